//! `diff(source, target)`: which blocks must change for target to equal source.

use std::fs::File;
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::block::{
    BlockSize, Progress, Scratch, digest_block, holds_no_data, is_zero, read_into, run_chunks,
};
use crate::io::BlockWriter;
use crate::signature::{Digest, Signature, SignatureReader};
use lifeboat_source::{PlacedBuf, ReadAt};

/// One side of a comparison: bytes that can be read here, or the signature of bytes that
/// live elsewhere.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum Side<'a> {
    /// A local source, read in large chunks.
    Local(&'a dyn ReadAt),
    /// A local in-memory buffer.
    Bytes(&'a [u8]),
    /// A signature: the bytes are remote; only their digests are known.
    Signature(&'a Signature),
}

impl std::fmt::Debug for Side<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Side::Local(_) => f.write_str("Side::Local"),
            Side::Bytes(b) => write!(f, "Side::Bytes({} bytes)", b.len()),
            Side::Signature(s) => write!(f, "Side::Signature({} bytes)", s.len()),
        }
    }
}

impl<'a> From<&'a [u8]> for Side<'a> {
    fn from(b: &'a [u8]) -> Self {
        Side::Bytes(b)
    }
}

impl<'a> From<&'a Vec<u8>> for Side<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        Side::Bytes(b)
    }
}

impl<'a> From<&'a File> for Side<'a> {
    fn from(f: &'a File) -> Self {
        Side::Local(f)
    }
}

impl<'a> From<&'a Signature> for Side<'a> {
    fn from(s: &'a Signature) -> Self {
        Side::Signature(s)
    }
}

impl<'a> Side<'a> {
    /// Any [`ReadAt`] as a local side.
    pub fn local(source: &'a dyn ReadAt) -> Self {
        Side::Local(source)
    }

    fn len(&self) -> Result<u64, Error> {
        match self {
            Side::Local(s) => s.size().map_err(|e| Error::io(0, e)),
            Side::Bytes(b) => Ok(b.len() as u64),
            Side::Signature(s) => Ok(s.len()),
        }
    }

    fn block_size(&self) -> Option<BlockSize> {
        match self {
            Side::Signature(s) => Some(s.block_size()),
            _ => None,
        }
    }
}

/// Whether an extent carries data or only zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExtentKind {
    /// Copy these bytes from the source.
    Data,
    /// The source reads as zeros here: clear the range (no bytes to send).
    Zero,
}

/// A run of differing blocks of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extent {
    /// Byte offset (a multiple of the block size).
    pub offset: u64,
    /// Length in bytes (whole blocks, but the source's last block may be short).
    pub len: u64,
    /// Data or zero.
    pub kind: ExtentKind,
}

/// What must change for the target to equal the source.
///
/// Apply it with [`apply`]: resize the target to `source_len`, then write each extent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The block size compared at.
    pub block_size: BlockSize,
    /// The source's length (the target's length after apply).
    pub source_len: u64,
    /// The target's length before apply; a difference is a grow or shrink.
    pub target_len: u64,
    /// Differing blocks, coalesced, in disk order.
    pub extents: Vec<Extent>,
    /// Source blocks compared.
    pub blocks_compared: u64,
    /// The first block this delta covers (the cursor it was started from).
    pub first_block: u64,
    /// The block to resume from; equals the source's block count when complete.
    pub next_block: u64,
}

impl Delta {
    /// An empty delta whose pass starts at block `start`.
    pub(crate) fn starting(
        block_size: BlockSize,
        source_len: u64,
        target_len: u64,
        start: u64,
    ) -> Self {
        Delta {
            block_size,
            source_len,
            target_len,
            extents: Vec::new(),
            blocks_compared: 0,
            first_block: start,
            next_block: start,
        }
    }

