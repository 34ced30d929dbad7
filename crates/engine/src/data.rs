//! The data path: disk bytes and logs into page-writer changes, blobs out to files, a blob
//! read where a `ReadAt` is wanted.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use lifeboat_hrl::{ChangeMap, Piece, ReadOptions, Reader};
use lifeboat_pageblob::{Change, MAX_PUT, PAGE, PageStore};
use lifeboat_resync::{BlockSize, Digest};
use lifeboat_source::{LINE, ReadAt, line_pad};

use crate::error::{Error, Result};
use crate::host::Disk;

/// Granularity at which copied ranges are split into data and zero runs.
const ZERO_GRAIN: usize = 4096;

/// Splits `data` (disk bytes at `offset`) into data runs and zero runs (sent as Clear
/// Pages, no payload).
pub(crate) fn split_zero_runs(offset: u64, data: Bytes) -> Vec<Change> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let zero = lifeboat_resync::is_zero(&data[i..(i + ZERO_GRAIN).min(data.len())]);
        let mut j = i;
        while j < data.len() {
            let end = (j + ZERO_GRAIN).min(data.len());
            if lifeboat_resync::is_zero(&data[j..end]) != zero {
                break;
            }
            j = end;
        }
        let at = offset + i as u64;
        out.push(if zero {
            Change::Zero {
                offset: at,
                len: (j - i) as u64,
            }
        } else {
            Change::Data {
                offset: at,
                data: data.slice(i..j),
            }
        });
        i = j;
    }
    out
}

/// Appends the digest of each block of `block_size` lying whole in `bytes` (disk bytes at
/// `offset`) that is not all zeros, in block order. The changes [`split_zero_runs`] makes
/// of `bytes` cover each whole (one data change, or data and zero runs side by side);
/// an all-zero block is left out: one zero run covers it whole where the runs' grains
/// meet its ends, and its digest is known without hashing.
pub(crate) fn hash_whole_blocks(
    bytes: &[u8],
    offset: u64,
    block_size: BlockSize,
    out: &mut Vec<(u64, Digest)>,
) {
    let bs = u64::from(block_size.get());
    let mut b = offset.div_ceil(bs);
    while (b + 1) * bs <= offset + bytes.len() as u64 {
        let at = (b * bs - offset) as usize;
        let block = &bytes[at..at + bs as usize];
        if !block.chunks(ZERO_GRAIN).all(lifeboat_resync::is_zero) {
            out.push((b, lifeboat_resync::digest_block(block)));
        }
        b += 1;
    }
}

/// `ranges` (in order, apart) widened to whole 512-byte pages, merged where they then
/// meet, and kept within `within` (whose ends are page-aligned).
pub(crate) fn page_aligned(ranges: &[Range<u64>], within: Range<u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        let start = (r.start / PAGE * PAGE).max(within.start);
        let end = r.end.div_ceil(PAGE).saturating_mul(PAGE).min(within.end);
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end >= start => last.end = last.end.max(end),
            _ => out.push(start..end),
        }
    }
    out
}

/// Buffers of copy segments ([`crate::copy`]), reused: a new one per piece cost a page
/// fault per 4 KiB (the allocator gives large blocks back to the system when freed), an
/// eighth of `protect`'s CPU time. Holds a few at most, none while a service waits.
#[derive(Debug, Default)]
pub(crate) struct Buffers(std::sync::Mutex<Vec<Vec<u8>>>);

impl Buffers {
    /// Buffers kept, at most: a transfer's segments being sent (up to the writer's requests
    /// in flight) and read ahead, of a few transfers.
    const KEEP: usize = 16;

