//! A site: a directory where one engine works (staged logs, protective copies, a cache of
//! the catalogue), with an id that is also the lease it holds on the items it owns.
//! Losing it loses nothing failover needs: that is all in the store.

use std::collections::hash_map::RandomState;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use lifeboat_pageblob::{Expect, LeaseId, PageStore, StoreError};
use serde::{Deserialize, Serialize};

use crate::catalog::{self, Guid, Owner, SCHEMA, StoreDoc};
use crate::data;
use crate::error::{Error, Result};

/// What `site.json` records.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SiteFile {
    schema: u32,
    /// The site's id: the lease it holds on what it owns.
    site: LeaseId,
    /// The store it was set up with: its id, and where it was.
    store_id: String,
    store: String,
}

/// An open site: its directory (locked: one engine at a time), id and label.
#[derive(Debug)]
pub struct Site {
    dir: PathBuf,
    id: LeaseId,
    label: String,
    /// The site's lock, held while the engine runs (released by the OS on any exit).
    _lock: File,
}

impl Site {
    /// Opens (or sets up) the site in `dir` for `store` (described as `store_desc` in
    /// messages): locks it, and checks that it was set up with this store. If
    /// `on_wait` is given, it is called before waiting for another engine on the site.
    pub(crate) async fn open(
        dir: &Path,
        store: &dyn PageStore,
        store_desc: &str,
        on_wait: Option<&(dyn Fn() + Send + Sync)>,
    ) -> Result<Site> {
        data::private_dir(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let dir = dir
            .canonicalize()
            .map_err(Error::io(format!("opening {}", dir.display())))?;
        let lock_path = dir.join("lock");
        let lock = data::private_file(&lock_path)
            .map_err(Error::io(format!("opening {}", lock_path.display())))?;
        wait_for_lock(&dir, &lock, on_wait)?;
        let store_id = store_identity(store).await?;
        let path = dir.join("site.json");
        let file = match fs::read(&path) {
            Ok(bytes) => {
                let f: SiteFile = serde_json::from_slice(&bytes).map_err(|e| Error::Catalog {
                    name: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                if f.store_id != store_id {
                    return Err(Error::WrongStore {
                        site: dir.clone(),
                        expected: f.store,
                        found: store_desc.to_owned(),
                    });
                }
                f
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = SiteFile {
                    schema: SCHEMA,
                    site: LeaseId(random_guid(&dir.display().to_string())),
                    store_id,
                    store: store_desc.to_owned(),
                };
                write_file(
                    &dir,
                    "site.json",
                    &serde_json::to_vec_pretty(&f).unwrap_or_default(),
                )?;
                f
            }
            Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
        };
        let label = format!("{}:{}", hostname(), dir.display());
        Ok(Site {
            dir,
            id: file.site,
            label,
            _lock: lock,
        })
    }

    /// Whether `dir` holds a site set up (an engine opened there recorded it): a caller
    /// can then tell a new site from an existing one without opening either.
    pub fn is_set_up(dir: &Path) -> bool {
        dir.join("site.json").exists()
    }

    /// The site's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The site's id (the lease it holds on the items it owns).
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Where the site is, for people.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The site as an owner.
    pub(crate) fn owner(&self) -> Owner {
        Owner {
            site: self.id,
            label: self.label.clone(),
        }
    }

    /// Everything the site keeps for an item: staged logs, protective copies.
    pub(crate) fn staging_dir(&self, item: &str) -> PathBuf {
        self.dir.join("staging").join(item)
    }

    /// Where an item's logs are staged.
    pub(crate) fn logs_dir(&self, item: &str) -> PathBuf {
        self.staging_dir(item).join("logs")
    }

    /// Where an item's protective copies go.
    pub(crate) fn protective_dir(&self, item: &str) -> PathBuf {
        self.staging_dir(item).join("protective")
    }

    /// Writes the last catalogue document seen for `name` into the site's cache (read when
    /// the store cannot be reached); replaced whole, so readers beside never see half.
    pub(crate) fn cache(&self, name: &str, bytes: &[u8]) {
        let dir = self.dir.join("cache");
        let file = dir.join(name.replace('/', "%"));
        let tmp = file.with_extension("tmp");
        let _ = data::private_dir(&dir)
            .and_then(|_| data::private_file(&tmp))
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|_| fs::rename(&tmp, &file));
    }

    /// Drops the cached copy of a document that is gone.
    pub(crate) fn uncache(&self, name: &str) {
        let _ = fs::remove_file(self.dir.join("cache").join(name.replace('/', "%")));
    }

    /// Lets another engine on the site work (the site's lock is released): for a service
    /// between its steps. [`Site::relock`] takes it back.
    pub(crate) fn unlock(&self) -> Result<()> {
        self._lock
            .unlock()
            .map_err(Error::io(format!("unlocking {}", self.dir.display())))
    }

    /// Another handle on the site's lock (the same lock: to take it back from a blocking
    /// thread with [`relock`]).
    pub(crate) fn lock_handle(&self) -> Result<File> {
        self._lock
            .try_clone()
            .map_err(Error::io(format!("locking {}", self.dir.display())))
    }

    /// Whether another process waits for the site's lock.
    pub(crate) fn wanted(&self) -> bool {
        wanted(&self.dir)
    }

    /// How many times engines have written the catalogue from this site (each write
    /// counts one): an engine that let another one work reloads when it changed.
    pub(crate) fn generation(&self) -> u64 {
        fs::read_to_string(self.dir.join("generation"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Counts a catalogue write (under the site's lock).
    pub(crate) fn bump_generation(&self) -> u64 {
        let next = self.generation() + 1;
        let tmp = self.dir.join("generation.tmp");
        let _ = data::private_file(&tmp)
            .and_then(|mut f| f.write_all(next.to_string().as_bytes()))
            .and_then(|_| fs::rename(&tmp, self.dir.join("generation")));
        next
    }
}

/// Takes the site's lock back after [`Site::unlock`] (waiting for whoever holds it).
pub(crate) fn relock(dir: &Path, lock: &File) -> Result<()> {
    wait_for_lock(dir, lock, None)
}

/// Whether a (live) process waits for the lock of the site in `dir`.
pub(crate) fn wanted(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(WANTED))
            .is_some_and(|pid| Path::new("/proc").join(pid).exists())
    })
}

/// The marker a process waiting for the site's lock leaves (`lock.wanted.PID`).
const WANTED: &str = "lock.wanted.";

/// Takes the site's lock; if another process holds it, says so (`on_wait`) and leaves a
/// marker while waiting, so a service working on the site lets it in between steps.
fn wait_for_lock(
    dir: &Path,
    lock: &File,
    on_wait: Option<&(dyn Fn() + Send + Sync)>,
) -> Result<()> {
    if lock.try_lock().is_ok() {
        return Ok(());
    }
    if let Some(f) = on_wait {
        f();
    }
    let marker = dir.join(format!("{WANTED}{}", std::process::id()));
    let _ = data::private_file(&marker);
    let r = lock.lock();
    let _ = fs::remove_file(&marker);
    r.map_err(Error::io(format!("locking {}", dir.join("lock").display())))
}

/// The id of the site set up in `dir`, read without its lock (`None` if there is none).
pub(crate) fn id_of(dir: &Path) -> Option<LeaseId> {
    let bytes = fs::read(dir.join("site.json")).ok()?;
    serde_json::from_slice::<SiteFile>(&bytes)
        .ok()
        .map(|f| f.site)
}

/// Checks, without the lock, that the site in `dir` (if one is set up there) was set up
/// with `store` (described as `store_desc`).
pub(crate) async fn check_store(dir: &Path, store: &dyn PageStore, store_desc: &str) -> Result<()> {
    let Ok(bytes) = fs::read(dir.join("site.json")) else {
        return Ok(());
    };
    let Ok(f) = serde_json::from_slice::<SiteFile>(&bytes) else {
        return Ok(());
    };
    let found = catalog::read::<StoreDoc>(store, &catalog::store_doc()).await?;
    match found {
        Some((doc, _, _)) if doc.id == f.store_id => Ok(()),
        _ => Err(Error::WrongStore {
            site: dir.to_path_buf(),
            expected: f.store,
            found: store_desc.to_owned(),
        }),
    }
}

/// The store's id, from its identity document (made by the first site that uses it).
async fn store_identity(store: &dyn PageStore) -> Result<String> {
    let name = catalog::store_doc();
    for _ in 0..3 {
        if let Some((doc, _, _)) = catalog::read::<StoreDoc>(store, &name).await? {
            return Ok(doc.id);
        }
        let doc = StoreDoc {
            schema: SCHEMA,
            id: catalog::hex(&random_guid("store")),
        };
        let bytes = catalog::encode(&name, &doc)?;
        match catalog::write(store, &name, &bytes, Expect::Absent, None).await {
            Ok(_) => return Ok(doc.id),
            // Another site made it first: read theirs.
            Err(StoreError::Changed { .. } | StoreError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Catalog {
        name,
        reason: "the store's identity keeps changing".into(),
    })
}

/// 16 bytes no other call (in this or another process) returns: the time, the process,
/// a counter and the OS-seeded keys of std's `RandomState`, hashed with BLAKE3.
pub(crate) fn random_guid(context: &str) -> Guid {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let seed = format!("{context}/{nanos}/{}/{}", std::process::id(), h.finish());
    let mut g = [0u8; 16];
    g.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..16]);
    g
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Replaces a file in `dir` atomically and durably.
pub(crate) fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let err = || Error::io(format!("writing {}", path.display()));
    let mut f = data::private_file(&tmp).map_err(err())?;
    f.write_all(bytes).map_err(err())?;
    f.sync_all().map_err(err())?;
    fs::rename(&tmp, &path).map_err(err())?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err())
}