    /// A full copy of `source` onto a target whose content is unknown (a failback's
    /// `--full`): every block is an extent, data blocks as data and zero blocks as zeros,
    /// and the target is taken to have the source's length already. The source is read
    /// once (to tell zero blocks); the target never.
    ///
    /// ```
    /// use lifeboat_resync::{Delta, ExtentKind, apply};
    /// let disk = [vec![0u8; 65536], vec![7u8; 65536], vec![0u8; 65536]].concat();
    /// let d = Delta::full(&disk)?;
    /// let kinds: Vec<ExtentKind> = d.extents.iter().map(|e| e.kind).collect();
    /// assert_eq!(kinds, [ExtentKind::Zero, ExtentKind::Data, ExtentKind::Zero]);
    /// let mut old = vec![0xEEu8; disk.len()];
    /// apply(&d, &disk, &mut old)?;
    /// assert!(old == disk);
    /// # Ok::<(), lifeboat_resync::Error>(())
    /// ```
    pub fn full(source: &dyn crate::ReadAt) -> Result<Delta, Error> {
        // Against nothing, zero blocks are left to the grow from length 0; onto a target of
        // the source's length with unknown content, they must be written as zeros.
        let mut d = diff(Side::Local(source), Side::Bytes(&[]))?;
        let mut extents = Vec::with_capacity(d.extents.len() * 2 + 1);
        let mut at = 0;
        for e in d.extents.drain(..) {
            if e.offset > at {
                extents.push(Extent {
                    offset: at,
                    len: e.offset - at,
                    kind: ExtentKind::Zero,
                });
            }
            at = e.offset + e.len;
            extents.push(e);
        }
        if at < d.source_len {
            extents.push(Extent {
                offset: at,
                len: d.source_len - at,
                kind: ExtentKind::Zero,
            });
        }
        d.extents = extents;
        d.target_len = d.source_len;
        Ok(d)
    }

    /// Whether every block was compared (not interrupted).
    pub fn is_complete(&self) -> bool {
        self.next_block >= self.block_size.blocks(self.source_len)
    }

    /// Whether applying the delta changes nothing.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty() && self.source_len == self.target_len
    }

    /// Bytes in all extents.
    pub fn bytes_differing(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// Bytes that must be sent (data extents).
    pub fn data_bytes(&self) -> u64 {
        self.bytes_of(ExtentKind::Data)
    }

    /// Bytes that are only cleared (zero extents).
    pub fn zero_bytes(&self) -> u64 {
        self.bytes_of(ExtentKind::Zero)
    }

    fn bytes_of(&self, kind: ExtentKind) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.len)
            .sum()
    }

    /// Appends the delta of a resumed pass (one that started at this delta's
    /// `next_block`), as if one pass had produced both.
    pub fn append(&mut self, later: Delta) -> Result<(), Error> {
        if later.first_block != self.next_block
            || later.block_size != self.block_size
            || later.source_len != self.source_len
            || later.target_len != self.target_len
        {
            return Err(Error::DeltaMismatch);
        }
        for e in later.extents {
            push_extent(&mut self.extents, e);
        }
        self.blocks_compared += later.blocks_compared;
        self.next_block = later.next_block;
        Ok(())
    }
}

pub(crate) fn push_extent(extents: &mut Vec<Extent>, e: Extent) {
    match extents.last_mut() {
        Some(last) if last.kind == e.kind && last.offset + last.len == e.offset => {
            last.len += e.len
        }
        _ => extents.push(e),
    }
}

/// How to diff: the block size for two local sides, and which blocks.
///
/// A long diff can be cut into steps: diff `start_block..end_block`, then the next range
/// from the delta's `next_block`, and join them with [`Delta::append`]; nothing is lost
/// between steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiffOptions {
    /// Block size when neither side is a signature (a signature brings its own).
    pub block_size: BlockSize,
    /// The block to start at: a previous step's `next_block` to go on from it.
    pub start_block: u64,
    /// The block to stop before (`None`: the source's end).
    pub end_block: Option<u64>,
}

impl DiffOptions {
    /// The blocks to compare, of `total`.
    fn range(&self, total: u64) -> std::ops::Range<u64> {
        let end = self.end_block.map_or(total, |e| e.min(total));
        self.start_block.min(end)..end
    }
}

