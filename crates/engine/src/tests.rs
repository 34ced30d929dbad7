//! Engines on a `MemoryHost` and a `LocalStore`: ownership, fencing and the catalogue.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lifeboat_hrl::{LogWriter, WriterConfig as WriterConfig2};
use lifeboat_pageblob::{
    Fault, FaultyStore, LocalStore, PageStore, ReplicaDigests, Request, WriterConfig,
};
use lifeboat_replication::{
    Command, HealthCause, PointId, ProtectionState, ReplicationPolicy, ResyncReason,
};

use crate::actions::{LOG_BATCH_BYTES, UNRECORDED_LOG_BATCH_BYTES};
use crate::catalog::Cycle;
use crate::{Clock, Engine, Error, Export, Failover, MemoryHost, Replicated, Verified};

/// A clock the test moves.
#[derive(Debug, Default)]
struct ManualClock(AtomicU64);

impl ManualClock {
    fn set(&self, t: Duration) {
        self.0.store(t.as_secs(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_secs(self.0.load(Ordering::SeqCst))
    }
}

struct World {
    dir: tempfile::TempDir,
    store: Arc<dyn PageStore>,
    faults: Arc<FaultyStore<LocalStore>>,
    host: Arc<MemoryHost>,
    clock: Arc<ManualClock>,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(FaultyStore::new(
            LocalStore::open(dir.path().join("store")).unwrap(),
        ));
        let host = Arc::new(MemoryHost::new());
        host.add_disk("vm/d0", vec![0u8; 2 << 20]);
        let clock = Arc::new(ManualClock::default());
        clock.set(Duration::from_secs(1_800_000_000));
        World {
            dir,
            store: faults.clone(),
            faults,
            host,
            clock,
        }
    }

    async fn engine(&self, site: &str) -> Engine {
        let mut writer = WriterConfig::default();
        writer.retry = writer.retry.scaled(1, 1000);
        Engine::builder(self.store.clone(), self.dir.path().join(site))
            .host(self.host.clone())
            .clock(self.clock.clone())
            .writer(writer)
            .open()
            .await
            .unwrap()
    }

    /// A log of one guest write of `n`s at `n * 8 KiB` (made on the disk too), with id
    /// `[n; 16]`, following `previous`.
    fn log(&self, e: &Engine, n: u8, previous: [u8; 16]) -> PathBuf {
        let guid = e.item("vm").unwrap().item.disks[0].tracking.write_guid;
        self.log_naming(n, previous, guid)
    }

    /// Logs 1, 2 and 3 of disk 0, chained after what the item has taken.
    fn three_logs(&self, e: &Engine) -> [PathBuf; 3] {
        let l1 = self.log(e, 1, self.chain(e));
        [l1, self.log(e, 2, [1; 16]), self.log(e, 3, [2; 16])]
    }

    /// [`World::log`] for a disk whose DataWriteGuid is `guid`.
    fn log_naming(&self, n: u8, previous: [u8; 16], guid: [u8; 16]) -> PathBuf {
        self.log_on("vm/d0", n, previous, guid)
    }

    /// [`World::log_naming`] for the host disk `disk`.
    fn log_on(&self, disk: &str, n: u8, previous: [u8; 16], guid: [u8; 16]) -> PathBuf {
        let at = u64::from(n) * 8192;
        self.host.write(disk, at, &[n; 4096]).unwrap();
        let path = self
            .dir
            .path()
            .join(format!("{}-l{n}.hrl", disk.replace('/', "-")));
        // Closed now, by the test's clock, in the HRL epoch.
        let now = (self.clock.now().as_secs() - lifeboat_hrl::HRL_EPOCH_UNIX_SECS) as u32;
        let config = WriterConfig2 {
            unique_id: [n; 16],
            previous_unique_id: previous,
            vhd2_data_write_guid: guid,
            timestamp: now,
            ..WriterConfig2::default()
        };
        let mut w = LogWriter::new(std::fs::File::create(&path).unwrap(), config).unwrap();
        w.write(at, &[n; 4096], now).unwrap();
        w.finish(now).unwrap();
        path
    }

    /// Where the disk's chain stands: the id the next log follows.
    fn chain(&self, e: &Engine) -> [u8; 16] {
        e.item("vm").unwrap().item.disks[0].tracking.last_log
    }

    fn advance(&self, d: Duration) {
        self.clock.set(self.clock.now() + d);
    }

    /// The replica's bytes as recovery point `point` holds them.
    async fn point_bytes(&self, e: &Engine, point: u64) -> Vec<u8> {
        let snap = &e.item("vm").unwrap().item.points[&point][0];
        self.store
            .read("lifeboat/items/vm/disk0", Some(snap), 0, 2 << 20)
            .await
            .unwrap()
            .to_vec()
    }

    /// The replica's sequence number.
    async fn replica_seq(&self) -> u64 {
        let p = self.store.properties("lifeboat/items/vm/disk0").await;
        p.unwrap().sequence_number
    }

    async fn replica_bytes(&self) -> Vec<u8> {
        self.store
            .read("lifeboat/items/vm/disk0", None, 0, 2 << 20)
            .await
            .unwrap()
            .to_vec()
    }

    fn source(&self) -> Vec<u8> {
        self.host.disk("vm/d0").unwrap()
    }
}

fn policy() -> ReplicationPolicy {
    ReplicationPolicy {
        retention: Duration::from_secs(3600),
        auto_resync: false,
        ..ReplicationPolicy::default()
    }
}

async fn protected(w: &World, site: &str) -> Engine {
    let mut e = w.engine(site).await;
    e.protect("vm", &[PathBuf::from("vm/d0")], policy(), 64 << 10)
        .await
        .unwrap();
    e
}

fn snapshots_of(w: &World) -> Vec<String> {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current()
            .block_on(w.store.snapshots("lifeboat/items/vm/disk0"))
            .unwrap()
    })
}

/// An engine that still acts for an item another site took over is refused by the store
/// at its next step, and says who owns the item now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_engine_is_fenced_by_a_take_over() {
    let w = World::new();
    let mut a = protected(&w, "a").await;
    let mut b = w.engine("b").await;
    assert!(!b.item("vm").unwrap().owned);
    assert!(matches!(
        b.command(Command::Resync { item: "vm".into() }).await,
        Err(Error::NotOwner { .. })
    ));
    assert!(b.take_over("vm").await.unwrap());
    assert!(b.item("vm").unwrap().owned);
    let seq = w.replica_seq().await;

    let r = a.command(Command::Resync { item: "vm".into() }).await;
    match r {
        Err(Error::Fenced { owner, .. }) => assert!(owner.ends_with("/b"), "{owner}"),
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(!a.item("vm").unwrap().owned);
    let after = w.store.properties("lifeboat/items/vm/disk0").await.unwrap();
    assert_eq!(
        after.sequence_number, seq,
        "the fenced engine wrote the replica"
    );
    // The new owner carries on.
    b.command(Command::Resync { item: "vm".into() })
        .await
        .unwrap();
    assert_eq!(b.protection("vm").unwrap(), ProtectionState::Protected);
}

/// The store does not fence snapshot deletions; the engine proves its ownership with a
/// fenced catalogue write first, so a taken-over engine deletes no recovery point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_engine_deletes_no_recovery_point() {
    let w = World::new();
    let mut a = protected(&w, "a").await;
    let l1 = w.log(&a, 1, w.chain(&a));
    w.clock.set(w.clock.now() + Duration::from_secs(600));
    assert!(matches!(
        a.replicate("vm", &[(0, l1)], false).await.unwrap(),
        Replicated::Applied { cycles: 1, .. }
    ));
    let before = snapshots_of(&w);
    assert_eq!(before.len(), 2);

    let mut b = w.engine("b").await;
    b.take_over("vm").await.unwrap();
    let r = a.delete_point("vm", PointId(1)).await;
    assert!(matches!(r, Err(Error::Fenced { .. })), "{r:?}");
    assert_eq!(snapshots_of(&w), before);
}

/// Everything failover needs is in the store's catalogue after each step: a new engine
/// on a new site sees the item's points, disks and state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_is_in_the_store() {
    let w = World::new();
    let mut a = protected(&w, "a").await;
    let l1 = w.log(&a, 1, w.chain(&a));
    a.replicate("vm", &[(0, l1)], false).await.unwrap();
    let points = a.item("vm").unwrap().item.points.clone();
    drop(a);
    std::fs::remove_dir_all(w.dir.path().join("a")).unwrap();
    let b = w.engine("b").await;
    let v = b.item("vm").unwrap();
    assert_eq!(v.status.state, ProtectionState::Protected);
    assert_eq!(v.status.points.len(), 2);
    assert_eq!(v.item.points, points);
    assert_eq!(v.item.disks[0].source, Path::new("vm/d0"));
    assert_eq!(v.item.disks[0].tracking.last_log, [1; 16]);
    assert!(v.item.owner.label.ends_with("/a"));
    let kinds: Vec<_> = b.jobs().iter().map(|j| j.kind).collect();
    assert_eq!(
        kinds,
        [
            lifeboat_replication::JobKind::EnableProtection,
            lifeboat_replication::JobKind::Replicate
        ]
    );
}

