//! Reading a log: validate the header, walk the metadata chain back from EOLLocation, then
//! hand out the writes oldest first.

use bytes::Bytes;

use crate::checksum::byte_sum;
use crate::error::{Error, Warning};
use crate::format::{
    Entry, HEADER_SIZE, Header, MetadataHeader, OP_WRITE, RECORD_SIZE, VERSION_1,
    valid_metadata_size,
};
use lifeboat_source::{PlacedBuf, ReadAt};

/// How strictly to read, and what to verify.
///
/// The default is strict, verifies every non-zero DataChecksum, and does not salvage.
///
/// ```
/// use lifeboat_hrl::ReadOptions;
/// let fast = ReadOptions::default().verify_data(false); // metadata only
/// let torn = ReadOptions::lenient().salvage(true);      // recover an unclosed log
/// # let _ = (fast, torn);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOptions {
    strict: bool,
    verify_data: bool,
    salvage: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            strict: true,
            verify_data: true,
            salvage: false,
        }
    }
}

impl ReadOptions {
    /// Strict: every finding a correct writer never produces is an error (the default).
    pub fn strict() -> Self {
        ReadOptions::default()
    }

    /// Lenient: non-normative findings become [`Warning`]s, readable from
    /// [`Reader::warnings`]; entries with an unknown MetaOperation are skipped.
    pub fn lenient() -> Self {
        ReadOptions {
            strict: false,
            ..ReadOptions::default()
        }
    }

    /// Whether to read every payload when opening, to check non-zero DataChecksums
    /// (default `true`). [`Reader::read_payload`] checks each payload it reads either way.
    pub fn verify_data(mut self, yes: bool) -> Self {
        self.verify_data = yes;
        self
    }

    /// Whether a log that was not closed cleanly (EOLLocation 0) is salvaged: the
    /// longest valid prefix of metadata blocks is recovered and the rest reported as
    /// dropped (default `false`: such a log is [`Error::NotClosedCleanly`]).
    pub fn salvage(mut self, yes: bool) -> Self {
        self.salvage = yes;
        self
    }
}

/// A metadata block as found in the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// File offset of the block.
    pub offset: u64,
    /// Its 32-byte header.
    pub header: MetadataHeader,
    /// File offset of its first payload (the end of the previous block, or 4096).
    pub data_start: u64,
    /// Its used entries, slot 0 first (oldest write first).
    pub entries: Vec<Entry>,
}

/// One write of the log, as the metadata describes it (the payload is read separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WriteRef {
    /// Where on the virtual disk the payload goes.
    pub disk_offset: u64,
    /// Payload length.
    pub len: u32,
    /// File offset of the payload.
    pub file_offset: u64,
    /// When the write was logged, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// The entry's DataChecksum (0: not provided).
    pub data_checksum: u32,
    /// File offset of the metadata entry.
    pub entry_offset: u64,
}

impl WriteRef {
    /// The disk range `disk_offset .. disk_offset + len`.
    pub fn disk_range(&self) -> std::ops::Range<u64> {
        self.disk_offset..self.disk_offset + u64::from(self.len)
    }
}

/// What salvage recovered from a log that was not closed cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Salvage {
    /// One past the last valid metadata block: the effective EOLLocation.
    pub end: u64,
    /// Bytes after `end` that could not be attributed to any write and were dropped.
    pub dropped_bytes: u64,
}

/// A validated log over a [`ReadAt`] source.
///
/// Opening reads the header and the metadata blocks only (plus the payloads, once, when
/// [`ReadOptions::verify_data`] is on); memory is O(metadata), never O(log size). Writes come
/// out oldest first, the order they must be replayed in.
///
/// ```
/// use std::io::Cursor;
/// use lifeboat_hrl::{LogWriter, Reader, WriterConfig};
///
/// let mut w = LogWriter::new(Cursor::new(Vec::new()), WriterConfig::default())?;
/// w.write(4096, &[7; 512], 100)?;
/// let bytes = w.finish(101)?.0.into_inner();
///
/// let log = Reader::new(bytes.as_slice())?;
/// let writes: Vec<_> = log.writes_with_payloads().collect();
/// assert_eq!(writes.len(), 1);
/// assert_eq!(writes[0].0.disk_offset, 4096);
/// assert_eq!(writes[0].1, &[7; 512][..]);
/// # Ok::<(), lifeboat_hrl::Error>(())
/// ```
#[derive(Debug)]
pub struct Reader<S> {
    source: S,
    header: Header,
    blocks: Vec<Block>,
    warnings: Vec<Warning>,
    end: u64,
    salvage: Option<Salvage>,
}