/// The differing blocks of `target` against `source`, at 64 KiB blocks.
///
/// Either side may be local bytes (a file, a buffer, any [`ReadAt`] via
/// [`Side::local`]) or a [`Signature`] of remote bytes. Two local sides are compared
/// byte for byte (no hashing); a local side against a signature is hashed with BLAKE3 as
/// it is read; two signatures compare digests. Lengths may differ: the delta records both,
/// and [`apply`] resizes.
///
/// ```
/// let source = vec![1u8; 300_000];
/// let mut target = source.clone();
/// target[70_000] = 9;          // block 1 differs
/// target.truncate(200_000);    // and the target is shorter
///
/// let delta = lifeboat_resync::diff(&source, &target)?;
/// assert_eq!((delta.source_len, delta.target_len), (300_000, 200_000));
/// // Block 1, the straddling block 3 and the grown tail 3..: 65536..131072 and 196608..300000.
/// assert_eq!(delta.extents.len(), 2);
///
/// lifeboat_resync::apply(&delta, source.as_slice(), &mut target)?;
/// assert_eq!(target, source);
/// # Ok::<(), lifeboat_resync::Error>(())
/// ```
pub fn diff<'a>(source: impl Into<Side<'a>>, target: impl Into<Side<'a>>) -> Result<Delta, Error> {
    diff_with(source, target, DiffOptions::default(), |_| {
        ControlFlow::Continue(())
    })
}

/// [`diff`] with options (a range of blocks, a block size) and a progress callback,
/// called after each chunk (≈ 8 MiB). Returning [`ControlFlow::Break`] abandons the diff
/// with [`Error::Interrupted`], as every progress callback of this crate does; to stop
/// and go on without losing work, diff in ranges ([`DiffOptions::end_block`]).
pub fn diff_with<'a>(
    source: impl Into<Side<'a>>,
    target: impl Into<Side<'a>>,
    options: DiffOptions,
    mut progress: impl FnMut(Progress) -> ControlFlow<()>,
) -> Result<Delta, Error> {
    let (src, tgt) = (source.into(), target.into());
    let bs = agreed_block_size(src.block_size(), tgt.block_size(), options.block_size)?;
    let (src_len, tgt_len) = (src.len()?, tgt.len()?);
    let blocks = options.range(bs.blocks(src_len));
    let mut delta = Delta::starting(bs, src_len, tgt_len, blocks.start);
    let mut differing = 0u64;
    let (src, tgt) = (Input::Side(src), Input::Side(tgt));
    diff_blocks(
        &src,
        &tgt,
        blocks,
        &mut delta,
        &mut differing,
        &mut progress,
    )?;
    Ok(delta)
}

/// The block size both sides agree on: a signature's own, or `default` for local sides.
fn agreed_block_size(
    source: Option<BlockSize>,
    target: Option<BlockSize>,
    default: BlockSize,
) -> Result<BlockSize, Error> {
    match (source, target) {
        (Some(a), Some(b)) if a != b => Err(Error::BlockSizeMismatch {
            source_block_size: a.get(),
            target_block_size: b.get(),
        }),
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Ok(default),
    }
}

/// Blocks in memory at once when diffing against a streamed signature (≈ 2 MiB of digests).
const STREAM_WINDOW: u64 = 1 << 16;

/// [`diff_with`] against a signature streamed from `target` (a [`SignatureReader`]): the
/// target's digests are read window by window, so memory stays bounded whatever the disk
/// size. The reader is read to its end, so a corrupted trailer is still an error.
pub fn diff_streamed<'a, R: std::io::Read>(
    source: impl Into<Side<'a>>,
    target: &mut SignatureReader<R>,
    options: DiffOptions,
    progress: impl FnMut(Progress) -> ControlFlow<()>,
) -> Result<Delta, Error> {
    diff_streamed_windowed(source.into(), target, options, progress, STREAM_WINDOW)
}

pub(crate) fn diff_streamed_windowed<R: std::io::Read>(
    src: Side<'_>,
    target: &mut SignatureReader<R>,
    options: DiffOptions,
    mut progress: impl FnMut(Progress) -> ControlFlow<()>,
    window: u64,
) -> Result<Delta, Error> {
    let bs = agreed_block_size(
        src.block_size(),
        Some(target.block_size()),
        options.block_size,
    )?;
    let (src_len, tgt_len) = (src.len()?, target.len());
    let (total, tgt_blocks) = (bs.blocks(src_len), bs.blocks(tgt_len));
    let std::ops::Range { start, end } = options.range(total);
    let mut delta = Delta::starting(bs, src_len, tgt_len, start);
    let mut read = 0u64;
    let next = |target: &mut SignatureReader<R>, read: &mut u64| -> Result<Digest, Error> {
        *read += 1;
        target.next_digest()?.ok_or(Error::BadSignature {
            offset: *read,
            reason: "fewer digests than blocks",
        })
    };
    while read < start.min(tgt_blocks) {
        next(target, &mut read)?;
    }
    let mut differing = 0u64;
    let src = Input::Side(src);
    let mut digests = Vec::new();
    let mut first = start;
    while first < end {
        let last = (first + window).min(end);
        digests.clear();
        while read < last.min(tgt_blocks) {
            digests.push(next(target, &mut read)?);
        }
        let tgt = Input::Window {
            digests: &digests,
            first,
        };
        diff_blocks(
            &src,
            &tgt,
            first..last,
            &mut delta,
            &mut differing,
            &mut progress,
        )?;
        first = last;
    }
    if end == total {
        // Drain the rest (a target longer than the source) so the trailer is checked.
        while target.next_digest()?.is_some() {}
    }
    Ok(delta)
}