/// Disabling protection forgets the item everywhere; a kept replica stays, released, and
/// protecting the name again reuses it; a deleted one leaves nothing in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprotect_forgets_the_item_and_keeps_or_deletes_the_replica() {
    let w = World::new();
    let mut a = protected(&w, "a").await;
    let l1 = w.log(&a, 1, w.chain(&a));
    w.clock.set(w.clock.now() + Duration::from_secs(600));
    a.replicate("vm", &[(0, l1)], false).await.unwrap();
    let replica = crate::replica_blob("vm", 0);

    a.unprotect("vm", false).await.unwrap();
    assert!(!a.has_item("vm"));
    assert_eq!(
        w.store.list("lifeboat/items/vm/catalog").await.unwrap(),
        Vec::<String>::new()
    );
    assert!(!w.dir.path().join("a/staging/vm").exists());
    // The replica is whole and nobody holds it: another site may lease it.
    same(&w.replica_bytes().await, &w.source(), "kept replica");
    let other = lifeboat_pageblob::LeaseId([7; 16]);
    w.store.acquire_lease(&replica, other).await.unwrap();
    w.store.release_lease(&replica, other).await.unwrap();
    // Gone for a new engine too, and the name can be protected again (the source
    // changed meanwhile, unseen).
    drop(a);
    w.host.write("vm/d0", 0, &[9; 4096]).unwrap();
    w.host.write("vm/d0", 8192, &[0; 4096]).unwrap();
    let mut b = w.engine("a").await;
    assert!(!b.has_item("vm"));
    b.protect("vm", &[PathBuf::from("vm/d0")], policy(), 64 << 10)
        .await
        .unwrap();
    assert_eq!(b.protection("vm").unwrap(), ProtectionState::Protected);
    same(
        &w.replica_bytes().await,
        &w.source(),
        "re-protected replica",
    );

    // Deleted: no blob of the item is left, snapshots included.
    b.unprotect("vm", true).await.unwrap();
    assert!(!b.has_item("vm"));
    assert_eq!(
        w.store.list("lifeboat/items/vm/").await.unwrap(),
        Vec::<String>::new()
    );
    assert!(
        w.store
            .snapshots(&replica)
            .await
            .is_ok_and(|s| s.is_empty())
            || matches!(
                w.store.snapshots(&replica).await,
                Err(lifeboat_pageblob::StoreError::NotFound { .. })
            )
    );
}

/// A disk that names itself (a VHDX's DataWriteGuid) is tracked under that id: logs that
/// name it apply, logs that name another (the disk was written outside tracking) make the
/// item resync, and the resync takes the disk's new id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_must_name_the_disks_own_write_guid() {
    let w = World::new();
    let (g1, g2) = ([0xA1; 16], [0xB2; 16]);
    w.host.add_disk_with_guid("vm/d0", vec![0u8; 2 << 20], g1);
    let mut e = protected(&w, "a").await;
    assert_eq!(e.item("vm").unwrap().item.disks[0].tracking.write_guid, g1);
    let l1 = w.log_naming(1, w.chain(&e), g1);
    w.advance(Duration::from_secs(600));
    assert_eq!(
        applied(e.replicate("vm", &[(0, l1)], false).await.unwrap()),
        1
    );

    // Written outside tracking: the disk has a new id, a log names it.
    let data = w.source();
    w.host.add_disk_with_guid("vm/d0", data, g2);
    let l2 = w.log_naming(2, [1; 16], g2);
    match e.replicate("vm", &[(0, l2)], false).await.unwrap() {
        Replicated::ResyncRequired(causes) => assert!(
            causes.contains(&HealthCause::ResyncRequired(ResyncReason::OfflineChange {
                disk: 0
            })),
            "{causes:?}"
        ),
        other => panic!("a log naming another DataWriteGuid was taken: {other:?}"),
    }
    e.command(Command::Resync { item: "vm".into() })
        .await
        .unwrap();
    assert_eq!(e.item("vm").unwrap().item.disks[0].tracking.write_guid, g2);
    same(&w.replica_bytes().await, &w.source(), "resynced replica");
    let l3 = w.log_naming(3, w.chain(&e), g2);
    w.advance(Duration::from_secs(600));
    assert_eq!(
        applied(e.replicate("vm", &[(0, l3)], false).await.unwrap()),
        1
    );
    same(&w.replica_bytes().await, &w.source(), "replica after l3");
}

/// A VHDX image whose file reads are counted.
#[derive(Debug)]
struct CountedFile {
    bytes: Vec<u8>,
    read: AtomicU64,
}

impl lifeboat_source::ReadAt for &'static CountedFile {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.bytes.as_slice().read_exact_at(buf, offset)
    }
}

/// A host with one disk (whatever path is asked for), which tests cannot write through
/// the host.
struct OneDiskHost(Arc<dyn crate::Disk>);

impl std::fmt::Debug for OneDiskHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OneDiskHost")
    }
}

struct VhdxDisk(lifeboat_vhdx::Vhdx<&'static CountedFile>);

impl std::fmt::Debug for VhdxDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VhdxDisk")
    }
}

impl lifeboat_source::ReadAt for VhdxDisk {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.0.info().virtual_size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset).map_err(std::io::Error::from)
    }

    fn data_ranges(&self, offset: u64, len: u64) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        self.0.data_ranges(offset, len)
    }
}

impl crate::Disk for VhdxDisk {
    fn write_at(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

impl crate::Host for OneDiskHost {
    fn open_disk(&self, _: &Path) -> std::io::Result<Arc<dyn crate::Disk>> {
        Ok(self.0.clone())
    }

    fn create_disk(&self, _: &Path, _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Initial replication of a half-empty dynamic VHDX reads only its allocated blocks from
/// the file (and its headers, metadata and BAT pages), and the replica is its virtual disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protecting_a_half_empty_vhdx_reads_only_its_allocated_blocks() {
    use lifeboat_source::ReadAt as _;
    let mut virtual_disk = vec![0u8; 64 << 20];
    for block in (0..64).step_by(2) {
        let b = &mut virtual_disk[block << 20..(block + 1) << 20];
        b.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i % 253) as u8 | 1);
    }
    let mut image = std::io::Cursor::new(Vec::new());
    let opts = lifeboat_vhdx::WriteOptions {
        block_size: 1 << 20,
        ..lifeboat_vhdx::WriteOptions::default()
    };
    lifeboat_vhdx::write_dynamic(&virtual_disk, opts, &mut image).unwrap();
    let file: &'static CountedFile = Box::leak(Box::new(CountedFile {
        bytes: image.into_inner(),
        read: AtomicU64::new(0),
    }));
    let v = lifeboat_vhdx::Vhdx::open(file).unwrap();
    assert_eq!(v.allocated().unwrap(), 32 << 20);
    let host = Arc::new(OneDiskHost(Arc::new(VhdxDisk(v))));
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn PageStore> = Arc::new(LocalStore::open(dir.path().join("store")).unwrap());
    let mut e = Engine::builder(store.clone(), dir.path().join("site"))
        .host(host)
        .open()
        .await
        .unwrap();
    let before = file.read.load(Ordering::Relaxed);
    e.protect("vm", &[PathBuf::from("vm/d0.vhdx")], policy(), 64 << 10)
        .await
        .unwrap();
    let read = file.read.load(Ordering::Relaxed) - before;
    // The data blocks, once, and a little of the structures around them.
    assert!(
        (32 << 20..(32 << 20) + (1 << 20)).contains(&read),
        "{read} bytes read from the file for 32 MiB allocated"
    );
    let replica = store
        .read(
            "lifeboat/items/vm/disk0",
            None,
            0,
            virtual_disk.size().unwrap(),
        )
        .await
        .unwrap();
    assert!(replica[..] == virtual_disk[..], "the replica differs");
}

/// A sparse raw file whose reads are counted (data segments as the file reports them).
#[derive(Debug)]
struct SparseDisk {
    file: std::fs::File,
    read: AtomicU64,
}

impl lifeboat_source::ReadAt for SparseDisk {
    fn size(&self) -> std::io::Result<u64> {
        self.file.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.file.read_exact_at(buf, offset)
    }

    fn data_ranges(&self, offset: u64, len: u64) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        self.file.data_ranges(offset, len)
    }
}

