//! Disk plumbing: turning bytes and logs into page-writer changes, exporting blobs to
//! files, hashing, and reading a blob where a `BlockSource` is wanted.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use lifeboat_hrl::{ChangeMap, Piece, ReadOptions, Reader};
use lifeboat_pageblob::{Change, MAX_PUT, PAGE, PageStore};
use lifeboat_resync::BlockSource;

/// Granularity at which copied ranges are split into data and zero runs.
const ZERO_GRAIN: usize = 4096;

/// Splits `data` (disk bytes at `offset`) into data runs and zero runs (sent as Clear
/// Pages, no payload).
pub(crate) fn split_zero_runs(offset: u64, data: Bytes) -> Vec<Change> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let zero = data[i..(i + ZERO_GRAIN).min(data.len())]
            .iter()
            .all(|&b| b == 0);
        let mut j = i;
        while j < data.len() {
            let end = (j + ZERO_GRAIN).min(data.len());
            if data[j..end].iter().all(|&b| b == 0) != zero {
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

/// Reads `len` bytes at `offset` of a file.
pub(crate) fn read_at(file: &File, offset: u64, len: u64) -> io::Result<Bytes> {
    let mut buf = vec![0u8; len as usize];
    FileExt::read_exact_at(file, &mut buf, offset)?;
    Ok(Bytes::from(buf))
}

/// What the agent checks of an HRL log (read through the file: memory is bounded by the
/// log's metadata, not its payload).
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
}

fn open_log(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("reading log {}", path.display()))
}

/// Reads and validates a log: strictly when it was closed cleanly, otherwise by salvage
/// (so the agent can still say what it held and ask for a resync).
pub(crate) fn read_log(path: &Path) -> Result<Log> {
    let (reader, clean) = match Reader::with_options(open_log(path)?, ReadOptions::strict()) {
        Ok(r) => (r, true),
        Err(strict) => {
            match Reader::with_options(open_log(path)?, ReadOptions::strict().salvage(true)) {
                Ok(r) if r.salvage().is_some() => (r, false),
                _ => return Err(strict).with_context(|| format!("log {}", path.display())),
            }
        }
    };
    if clean {
        // Every payload against its DataChecksum, streamed (bounded memory).
        reader
            .verify_data()
            .with_context(|| format!("log {}", path.display()))?;
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
    })
}

/// A chain of logs folded into final, non-overlapping pieces (later writes win), cut into
/// batches of at most `batch` bytes; the same logs always give the same batches.
pub(crate) struct LogChain {
    readers: Vec<Reader<File>>,
    batches: Vec<Vec<Piece>>,
}

impl LogChain {
    /// Opens and folds the logs (chain order checked).
    pub(crate) fn open(paths: &[&Path], batch: u64) -> Result<Self> {
        let readers = paths
            .iter()
            .map(|p| Reader::new(open_log(p)?).with_context(|| format!("log {}", p.display())))
            .collect::<Result<Vec<_>>>()?;
        let mut map = ChangeMap::new();
        for r in &readers {
            map.add_log(r)?;
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
        Ok(LogChain { readers, batches })
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
                let mut buf = vec![0u8; p.len as usize];
                FileExt::read_exact_at(self.readers[p.log].source(), &mut buf, p.file_offset)?;
                Ok(Change::Data {
                    offset: p.disk_offset,
                    data: Bytes::from(buf),
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
    pub(crate) pages: BTreeMap<u64, Bytes>,
    pub(crate) size: u64,
}

impl EdgePages {
    /// Reads `pages` of `blob`.
    pub(crate) async fn fetch<S: PageStore>(
        store: &S,
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

impl BlockSource for EdgePages {
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

/// A blob (or snapshot) read through the store as a [`BlockSource`], for comparing and
/// copying recovered disks that live in Azure. Call it from a blocking thread.
pub(crate) struct BlobSource<S> {
    pub(crate) store: Arc<S>,
    pub(crate) blob: String,
    pub(crate) len: u64,
    pub(crate) handle: tokio::runtime::Handle,
}

impl<S: PageStore> BlockSource for BlobSource<S> {
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

/// Copies `len` bytes of a blob (or snapshot) into a new file at `path` (written to a
/// temporary name, synced, renamed), reading only allocated ranges.
pub(crate) async fn export<S: PageStore>(
    store: &S,
    blob: &str,
    snapshot: Option<&str>,
    len: u64,
    path: &Path,
) -> Result<()> {
    let tmp = tmp_path(path);
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.set_len(len)?;
    for r in store.page_ranges(blob, snapshot).await? {
        let mut at = r.start;
        let end = r.end.min(len);
        while at < end {
            let n = (end - at).min(MAX_PUT);
            let data = store.read(blob, snapshot, at, n).await?;
            file.write_all_at(&data, at)?;
            at += n;
        }
    }
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `path` with `.tmp` appended.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Copies a file durably (temporary name, sync, rename).
pub(crate) fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let tmp = tmp_path(to);
    fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, to)?;
    Ok(())
}

/// BLAKE3 of the first `len` bytes of a file.
pub(crate) fn hash_file(path: &Path, len: u64) -> Result<blake3::Hash> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let have = f.metadata()?.len();
    if have < len {
        bail!("{} holds {have} bytes, expected {len}", path.display());
    }
    let mut h = blake3::Hasher::new();
    let mut at = 0;
    let mut buf = vec![0u8; 4 << 20];
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        FileExt::read_exact_at(&f, &mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize())
}

/// BLAKE3 of the first `len` bytes of a blob or snapshot.
pub(crate) async fn hash_blob<S: PageStore>(
    store: &S,
    blob: &str,
    snapshot: Option<&str>,
    len: u64,
) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MAX_PUT);
        h.update(&store.read(blob, snapshot, at, n).await?);
        at += n;
    }
    Ok(h.finalize())
}

/// Opens a disk image for reading and writing, checking its size.
pub(crate) fn open_disk(path: &Path, len: u64) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening disk {}", path.display()))?;
    let have = f.metadata()?.len();
    if have != len {
        bail!(
            "disk {} is {have} bytes, expected {len} (the protected disk's size)",
            path.display()
        );
    }
    Ok(f)
}

/// Copies a file durably into a directory that may not exist yet.
pub(crate) fn copy_file_to(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    copy_file(from, to)
}