    /// A buffer for `len` bytes of a disk from `offset`, and where they start in it
    /// (contents unspecified: a reused one holds an old piece): placed as the bytes lie
    /// in the page cache, so the kernel copies them into it (the read) and out of it (the
    /// store's write) 3x faster than 16 bytes off, where the allocator places a large
    /// block ([`lifeboat_source::line_pad`]).
    pub(crate) fn take(&self, len: usize, offset: u64) -> (Vec<u8>, usize) {
        let reused = self.lock().pop();
        // A new one is not written to (zeroed memory from the system): its pages are
        // faulted in by the reads that fill them, so a piece's holes cost none.
        // Same-sized pieces (all but a disk's last) reuse one without touching a byte
        // (shrinking keeps its start).
        let mut buf = reused.unwrap_or_else(|| vec![0; len + LINE]);
        buf.resize(len + LINE, 0);
        let start = line_pad(buf.as_ptr(), offset);
        (buf, start)
    }

    /// Takes `bytes` back if nothing else holds it (no copy: otherwise it is dropped),
    /// unless it is empty (a segment of holes reads into no buffer).
    pub(crate) fn give(&self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if let Ok(m) = bytes.try_into_mut() {
            let mut pool = self.lock();
            if pool.len() < Self::KEEP {
                pool.push(Vec::from(m));
            }
        }
    }

    /// Drops every buffer kept, on another thread: giving their pages back to the system
    /// takes milliseconds (17 ms for 128 MiB, at the end of `protect`).
    pub(crate) fn clear(&self) {
        let kept = std::mem::take(&mut *self.lock());
        if !kept.is_empty() {
            // No thread to be had: they are dropped here, with the closure.
            let _ = std::thread::Builder::new()
                .name("lifeboat-free".into())
                .spawn(move || drop(kept));
        }
    }

