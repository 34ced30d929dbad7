//! The VHDX log ([MS-VHDX] 2.3), replayed in memory: a file whose header has a LogGuid
//! set may hold metadata and BAT updates that reached the log but not their place. They
//! are applied to an [`Overlay`] the reader reads the file through; the file itself is
//! never written (it may be a live disk or a VSS snapshot).

use std::collections::BTreeMap;
use std::ops::Range;

use lifeboat_source::ReadAt;

use crate::error::{Error, Result};
use crate::format::*;

/// Log sectors are 4 KiB.
const SECTOR: usize = 4096;
/// An entry header is 64 bytes; each descriptor 32.
const ENTRY_HEADER: usize = 64;
const DESCRIPTOR: usize = 32;
/// Logs larger than this are refused rather than read whole (Hyper-V makes 1 MiB logs).
const MAX_LOG: u64 = 256 * MIB;

/// What a replayed log changed in the file: whole 4 KiB sectors written, ranges zeroed,
/// and the file's length afterwards (LastFileOffset may lie past the end).
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    /// Sectors written, by file offset; each newer than any zero range covering it.
    data: BTreeMap<u64, Box<[u8]>>,
    /// Ranges zeroed.
    zeros: Vec<Range<u64>>,
    /// The file's length on disk.
    file_len: u64,
    /// The file's length after replay.
    len: u64,
}

impl Overlay {
    /// The file's length after replay.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Fills `buf` with the replayed file's bytes at `offset`.
    pub(crate) fn read(&self, source: &dyn ReadAt, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        // What the file holds (bytes past its end, below the replayed length, are zeros).
        let on_disk = end.min(self.file_len).saturating_sub(offset) as usize;
        if on_disk > 0 {
            source
                .read_exact_at(&mut buf[..on_disk], offset)
                .map_err(|e| Error::Io { offset, source: e })?;
        }
        buf[on_disk..].fill(0);
        let clip = |r: &Range<u64>| {
            let (a, b) = (r.start.max(offset), r.end.min(end));
            (a < b).then(|| ((a - offset) as usize, (b - offset) as usize))
        };
        for z in &self.zeros {
            if let Some((a, b)) = clip(z) {
                buf[a..b].fill(0);
            }
        }
        let first = offset.saturating_sub(SECTOR as u64 - 1);
        for (&at, sector) in self.data.range(first..end) {
            if let Some((a, b)) = clip(&(at..at + SECTOR as u64)) {
                let from = (offset + a as u64 - at) as usize;
                buf[a..b].copy_from_slice(&sector[from..from + (b - a)]);
            }
        }
        Ok(())
    }

    fn zero(&mut self, range: Range<u64>) {
        let inside: Vec<u64> = self.data.range(range.clone()).map(|(k, _)| *k).collect();
        for k in inside {
            self.data.remove(&k);
        }
        self.zeros.push(range);
    }
}

/// One descriptor of an entry.
enum Descriptor {
    /// Write this 4 KiB sector at the file offset.
    Data { offset: u64, sector: Box<[u8]> },
    /// Zero this range.
    Zero { range: Range<u64> },
}

/// A valid entry: where it starts in the log, its fields, its descriptors.
struct Entry {
    at: u64,
    len: u64,
    seq: u64,
    tail: u64,
    flushed: u64,
    last: u64,
    descriptors: Vec<Descriptor>,
}

/// The log region, read whole, with reads that wrap around its end.
struct Ring<'a> {
    log: &'a [u8],
    /// The log's file offset (for messages).
    base: u64,
}