impl crate::Disk for SparseDisk {
    fn write_at(&self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Initial replication of a sparse raw disk reads its data segments only: its holes
/// (which read as zeros) are cleared in the replica without being read, and the replica
/// equals the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protecting_a_sparse_disk_reads_only_its_data() {
    use lifeboat_source::ReadAt as _;
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let file = tempfile::tempfile_in(dir.path()).unwrap();
    let len = 40 * MIB;
    file.set_len(len).unwrap();
    let mut want = vec![0u8; len as usize];
    // Data in MiB 0, 3, 4, 17, 39 (the last chunk), and 4 KiB in the middle of MiB 25.
    let mut rng = lifeboat_source::SplitMix64::new(3);
    for (at, n) in [
        (0, MIB),
        (3 * MIB, 2 * MIB),
        (17 * MIB, MIB),
        (39 * MIB, MIB),
        (25 * MIB + 8192, 4096),
    ] {
        let bytes = rng.bytes(n as usize);
        std::os::unix::fs::FileExt::write_all_at(&file, &bytes, at).unwrap();
        want[at as usize..(at + n) as usize].copy_from_slice(&bytes);
    }
    let data: u64 = file
        .data_ranges(0, len)
        .unwrap()
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    assert!(
        data < 8 * MIB,
        "the test needs a file system that reports holes ({data})"
    );
    let store: Arc<dyn PageStore> = Arc::new(LocalStore::open(dir.path().join("store")).unwrap());
    let (mut e, disk) = protect_sparse(&store, dir.path(), file, 16 << 20).await;
    let read = disk.read.load(Ordering::Relaxed);
    assert_eq!(read, data, "bytes read from the disk");
    let replica = store
        .read("lifeboat/items/vm/disk0", None, 0, len)
        .await
        .unwrap();
    assert!(replica[..] == want[..], "the replica differs");
    // The digests (hashed from what was sent, holes included) describe the replica.
    let v = e.verify("vm", None, false).await.unwrap();
    assert!(v.iter().all(Verified::clean), "{v:?}");
}

/// Blocks whose digests were recorded unknown (a batch cut short, not read back) are
/// reported as such by verify, not as damage, and the replica is not clean until a
/// resync sends them.
#[tokio::test]
async fn verify_tells_unknown_blocks_from_damaged_ones() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let file = tempfile::tempfile_in(dir.path()).unwrap();
    let len = 8 * MIB;
    file.set_len(len).unwrap();
    let bytes = lifeboat_source::SplitMix64::new(9).bytes(MIB as usize);
    std::os::unix::fs::FileExt::write_all_at(&file, &bytes, MIB).unwrap();
    let store: Arc<dyn PageStore> = Arc::new(LocalStore::open(dir.path().join("store")).unwrap());
    let (mut e, _) = protect_sparse(&store, dir.path(), file, 4 * MIB).await;
    let blob = "lifeboat/items/vm/disk0";
    let bs = u64::from(e.item("vm").unwrap().item.block_size);
    let mut digests = ReplicaDigests::load(&*store, blob).await.unwrap().unwrap();
    let seq = digests.sequence_number();
    // A block of data and one of zeros.
    let forgotten = [MIB..MIB + 1, 6 * MIB..6 * MIB + 1];
    digests.forget(&*store, &forgotten, seq).await.unwrap();
    digests
        .save(&*store, blob, Some(e.site().id()))
        .await
        .unwrap();
    e.forget_digests(blob);
    let v = e.verify("vm", None, false).await.unwrap();
    assert_eq!(v[0].unknown, vec![MIB / bs, 6 * MIB / bs], "{v:?}");
    assert_eq!(v[0].damaged, Vec::<u64>::new());
    assert!(!v[0].clean());
    e.command(Command::Resync { item: "vm".into() })
        .await
        .unwrap();
    let v = e.verify("vm", None, false).await.unwrap();
    assert!(v.iter().all(Verified::clean), "{v:?}");
}

/// An engine in `dir` on `store` that protected `file` (as item `vm`, in 16 MiB pieces),
/// and the disk, which counts the bytes read.
async fn protect_sparse(
    store: &Arc<dyn PageStore>,
    dir: &Path,
    file: std::fs::File,
    copy_chunk: u64,
) -> (Engine, Arc<SparseDisk>) {
    let disk = Arc::new(SparseDisk {
        file,
        read: AtomicU64::new(0),
    });
    let mut e = Engine::builder(store.clone(), dir.join("site"))
        .host(Arc::new(OneDiskHost(disk.clone())))
        .open()
        .await
        .unwrap();
    let p = ReplicationPolicy {
        copy_chunk,
        ..policy()
    };
    e.protect("vm", &[PathBuf::from("vm/d0.raw")], p, 64 << 10)
        .await
        .unwrap();
    (e, disk)
}

/// An initial copy sends only the zeros the replica does not hold: onto a new replica, a
/// sparse disk's holes are not cleared and a piece of holes makes no batch; onto a replica
/// holding stray pages (a first batch that landed in part leaves them at sequence number
/// 0), those under the disk's holes are cleared, in 4 MiB pieces also where they lie
/// inside a run of pieces of holes (the run is skipped up to their piece, which is sent,
/// and on after it). Either way the replica equals the disk.
#[tokio::test]
async fn an_initial_copy_sends_only_the_zeros_the_replica_lacks() {
    use lifeboat_pageblob::{Condition, crc64, vhd};
    const MIB: u64 = 1 << 20;
    let (len, blob) = (48 * MIB, "lifeboat/items/vm/disk0");
    let mut rng = lifeboat_source::SplitMix64::new(5);
    // Data in the first and the last 16 MiB piece (with holes between), none in the middle.
    let mut data: Vec<(u64, Vec<u8>)> = [(0, MIB), (4 * MIB, 4096), (40 * MIB, 2 * MIB)]
        .into_iter()
        .map(|(at, n)| (at, rng.bytes(n as usize)))
        .collect();
    // Zeros written inside the first MiB: blocks mixing data and zero runs (their digests
    // hashed as read, given for the changes that cover them together), and a zero block.
    for r in [8192..12288, 69632..77824, 131072..196608, 258048..262144] {
        data[0].1[r].fill(0);
    }
    let mut want = vec![0u8; len as usize];
    for (at, bytes) in &data {
        want[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
    }
    // Whether stray pages are there, the copy's pieces, and the batches it makes: one
    // per piece holding data or strays (in 4 MiB pieces: 0, 4, 20 and 40 MiB).
    for (stray, chunk, batches) in [(false, 16, 2), (true, 16, 3), (true, 4, 4)] {
        let dir = tempfile::tempdir().unwrap();
        let file = tempfile::tempfile_in(dir.path()).unwrap();
        file.set_len(len).unwrap();
        for (at, bytes) in &data {
            std::os::unix::fs::FileExt::write_all_at(&file, bytes, *at).unwrap();
        }
        let faults = Arc::new(FaultyStore::new(
            LocalStore::open(dir.path().join("store")).unwrap(),
        ));
        let store: Arc<dyn PageStore> = faults.clone();
        // Stray pages under holes of the first piece and of the middle one.
        let strays = [2 * MIB..3 * MIB, 20 * MIB..20 * MIB + 4096];
        if stray {
            let md = [("disklength".to_string(), len.to_string())].into();
            store
                .create(blob, vhd::blob_size(len), 0, &md)
                .await
                .unwrap();
            for r in &strays {
                let junk = bytes::Bytes::from(vec![0xA5; (r.end - r.start) as usize]);
                let crc = Some(crc64(&junk));
                store
                    .write_pages(blob, r.start, junk, crc, Condition::NONE)
                    .await
                    .unwrap();
            }
        }
        let (mut e, _) = protect_sparse(&store, dir.path(), file, chunk * MIB).await;
        // The digests of blocks holding data and zeros left out are hashed from the
        // piece as read, not completed from the replica.
        let replica_reads: Vec<_> = faults
            .reads()
            .into_iter()
            .filter(|r| r.blob == blob)
            .collect();
        if !stray {
            assert_eq!(
                replica_reads,
                vec![],
                "the replica was read during the copy"
            );
        }
        let replica = store.read(blob, None, 0, len).await.unwrap();
        assert!(
            replica[..] == want[..],
            "the replica differs (stray {stray}, {chunk} MiB pieces)"
        );
        let v = e.verify("vm", None, false).await.unwrap();
        assert!(v.iter().all(Verified::clean), "{v:?}");
        let clears: Vec<(u64, u64)> = faults
            .seen()
            .iter()
            .filter(|s| s.kind == "clear")
            .map(|s| (s.offset, s.offset + s.len))
            .collect();
        let seq = store.properties(blob).await.unwrap().sequence_number;
        if stray {
            for r in &strays {
                assert!(
                    clears.iter().any(|c| c.0 <= r.start && r.end <= c.1),
                    "stray pages {r:?} not cleared: {clears:?}"
                );
            }
        } else {
            assert_eq!(clears, vec![], "zeros sent onto a new replica");
        }
        assert_eq!(
            seq, batches,
            "batches in {chunk} MiB pieces (stray {stray})"
        );
    }
}

/// `file` as a sparse disk, and an embedded store in `dir`/store behind a `FaultyStore`
/// (as itself, to plan faults, and as the engine's store).
#[allow(clippy::type_complexity)]
fn disk_and_faulty_store(
    file: std::fs::File,
    dir: &Path,
) -> (
    Arc<dyn crate::Disk>,
    Arc<FaultyStore<LocalStore>>,
    Arc<dyn PageStore>,
) {
    let disk: Arc<dyn crate::Disk> = Arc::new(SparseDisk {
        file,
        read: AtomicU64::new(0),
    });
    let faults = Arc::new(FaultyStore::new(
        LocalStore::open(dir.join("store")).unwrap(),
    ));
    let store: Arc<dyn PageStore> = faults.clone();
    (disk, faults, store)
}

/// An engine on `store` (its site in `site`) whose host has the one disk `disk`, sending
/// copy pieces in `segment`-byte segments, its writer retrying a thousand times faster.
async fn one_disk_engine(
    store: &Arc<dyn PageStore>,
    site: PathBuf,
    disk: &Arc<dyn crate::Disk>,
    segment: u64,
) -> Result<Engine, Error> {
    let mut writer = WriterConfig::default();
    writer.retry = writer.retry.scaled(1, 1000);
    let mut e = Engine::builder(store.clone(), site)
        .host(Arc::new(OneDiskHost(disk.clone())))
        .writer(writer)
        .open()
        .await?;
    e.segment = segment;
    Ok(e)
}

/// A copy resumed by the next process, whose replica digests come from their blob (any
/// slot page may hold something), reads the digests a piece at a time: its 1 MiB segments
/// each hold a zero run the copy asks the digests about, against the slot pages held for
/// the piece (each segment read its page on its own before: a request each on Azure). No
/// page is read twice, and the replica equals the disk.
#[tokio::test]
async fn a_resumed_copy_reads_its_slot_pages_a_piece_at_a_time() {
    const MIB: u64 = 1 << 20;
    let len = 16 * MIB;
    let mut want = lifeboat_source::SplitMix64::new(23).bytes(len as usize);
    for seg in 0..len / MIB {
        let at = (seg * MIB + 256 * 1024) as usize;
        want[at..at + 128 * 1024].fill(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = tempfile::tempfile_in(dir.path()).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &want, 0).unwrap();
    let (disk, faults, store) = disk_and_faulty_store(file, dir.path());
    let open = || one_disk_engine(&store, dir.path().join("site"), &disk, MIB);
    let p = ReplicationPolicy {
        copy_chunk: 4 * MIB,
        ..policy()
    };
    // The first process dies part way through the copy, after 40 requests.
    let mut first = open().await.unwrap();
    let before = faults.requests(Request::Put);
    faults.kill_after(40);
    let _ = first
        .protect("vm", &[PathBuf::from("vm/d0.raw")], p, 64 << 10)
        .await;
    // The process dies: what it held in memory goes with it.
    drop(first);
    faults.revive();
    assert!(faults.requests(Request::Put) > before + 4, "died too early");
    let seen = faults.reads().len();
    let mut e = open().await.unwrap();
    e.drive().await.unwrap();
    assert_eq!(e.protection("vm").unwrap(), ProtectionState::Protected);
    let replica = store
        .read("lifeboat/items/vm/disk0", None, 0, len)
        .await
        .unwrap();
    assert!(replica[..] == want[..], "the replica differs");
    let mut reads: Vec<(u64, u64)> = faults.reads()[seen..]
        .iter()
        .filter(|r| r.blob.ends_with(".digests"))
        .map(|r| (r.offset, r.offset + r.len))
        .collect();
    assert!(!reads.is_empty(), "the digests were not read: not resumed");
    reads.sort_unstable();
    for w in reads.windows(2) {
        assert!(w[0].1 <= w[1].0, "slot pages read twice: {reads:?}");
    }
    // A piece's four slot pages (64 blocks of 64 KiB, 32 bytes each) in one read.
    assert!(
        reads.iter().all(|(start, end)| end - start == 2048),
        "digests read a segment at a time: {reads:?}"
    );
}

/// Progress moves inside a copy piece, a segment at a time: a disk copied in one piece
/// (16 MiB, 1 MiB segments) reports figures inside it, not only its end, none below the
/// one before.
#[tokio::test]
async fn a_copy_piece_reports_progress_as_its_segments_land() {
    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<(u64, u64)>>);
    impl crate::Observer for Seen {
        fn event(&self, e: &crate::Event) {
            if let crate::Event::Progress {
                task: crate::Task::InitialCopy,
                done,
                total,
                ..
            } = e
            {
                self.0.lock().unwrap().push((*done, *total));
            }
        }
    }
    const MIB: u64 = 1 << 20;
    let len = 16 * MIB;
    let mut want = lifeboat_source::SplitMix64::new(29).bytes(len as usize);
    // A segment of zeros the replica holds already: it counts as done too.
    want[(5 * MIB) as usize..(6 * MIB) as usize].fill(0);
    let dir = tempfile::tempdir().unwrap();
    let file = tempfile::tempfile_in(dir.path()).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &want, 0).unwrap();
    let (disk, _faults, store) = disk_and_faulty_store(file, dir.path());
    let seen = Arc::new(Seen::default());
    let mut e = Engine::builder(store.clone(), dir.path().join("site"))
        .host(Arc::new(OneDiskHost(disk.clone())))
        .observer(seen.clone())
        .open()
        .await
        .unwrap();
    e.segment = MIB;
    let p = ReplicationPolicy {
        copy_chunk: len,
        ..policy()
    };
    e.protect("vm", &[PathBuf::from("vm/d0.raw")], p, 64 << 10)
        .await
        .unwrap();
    e.drive().await.unwrap();
    assert_eq!(e.protection("vm").unwrap(), ProtectionState::Protected);
    let seen = seen.0.lock().unwrap().clone();
    assert!(seen.iter().all(|&(_, total)| total == len), "{seen:?}");
    let done: Vec<u64> = seen.iter().map(|&(d, _)| d).collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    assert_eq!(done.last(), Some(&len), "{done:?}");
    let inside = done.iter().filter(|&&d| d > 0 && d < len).count();
    assert!(inside >= 15, "progress inside the piece: {done:?}");
}

