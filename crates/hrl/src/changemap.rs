//! Folding one or more logs into the final content of each changed disk range.

use std::collections::BTreeMap;

use crate::error::Error;
use crate::reader::{Reader, WriteRef};
use lifeboat_source::ReadAt;

/// A disk range whose final bytes come from one place in one log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Piece {
    /// Where the range starts on the disk.
    pub disk_offset: u64,
    /// Its length (never 0).
    pub len: u64,
    /// Which log (its position in the chain, from 0) holds the bytes.
    pub log: usize,
    /// Where in that log the bytes start.
    pub file_offset: u64,
}

impl Piece {
    /// One past the last disk byte.
    pub fn disk_end(&self) -> u64 {
        self.disk_offset + self.len
    }
}

/// A maximal run of changed disk bytes: adjacent pieces merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Where the run starts on the disk.
    pub disk_offset: u64,
    /// Its length.
    pub len: u64,
    /// Where its bytes come from, in disk order, tiling the run exactly.
    pub pieces: Vec<Piece>,
}

/// The minimal set of final extents of a chain of logs: later writes override earlier ones
/// and adjacent ranges merge, so a shipper reads and sends each final byte once.
///
/// Pieces point into the logs (log index and file offset); no payload is held in memory.
///
/// ```
/// use std::io::Cursor;
/// use lifeboat_hrl::{ChangeMap, LogWriter, Reader, WriterConfig};
///
/// let mut w = LogWriter::new(Cursor::new(Vec::new()), WriterConfig::default())?;
/// w.write(0, &[1; 1024], 1)?;
/// w.write(512, &[2; 1024], 2)?; // overlaps the second half of the first write
/// let bytes = w.finish(3)?.0.into_inner();
///
/// let mut map = ChangeMap::new();
/// map.add_log(&Reader::new(bytes.as_slice())?)?;
/// assert_eq!(map.logged_bytes(), 2048);
/// assert_eq!(map.unique_bytes(), 1536);
/// let extents = map.extents();
/// assert_eq!((extents.len(), extents[0].len, extents[0].pieces.len()), (1, 1536, 2));
/// # Ok::<(), lifeboat_hrl::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct ChangeMap {
    pieces: BTreeMap<u64, Piece>,
    logged: u64,
    unique: u64,
    logs: usize,
    last_id: Option<[u8; 16]>,
}

impl ChangeMap {
    /// An empty map.
    pub fn new() -> Self {
        ChangeMap::default()
    }

    /// Folds in the next log of the chain and returns its index. Its PreviousUniqueId must
    /// be the UniqueId of the log added before it ([`Error::ChainLink`] otherwise).
    pub fn add_log<S: ReadAt>(&mut self, log: &Reader<S>) -> Result<usize, Error> {
        let h = log.header();
        if let Some(expected) = self.last_id
            && h.previous_unique_id != expected
        {
            return Err(Error::ChainLink {
                index: self.logs,
                prev: self.logs - 1,
                expected,
                found: h.previous_unique_id,
            });
        }
        let index = self.logs;
        for w in log.writes() {
            self.add_write(index, &w);
        }
        self.logs = index + 1;
        self.last_id = Some(h.unique_id);
        Ok(index)
    }

    /// Records one write from log `log`, overriding whatever earlier writes said about
    /// its range. Writes must be added in replay order.
    pub fn add_write(&mut self, log: usize, w: &WriteRef) {
        let len = u64::from(w.len);
        self.logged += len;
        if len == 0 {
            return;
        }
        self.logs = self.logs.max(log + 1);
        let (start, end) = (w.disk_offset, w.disk_offset + len);

        // A piece starting before `start` may reach into the range: keep its head, and
        // its tail if it also reaches past `end`.
        if let Some((_, &p)) = self.pieces.range(..start).next_back()
            && p.disk_end() > start
        {
            self.pieces.insert(
                p.disk_offset,
                Piece {
                    len: start - p.disk_offset,
                    ..p
                },
            );
            self.unique -= p.disk_end() - start;
            if p.disk_end() > end {
                let tail = tail_of(&p, end);
                self.unique += tail.len;
                self.pieces.insert(end, tail);
            }
        }
        // Pieces starting inside the range are replaced; the last may leave a tail.
        let inside: Vec<u64> = self.pieces.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            if let Some(p) = self.pieces.remove(&k) {
                self.unique -= p.len;
                if p.disk_end() > end {
                    let tail = tail_of(&p, end);
                    self.unique += tail.len;
                    self.pieces.insert(end, tail);
                }
            }
        }
        self.pieces.insert(
            start,
            Piece {
                disk_offset: start,
                len,
                log,
                file_offset: w.file_offset,
            },
        );
        self.unique += len;
    }

    /// The pieces in disk order; they never overlap.
    pub fn pieces(&self) -> impl Iterator<Item = &Piece> + '_ {
        self.pieces.values()
    }

    /// The changed runs in disk order, adjacent pieces merged.
    pub fn extents(&self) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for p in self.pieces.values() {
            match out.last_mut() {
                Some(e) if e.disk_offset + e.len == p.disk_offset => {
                    e.len += p.len;
                    e.pieces.push(*p);
                }
                _ => out.push(Extent {
                    disk_offset: p.disk_offset,
                    len: p.len,
                    pieces: vec![*p],
                }),
            }
        }
        out
    }

    /// Payload bytes of every write folded in, overwritten or not.
    pub fn logged_bytes(&self) -> u64 {
        self.logged
    }

    /// Distinct disk bytes changed: what a shipper sends.
    pub fn unique_bytes(&self) -> u64 {
        self.unique
    }

    /// Logs folded in.
    pub fn logs(&self) -> usize {
        self.logs
    }
}

fn tail_of(p: &Piece, from: u64) -> Piece {
    let cut = from - p.disk_offset;
    Piece {
        disk_offset: from,
        len: p.len - cut,
        log: p.log,
        file_offset: p.file_offset + cut,
    }
}