/// Collects warnings; in strict mode the serious ones become errors.
struct Findings {
    strict: bool,
    warnings: Vec<Warning>,
}

impl Findings {
    fn note(&mut self, w: Warning) -> Result<(), Error> {
        if self.strict && w.is_strict_error() {
            return Err(Error::Strict(w));
        }
        self.warnings.push(w);
        Ok(())
    }
}

fn read_at<S: ReadAt + ?Sized>(src: &S, buf: &mut [u8], offset: u64) -> Result<(), Error> {
    src.read_exact_at(buf, offset)
        .map_err(|source| Error::Io { offset, source })
}

impl<S: ReadAt> Reader<S> {
    /// Opens `source` with the default options (strict, data verified).
    pub fn new(source: S) -> Result<Self, Error> {
        Self::with_options(source, ReadOptions::default())
    }

    /// Opens `source` with `options`.
    pub fn with_options(source: S, options: ReadOptions) -> Result<Self, Error> {
        let file_len = source
            .size()
            .map_err(|source| Error::Io { offset: 0, source })?;
        if file_len < HEADER_SIZE {
            return Err(Error::TooShort { len: file_len });
        }
        let mut raw = [0u8; 4096];
        read_at(&source, &mut raw, 0)?;
        let header = Header::decode(&raw);
        let mut findings = Findings {
            strict: options.strict,
            warnings: Vec::new(),
        };
        check_header(&header, &mut findings)?;
        let ms = u64::from(header.metadata_size);

        let (offsets, end, salvage) = if header.eol_location == 0 {
            if !options.salvage {
                return Err(Error::NotClosedCleanly);
            }
            let (offsets, end) = salvage_walk(&source, &header, file_len)?;
            let salvage = Salvage {
                end,
                dropped_bytes: file_len - end,
            };
            (offsets, end, Some(salvage))
        } else {
            let eol = header.eol_location;
            if eol == HEADER_SIZE {
                findings.note(Warning::EmptyLog)?;
                (Vec::new(), eol, None)
            } else {
                let min = HEADER_SIZE + ms;
                if eol < min || eol > file_len {
                    return Err(Error::EolOutOfBounds { eol, min, file_len });
                }
                (backward_walk(&source, eol, ms)?, eol, None)
            }
        };
        if salvage.is_none() {
            check_sizes(&header, file_len, &mut findings)?;
        }

        let mut blocks = Vec::with_capacity(offsets.len());
        let mut buf = vec![0u8; usize::try_from(ms).unwrap_or(usize::MAX)];
        let mut prev_end = HEADER_SIZE;
        for &m in &offsets {
            read_at(&source, &mut buf, m)?;
            let block = parse_block(&buf, m, prev_end, &header, &mut findings)?;
            prev_end = m + ms;
            blocks.push(block);
        }

        let counted: u64 = blocks.iter().map(|b| b.entries.len() as u64).sum();
        if salvage.is_none() && counted != header.total_metadata_entries {
            findings.note(Warning::TotalEntriesMismatch {
                header: header.total_metadata_entries,
                counted,
            })?;
        }

        let reader = Reader {
            source,
            header,
            blocks,
            warnings: findings.warnings,
            end,
            salvage,
        };
        if options.verify_data {
            reader.verify_data()?;
        }
        Ok(reader)
    }

    /// The header as stored.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The metadata blocks, oldest first.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// What lenient mode let through (empty in strict mode unless only soft findings).
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// What salvage recovered, when the log was salvaged.
    pub fn salvage(&self) -> Option<&Salvage> {
        self.salvage.as_ref()
    }

    /// One past the last metadata block: EOLLocation, or the salvaged end.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The source the log is read from.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Gives the source back.
    pub fn into_source(self) -> S {
        self.source
    }