/// A copy piece is sent in segments (read, hashed and sent while the next is read): a
/// process that dies after any of the store's requests, some of a piece's segments
/// landed, leaves a replica the next process finishes copying, equal to the disk and its
/// digests describing it. The disk's data lies across segments' ends, beside holes in
/// blocks it holds in part, and holds zero runs. Blocks larger than a segment (2 MiB)
/// too, without deaths.
#[tokio::test]
async fn a_copy_that_dies_inside_a_piece_is_finished_by_the_next_process() {
    // Pieces of 4 MiB sent in segments of 1 MiB (a real disk's: 64 and 4 MiB).
    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;
    let len = 6 * MIB;
    let mut rng = lifeboat_source::SplitMix64::new(17);
    let runs = [
        (0, 1536 * KIB),
        (1280 * KIB + 4096, 8192),
        (1792 * KIB + 8192, 768 * KIB),
        (4 * MIB - 4096, 4096),
        (5 * MIB, 256 * KIB),
    ];
    let mut want = vec![0u8; len as usize];
    for (at, n) in runs {
        let mut bytes = rng.bytes(n as usize);
        if n > 512 * KIB {
            bytes[256 * KIB as usize..288 * KIB as usize].fill(0);
        }
        want[at as usize..(at + n) as usize].copy_from_slice(&bytes);
    }
    // Every request a whole copy makes, the first time with no death.
    for block in [64 << 10, 2 << 20] {
        let deaths = block == 64 << 10;
        let mut total = None;
        let mut n = 0;
        while total.is_none_or(|t| deaths && n <= t) {
            let dir = tempfile::tempdir().unwrap();
            let file = tempfile::tempfile_in(dir.path()).unwrap();
            file.set_len(len).unwrap();
            for (at, n) in runs {
                let (at, end) = (at as usize, (at + n) as usize);
                std::os::unix::fs::FileExt::write_all_at(&file, &want[at..end], at as u64).unwrap();
            }
            let (disk, faults, store) = disk_and_faulty_store(file, dir.path());
            let open = || one_disk_engine(&store, dir.path().join("site"), &disk, MIB);
            let p = ReplicationPolicy {
                copy_chunk: 4 * MIB,
                ..policy()
            };
            let protect = |mut e: Engine| {
                let p = p.clone();
                async move {
                    let disks = [PathBuf::from("vm/d0.raw")];
                    e.protect("vm", &disks, p, block).await.map(|_| e)
                }
            };
            if total.is_some() {
                faults.kill_after(n);
                // The process dies: what it held in memory goes with it.
                if let Ok(e) = open().await {
                    let _ = protect(e).await;
                }
                faults.revive();
            }
            let mut e = open().await.unwrap();
            if e.item("vm").is_ok() {
                e.drive().await.unwrap();
            } else {
                e = protect(e).await.unwrap();
            }
            assert_eq!(
                e.protection("vm").unwrap(),
                ProtectionState::Protected,
                "dead after {n} requests"
            );
            let replica = store
                .read("lifeboat/items/vm/disk0", None, 0, len)
                .await
                .unwrap();
            assert!(
                replica[..] == want[..],
                "the replica differs (dead after {n})"
            );
            let v = e.verify("vm", None, false).await.unwrap();
            assert!(v.iter().all(Verified::clean), "dead after {n}: {v:?}");
            if total.is_none() {
                let kinds = [
                    Request::Create,
                    Request::Properties,
                    Request::Put,
                    Request::Clear,
                    Request::Read,
                    Request::Ranges,
                    Request::Snapshot,
                    Request::SetSequenceNumber,
                    Request::Metadata,
                    Request::Lease,
                    Request::GetDoc,
                    Request::PutDoc,
                    Request::List,
                ];
                total = Some(kinds.iter().map(|&k| faults.requests(k)).sum::<u64>());
            } else {
                n += 1;
            }
        }
    }
}

/// A sparse disk protected into a `LocalStore` whose requests are counted.
struct Counted {
    engine: Engine,
    disk: Arc<SparseDisk>,
    faults: Arc<FaultyStore<LocalStore>>,
    _dir: tempfile::TempDir,
}

impl Counted {
    /// Requests of `kind` made by protecting the disk of [`Counted::protect`] in pieces of
    /// each of `chunks`, each copy checked (protected, the replica equal to the disk).
    async fn requests(len: u64, data: &[u64], chunks: [u64; 2], kind: Request) -> [u64; 2] {
        let mut out = [0; 2];
        for (n, chunk) in out.iter_mut().zip(chunks) {
            let p = Counted::protect(len, data, chunk).await;
            *n = p.faults.requests(kind);
            assert_eq!(
                p.engine.protection("vm").unwrap(),
                ProtectionState::Protected
            );
            let replica = p
                .faults
                .read("lifeboat/items/vm/disk0", None, 0, len)
                .await
                .unwrap();
            let mut want = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&p.disk.file, &mut want, 0).unwrap();
            assert!(replica[..] == want[..], "the replica differs ({chunk})");
        }
        out
    }

    /// A disk of `len` bytes holding 4 KiB at each of `data` (holes elsewhere), protected
    /// in pieces of `chunk`.
    async fn protect(len: u64, data: &[u64], chunk: u64) -> Counted {
        let dir = tempfile::tempdir().unwrap();
        let file = tempfile::tempfile_in(dir.path()).unwrap();
        file.set_len(len).unwrap();
        for &at in data {
            std::os::unix::fs::FileExt::write_all_at(&file, &[0x5A; 4096], at).unwrap();
        }
        let faults = Arc::new(FaultyStore::new(
            LocalStore::open(dir.path().join("store")).unwrap(),
        ));
        let store: Arc<dyn PageStore> = faults.clone();
        let (engine, disk) = protect_sparse(&store, dir.path(), file, chunk).await;
        Counted {
            engine,
            disk,
            faults,
            _dir: dir,
        }
    }
}