    /// Buffers kept.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads `len` bytes at `offset` of a disk.
pub(crate) fn read_at(disk: &dyn Disk, offset: u64, len: u64, what: &Path) -> Result<Bytes> {
    disk.read_bytes_at(offset, len as usize)
        .map_err(Error::io(format!("reading disk {}", what.display())))
}

/// What the engine checks of an HRL log (read through the file: memory is bounded by the
/// log's metadata, not its payload).
#[derive(Clone, Debug)]
pub(crate) struct Log {
    /// Its header ids.
    pub(crate) unique_id: [u8; 16],
    /// The previous log's id.
    pub(crate) previous_id: [u8; 16],
    /// Its Vhd2DataWriteGuid.
    pub(crate) write_guid: [u8; 16],
    /// Bytes of writes.
    pub(crate) logged_bytes: u64,
    /// Whether EOLLocation was set.
    pub(crate) clean: bool,
    /// The highest disk byte written.
    pub(crate) disk_end: u64,
    /// When it was closed (its header's LastModifiedTimeStamp), if set.
    pub(crate) closed_at: Option<std::time::Duration>,
}

fn open_log(path: &Path) -> Result<File> {
    File::open(path).map_err(Error::io(format!("reading log {}", path.display())))
}

fn log_err(path: &Path) -> impl FnOnce(lifeboat_hrl::Error) -> Error + '_ {
    move |source| Error::Log {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads and validates a log: strictly when it was closed cleanly, otherwise by salvage
/// (so the engine can still say what it held and ask for a resync).
pub(crate) fn read_log(path: &Path) -> Result<Log> {
    // Metadata first; the payloads are checked once below.
    let strict = ReadOptions::strict().verify_data(false);
    let (reader, clean) = match Reader::with_options(open_log(path)?, strict) {
        Ok(r) => (r, true),
        Err(strict) => {
            match Reader::with_options(open_log(path)?, ReadOptions::strict().salvage(true)) {
                Ok(r) if r.salvage().is_some() => (r, false),
                _ => return Err(log_err(path)(strict)),
            }
        }
    };
    if clean {
        // Every payload against its DataChecksum, streamed (bounded memory).
        reader.verify_data().map_err(log_err(path))?;
    }
    let h = reader.header();
    let disk_end = reader
        .writes()
        .map(|w| w.disk_range().end)
        .max()
        .unwrap_or(0);
    Ok(Log {
        unique_id: h.unique_id,
        previous_id: h.previous_unique_id,
        write_guid: h.vhd2_data_write_guid,
        logged_bytes: reader.logged_bytes(),
        clean,
        disk_end,
        closed_at: (h.last_modified_timestamp != 0).then(|| {
            std::time::Duration::from_secs(
                u64::from(h.last_modified_timestamp) + lifeboat_hrl::HRL_EPOCH_UNIX_SECS,
            )
        }),
    })
}

/// A chain of logs folded into final, non-overlapping pieces (later writes win), cut into
/// batches of at most `batch` bytes; the same logs always give the same batches.
pub(crate) struct LogChain {
    readers: Vec<Reader<File>>,
    paths: Vec<PathBuf>,
    batches: Vec<Vec<Piece>>,
}

impl LogChain {
    /// Opens and folds the logs (chain order checked), each checked to be the log its
    /// UniqueId (hex) names when one is given. Their payloads are checked by
    /// [`LogChain::verify`] (the caller runs it beside the batches).
    pub(crate) fn open(logs: &[(&Path, &str)], batch: u64) -> Result<Self> {
        let paths: Vec<&Path> = logs.iter().map(|(p, _)| *p).collect();
        let metadata = ReadOptions::strict().verify_data(false);
        let readers = logs
            .iter()
            .map(|&(p, id)| {
                let r = Reader::with_options(open_log(p)?, metadata).map_err(log_err(p))?;
                let found = crate::catalog::hex(&r.header().unique_id);
                if !id.is_empty() && found != id {
                    return Err(Error::Invalid(format!(
                        "{}: the staged log changed (it is log {found}, not {id}): stage it again or resync",
                        p.display()
                    )));
                }
                Ok(r)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut map = ChangeMap::new();
        for (r, p) in readers.iter().zip(&paths) {
            map.add_log(r).map_err(log_err(p))?;
        }
        let mut batches: Vec<Vec<Piece>> = Vec::new();
        let mut size = 0;
        for p in map.pieces() {
            // A piece may be large (one write of up to 4 GiB): cut it to request size.
            let mut at = 0;
            while at < p.len {
                let n = (p.len - at).min(MAX_PUT);
                if batches.is_empty() || size + n > batch {
                    batches.push(Vec::new());
                    size = 0;
                }
                batches.last_mut().expect("pushed").push(Piece {
                    disk_offset: p.disk_offset + at,
                    len: n,
                    log: p.log,
                    file_offset: p.file_offset + at,
                });
                size += n;
                at += n;
            }
        }
        Ok(LogChain {
            readers,
            paths: paths.iter().map(|p| p.to_path_buf()).collect(),
            batches,
        })
    }

    /// Checks every payload of every log against its DataChecksum (one sequential read).
    pub(crate) fn verify(&self) -> Result<()> {
        for (r, p) in self.readers.iter().zip(&self.paths) {
            r.verify_data().map_err(log_err(p))?;
        }
        Ok(())
    }

    /// How many batches.
    pub(crate) fn len(&self) -> usize {
        self.batches.len()
    }

    /// Batch `i` as page-writer changes (payloads read from the logs).
    pub(crate) fn changes(&self, i: usize) -> Result<Vec<Change>> {
        self.batches[i]
            .iter()
            .map(|p| {
                let data = ReadAt::read_bytes_at(
                    self.readers[p.log].source(),
                    p.file_offset,
                    p.len as usize,
                )
                .map_err(Error::io(format!(
                    "reading log {}",
                    self.paths[p.log].display()
                )))?;
                Ok(Change::Data {
                    offset: p.disk_offset,
                    data,
                })
            })
            .collect()
    }
}

/// The pages a set of changes only partly covers: the bytes the page writer needs
/// from the replica to complete them.
pub(crate) fn edge_pages(changes: &[Change]) -> Vec<u64> {
    let mut pages: Vec<u64> = changes
        .iter()
        .flat_map(|c| {
            let r = c.range();
            let mut v = Vec::new();
            if !r.start.is_multiple_of(PAGE) {
                v.push(r.start / PAGE * PAGE);
            }
            if !r.end.is_multiple_of(PAGE) {
                v.push(r.end / PAGE * PAGE);
            }
            v
        })
        .collect();
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// Pages read ahead from a replica, served to the page writer as its edge source.
pub(crate) struct EdgePages {
    pages: BTreeMap<u64, Bytes>,
    size: u64,
}

impl EdgePages {
    /// Reads `pages` of `blob`.
    pub(crate) async fn fetch(
        store: &dyn PageStore,
        blob: &str,
        pages: &[u64],
        size: u64,
    ) -> Result<Self> {
        let mut map = BTreeMap::new();
        for &p in pages {
            map.insert(p, store.read(blob, None, p, PAGE).await?);
        }
        Ok(EdgePages { pages: map, size })
    }
}

impl ReadAt for EdgePages {
    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            let page = pos / PAGE * PAGE;
            let data = self
                .pages
                .get(&page)
                .ok_or_else(|| io::Error::other(format!("edge page {page} was not read ahead")))?;
            let from = (pos - page) as usize;
            let n = (PAGE as usize - from).min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&data[from..from + n]);
            at += n;
        }
        Ok(())
    }
}

/// A blob (or snapshot) read through the store as a [`ReadAt`], limited to its first
/// `len` bytes (a replica's footer is not disk data). Call it from a blocking thread.
pub(crate) struct BlobSource {
    pub(crate) store: Arc<dyn PageStore>,
    pub(crate) blob: String,
    pub(crate) len: u64,
    pub(crate) handle: tokio::runtime::Handle,
}

impl ReadAt for BlobSource {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > self.len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut at = 0usize;
        while at < buf.len() {
            let n = (buf.len() - at).min(MAX_PUT as usize);
            let data = self
                .handle
                .block_on(
                    self.store
                        .read(&self.blob, None, offset + at as u64, n as u64),
                )
                .map_err(io::Error::other)?;
            buf[at..at + n].copy_from_slice(&data);
            at += n;
        }
        Ok(())
    }
}

/// A source limited to its first `len` bytes (a VHD file's footer is not disk data).
pub(crate) struct TakeSource<'a> {
    pub(crate) inner: &'a (dyn ReadAt + Send),
    pub(crate) len: u64,
}