/// One side as the chunk loop sees it: a [`Side`], or a window of streamed digests.
enum Input<'a> {
    Side(Side<'a>),
    Window { digests: &'a [Digest], first: u64 },
}

/// Compares `blocks`, appending to `delta`; [`Error::Interrupted`] if `progress` says
/// to stop.
fn diff_blocks(
    src: &Input<'_>,
    tgt: &Input<'_>,
    blocks: std::ops::Range<u64>,
    delta: &mut Delta,
    differing: &mut u64,
    progress: &mut impl FnMut(Progress) -> ControlFlow<()>,
) -> Result<(), Error> {
    let (bs, src_len, tgt_len) = (delta.block_size, delta.source_len, delta.target_len);
    let total = bs.blocks(src_len);
    run_chunks(
        bs,
        blocks,
        |scratch, blocks| {
            let Scratch { a, b } = scratch;
            let s = view_input(src, a, bs, src_len, blocks.clone())?;
            let t = view_input(tgt, b, bs, tgt_len, blocks.clone())?;
            Ok((blocks.start..blocks.end)
                .map(|i| classify(i, i - blocks.start, &s, &t, bs, src_len, tgt_len))
                .collect::<Vec<_>>())
        },
        |blocks, classes| {
            for (i, class) in (blocks.start..).zip(classes) {
                if let Some(kind) = class {
                    let r = bs.range(i, src_len);
                    *differing += r.end - r.start;
                    push_extent(
                        &mut delta.extents,
                        Extent {
                            offset: r.start,
                            len: r.end - r.start,
                            kind,
                        },
                    );
                }
            }
            delta.blocks_compared += blocks.end - blocks.start;
            delta.next_block = blocks.end;
            match progress(Progress::new(blocks.end, total, *differing)) {
                ControlFlow::Continue(()) => Ok(ControlFlow::Continue(())),
                ControlFlow::Break(()) => Err(Error::Interrupted {
                    next_block: blocks.end,
                }),
            }
        },
    )?;
    Ok(())
}

fn view_input<'b>(
    input: &'b Input<'_>,
    buf: &'b mut PlacedBuf,
    bs: BlockSize,
    len: u64,
    blocks: std::ops::Range<u64>,
) -> Result<View<'b>, Error> {
    match input {
        Input::Side(s) => view(s, buf, bs, len, blocks),
        Input::Window { digests, first } => {
            let hi = ((blocks.end - first) as usize).min(digests.len());
            let lo = ((blocks.start - first) as usize).min(hi);
            Ok(View::Digests(&digests[lo..hi]))
        }
    }
}

/// What one side holds for a chunk of blocks.
enum View<'a> {
    Bytes(&'a [u8]),
    Digests(&'a [Digest]),
    /// Zeros, not read: the source says the chunk holds no data (a sparse file's hole).
    Zeros,
}

fn view<'b>(
    side: &'b Side<'_>,
    buf: &'b mut PlacedBuf,
    bs: BlockSize,
    len: u64,
    blocks: std::ops::Range<u64>,
) -> Result<View<'b>, Error> {
    let start = bs.range(blocks.start, len).start;
    let end = bs.range(blocks.end.saturating_sub(1), len).end.max(start);
    Ok(match side {
        Side::Bytes(b) => View::Bytes(&b[start as usize..end as usize]),
        Side::Local(s) if holds_no_data(*s, start, end - start)? => View::Zeros,
        Side::Local(s) => View::Bytes(read_into(*s, buf, start, end - start)?),
        Side::Signature(sig) => {
            let d = sig.digests();
            let lo = (blocks.start as usize).min(d.len());
            let hi = (blocks.end as usize).min(d.len());
            View::Digests(&d[lo..hi])
        }
    })
}