/// A copy piece asks one blob's properties (a HEAD on Azure): the replica's, though the
/// piece holds zeros to check against its digests and the digests are saved after it
/// (their blob's were asked at its first save). Counted as the difference between copies
/// of the same disk in 16 and 8 MiB pieces (every piece holds data and zeros).
#[tokio::test]
async fn a_copy_piece_asks_one_properties() {
    const MIB: u64 = 1 << 20;
    let len = 48 * MIB;
    let data: Vec<u64> = (0..len)
        .step_by(8 * MIB as usize)
        .map(|at| at + MIB)
        .collect();
    let mut heads = Vec::new();
    for chunk in [16 * MIB, 8 * MIB] {
        let p = Counted::protect(len, &data, chunk).await;
        heads.push(p.faults.requests(Request::Properties));
    }
    assert_eq!(heads[1] - heads[0], 3, "three more pieces: {heads:?}");
}

/// A run of holes is skipped in one action, asking the replica's properties once (each
/// piece asked them: a request per 64 MiB of a thin disk on Azure): copies of a disk with
/// data in its first and last MiB ask as many in 2 MiB pieces as in 8 MiB ones, and the
/// replica equals the disk.
#[tokio::test]
async fn a_run_of_holes_asks_the_replica_once() {
    const MIB: u64 = 1 << 20;
    let pieces = [8 * MIB, 2 * MIB];
    let heads = Counted::requests(48 * MIB, &[0, 47 * MIB], pieces, Request::Properties).await;
    assert_eq!(heads[0], heads[1], "properties asked: {heads:?}");
}

/// Copy pieces of holes the replica holds save no catalogue (a thin disk is mostly such
/// pieces; each save is two fsyncs locally): copies of a disk with data in its first and
/// last 16 MiB write as many documents in 8 MiB pieces (four of them holes) as in 16 MiB
/// ones (one). Their progress is saved with the next piece that sends something.
#[tokio::test]
async fn pieces_of_holes_save_no_catalogue() {
    const MIB: u64 = 1 << 20;
    let pieces = [16 * MIB, 8 * MIB];
    let saves = Counted::requests(48 * MIB, &[MIB, 44 * MIB], pieces, Request::PutDoc).await;
    assert_eq!(saves[0], saves[1], "documents written: {saves:?}");
}

/// The initial copy of a thin disk reads none of the replica's digests: their blob was
/// made by the copy, which knows the pages it wrote (the rest are zeros). Each piece of
/// holes read its slot pages before (a request per piece on Azure).
#[tokio::test]
async fn a_thin_copy_reads_no_digests() {
    const MIB: u64 = 1 << 20;
    let p = Counted::protect(48 * MIB, &[MIB, 44 * MIB], 8 * MIB).await;
    assert_eq!(
        p.engine.protection("vm").unwrap(),
        ProtectionState::Protected
    );
    let digests: Vec<_> = p
        .faults
        .reads()
        .into_iter()
        .filter(|r| r.blob.ends_with(".digests"))
        .collect();
    assert!(digests.is_empty(), "digests read: {digests:?}");
}

/// Once an item's disks are copied, the copy buffers are let go (on another thread: a
/// 64 MiB buffer took 8 ms to give back, on the way out of `protect`).
#[tokio::test]
async fn copy_buffers_go_once_the_copy_is_done() {
    const MIB: u64 = 1 << 20;
    let p = Counted::protect(48 * MIB, &[MIB, 44 * MIB], 16 * MIB).await;
    assert_eq!(
        p.engine.protection("vm").unwrap(),
        ProtectionState::Protected
    );
    assert_eq!(p.engine.buffers.kept(), 0, "copy buffers kept");
}

/// A `FileHost` that may not write its disks (a read-only mount, say): it opens them to
/// be read only.
#[derive(Debug)]
struct ReadOnlyHost;

impl crate::Host for ReadOnlyHost {
    fn open_disk(&self, path: &Path) -> std::io::Result<Arc<dyn crate::Disk>> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is read-only", path.display()),
        ))
    }

    fn open_disk_read(&self, path: &Path) -> std::io::Result<Arc<dyn crate::Disk>> {
        crate::Host::open_disk_read(&crate::FileHost, path)
    }

    fn create_disk(&self, _: &Path, _: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::PermissionDenied.into())
    }
}

/// A disk the host may only read is protected, resynchronised and verified against
/// (nothing but a failback writes a protected disk); `FileHost` opens it read-only then.
#[tokio::test]
async fn a_disk_the_host_may_not_write_is_protected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d0.raw");
    std::fs::write(&path, lifeboat_source::SplitMix64::new(9).bytes(4 << 20)).unwrap();
    let store: Arc<dyn PageStore> = Arc::new(LocalStore::open(dir.path().join("store")).unwrap());
    let mut e = Engine::builder(store, dir.path().join("site"))
        .host(Arc::new(ReadOnlyHost))
        .open()
        .await
        .unwrap();
    e.protect("vm", std::slice::from_ref(&path), policy(), 64 << 10)
        .await
        .unwrap();
    e.command(Command::Resync { item: "vm".into() })
        .await
        .unwrap();
    assert_eq!(e.protection("vm").unwrap(), ProtectionState::Protected);
    let v = e.verify("vm", None, true).await.unwrap();
    assert!(v.iter().all(Verified::clean), "{v:?}");
    // FileHost's read-only handle refuses writes.
    let disk = crate::Host::open_disk_read(&crate::FileHost, &path).unwrap();
    assert!(disk.write_at(0, b"x").is_err(), "a write went through");
}

/// Names that would escape a path or collide are refused before anything is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_names_are_checked() {
    let w = World::new();
    let mut e = w.engine("a").await;
    for bad in [
        "",
        "..",
        "a/b",
        "/abs",
        "with space",
        ".hidden",
        &"x".repeat(64),
    ] {
        let r = e
            .protect(bad, &[PathBuf::from("vm/d0")], policy(), 64 << 10)
            .await;
        assert!(matches!(r, Err(Error::Invalid(_))), "{bad:?}: {r:?}");
    }
    assert_eq!(e.items().count(), 0);
    assert!(w.store.list("lifeboat/items/").await.unwrap().is_empty());
}

/// Asserts two disks' bytes are the same, naming the first difference (not printing them).
#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {:02x} instead of {:02x}",
            got[i], want[i]
        );
    }
}

fn applied(r: Replicated) -> usize {
    match r {
        Replicated::Applied { cycles, .. } => cycles as usize,
        other => panic!("expected cycles applied, got {other:?}"),
    }
}

/// Protect; the guest writes l1 then l2 (l2 follows l1); only l2 is handed over. It must
/// not be applied (the latest point would lack l1's write): the item needs a resync and
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_whose_predecessor_is_missing_is_never_applied() {
    let w = World::new();
    let mut e = protected(&w, "a").await;
    let point1 = w.point_bytes(&e, 1).await;
    let _l1 = w.log(&e, 1, w.chain(&e));
    let l2 = w.log(&e, 2, [1; 16]);
    let r = e.replicate("vm", &[(0, l2)], false).await.unwrap();
    match r {
        Replicated::ResyncRequired(causes) => assert!(
            causes.contains(&HealthCause::ResyncRequired(ResyncReason::LogChainBroken {
                disk: 0
            })),
            "{causes:?}"
        ),
        other => panic!("l2 was taken: {other:?}"),
    }
    same(
        &w.replica_bytes().await,
        &point1,
        "l2's write reached the replica",
    );
    assert_eq!(e.item("vm").unwrap().status.points.len(), 1);
    assert_ne!(
        e.item("vm").unwrap().status.health,
        lifeboat_replication::Health::Normal
    );
}

/// A log handed over is staged without a copy (a hard link on the site's file system); if
/// the file is then rewritten in place with another log, applying it is refused, not done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_log_is_linked_and_checked_before_it_is_applied() {
    use std::os::unix::fs::MetadataExt;
    let w = World::new();
    let mut e = protected(&w, "a").await;
    let point1 = w.point_bytes(&e, 1).await;
    let l1 = w.log(&e, 1, w.chain(&e));
    e.stage_logs("vm", &[(0, l1.clone())], false).await.unwrap();
    assert_eq!(
        std::fs::metadata(&l1).unwrap().nlink(),
        2,
        "staged by a link"
    );
    // Rewritten in place (the same file, so the staged link too): another log.
    let other = std::fs::read(w.log_naming(9, [7; 16], [0; 16])).unwrap();
    std::fs::write(&l1, other).unwrap();
    let err = e.replicate("vm", &[], false).await.unwrap_err().to_string();
    assert!(err.contains("the staged log changed"), "{err}");
    same(
        &w.replica_bytes().await,
        &point1,
        "a changed log reached the replica",
    );
}

/// A staged log whose payload is changed in place after it was handed over (the same
/// header: the UniqueId check passes) fails its cycle on the DataChecksum: no recovery
/// point holds its bytes and the item is not Normal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_log_changed_in_place_fails_its_cycle() {
    use std::os::unix::fs::FileExt;
    let w = World::new();
    let mut e = protected(&w, "a").await;
    let point1 = w.point_bytes(&e, 1).await;
    let l1 = w.log(&e, 1, w.chain(&e));
    e.stage_logs("vm", &[(0, l1.clone())], false).await.unwrap();
    let bytes = std::fs::read(&l1).unwrap();
    let at = bytes.windows(4096).position(|p| p == [1u8; 4096]).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&l1).unwrap();
    f.write_all_at(&[2], (at + 100) as u64).unwrap();
    let err = e.replicate("vm", &[], false).await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("checksum"), "{err}");
    let status = &e.item("vm").unwrap().status;
    assert_eq!(status.points.len(), 1, "a point holds the changed log");
    assert_ne!(status.health, lifeboat_replication::Health::Normal);
    same(
        &w.point_bytes(&e, 1).await,
        &point1,
        "the recovery point changed",
    );
}