impl ReadAt for TakeSource<'_> {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > self.len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.inner.read_exact_at(buf, offset)
    }
}

/// A host disk as the target of `resync::apply`.
pub(crate) struct DiskWriter<'a>(pub(crate) &'a dyn Disk);

impl lifeboat_resync::BlockWriter for DiskWriter<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_at(offset, data)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(MAX_PUT) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(MAX_PUT) as usize;
            self.0.write_at(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        if self.0.size()? == len {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a disk's size does not change in a failback",
            ))
        }
    }
}

/// Copies `len` bytes of a blob (or snapshot) into a new file at `path` (written to a
/// temporary name, synced, renamed), reading only allocated ranges.
pub(crate) async fn export(
    store: &dyn PageStore,
    blob: &str,
    snapshot: Option<&str>,
    len: u64,
    path: &Path,
) -> Result<()> {
    let tmp = tmp_path(path);
    let err = || Error::io(format!("writing {}", tmp.display()));
    let file = private_file(&tmp).map_err(err())?;
    file.set_len(len).map_err(err())?;
    for r in store.page_ranges(blob, snapshot).await? {
        let mut at = r.start;
        let end = r.end.min(len);
        while at < end {
            let n = (end - at).min(MAX_PUT);
            let data = store.read(blob, snapshot, at, n).await?;
            file.write_all_at(&data, at).map_err(err())?;
            at += n;
        }
    }
    file.sync_all().map_err(err())?;
    fs::rename(&tmp, path).map_err(Error::io(format!("writing {}", path.display())))?;
    Ok(())
}