    /// The writes, oldest first (block by block, slot 0 first): the replay order. Later
    /// writes to the same range win. Entries skipped in lenient mode are not included.
    pub fn writes(&self) -> impl Iterator<Item = WriteRef> + '_ {
        self.blocks.iter().flat_map(block_writes)
    }

    /// Total payload bytes of all writes.
    pub fn logged_bytes(&self) -> u64 {
        self.writes().map(|w| u64::from(w.len)).sum()
    }

    /// Reads the payload of `write` into `buf` (resized to fit), checking its
    /// DataChecksum when non-zero.
    pub fn read_payload(&self, write: &WriteRef, buf: &mut Vec<u8>) -> Result<(), Error> {
        buf.resize(write.len as usize, 0);
        read_at(&self.source, buf, write.file_offset)?;
        check_data(write, byte_sum(buf))
    }

    /// Calls `f` with each write and its payload, oldest first, borrowing the payload
    /// from memory when the source is in memory and reading it into one reused buffer
    /// otherwise. DataChecksums are checked as payloads are read.
    pub fn for_each_write<E: From<Error>>(
        &self,
        mut f: impl FnMut(&WriteRef, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        // Placed as the payloads lie in the file: the kernel copies them 3x faster so.
        let mut buf = PlacedBuf::default();
        for w in self.writes() {
            match self.source.as_slice() {
                Some(all) => {
                    let p = &all[payload_range(&w)];
                    check_data(&w, byte_sum(p))?;
                    f(&w, p)?;
                }
                None => {
                    let p = buf.slice(w.file_offset, w.len as usize);
                    read_at(&self.source, p, w.file_offset)?;
                    check_data(&w, byte_sum(p))?;
                    f(&w, p)?;
                }
            }
        }
        Ok(())
    }

    /// Reads every payload once (in large sequential reads) and checks every non-zero
    /// DataChecksum.
    pub fn verify_data(&self) -> Result<(), Error> {
        const CHUNK: u64 = 4 << 20;
        if let Some(all) = self.source.as_slice() {
            for w in self.writes() {
                check_data(&w, byte_sum(&all[payload_range(&w)]))?;
            }
            return Ok(());
        }
        let mut raw = PlacedBuf::default();
        for block in &self.blocks {
            // The data area of a block is contiguous and its entries tile it exactly.
            let mut writes = block_writes(block).peekable();
            let mut pos = block.data_start;
            let mut sum = 0u32;
            while pos < block.offset {
                let n = CHUNK.min(block.offset - pos);
                let buf = raw.slice(pos, n as usize);
                read_at(&self.source, buf, pos)?;
                let mut at = pos;
                let chunk_end = pos + n;
                while at < chunk_end {
                    let Some(w) = writes.peek() else { break };
                    let w_end = w.file_offset + u64::from(w.len);
                    if w.file_offset > at {
                        // A skipped (lenient) entry's payload: step over it.
                        at = w.file_offset.min(chunk_end);
                        continue;
                    }
                    let upto = w_end.min(chunk_end);
                    let part = &buf[(at - pos) as usize..(upto - pos) as usize];
                    sum = sum.wrapping_add(byte_sum(part));
                    at = upto;
                    if upto == w_end {
                        check_data(w, sum)?;
                        sum = 0;
                        writes.next();
                    }
                }
                pos = chunk_end;
            }
            for w in writes {
                // Zero-length writes at the end of the area.
                check_data(&w, 0)?;
            }
        }
        Ok(())
    }
}

impl<S: ReadAt> Reader<S> {
    /// The payload of `write`, borrowed from an in-memory source; `None` for a file
    /// source or a `write` from another log.
    pub fn payload(&self, write: &WriteRef) -> Option<&[u8]> {
        self.source.as_slice()?.get(payload_range(write))
    }

    /// Each write with its payload borrowed from an in-memory source, oldest first.
    /// Yields nothing for a file source (use [`Reader::for_each_write`]). Payloads were
    /// checked at open unless [`ReadOptions::verify_data`] was off.
    pub fn writes_with_payloads(&self) -> impl Iterator<Item = (WriteRef, &[u8])> + '_ {
        self.writes()
            .filter_map(move |w| Some((w, self.payload(&w)?)))
    }
}

impl Reader<Bytes> {
    /// The payload of `write` as a [`Bytes`] sharing the log's buffer (no copy).
    pub fn payload_bytes(&self, write: &WriteRef) -> Option<Bytes> {
        let r = payload_range(write);
        (r.end <= self.source.len()).then(|| self.source.slice(r))
    }
}

fn payload_range(w: &WriteRef) -> std::ops::Range<usize> {
    let start = w.file_offset as usize;
    start..start + w.len as usize
}

fn check_data(w: &WriteRef, sum: u32) -> Result<(), Error> {
    if w.data_checksum != 0 && !sum != w.data_checksum {
        return Err(Error::DataChecksum {
            offset: w.file_offset,
            entry: w.entry_offset,
            expected: !sum,
            found: w.data_checksum,
        });
    }
    Ok(())
}