/// Logs handed over together are taken in chain order, whatever order they are given in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_taken_in_chain_order() {
    let w = World::new();
    let mut e = protected(&w, "a").await;
    let [l1, l2, l3] = w.three_logs(&e);
    let r = e
        .replicate("vm", &[(0, l3), (0, l1.clone()), (0, l2)], false)
        .await
        .unwrap();
    assert_eq!(applied(r), 1);
    same(&w.replica_bytes().await, &w.source(), "replica");
    // Handed over again: taken before, nothing to do.
    assert_eq!(
        e.replicate("vm", &[(0, l1)], false).await.unwrap(),
        Replicated::Nothing
    );
}

/// Digests held in memory follow the batch, not the disk: after protecting a 64 MiB disk
/// in 4 MiB pieces (1024 blocks: 32 KiB of slots) the engine holds the slots of the last
/// piece's blocks only; a budget of one byte keeps one item's; each batch reads the slot
/// pages it needs back, and the digests stay right (a verify against the source finds
/// nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_held_in_memory_follow_the_batch_and_stay_within_their_budget() {
    let w = World::new();
    let mut big = vec![0u8; 64 << 20];
    for (i, b) in big.iter_mut().enumerate().step_by(4096) {
        *b = (i / 4096) as u8 | 1;
    }
    w.host.add_disk("vm2/d0", big);
    let mut e = Engine::builder(w.store.clone(), w.dir.path().join("a"))
        .host(w.host.clone())
        .clock(w.clock.clone())
        .digest_memory(1)
        .open()
        .await
        .unwrap();
    e.protect("vm", &[PathBuf::from("vm/d0")], policy(), 64 << 10)
        .await
        .unwrap();
    let pieces = ReplicationPolicy {
        copy_chunk: 4 << 20,
        ..policy()
    };
    e.protect("vm2", &[PathBuf::from("vm2/d0")], pieces, 64 << 10)
        .await
        .unwrap();
    let held = e.digests.lock().unwrap().bytes();
    // 4 MiB is 64 blocks: 2 KiB of slots.
    assert_eq!(held, 2048, "the last piece's slot pages");
    let l1 = w.log(&e, 1, w.chain(&e));
    assert_eq!(
        applied(e.replicate("vm", &[(0, l1)], false).await.unwrap()),
        1
    );
    assert!(
        e.digests.lock().unwrap().bytes() < held,
        "vm2's were evicted"
    );
    same(&w.replica_bytes().await, &w.source(), "replica");
    for item in ["vm", "vm2"] {
        let v = e.verify(item, None, true).await.unwrap();
        assert!(v.iter().all(Verified::clean), "{item}: {v:?}");
    }
}

/// Job actions and plan commands given to `Engine::command` go where they belong: a job
/// action to the job (an unknown one is said so, not taken for an item), a plan's start
/// to `start_plan`, which names its outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_command_routes_job_and_plan_commands() {
    use lifeboat_replication::{Command, JobId, PlanFailover};

    let w = World::new();
    let mut e = protected(&w, "a").await;
    let done = e.jobs()[0].id.clone();
    let r = e.command(Command::CancelJob { job: done.clone() }).await;
    assert!(
        matches!(&r, Err(Error::Refused(lifeboat_replication::OpError::JobActionRefused { job, .. })) if *job == done),
        "{r:?}"
    );
    let r = e
        .command(Command::ResumeJob {
            job: JobId::new("nobody", 1),
        })
        .await;
    assert!(
        matches!(&r, Err(Error::Invalid(m)) if m.contains("no job nobody#1")),
        "{r:?}"
    );
    let start = Command::StartPlan {
        plan: "p".into(),
        failover: PlanFailover::Planned,
    };
    let r = e.command(start).await;
    assert!(
        matches!(&r, Err(Error::Invalid(m)) if m.contains("start_plan")),
        "{r:?}"
    );
}

/// After a lost log, a resync restarts the chain: the disk takes logs again, and a late
/// log of the old chain (covered by the resync) is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_lost_log_a_resync_lets_the_disk_take_logs_again() {
    let w = World::new();
    let mut e = protected(&w, "a").await;
    let l1 = w.log(&e, 1, w.chain(&e));
    let l2 = w.log(&e, 2, [1; 16]);
    assert!(matches!(
        e.replicate("vm", &[(0, l2)], false).await.unwrap(),
        Replicated::ResyncRequired(_)
    ));
    e.command(Command::Resync { item: "vm".into() })
        .await
        .unwrap();
    assert_eq!(e.protection("vm").unwrap(), ProtectionState::Protected);
    same(&w.replica_bytes().await, &w.source(), "replica");
    // The lost log turns up late: its write is in the resynced replica already.
    assert_eq!(
        e.replicate("vm", &[(0, l1)], false).await.unwrap(),
        Replicated::Nothing
    );
    // The new chain starts where the resync restarted tracking.
    let l4 = w.log(&e, 4, w.chain(&e));
    let l5 = w.log(&e, 5, [4; 16]);
    assert_eq!(
        applied(e.replicate("vm", &[(0, l4), (0, l5)], false).await.unwrap()),
        1
    );
    same(&w.replica_bytes().await, &w.source(), "replica");
}

/// Eight quick replicate runs with a 15-minute copy frequency and a 1-hour retention:
/// every point is stamped with the time it was made (none in the future) and none is
/// pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_replicates_keep_their_points_and_their_times() {
    let w = World::new();
    let mut e = w.engine("a").await;
    let policy = ReplicationPolicy {
        copy_frequency: lifeboat_replication::CopyFrequency::Minutes15,
        ..policy()
    };
    e.protect("vm", &[PathBuf::from("vm/d0")], policy, 64 << 10)
        .await
        .unwrap();
    let mut previous = w.chain(&e);
    for n in 1..=8u8 {
        w.advance(Duration::from_secs(1));
        let l = w.log(&e, n, previous);
        previous = [n; 16];
        assert_eq!(
            applied(e.replicate("vm", &[(0, l)], false).await.unwrap()),
            1
        );
    }
    let now = w.clock.now();
    let points = e.item("vm").unwrap().status.points;
    assert_eq!(points.len(), 9, "{points:?}");
    assert!(points.iter().all(|p| p.time <= now), "{points:?}");
    assert_eq!(points.last().unwrap().time, now);
    // Each point holds the source as of its own cycle.
    same(&w.point_bytes(&e, 9).await, &w.source(), "point 9");
    // A log handed over ten minutes after it closed: its point describes the close.
    let closed = w.clock.now();
    let l = w.log(&e, 9, previous);
    w.advance(Duration::from_secs(600));
    assert_eq!(
        applied(e.replicate("vm", &[(0, l)], false).await.unwrap()),
        1
    );
    let last = *e.item("vm").unwrap().status.points.last().unwrap();
    assert_eq!(last.time, closed);
}

/// A cycle stuck before it was applied (its writes keep failing), then a planned failover
/// with the final log: the recovered disk holds every write, the stuck cycle's included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_after_a_stuck_cycle_loses_no_write() {
    let w = World::new();
    let mut e = protected(&w, "a").await;
    let l1 = w.log(&e, 1, w.chain(&e));
    w.faults.fail_next(Request::Put, 1000, Fault::Status(503));
    let r = e.replicate("vm", &[(0, l1)], false).await;
    assert!(matches!(r, Err(Error::Retrying { .. })), "{r:?}");
    w.faults.fail_next(Request::Put, 0, Fault::Status(503));
    let last = w.log(&e, 2, [1; 16]);
    let out = w.dir.path().join("recovered");
    let export = Export {
        dir: Some(out.clone()),
        ..Export::default()
    };
    e.failover("vm", Failover::Planned(vec![(0, last)]), export)
        .await
        .unwrap();
    assert_eq!(
        e.protection("vm").unwrap(),
        ProtectionState::PlannedFailoverCompleted
    );
    same(
        &std::fs::read(out.join("disk0.raw")).unwrap(),
        &w.source(),
        "recovered",
    );
}

/// Resyncs the item: it is Protected, and its replica and newest point equal the source.
async fn resync_to_source(w: &World, e: &mut Engine) {
    e.command(Command::Resync { item: "vm".into() })
        .await
        .unwrap();
    assert_eq!(e.protection("vm").unwrap(), ProtectionState::Protected);
    same(&w.replica_bytes().await, &w.source(), "replica");
    let last = e.item("vm").unwrap().status.points.last().unwrap().id.0;
    same(&w.point_bytes(e, last).await, &w.source(), "the last point");
}