/// Exports a blob (or one of its snapshots) of a `size`-byte disk as a new dynamic VHDX at
/// `path`: the raw image first (sparse, beside it), then the VHDX written from it with its
/// zero blocks unallocated; `id` seeds the VHDX's GUIDs.
pub(crate) async fn export_vhdx(
    store: &dyn PageStore,
    blob: &str,
    snapshot: Option<&str>,
    size: u64,
    path: &Path,
) -> Result<()> {
    let mut raw = path.as_os_str().to_owned();
    raw.push(".raw");
    let raw = PathBuf::from(raw);
    export(store, blob, snapshot, size, &raw).await?;
    let tmp = tmp_path(path);
    let err = || Error::io(format!("writing {}", tmp.display()));
    let src = fs::File::open(&raw).map_err(Error::io(format!("reading {}", raw.display())))?;
    let mut out = private_file(&tmp).map_err(err())?;
    let seed = blake3::hash(format!("{blob}@{}", snapshot.unwrap_or("")).as_bytes());
    let g = |i: u8| {
        let mut id = [0u8; 16];
        id.copy_from_slice(&seed.as_bytes()[..16]);
        id[15] ^= i;
        id
    };
    let opts = lifeboat_vhdx::WriteOptions {
        ids: [g(1), g(2), g(3)],
        ..lifeboat_vhdx::WriteOptions::default()
    };
    lifeboat_vhdx::write_dynamic(&src, opts, &mut out).map_err(err())?;
    out.sync_all().map_err(err())?;
    fs::rename(&tmp, path).map_err(Error::io(format!("writing {}", path.display())))?;
    let _ = fs::remove_file(&raw);
    Ok(())
}

/// `path` with `.tmp` appended.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Copies a file durably into a directory that may not exist yet (temporary name, sync,
/// rename).
pub(crate) fn copy_file_to(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        private_dir(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    let tmp = tmp_path(to);
    let err = || Error::io(format!("copying {} to {}", from.display(), to.display()));
    let mut src = File::open(from).map_err(err())?;
    let mut dst = private_file(&tmp).map_err(err())?;
    std::io::copy(&mut src, &mut dst).map_err(err())?;
    dst.sync_all().map_err(err())?;
    fs::rename(&tmp, to).map_err(err())
}

/// Puts the file `from` at `to` without copying its bytes where it can: a hard link (same
/// file system) after fsyncing the file, else a copy ([`copy_file_to`]). For files nobody
/// rewrites once handed over (closed logs); whoever reads `to` later checks it is still the
/// file it was.
pub(crate) fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        private_dir(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    let tmp = tmp_path(to);
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(from, &tmp).is_err() {
        return copy_file_to(from, to);
    }
    let err = || Error::io(format!("staging {} as {}", from.display(), to.display()));
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(err())?;
    fs::rename(&tmp, to).map_err(err())
}

/// Creates (or truncates) a file only its owner can read: disks and logs are the
/// machine's data.
pub(crate) fn private_file(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Creates a directory (and its parents) only its owner can enter.
pub(crate) fn private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Copies `len` bytes of a disk into a new file (a protective copy).
pub(crate) fn save_disk(disk: &dyn Disk, len: u64, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        private_dir(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    let tmp = tmp_path(to);
    let err = || Error::io(format!("writing {}", tmp.display()));
    let f = private_file(&tmp).map_err(err())?;
    f.set_len(len).map_err(err())?;
    let mut buf = vec![0u8; MAX_PUT as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MAX_PUT) as usize;
        disk.read_exact_at(&mut buf[..n], at)
            .map_err(Error::io("reading a failback target disk"))?;
        if buf[..n].iter().any(|&b| b != 0) {
            f.write_all_at(&buf[..n], at).map_err(err())?;
        }
        at += n as u64;
    }
    f.sync_all().map_err(err())?;
    fs::rename(&tmp, to).map_err(Error::io(format!("writing {}", to.display())))
}

/// Writes a file's first `len` bytes back onto a disk (restoring a protective copy).
pub(crate) fn restore_disk(from: &Path, disk: &dyn Disk, len: u64) -> Result<()> {
    let f = File::open(from).map_err(Error::io(format!("reading {}", from.display())))?;
    let mut buf = vec![0u8; MAX_PUT as usize];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MAX_PUT) as usize;
        FileExt::read_exact_at(&f, &mut buf[..n], at)
            .map_err(Error::io(format!("reading {}", from.display())))?;
        disk.write_at(at, &buf[..n])
            .map_err(Error::io("restoring a failback target disk"))?;
        at += n as u64;
    }
    disk.sync()
        .map_err(Error::io("restoring a failback target disk"))
}