/// `None` when block `index` (the `j`-th of the chunk) is equal, else the extent kind.
fn classify(
    index: u64,
    j: u64,
    s: &View<'_>,
    t: &View<'_>,
    bs: BlockSize,
    src_len: u64,
    tgt_len: u64,
) -> Option<ExtentKind> {
    let sr = bs.range(index, src_len);
    let tr = bs.range(index, tgt_len);
    let at = (j * u64::from(bs.get())) as usize;
    let s_len = sr.end - sr.start;
    let t_len = tr.end - tr.start;
    let kind = |zero: bool| {
        if zero {
            ExtentKind::Zero
        } else {
            ExtentKind::Data
        }
    };
    let src_zero = || match s {
        View::Bytes(b) => is_zero(&b[at..at + s_len as usize]),
        View::Digests(d) => d[j as usize] == Digest::Zero,
        View::Zeros => true,
    };
    if t_len == 0 {
        // Past the target's end: the resize reads as zeros.
        return (!src_zero()).then_some(ExtentKind::Data);
    }
    if t_len != s_len {
        // The block the length change cuts through: always rewritten.
        return Some(kind(src_zero()));
    }
    match (s, t) {
        (View::Bytes(a), View::Bytes(b)) => {
            let (a, b) = (&a[at..at + s_len as usize], &b[at..at + t_len as usize]);
            (a != b).then(|| kind(is_zero(a)))
        }
        (View::Zeros, View::Zeros) => None,
        (View::Zeros, View::Bytes(b)) => {
            (!is_zero(&b[at..at + t_len as usize])).then_some(ExtentKind::Zero)
        }
        (View::Bytes(a), View::Zeros) => {
            (!is_zero(&a[at..at + s_len as usize])).then_some(ExtentKind::Data)
        }
        _ => {
            let sd = view_digest(s, at, s_len, j);
            (sd != view_digest(t, at, t_len, j)).then(|| kind(sd == Digest::Zero))
        }
    }
}

/// The digest of the `j`-th block of a view (`n` bytes at `at` when it holds bytes).
fn view_digest(v: &View<'_>, at: usize, n: u64, j: u64) -> Digest {
    match v {
        View::Bytes(b) => digest_block(&b[at..at + n as usize]),
        View::Digests(d) => d[j as usize],
        View::Zeros => Digest::Zero,
    }
}

/// What [`apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApplyStats {
    /// Bytes copied from the source.
    pub data_bytes: u64,
    /// Bytes cleared.
    pub zero_bytes: u64,
    /// Whether the target was resized.
    pub resized: bool,
}

/// Makes `target` equal to `source` by writing only the delta's extents (data read from
/// `source` in ≤ 4 MiB pieces, zero extents cleared) after resizing it to the source's
/// length. Idempotent: after a crash, apply the same delta again (or diff again).
pub fn apply<S: ReadAt + ?Sized, W: BlockWriter + ?Sized>(
    delta: &Delta,
    source: &S,
    target: &mut W,
) -> Result<ApplyStats, Error> {
    const PIECE: u64 = 4 << 20;
    let len = source.size().map_err(|e| Error::io(0, e))?;
    if len != delta.source_len {
        return Err(Error::SourceChanged {
            expected: delta.source_len,
            found: len,
        });
    }
    let mut stats = ApplyStats::default();
    if delta.target_len != delta.source_len {
        target
            .set_len(delta.source_len)
            .map_err(|e| Error::io(delta.source_len, e))?;
        stats.resized = true;
    }
    let mut buf = PlacedBuf::default();
    for e in &delta.extents {
        match e.kind {
            ExtentKind::Zero => {
                target
                    .zero(e.offset, e.len)
                    .map_err(|err| Error::io(e.offset, err))?;
                stats.zero_bytes += e.len;
            }
            ExtentKind::Data => {
                let mut at = e.offset;
                while at < e.offset + e.len {
                    let n = PIECE.min(e.offset + e.len - at);
                    let data = read_into(source, &mut buf, at, n)?;
                    target
                        .write_at(at, data)
                        .map_err(|err| Error::io(at, err))?;
                    at += n;
                }
                stats.data_bytes += e.len;
            }
        }
    }
    Ok(stats)
}