/// A flush of the replica's data file fails after a cycle's writes (the kernel may have
/// dropped them, and reports that to one fsync only): the cycle fails saying so, no later
/// sync point passes and no read shows those pages while they are not written again, and
/// the touched blocks' digests are unknown; a resync sends them again, and the replica and
/// its new recovery point equal the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_is_never_taken_for_a_landed_cycle() {
    let w = World::new();
    let mut e = protected(&w, "a").await;
    let points = e.item("vm").unwrap().status.points.len();
    let l1 = w.log(&e, 1, w.chain(&e));
    w.faults
        .inner()
        .fail_flush("lifeboat/items/vm/disk0")
        .unwrap();
    let r = e.replicate("vm", &[(0, l1)], false).await;
    assert!(matches!(r, Err(Error::Critical { .. })), "{r:?}");
    assert!(format!("{r:?}").contains("write them again"), "{r:?}");
    assert_eq!(e.item("vm").unwrap().status.points.len(), points);
    let r = w
        .store
        .read("lifeboat/items/vm/disk0", None, 8192, 4096)
        .await;
    assert!(format!("{r:?}").contains("may not be on disk"), "{r:?}");
    resync_to_source(&w, &mut e).await;
}

/// A resync while a cycle is stuck: the stale cycle is covered by the resync and never
/// applied on top of it (its write would undo a later one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_never_reapplies_a_stale_cycle() {
    let w = World::new();
    let mut e = protected(&w, "a").await;
    let l1 = w.log(&e, 1, w.chain(&e));
    w.faults.fail_next(Request::Put, 1000, Fault::Status(503));
    assert!(e.replicate("vm", &[(0, l1)], false).await.is_err());
    w.faults.fail_next(Request::Put, 0, Fault::Status(503));
    // The guest overwrites l1's block; no log reaches the site (say, the host lost it).
    w.host.write("vm/d0", 8192, &[0xEE; 4096]).unwrap();
    resync_to_source(&w, &mut e).await;
}

/// A cycle is split into batches as when it began, whatever this build would split it
/// in: batch i is fenced on the replica's sequence number before the cycle plus i, so a
/// build (or a constant) that split it otherwise on resuming would skip or repeat writes.
/// Here a begun cycle of three 4 KiB writes records 64 MiB batches; recorded as 4 KiB
/// instead, the resumed cycle sends three batches, and the replica equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_resumes_in_the_batches_it_began_with() {
    let w = World::new();
    let mut e = protected(&w, "a").await;
    let [l1, l2, l3] = w.three_logs(&e);
    w.faults.fail_next(Request::Put, 1000, Fault::Status(503));
    let logs = [(0, l1), (0, l2), (0, l3)];
    assert!(e.replicate("vm", &logs, false).await.is_err());
    w.faults.fail_next(Request::Put, 0, Fault::Status(503));
    let cycles = &mut e.doc_mut("vm").unwrap().cycles;
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    let begun = cycles.values_mut().next().unwrap();
    assert_eq!(begun.batch_bytes, Some(LOG_BATCH_BYTES));
    begun.batch_bytes = Some(4096);
    let expect = begun.expect_seq[0];
    e.resume(true).await.unwrap();
    let seq = w.replica_seq().await;
    assert_eq!(seq - expect, 3, "batches sent");
    same(&w.replica_bytes().await, &w.source(), "replica");
}

/// A cycle recorded before its batch size was is split in 32 MiB, as it was then.
#[test]
fn a_cycle_recorded_without_its_batch_size_was_split_in_32_mib() {
    let c: Cycle = serde_json::from_str(r#"{"logs": [], "expect_seq": [7]}"#).unwrap();
    assert_eq!(c.batch_bytes, None);
    assert_eq!(UNRECORDED_LOG_BATCH_BYTES, 32 << 20);
    let json = serde_json::to_string(&Cycle::default()).unwrap();
    assert!(!json.contains("batch_bytes"), "{json}");
}

/// A catalogue write that landed but whose reply was lost is this site's own, not a
/// take-over: the engine carries on from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_catalogue_reply_is_not_a_take_over() {
    let w = World::new();
    let mut e = protected(&w, "a").await;
    w.faults
        .fail_next(Request::PutDoc, 1, Fault::ResetAfterApply);
    let l1 = w.log(&e, 1, w.chain(&e));
    assert!(e.replicate("vm", &[(0, l1)], false).await.is_err());
    e.resume(true).await.unwrap();
    let v = e.item("vm").unwrap();
    assert!(v.owned);
    assert_eq!(v.status.state, ProtectionState::Protected);
    let l2 = w.log(&e, 2, w.chain(&e));
    e.replicate("vm", &[(0, l2)], false).await.unwrap();
    same(&w.replica_bytes().await, &w.source(), "replica");
}

/// Seeds of the whole-engine simulation (`sim`) that once broke a rule: partial log
/// deliveries, a cycle's point claiming a later cycle's moment, a failover cancelled
/// during a resync, a command acting before its catalogue write landed, a cycle applied
/// on top of logs that needed a resync, digests claiming a sequence number after a batch
/// landed in part (a later resync then skipped blocks that differed), a catalogue write
/// whose reply was lost taken for a take-over.
const SIM_REGRESSIONS: [u64; 14] = [
    4, 20, 30, 52, 64, 67, 118, 136, 235, 287, 866, 1599, 3679, 3838,
];

fn simulate(seeds: impl IntoIterator<Item = u64>) {
    let failed: Vec<String> = seeds
        .into_iter()
        .filter_map(|seed| crate::sim::run(seed, 80).err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} seed(s) failed; the first:\n{}",
        failed.len(),
        failed[0]
    );
}

#[test]
fn simulation_regressions() {
    simulate(SIM_REGRESSIONS);
}

/// A few hundred fresh seeds each run (`LIFEBOAT_SIM_SEEDS` says how many; `scripts/soak`
/// runs thousands).
#[test]
fn simulation() {
    let n: u64 = std::env::var("LIFEBOAT_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    simulate(100_000..100_000 + n);
}

/// A host whose disks' large reads wait until `n` of them are under way at once (or fail
/// after a few seconds): a protect that copies items one at a time cannot pass it.
#[derive(Debug)]
struct Rendezvous {
    inner: Arc<MemoryHost>,
    n: usize,
    arrived: Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>,
    /// Large reads, counted.
    reads: Arc<AtomicU64>,
}

struct MeetingDisk {
    inner: Arc<dyn crate::Disk>,
    n: usize,
    arrived: Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>,
    reads: Arc<AtomicU64>,
}

impl lifeboat_source::ReadAt for MeetingDisk {
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if buf.len() >= 1 << 20 {
            let (count, cv) = &*self.arrived;
            let mut c = count.lock().unwrap();
            *c += 1;
            self.reads.fetch_add(1, Ordering::SeqCst);
            cv.notify_all();
            let (c, waited) = cv
                .wait_timeout_while(c, Duration::from_secs(5), |c| *c < self.n)
                .unwrap();
            if waited.timed_out() {
                return Err(std::io::Error::other(format!(
                    "{} of {} copy reads under way at once",
                    *c, self.n
                )));
            }
        }
        self.inner.read_exact_at(buf, offset)
    }
}

impl crate::Disk for MeetingDisk {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset, data)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
}

impl crate::Host for Rendezvous {
    fn open_disk(&self, path: &Path) -> std::io::Result<Arc<dyn crate::Disk>> {
        Ok(Arc::new(MeetingDisk {
            inner: self.inner.open_disk(path)?,
            n: self.n,
            arrived: self.arrived.clone(),
            reads: self.reads.clone(),
        }))
    }

    fn create_disk(&self, path: &Path, len: u64) -> std::io::Result<()> {
        self.inner.create_disk(path, len)
    }
}

/// With `transfers(3)`, three items' initial copies run at once, then their resyncs, then
/// their cycles: each copy's large read waits until all three are reading, each resync's
/// and each cycle's first replica write until all three are writing (either fails after a
/// few seconds otherwise, as one item at a time would), and every replica ends equal to
/// its source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_copy_resync_and_apply_logs_at_once_up_to_the_transfer_limit() {
    let w = World::new();
    let items = ["vm", "vm2", "vm3"];
    for (i, item) in items.iter().enumerate() {
        let mut data = vec![0u8; 4 << 20];
        for (j, b) in data.iter_mut().enumerate().step_by(512) {
            *b = (i * 7 + j / 512) as u8 | 1;
        }
        w.host.add_disk(format!("{item}/d1"), data);
    }
    let host = Arc::new(Rendezvous {
        inner: w.host.clone(),
        n: items.len(),
        arrived: Arc::default(),
        reads: Arc::default(),
    });
    let mut e = Engine::builder(w.store.clone(), w.dir.path().join("a"))
        .host(host.clone())
        .clock(w.clock.clone())
        .transfers(items.len())
        .open()
        .await
        .unwrap();
    let pieces = ReplicationPolicy {
        copy_chunk: 1 << 20,
        ..policy()
    };
    // Registered first, copied together.
    e.focus(Some(Vec::new()));
    for item in items {
        e.protect(
            item,
            &[PathBuf::from(format!("{item}/d1"))],
            pieces.clone(),
            64 << 10,
        )
        .await
        .unwrap();
    }
    e.focus(None);
    e.drive().await.unwrap();
    let same_as_source = async |e: &Engine| {
        for (i, item) in items.iter().enumerate() {
            let st = e.item(item).unwrap().status;
            assert_eq!(st.state, ProtectionState::Protected, "{item}: {st:?}");
            assert!(st.causes.is_empty(), "{item}: {:?}", st.causes);
            let replica = w
                .store
                .read(&format!("lifeboat/items/{item}/disk0"), None, 0, 4 << 20)
                .await
                .unwrap();
            assert!(
                replica[..] == w.host.disk(format!("{item}/d1")).unwrap()[..],
                "{item} (#{i}) differs from its source"
            );
        }
    };
    same_as_source(&e).await;
    // Each piece read once: none read ahead beside other items' pieces (unused there).
    assert_eq!(host.reads.load(Ordering::SeqCst), 3 * 4);

    // Each disk changes outside tracking; the three resyncs send together (the store holds
    // each replica's first data write until all three are writing; with `parallel` the
    // comparisons share one pool of readers, so reads do not tell).
    w.faults
        .meet(items.len(), Duration::from_secs(5), |blob, at| {
            blob.ends_with("/disk0") && at < 4 << 20
        });
    e.focus(Some(Vec::new()));
    for (i, item) in items.iter().enumerate() {
        w.host
            .write(format!("{item}/d1"), (i as u64 + 1) << 20, &[0xAB; 8192])
            .unwrap();
        e.command(Command::Resync {
            item: item.to_string(),
        })
        .await
        .unwrap();
    }
    e.focus(None);
    e.drive().await.unwrap();
    same_as_source(&e).await;
    for item in items {
        let report = &e.item(item).unwrap().item.last_resync[0];
        assert_eq!(report.bytes_sent, 65536, "{item}: {report:?}");
    }

    // A log for each; the three cycles apply together.
    let applied_before: Vec<u64> = items
        .iter()
        .map(|i| e.item(i).unwrap().status.cycles_applied)
        .collect();
    w.faults
        .meet(items.len(), Duration::from_secs(5), |blob, at| {
            blob.ends_with("/disk0") && at < 4 << 20
        });
    e.focus(Some(Vec::new()));
    for (i, item) in items.iter().enumerate() {
        let t = &e.item(item).unwrap().item.disks[0].tracking;
        let log = w.log_on(
            &format!("{item}/d1"),
            40 + i as u8,
            t.last_log,
            t.write_guid,
        );
        e.replicate(item, &[(0, log)], false).await.unwrap();
    }
    e.focus(None);
    e.drive().await.unwrap();
    same_as_source(&e).await;
    for (item, before) in items.iter().zip(applied_before) {
        let after = e.item(item).unwrap().status.cycles_applied;
        assert_eq!(after, before + 1, "{item}");
    }
}

