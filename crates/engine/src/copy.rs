//! Reading a copy piece of a disk (initial replication) on a blocking thread, a segment at
//! a time: each segment is read into one of a few reused buffers, its blocks hashed while
//! the CPU's caches hold them, and handed to the sender, which sends it while the next
//! is read. Nothing of the piece is held whole.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use lifeboat_pageblob::{BatchDigests, Change, MAX_PUT};
use lifeboat_resync::{BlockSize, Digest};
use tokio::sync::mpsc;

use crate::data::{self, Buffers};
use crate::error::{Error, Result, joined};
use crate::host::{Disk, Host};

/// Bytes of a piece read, hashed and handed on at a time (a Put Page's most): a segment
/// being read and the few waiting to be sent fit the CPU's last-level cache, where a
/// piece (64 MiB) held whole did not: writing it out then read it from memory again, and
/// its two buffers' first touch cost a page fault per 4 KiB (ADR 0008).
pub(crate) const SEGMENT: u64 = MAX_PUT;

/// Segments a piece's reader may have read ahead of the sender.
const SEGMENTS_AHEAD: usize = 2;

/// Bytes of a segment read at a time: each stride's blocks are hashed right after its
/// read, while the CPU's cache holds them.
const READ_STRIDE: u64 = 1 << 20;

/// Blocks of holes, at most, that a copy piece of holes skips with it in one action and
/// one fence read (64 GiB of 64 KiB blocks; their pieces are listed to ask the digests).
const HOLE_RUN_BLOCKS: u64 = 1 << 20;

/// What a piece's reader hands on, in order: the layout, each segment, the end.
#[derive(Debug)]
pub(crate) enum Read {
    /// Where the piece holds data.
    Layout(Layout),
    /// The next segment, read and hashed.
    Segment(Segment),
    /// Every segment was handed on.
    End,
}

/// Where a copy piece holds data, as its disk says before it is read.
#[derive(Debug)]
pub(crate) struct Layout {
    /// The piece's ranges of data (page-aligned, in order, apart): the rest are holes.
    pub(crate) data: Vec<Range<u64>>,
    /// For a piece of holes only: where the run of holes it begins ends (its own end, or
    /// further: the copy may skip the whole run in this action). No segment follows.
    pub(crate) holes_until: Option<u64>,
}

/// A segment of a copy piece, read and hashed.
#[derive(Debug)]
pub(crate) struct Segment {
    /// The bytes of the disk it covers.
    pub(crate) window: Range<u64>,
    /// Its bytes as changes: holes and zero runs as zero runs, the rest as data.
    pub(crate) changes: Vec<Change>,
    /// The buffer the data changes slice, for [`Buffers::give`] once they are sent.
    pub(crate) buffer: Bytes,
    /// The digests of the blocks the changes cover, hashed as they were read
    /// ([`BatchDigests::of_hashed`]); a block the segment covers only in part is left to
    /// be read back after the batch lands.
    pub(crate) digests: BatchDigests,
}

/// A copy piece being read on a blocking thread.
#[derive(Debug)]
pub(crate) struct PieceReader {
    read: mpsc::Receiver<Result<Read>>,
    thread: tokio::task::JoinHandle<()>,
}

/// What a [`PieceReader`] reads: a piece of a disk.
pub(crate) struct PieceSpec {
    /// The host whose disk it is.
    pub(crate) host: Arc<dyn Host>,
    /// The disk's path and size.
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    /// The piece.
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// The replica's block size.
    pub(crate) block_size: u32,
    /// Bytes read and handed on at a time ([`SEGMENT`]).
    pub(crate) segment: u64,
}

