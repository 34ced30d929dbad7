//! Engines on a `MemoryHost` and a `LocalStore`: ownership, fencing and the catalogue.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lifeboat_hrl::{LogWriter, WriterConfig};
use lifeboat_pageblob::{LocalStore, PageStore};
use lifeboat_replication::{Command, PointId, ProtectionState, ReplicationPolicy};

use crate::{Clock, Engine, Error, MemoryHost, Replicated};

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
    host: Arc<MemoryHost>,
    clock: Arc<ManualClock>,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn PageStore> =
            Arc::new(LocalStore::open(dir.path().join("store")).unwrap());
        let host = Arc::new(MemoryHost::new());
        host.add_disk("vm/d0", vec![0u8; 2 << 20]);
        let clock = Arc::new(ManualClock::default());
        clock.set(Duration::from_secs(1_800_000_000));
        World {
            dir,
            store,
            host,
            clock,
        }
    }

    async fn engine(&self, site: &str) -> Engine {
        Engine::builder(self.store.clone(), self.dir.path().join(site))
            .host(self.host.clone())
            .clock(self.clock.clone())
            .open()
            .await
            .unwrap()
    }

    /// A log of one guest write, chained after `previous`.
    fn log(&self, e: &Engine, n: u8, previous: [u8; 16]) -> PathBuf {
        let t = &e.item("vm").unwrap().item.disks[0].tracking;
        let at = u64::from(n) * 8192;
        self.host.write("vm/d0", at, &[n; 4096]).unwrap();
        let path = self.dir.path().join(format!("l{n}.hrl"));
        let config = WriterConfig {
            unique_id: [n; 16],
            previous_unique_id: previous,
            vhd2_data_write_guid: t.write_guid,
            ..WriterConfig::default()
        };
        let mut w = LogWriter::new(std::fs::File::create(&path).unwrap(), config).unwrap();
        w.write(at, &[n; 4096], 0).unwrap();
        w.finish(1).unwrap();
        path
    }
}

fn policy() -> ReplicationPolicy {
    ReplicationPolicy {
        retention: Duration::from_secs(3600),
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
    let seq = w
        .store
        .properties("lifeboat/items/vm/disk0")
        .await
        .unwrap()
        .sequence_number;

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
    let l1 = w.log(&a, 1, [0; 16]);
    w.clock.set(w.clock.now() + Duration::from_secs(600));
    assert!(matches!(
        a.replicate("vm", &[(0, l1)]).await.unwrap(),
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
    let l1 = w.log(&a, 1, [0; 16]);
    a.replicate("vm", &[(0, l1)]).await.unwrap();
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
    assert_eq!(b.jobs().len(), 1);
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