fn block_writes(block: &Block) -> impl Iterator<Item = WriteRef> + '_ {
    let mut file_offset = block.data_start;
    block.entries.iter().enumerate().filter_map(move |(i, e)| {
        let at = file_offset;
        file_offset += u64::from(e.data_length);
        (e.meta_operation == OP_WRITE).then_some(WriteRef {
            disk_offset: e.byte_offset,
            len: e.data_length,
            file_offset: at,
            timestamp: e.timestamp,
            data_checksum: e.data_checksum,
            entry_offset: block.offset + RECORD_SIZE * (1 + i as u64),
        })
    })
}

fn check_header(h: &Header, findings: &mut Findings) -> Result<(), Error> {
    // The checksum first: a header that fails it cannot be trusted in any field.
    let expected = h.computed_checksum();
    if expected != h.checksum {
        return Err(Error::HeaderChecksum {
            expected,
            found: h.checksum,
        });
    }
    if h.cookie[..7] != *b"msctlog" || !matches!(h.cookie[7], 0 | b' ') {
        return Err(Error::BadCookie { found: h.cookie });
    }
    if h.cookie[7] == b' ' {
        findings.note(Warning::CookieTrailingBlank)?;
    }
    let major = h.log_format_version >> 16;
    if major != 1 && major != 2 {
        return Err(Error::UnsupportedVersion {
            found: h.log_format_version,
        });
    }
    if h.log_format_version & 0xFFFF != 0 {
        findings.note(Warning::MinorVersion {
            found: h.log_format_version,
        })?;
    }
    let ms = h.metadata_size;
    if !valid_metadata_size(ms) {
        return Err(Error::BadMetadataSize { found: ms });
    }
    if !ms.is_multiple_of(512) {
        findings.note(Warning::MetadataSizeNotMultipleOf512 { found: ms })?;
    }
    if h.file_type != 0 {
        findings.note(Warning::FileType { found: h.file_type })?;
    }
    if h.flags != [0, 0] {
        findings.note(Warning::FlagsNonZero { found: h.flags })?;
    }
    let v1_reserved = h.log_format_version == VERSION_1 && h.vhd2_data_write_guid != [0; 16];
    if let Some(i) = h.reserved.iter().position(|&b| b != 0) {
        findings.note(Warning::HeaderReservedNonZero {
            offset: 126 + i as u64,
        })?;
    } else if v1_reserved {
        findings.note(Warning::HeaderReservedNonZero { offset: 110 })?;
    }
    Ok(())
}

fn check_sizes(h: &Header, file_len: u64, findings: &mut Findings) -> Result<(), Error> {
    if h.current_size != file_len {
        findings.note(Warning::CurrentSizeMismatch {
            current_size: h.current_size,
            file_len,
        })?;
    }
    if h.eol_location > h.current_size {
        findings.note(Warning::EolBeyondCurrentSize {
            eol: h.eol_location,
            current_size: h.current_size,
        })?;
    }
    Ok(())
}

/// Walks PreviousMetadataLocation links back from the last block; returns the block
/// offsets oldest first.
fn backward_walk<S: ReadAt>(src: &S, eol: u64, ms: u64) -> Result<Vec<u64>, Error> {
    let max_blocks = (eol - HEADER_SIZE) / ms + 1;
    let mut offsets = Vec::new();
    let mut cur = eol - ms;
    let mut field = [0u8; 8];
    loop {
        offsets.push(cur);
        read_at(src, &mut field, cur)?;
        let distance = u64::from_le_bytes(field);
        if distance == 0 {
            break;
        }
        let reason = if distance < ms {
            Some("is smaller than MetadataSize (blocks would overlap)")
        } else if distance > cur - HEADER_SIZE {
            Some("points into or before the header")
        } else if offsets.len() as u64 >= max_blocks {
            Some("makes the chain longer than the file can hold")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Error::BrokenChain {
                offset: cur,
                distance,
                reason,
            });
        }
        cur -= distance;
    }
    offsets.reverse();
    Ok(offsets)
}