impl Ring<'_> {
    fn len(&self) -> u64 {
        self.log.len() as u64
    }

    /// `n` bytes from `at`, wrapping.
    fn bytes(&self, at: u64, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        let mut pos = (at % self.len()) as usize;
        while out.len() < n {
            let take = (n - out.len()).min(self.log.len() - pos);
            out.extend_from_slice(&self.log[pos..pos + take]);
            pos = (pos + take) % self.log.len();
        }
        out
    }

    /// The entry starting at `at`, if it is whole and valid for `guid`.
    fn entry(&self, at: u64, guid: &[u8; 16]) -> Option<Entry> {
        let head = self.bytes(at, ENTRY_HEADER);
        if &head[0..4] != b"loge" {
            return None;
        }
        let len = u64::from(u32_at(&head, 8));
        if len == 0 || !len.is_multiple_of(SECTOR as u64) || len > self.len() {
            return None;
        }
        let (tail, seq, count) = (
            u64::from(u32_at(&head, 12)),
            u64_at(&head, 16),
            u32_at(&head, 24) as usize,
        );
        if guid_at(&head, 32) != *guid || seq == 0 || !tail.is_multiple_of(SECTOR as u64) {
            return None;
        }
        let desc_sectors = (ENTRY_HEADER + count * DESCRIPTOR).div_ceil(SECTOR) as u64;
        if desc_sectors * SECTOR as u64 > len {
            return None;
        }
        let whole = self.bytes(at, len as usize);
        if u32_at(&whole, 4) != checksum_with_zeroed(&whole, 4) {
            return None;
        }
        let mut descriptors = Vec::with_capacity(count);
        let mut data = desc_sectors as usize;
        for k in 0..count {
            let d = &whole[ENTRY_HEADER + k * DESCRIPTOR..][..DESCRIPTOR];
            let offset = u64_at(d, 16);
            if u64_at(d, 24) != seq || !offset.is_multiple_of(SECTOR as u64) {
                return None;
            }
            match &d[0..4] {
                b"zero" => {
                    let n = u64_at(d, 8);
                    if !n.is_multiple_of(SECTOR as u64) {
                        return None;
                    }
                    descriptors.push(Descriptor::Zero {
                        range: offset..offset.checked_add(n)?,
                    });
                }
                b"desc" => {
                    let s = whole.get(data * SECTOR..(data + 1) * SECTOR)?;
                    let sector_seq = (u64::from(u32_at(s, 4)) << 32) | u64::from(u32_at(s, 4092));
                    if &s[0..4] != b"data" || sector_seq != seq {
                        return None;
                    }
                    let mut sector = vec![0u8; SECTOR].into_boxed_slice();
                    sector[..8].copy_from_slice(&d[8..16]);
                    sector[8..4092].copy_from_slice(&s[8..4092]);
                    sector[4092..].copy_from_slice(&d[4..8]);
                    descriptors.push(Descriptor::Data { offset, sector });
                    data += 1;
                }
                _ => return None,
            }
        }
        Some(Entry {
            at,
            len,
            seq,
            tail,
            flushed: u64_at(&head, 48),
            last: u64_at(&head, 56),
            descriptors,
        })
    }
}