/// An item protected by another engine on the site while this one (a service) waits
/// unlocked is read back and copied by this one: the new catalogue document counts as a
/// catalogue write (a service started before the item was protected used to never see it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_protected_beside_a_waiting_engine_is_picked_up_by_it() {
    let w = World::new();
    let mut service = w.engine("a").await;
    service
        .unlocked(async {
            let mut command = w.engine("a").await;
            // As a command beside a service: it registers, the service copies.
            command.focus(Some(Vec::new()));
            command
                .protect("vm", &[PathBuf::from("vm/d0")], policy(), 64 << 10)
                .await
                .unwrap();
            assert_eq!(
                command.protection("vm").unwrap(),
                ProtectionState::EnablingProtection
            );
        })
        .await
        .unwrap();
    service.drive().await.unwrap();
    assert_eq!(
        service.protection("vm").unwrap(),
        ProtectionState::Protected
    );
    same(&w.replica_bytes().await, &w.source(), "replica");
}

/// A copy segment's buffer is taken back once nothing holds a slice of it (then a later
/// segment reads into the same memory), never while something does; the segment's bytes lie
/// in it as in the page cache, relative to a line (the kernel's copies into and out of it
/// run at a third of the speed 16 bytes off, as the allocator places a large block).
#[test]
fn copy_buffers_are_reused_only_when_nothing_else_holds_them() {
    use lifeboat_source::LINE;
    let pool = crate::data::Buffers::default();
    let placed = |(buf, start): &(Vec<u8>, usize), len: usize, offset: u64| {
        assert!(buf.len() >= start + len, "{} < {start} + {len}", buf.len());
        let at = buf.as_ptr() as usize + start;
        assert_eq!(at % LINE, offset as usize % LINE, "misplaced for {offset}");
    };
    let buf = pool.take(1 << 20, 0);
    placed(&buf, 1 << 20, 0);
    let at = buf.0.as_ptr();
    let bytes = bytes::Bytes::from(buf.0);
    let slice = bytes.slice(10..20);
    pool.give(bytes.clone());
    let other = pool.take(1 << 20, 1 << 20);
    assert_ne!(other.0.as_ptr(), at, "a buffer still sliced was handed out");
    drop(slice);
    pool.give(bytes);
    let again = pool.take(1 << 20, 2 << 20);
    assert_eq!(again.0.as_ptr(), at, "the buffer was not reused");
    placed(&again, 1 << 20, 2 << 20);
    // A shorter last piece reuses it too, wherever it starts.
    pool.give(bytes::Bytes::from(again.0));
    let last = pool.take(4096, (3 << 20) + 520);
    assert_eq!(last.0.as_ptr(), at);
    placed(&last, 4096, (3 << 20) + 520);
}

/// A new copy buffer is not written to: its memory is faulted in by the reads that fill
/// it, so a piece's holes cost none (zeroing a 64 MiB buffer faulted in all of it on the
/// first piece's critical path, where only its data needs reading).
#[test]
fn a_new_copy_buffer_is_not_touched() {
    // Resident bytes of this process (Linux: /proc/self/statm, in pages).
    fn resident() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }
    let pool = crate::data::Buffers::default();
    let len = 256 << 20;
    let before = resident();
    let (buf, start) = pool.take(len, 0);
    let grew = resident().saturating_sub(before);
    assert!(buf.len() >= start + len);
    assert!(
        grew < len as u64 / 2,
        "taking a {len}-byte buffer made {grew} bytes resident"
    );
}

/// A copy segment hashes each block as it reads it (while the CPU's cache holds it): the
/// blocks of one run of data, across a read stride's end, a block holding a run of zeros
/// and one holding data in part, the rest holes (its holes zeroed in a reused buffer
/// first); a block the segment holds in part is left to be read back.
#[test]
fn a_segment_is_hashed_as_it_is_read() {
    use lifeboat_resync::{BlockSize, Digest, digest_block};
    const BS: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let file = tempfile::tempfile_in(dir.path()).unwrap();
    let len = 26 * BS;
    file.set_len(len).unwrap();
    let mut rng = lifeboat_source::SplitMix64::new(11);
    let mut want = vec![0u8; len as usize];
    // Block 0 data; 1 data with 4 KiB of zeros; 2 a hole; 3 zeros written; 4..=20 data
    // (a 1 MiB read stride ends at block 16), 21 a hole; 22 8 KiB of data, then a hole;
    // 23 a hole; 24 a hole, 4 KiB of data, a hole; 25 a hole.
    let runs = [
        (0, BS),
        (BS, BS),
        (3 * BS, BS),
        (4 * BS, 17 * BS),
        (22 * BS, 8192),
        (24 * BS + 8192, 4096),
    ];
    for (at, n) in runs {
        let mut bytes = rng.bytes(n as usize);
        if at == 3 * BS {
            bytes.fill(0);
        }
        if at == BS {
            bytes[8192..12288].fill(0);
        }
        want[at as usize..(at + n) as usize].copy_from_slice(&bytes);
        std::os::unix::fs::FileExt::write_all_at(&file, &bytes, at).unwrap();
    }
    let disk = SparseDisk {
        file,
        read: AtomicU64::new(0),
    };
    let bs = BlockSize::new(BS as u32).unwrap();
    let block = |b: u64| &want[(b * BS) as usize..((b + 1) * BS) as usize];
    // Buffers that held other bytes: the holes of a block hashed are zeroed.
    let pool = crate::data::Buffers::default();
    for _ in 0..2 {
        pool.give(bytes::Bytes::from(vec![0xA5; (21 * BS) as usize + 64]));
    }
    let read = |window: std::ops::Range<u64>| {
        let named =
            lifeboat_source::ReadAt::data_ranges(&disk, window.start, window.end - window.start)
                .unwrap();
        let data = crate::data::page_aligned(&named, window.clone());
        crate::copy::read_window(&disk, Path::new("d"), window, &data, &pool, bs, len).unwrap()
    };
    // A window that begins inside block 0 and ends inside block 20.
    let first = read(4096..20 * BS + 4096);
    let mut known = first.digests.known().to_vec();
    known.sort_by_key(|&(b, _)| b);
    let blocks: Vec<u64> = known.iter().map(|&(b, _)| b).collect();
    assert_eq!(blocks, (1..=19).collect::<Vec<u64>>());
    for &(b, d) in &known {
        assert_eq!(d, digest_block(block(b)), "block {b}");
    }
    assert_eq!(
        first.digests.rest(),
        &[4096..BS, 20 * BS..20 * BS + 4096][..]
    );
    // The changes hold the window's bytes.
    for c in &first.changes {
        if let lifeboat_pageblob::Change::Data { offset, data } = c {
            let at = *offset as usize;
            assert!(data[..] == want[at..at + data.len()], "change at {offset}");
        }
    }
    // Blocks holding data in part, among holes: hashed with their holes as zeros.
    let second = read(21 * BS..26 * BS);
    let mut known = second.digests.known().to_vec();
    known.sort_by_key(|&(b, _)| b);
    assert_eq!(
        known,
        vec![
            (21, Digest::Zero),
            (22, digest_block(block(22))),
            (23, Digest::Zero),
            (24, digest_block(block(24))),
            (25, Digest::Zero),
        ]
    );
    assert!(
        second.digests.rest().is_empty(),
        "{:?}",
        second.digests.rest()
    );
}

#[test]
fn an_items_document_names_its_item() {
    use crate::catalog::{item_doc, item_of, plan_doc, replica_blob};
    assert_eq!(item_of(&item_doc("vm-1.a")), Some("vm-1.a"));
    assert_eq!(item_of(&replica_blob("vm", 0)), None);
    assert_eq!(item_of(&plan_doc("vm")), None);
    assert_eq!(item_of("other/items/vm/catalog.json"), None);
}