/// Decodes and validates one metadata block read into `raw` (MetadataSize bytes).
fn parse_block(
    raw: &[u8],
    offset: u64,
    data_start: u64,
    h: &Header,
    findings: &mut Findings,
) -> Result<Block, Error> {
    let header = MetadataHeader::decode(raw);
    let expected = MetadataHeader::computed_checksum(raw);
    if expected != header.checksum {
        return Err(Error::MetadataChecksum {
            offset,
            expected,
            found: header.checksum,
        });
    }
    if header.reserved != [0; 16] {
        findings.note(Warning::MetadataReservedNonZero { offset })?;
    }
    let slots = h.slots_per_block();
    let valid = header.valid_metadata_entries;
    if valid > slots {
        return Err(Error::TooManyEntries {
            offset: offset + 8,
            found: valid,
            slots,
        });
    }
    let mut entries = Vec::with_capacity(valid as usize);
    let mut total = 0u64;
    for i in 0..valid as usize {
        let at = offset + RECORD_SIZE * (1 + i as u64);
        let bytes = &raw[32 * (1 + i)..32 * (2 + i)];
        let e = Entry::decode(bytes);
        let expected = Entry::computed_checksum(bytes);
        if expected != e.checksum {
            return Err(Error::EntryChecksum {
                offset: at,
                expected,
                found: e.checksum,
            });
        }
        if e.meta_operation != OP_WRITE {
            if findings.strict {
                return Err(Error::UnsupportedOperation {
                    offset: at,
                    found: e.meta_operation,
                });
            }
            findings.note(Warning::SkippedOperation {
                offset: at,
                found: e.meta_operation,
            })?;
        }
        if e.location != 0 {
            findings.note(Warning::LocationNonZero {
                offset: at,
                found: e.location,
            })?;
        }
        if e.reserved != [0; 6] {
            findings.note(Warning::EntryReservedNonZero { offset: at })?;
        }
        if e.data_length == 0 {
            findings.note(Warning::ZeroLengthWrite { offset: at })?;
        }
        if e.byte_offset
            .checked_add(u64::from(e.data_length))
            .is_none()
        {
            return Err(Error::DiskRangeOverflow {
                offset: at,
                disk_offset: e.byte_offset,
                len: u64::from(e.data_length),
            });
        }
        total += u64::from(e.data_length);
        entries.push(e);
    }
    let area = offset - data_start;
    if total != area {
        return Err(Error::PayloadMismatch {
            offset,
            expected: area,
            found: total,
        });
    }
    let used_end = 32 * (1 + valid as usize);
    if let Some(i) = raw[used_end..].iter().position(|&b| b != 0) {
        findings.note(Warning::UnusedSlotNonZero {
            offset: offset + (used_end + i / 32 * 32) as u64,
        })?;
    }
    Ok(Block {
        offset,
        header,
        data_start,
        entries,
    })
}

/// Forward walk for a log whose EOLLocation is 0: accept each metadata block that fits
/// exactly after the previous one (MS-HRL reference §4.4). Returns the accepted block
/// offsets and the end of the last one.
fn salvage_walk<S: ReadAt>(src: &S, h: &Header, file_len: u64) -> Result<(Vec<u64>, u64), Error> {
    const WINDOW: u64 = 1 << 20;
    let ms = u64::from(h.metadata_size);
    // No block fits: nothing to salvage, and nothing sized by the header is allocated.
    if HEADER_SIZE + ms > file_len {
        return Err(Error::NothingToSalvage);
    }
    let slots = u64::from(h.slots_per_block());
    let mut offsets = Vec::new();
    let mut prev_start: Option<u64> = None;
    let mut prev_end = HEADER_SIZE;
    let mut block = vec![0u8; ms as usize];
    let mut window = Vec::new();
    let mut window_start = 0u64;
    let mut m = prev_end;
    while m + ms <= file_len {
        // Cheap filter on the 32-byte header through a sliding window.
        if m < window_start || m + RECORD_SIZE > window_start + window.len() as u64 {
            let n = WINDOW.min(file_len - m);
            window.resize(n as usize, 0);
            read_at(src, &mut window, m)?;
            window_start = m;
        }
        let at = (m - window_start) as usize;
        let head = &window[at..at + 32];
        let want = prev_start.map_or(0, |p| m - p);
        let plausible = u64::from_le_bytes(head[0..8].try_into().unwrap_or([0xFF; 8])) == want
            && head[16..32].iter().all(|&b| b == 0)
            && MetadataHeader::computed_checksum(head) == MetadataHeader::decode(head).checksum
            && u64::from(MetadataHeader::decode(head).valid_metadata_entries) <= slots;
        if plausible {
            read_at(src, &mut block, m)?;
            let mut strict = Findings {
                strict: true,
                warnings: Vec::new(),
            };
            if parse_block(&block, m, prev_end, h, &mut strict).is_ok() {
                offsets.push(m);
                prev_start = Some(m);
                prev_end = m + ms;
                m = prev_end;
                continue;
            }
        }
        m += 1;
    }
    if offsets.is_empty() {
        return Err(Error::NothingToSalvage);
    }
    Ok((offsets, prev_end))
}