/// Replays the log the current header names (LogGuid `guid`, LogOffset, LogLength) into an
/// overlay of the file: the newest complete sequence of entries whose head's tail lies in
/// it, from that tail to its head (spec 2.3.3). No valid entry: nothing to replay.
pub(crate) fn replay(
    source: &dyn ReadAt,
    file_len: u64,
    header_at: u64,
    guid: [u8; 16],
    log_offset: u64,
    log_len: u64,
) -> Result<Overlay> {
    if log_len == 0
        || !log_len.is_multiple_of(MIB)
        || !log_offset.is_multiple_of(MIB)
        || log_offset < MIB
        || log_offset.saturating_add(log_len) > file_len
    {
        return Err(Error::invalid(
            "header's log location",
            header_at + 68,
            format!(
                "a MiB-aligned log of whole MiBs after the first MiB, within the file ({file_len} bytes)"
            ),
            format!("{log_len} bytes at {log_offset}"),
        ));
    }
    if log_len > MAX_LOG {
        return Err(Error::unsupported(
            format!("a log of {log_len} bytes"),
            log_offset,
            "logs over 256 MiB are not replayed (Hyper-V writes 1 MiB logs)",
        ));
    }
    let mut log = vec![0u8; log_len as usize];
    source
        .read_exact_at(&mut log, log_offset)
        .map_err(|e| Error::Io {
            offset: log_offset,
            source: e,
        })?;
    let ring = Ring {
        log: &log,
        base: log_offset,
    };
    let sectors = log_len / SECTOR as u64;
    let mut parsed: Vec<Option<Option<std::rc::Rc<Entry>>>> = vec![None; sectors as usize];
    let mut entry_at = |i: u64| -> Option<std::rc::Rc<Entry>> {
        parsed[i as usize]
            .get_or_insert_with(|| ring.entry(i * SECTOR as u64, &guid).map(std::rc::Rc::new))
            .clone()
    };
    // Every maximal sequence: entries back to back, each sequence number one more.
    let mut in_sequence = vec![false; sectors as usize];
    let mut best: Option<Vec<std::rc::Rc<Entry>>> = None;
    for start in 0..sectors {
        if in_sequence[start as usize] {
            continue;
        }
        let Some(first) = entry_at(start) else {
            continue;
        };
        let mut seq = vec![first];
        loop {
            let last = seq.last().expect("one entry at least");
            let next = (last.at + last.len) % log_len / SECTOR as u64;
            if seq.len() as u64 >= sectors || seq.iter().any(|e| e.at / SECTOR as u64 == next) {
                break;
            }
            match entry_at(next) {
                Some(e) if e.seq == last.seq + 1 => seq.push(e),
                _ => break,
            }
        }
        for e in &seq {
            in_sequence[(e.at / SECTOR as u64) as usize] = true;
        }
        let head = seq.last().expect("one entry at least");
        // The head's tail must be an entry of the sequence.
        let Some(tail) = seq.iter().position(|e| e.at == head.tail) else {
            continue;
        };
        if best
            .as_ref()
            .is_none_or(|b| b.last().expect("non-empty").seq < head.seq)
        {
            best = Some(seq.split_off(tail));
        }
    }
    let mut overlay = Overlay {
        file_len,
        len: file_len,
        ..Overlay::default()
    };
    let Some(active) = best else {
        return Ok(overlay);
    };
    let head = active.last().expect("non-empty");
    if head.flushed > file_len {
        return Err(Error::invalid(
            "log entry",
            ring.base + head.at + 48,
            format!("a FlushedFileOffset within the file ({file_len} bytes)"),
            format!("{} (the file was truncated)", head.flushed),
        ));
    }
    overlay.len = file_len.max(head.last);
    for e in &active {
        for d in &e.descriptors {
            match d {
                Descriptor::Data { offset, sector } => {
                    overlay.data.insert(*offset, sector.clone());
                }
                Descriptor::Zero { range } => overlay.zero(range.clone()),
            }
        }
    }
    Ok(overlay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_reads_sectors_over_zeros_over_the_file() {
        let file = vec![1u8; 3 * SECTOR];
        let mut o = Overlay {
            file_len: file.len() as u64,
            len: 5 * SECTOR as u64,
            ..Overlay::default()
        };
        o.data.insert(0, vec![2u8; SECTOR].into_boxed_slice());
        o.zero(0..2 * SECTOR as u64);
        o.data
            .insert(SECTOR as u64, vec![3u8; SECTOR].into_boxed_slice());
        o.data
            .insert(4 * SECTOR as u64, vec![4u8; SECTOR].into_boxed_slice());
        let mut buf = vec![9u8; 5 * SECTOR - 10];
        o.read(&file.as_slice(), &mut buf, 10).unwrap();
        let want: Vec<u8> = [0u8; SECTOR - 10]
            .iter()
            .chain(&[3u8; SECTOR])
            .chain(&[1u8; SECTOR])
            .chain(&[0u8; SECTOR])
            .chain(&[4u8; SECTOR])
            .copied()
            .collect();
        assert_eq!(buf, want);
    }
}