impl PieceReader {
    /// Starts reading a piece on tokio's blocking pool, through `buffers`. Dropping the
    /// reader stops the read at its next segment.
    pub(crate) fn start(spec: PieceSpec, buffers: Arc<Buffers>) -> Self {
        let (tx, read) = mpsc::channel(SEGMENTS_AHEAD);
        let thread = tokio::task::spawn_blocking(move || {
            if let Err(e) = read_piece(&spec, &buffers, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        PieceReader { read, thread }
    }

    /// What the reader hands on next. A reader that stopped before its end (a panic)
    /// says so, never ends the piece early.
    pub(crate) async fn next(&mut self) -> Result<Read> {
        if let Some(r) = self.read.recv().await {
            return r;
        }
        joined((&mut self.thread).await, "reading a disk")?;
        Err(Error::Invalid(
            "the reader of a copy piece stopped before the piece's end".into(),
        ))
    }
}

/// Reads a piece: its layout, then (unless it is all holes) each segment, a segment of
/// holes as one zero run, then the end; stops, without an error, when nobody takes what
/// it hands on.
fn read_piece(spec: &PieceSpec, buffers: &Buffers, tx: &mpsc::Sender<Result<Read>>) -> Result<()> {
    let bs = BlockSize::new(spec.block_size)?;
    let (path, offset, len) = (&spec.path, spec.offset, spec.len);
    let end = offset + len;
    let src = crate::actions::open_source(&*spec.host, path, spec.size)?;
    let what = || format!("reading disk {}", path.display());
    let named = src.data_ranges(offset, len).map_err(Error::io(what()))?;
    let data = data::page_aligned(&named, offset..end);
    let holes_until = match named.is_empty() {
        true => {
            let limit = HOLE_RUN_BLOCKS * u64::from(bs.get());
            Some(holes_until(&*src, path, end, len, limit, spec.size)?)
        }
        false => None,
    };
    let layout = Layout {
        data: data.clone(),
        holes_until,
    };
    if tx.blocking_send(Ok(Read::Layout(layout))).is_err() || data.is_empty() {
        return Ok(());
    }
    // Blocks larger than a segment: a segment of one block.
    let step = spec.segment.max(u64::from(bs.get()));
    let mut at = offset;
    while at < end {
        let to = ((at / step + 1) * step).min(end);
        let inside = data::page_aligned(&data, at..to);
        let segment = read_window(&*src, path, at..to, &inside, buffers, bs, spec.size)?;
        if tx.blocking_send(Ok(Read::Segment(segment))).is_err() {
            return Ok(());
        }
        at = to;
    }
    let _ = tx.blocking_send(Ok(Read::End));
    Ok(())
}

/// Reads the `data` ranges (page-aligned, in order, apart) of `window` of a disk of
/// `size` bytes into a buffer of `buffers`, hashing each block as it goes: the window
/// as changes, and their digests. A block the window holds whole is hashed from the
/// buffer, its holes zeroed there first.
pub(crate) fn read_window(
    src: &dyn Disk,
    path: &Path,
    window: Range<u64>,
    data: &[Range<u64>],
    buffers: &Buffers,
    block_size: BlockSize,
    size: u64,
) -> Result<Segment> {
    if data.is_empty() {
        let changes = vec![Change::Zero {
            offset: window.start,
            len: window.end - window.start,
        }];
        let digests = BatchDigests::of(&changes, block_size, size);
        return Ok(Segment {
            window,
            changes,
            buffer: Bytes::new(),
            digests,
        });
    }
    let what = || format!("reading disk {}", path.display());
    let (mut buf, start) = buffers.take((window.end - window.start) as usize, window.start);
    // Where disk byte `at` of the window lies in the buffer.
    let place = |at: u64| start + (at - window.start) as usize;
    let mut hashed = Vec::new();
    for r in data {
        let mut at = r.start;
        while at < r.end {
            let to = ((at / READ_STRIDE + 1) * READ_STRIDE).min(r.end);
            let bytes = &mut buf[place(at)..place(to)];
            src.read_exact_at(bytes, at).map_err(Error::io(what()))?;
            data::hash_whole_blocks(bytes, at, block_size, &mut hashed);
            at = to;
        }
    }
    hash_mixed_blocks(
        &mut buf,
        place(window.start),
        &window,
        data,
        block_size,
        size,
        &mut hashed,
    );
    hashed.sort_unstable_by_key(|&(b, _)| b);
    let all = Bytes::from(buf);
    let mut changes = Vec::new();
    let mut at = window.start;
    for r in data {
        if at < r.start {
            changes.push(Change::Zero {
                offset: at,
                len: r.start - at,
            });
        }
        let bytes = all.slice(place(r.start)..place(r.end));
        changes.extend(data::split_zero_runs(r.start, bytes));
        at = r.end;
    }
    if at < window.end {
        changes.push(Change::Zero {
            offset: at,
            len: window.end - at,
        });
    }
    let digests = BatchDigests::of_hashed(&changes, block_size, size, |b| {
        let i = hashed.binary_search_by_key(&b, |&(k, _)| k).ok()?;
        Some(hashed[i].1)
    });
    Ok(Segment {
        window,
        changes,
        buffer: all,
        digests,
    })
}

/// Appends the digest of each block of `window` that holds data in part (the rest
/// holes), if the window holds it whole: its holes zeroed in `buf` (the window's bytes
/// from `at`, data ranges read), it is hashed as the window's changes hold it. A data
/// range off the blocks' bounds (a sparse file's 4 KiB extents) leaves such blocks at
/// its ends; without this they would be read back after the batch.
fn hash_mixed_blocks(
    buf: &mut [u8],
    at: usize,
    window: &Range<u64>,
    data: &[Range<u64>],
    block_size: BlockSize,
    size: u64,
    out: &mut Vec<(u64, Digest)>,
) {
    let bs = u64::from(block_size.get());
    let mut ends: Vec<u64> = data
        .iter()
        .flat_map(|r| [r.start / bs, (r.end - 1) / bs])
        .collect();
    ends.dedup();
    for b in ends {
        let br = block_size.range(b, size);
        if br.start < window.start || br.end > window.end {
            continue;
        }
        let first = data.partition_point(|r| r.end <= br.start);
        let inside = data[first..].iter().take_while(|r| r.start < br.end);
        let covered: u64 = inside
            .clone()
            .map(|r| r.end.min(br.end) - r.start.max(br.start))
            .sum();
        if covered == br.end - br.start {
            // Data whole: hashed as it was read (unless all zeros: a zero run then).
            continue;
        }
        let mut from = br.start;
        for r in inside.chain(std::iter::once(&(br.end..br.end))) {
            let to = r.start.max(from);
            let hole = at + (from - window.start) as usize..at + (to - window.start) as usize;
            buf[hole].fill(0);
            from = r.end.min(br.end).max(from);
        }
        let block =
            &buf[at + (br.start - window.start) as usize..at + (br.end - window.start) as usize];
        out.push((b, lifeboat_resync::digest_block(block)));
    }
}

/// Where the run of holes of `src` from `from` on ends, probed in steps of `step` bytes
/// (whole steps of holes only, so the pieces after the run keep their places), up to
/// `limit` bytes and the disk's `size`.
fn holes_until(
    src: &dyn Disk,
    path: &Path,
    from: u64,
    step: u64,
    limit: u64,
    size: u64,
) -> Result<u64> {
    let end = from.saturating_add(limit).min(size);
    let mut at = from;
    while at < end {
        let n = step.max(1).min(size - at);
        let named = src
            .data_ranges(at, n)
            .map_err(Error::io(format!("reading disk {}", path.display())))?;
        if !named.is_empty() || at + n > end {
            break;
        }
        at += n;
    }
    Ok(at)
}
