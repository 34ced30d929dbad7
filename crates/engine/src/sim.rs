//! The whole-engine deterministic simulation: seeded random runs of guest writes, log
//! deliveries (lost, duplicated, reordered, unclean, over half a disk), operator commands
//! (resync with pause, resume and cancel among them), process crashes, store faults (503,
//! 500, timeouts, a reply lost after the request landed, disk full, page writes changed
//! on the way and refused by their checksums) and clock jumps, checked after every step
//! against an oracle that keeps the source disks' history. Not a stable API: `cargo test`
//! runs a few hundred seeds, `scripts/soak N` many more (and prints a failing seed as a
//! command that replays it).
//!
//! What the oracle checks after every step:
//! - every recovery point holds the source disks as they were at the moment it claims;
//! - a Protected item whose health is Normal has a replica equal to its newest point;
//! - test-failover and failover disks hold their point; a planned failover's disks hold
//!   every write; failback targets hold the recovered disks;
//! - digests that claim the replica's sequence number describe its bytes;
//! - nothing outside the item's own names is ever written in the store.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_hrl::{HRL_EPOCH_UNIX_SECS, LogWriter, WriterConfig as LogConfig};
use lifeboat_pageblob::{
    Fault, FaultyStore, LocalStore, PageStore, ReplicaDigests, Request, WriterConfig, digests_blob,
};
use lifeboat_replication::{
    Command, CopyFrequency, Health, PointChoice, PointId, ProtectionState, ReplicationPolicy,
};

use crate::catalog::{Location, replica_blob};
use crate::host::{Clock, Disk, Host, MemoryHost};
use crate::{Engine, Error, Export, Failover};

const ITEM: &str = "vm";
const SIZES: [u64; 2] = [256 << 10, 128 << 10];
const BLOCK: u32 = 4096;
/// The simulation's first second (traces count from it).
const START: u64 = 1_900_000_000;

/// The simulation's generator: the workspace's one seeded generator.
pub use lifeboat_source::SplitMix64 as Rng;

/// A clock the simulation moves (both ways).
#[derive(Debug, Default)]
struct SimClock(AtomicU64);

impl Clock for SimClock {
    fn now(&self) -> Duration {
        Duration::from_secs(self.0.load(Ordering::SeqCst))
    }
}

/// The host: disks in memory, and the change tracking driver's state (where each disk's
/// chain stands, the writes of its open log, the logs closed and not handed over). It
/// closes logs on its own schedule (the simulation's steps) and when the engine asks.
#[derive(Debug)]
struct SimHost {
    disks: MemoryHost,
    tracking: Mutex<Tracking>,
}

#[derive(Debug, Default)]
struct Tracking {
    disks: Vec<Tracker>,
    /// Logs closed, waiting to be handed over.
    queue: VecDeque<Closed>,
    /// Logs closed so far (names them).
    logs: u64,
    /// The host's time (seconds since the Unix epoch).
    now: u64,
    /// Where logs are written.
    dir: PathBuf,
    /// Each disk's data-write GUID, as the engine recorded it.
    write_guids: Vec<[u8; 16]>,
}

#[derive(Clone, Debug, Default)]
struct Tracker {
    /// The id the next log follows.
    cursor: [u8; 16],
    /// Writes since the last close.
    open: Vec<(u64, Vec<u8>)>,
}

/// A log the host closed and has not handed over yet.
#[derive(Clone, Debug)]
struct Closed {
    disk: usize,
    path: PathBuf,
    /// When it was closed (seconds since the start).
    at: u64,
}

impl SimHost {
    fn tracking(&self) -> std::sync::MutexGuard<'_, Tracking> {
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes every disk's open log (one round: all disks at once).
    fn close_round(&self, unclean: bool) {
        let mut t = self.tracking();
        let now = t.now;
        let stamp = (now - HRL_EPOCH_UNIX_SECS) as u32;
        for d in 0..t.disks.len() {
            t.logs += 1;
            let id = blake3::hash(&t.logs.to_le_bytes());
            let mut unique = [0u8; 16];
            unique.copy_from_slice(&id.as_bytes()[..16]);
            let path = t.dir.join(format!("log{}.hrl", t.logs));
            let config = LogConfig {
                unique_id: unique,
                previous_unique_id: t.disks[d].cursor,
                vhd2_data_write_guid: t.write_guids.get(d).copied().unwrap_or([0; 16]),
                timestamp: stamp,
                ..LogConfig::default()
            };
            let Ok(file) = std::fs::File::create(&path) else {
                continue;
            };
            let Ok(mut w) = LogWriter::new(file, config) else {
                continue;
            };
            for (at, data) in &t.disks[d].open {
                let _ = w.write(*at, data, stamp);
            }
            if !unclean {
                let _ = w.finish(stamp);
            }
            t.disks[d].cursor = unique;
            t.disks[d].open.clear();
            t.queue.push_back(Closed {
                disk: d,
                path,
                at: now - START,
            });
        }
    }
}

impl Host for SimHost {
    fn open_disk(&self, path: &std::path::Path) -> std::io::Result<Arc<dyn Disk>> {
        self.disks.open_disk(path)
    }

    fn create_disk(&self, path: &std::path::Path, len: u64) -> std::io::Result<()> {
        self.disks.create_disk(path, len)
    }

    fn tracking_started(&self, _item: &str, disk: usize, chain: [u8; 16]) -> std::io::Result<()> {
        let mut t = self.tracking();
        if t.disks.len() <= disk {
            t.disks.resize(disk + 1, Tracker::default());
        }
        // A new chain: writes before it are covered by the copy that follows (logs of the
        // old chain waiting to be handed over still are: the engine skips them).
        t.disks[disk] = Tracker {
            cursor: chain,
            open: Vec::new(),
        };
        Ok(())
    }

    fn close_logs(&self, _item: &str, _disks: usize) -> std::io::Result<Vec<(usize, PathBuf)>> {
        self.close_round(false);
        Ok(self
            .tracking()
            .queue
            .drain(..)
            .map(|c| (c.disk, c.path))
            .collect())
    }
}

/// Writes the engine's events into the trace.
#[derive(Debug, Default)]
struct Recorder(Mutex<String>);

impl crate::Observer for Recorder {
    fn event(&self, event: &crate::Event) {
        if matches!(event, crate::Event::Progress { .. }) {
            return;
        }
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(s, "         engine: {event:?}");
    }
}

/// One seeded run.
struct Sim {
    rng: Rng,
    dir: tempfile::TempDir,
    faults: Arc<FaultyStore<LocalStore>>,
    store: Arc<dyn PageStore>,
    host: Arc<SimHost>,
    clock: Arc<SimClock>,
    engine: Option<Engine>,
    events: Arc<Recorder>,
    /// The source disks' history: (time, contents) each time they changed.
    history: Vec<(u64, Vec<Vec<u8>>)>,
    /// The highest time seen: the host's and the engine's clocks never run backwards.
    high: u64,
    trace: String,
}

/// Runs seed `seed` for `steps` steps; on a broken rule, returns what happened.
pub fn run(seed: u64, steps: u32) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut sim = Sim::new(seed).await?;
        let r = sim.go(steps).await;
        r.map_err(|e| {
            sim.note("(the end)");
            format!("seed {seed}: {e}\nsteps:\n{}{}", sim.trace, sim.dump())
        })
    })
}

impl Sim {
    async fn new(seed: u64) -> Result<Self, String> {
        // tmpfs when there is one: the simulation writes a lot of small files.
        let base = std::path::Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::tempdir_in(base)
        } else {
            tempfile::tempdir()
        }
        .map_err(|e| e.to_string())?;
        let faults = Arc::new(FaultyStore::new(
            LocalStore::open_unsynced(dir.path().join("store")).map_err(|e| e.to_string())?,
        ));
        // Page writes carry their checksums, as to Azure: a write changed on the way is
        // refused, not taken.
        faults.checksum_writes();
        let host = Arc::new(SimHost {
            disks: MemoryHost::default(),
            tracking: Mutex::new(Tracking {
                dir: dir.path().to_path_buf(),
                ..Tracking::default()
            }),
        });
        let mut rng = Rng::new(seed);
        for (d, &len) in SIZES.iter().enumerate() {
            // Thin in places: each 64 KiB (a copy piece) holds data or none, so copies
            // meet runs of holes to skip.
            let mut bytes = vec![0u8; len as usize];
            for piece in bytes.chunks_mut(64 << 10) {
                if rng.chance(60) {
                    for b in piece.iter_mut().step_by(97) {
                        *b = rng.next_u64() as u8;
                    }
                }
            }
            host.disks.add_disk(format!("src/d{d}"), bytes);
        }
        let clock = Arc::new(SimClock(AtomicU64::new(START)));
        let mut sim = Sim {
            rng,
            dir,
            store: faults.clone(),
            faults,
            host,
            clock,
            engine: None,
            events: Arc::new(Recorder::default()),
            history: Vec::new(),
            high: 0,
            trace: String::new(),
        };
        sim.open().await?;
        Ok(sim)
    }

    async fn open(&mut self) -> Result<(), String> {
        let writer = WriterConfig {
            in_flight: 1,
            retry: WriterConfig::default().retry.scaled(1, 100_000),
            ..WriterConfig::default()
        };
        let mut e = Engine::builder(self.store.clone(), self.dir.path().join("site"))
            .host(self.host.clone())
            .clock(self.clock.clone())
            .observer(self.events.clone())
            .writer(writer)
            .open()
            .await
            .map_err(|e| format!("open: {e}"))?;
        // Copy pieces of 64 KiB sent in parts, as a real disk's 256 MiB ones are.
        e.segment = 16 << 10;
        self.engine = Some(e);
        Ok(())
    }

    /// The item's points and jobs, for a failure's report.
    fn dump(&self) -> String {
        let mut out = String::new();
        let Some(e) = self.engine.as_ref() else {
            return out;
        };
        if let Ok(v) = e.item(ITEM) {
            let _ = writeln!(
                out,
                "state {:?}, health {:?}",
                v.status.state, v.status.health
            );
            for p in &v.status.points {
                let _ = writeln!(
                    out,
                    "  point {} at {}",
                    p.id.0,
                    p.time.as_secs().saturating_sub(START)
                );
            }
        }
        for j in e.jobs() {
            let tasks: Vec<String> = j.tasks.iter().map(|t| format!("{:?}", t)).collect();
            let _ = writeln!(
                out,
                "  job {} {:?} {:?} {}..{:?} tasks [{}] errors {:?}",
                j.id,
                j.kind,
                j.state,
                j.started.as_secs().saturating_sub(START),
                j.ended.map(|t| t.as_secs().saturating_sub(START)),
                tasks.join(", "),
                j.errors
            );
        }
        out
    }

    fn e(&mut self) -> &mut Engine {
        self.engine.as_mut().expect("open")
    }

    fn note(&mut self, s: impl AsRef<str>) {
        let events = std::mem::take(&mut *self.events.0.lock().unwrap_or_else(|p| p.into_inner()));
        self.trace.push_str(&events);
        let _ = writeln!(
            self.trace,
            "  {:>6} {}",
            self.high.saturating_sub(START),
            s.as_ref()
        );
    }

    fn sources(&self) -> Vec<PathBuf> {
        match self.engine.as_ref().and_then(|e| e.item(ITEM).ok()) {
            Some(v) => v.item.disks.iter().map(|d| d.source.clone()).collect(),
            None => (0..SIZES.len())
                .map(|d| format!("src/d{d}").into())
                .collect(),
        }
    }

    fn contents(&self) -> Vec<Vec<u8>> {
        self.sources()
            .iter()
            .map(|p| self.host.disks.disk(p).unwrap_or_default())
            .collect()
    }

    /// Records the source disks at the current time, if they changed.
    fn remember(&mut self) {
        let now = self.high;
        let c = self.contents();
        if self.history.last().is_none_or(|(_, last)| *last != c) {
            self.history.push((now, c));
        }
    }

    /// Failback wrote `to` (the source disks again, or alternates that become them).
    fn remember_disks(&mut self, to: &[PathBuf]) {
        if to == self.sources().as_slice() {
            self.remember();
        }
    }

    /// The source disks as they were at time `t`.
    fn at(&self, t: u64) -> Option<&Vec<Vec<u8>>> {
        self.history
            .iter()
            .rev()
            .find(|(when, _)| *when <= t)
            .map(|(_, c)| c)
    }

    /// Moves the wall clock (sometimes backwards). The host's and the engine's time never
    /// go back: each step is at least a second after the last, and the engine is shown it
    /// before the wall clock is set (a crash must not make it forget).
    fn tick(&mut self) {
        let now = self.clock.now().as_secs();
        let wall = match self.rng.below(20) {
            0 => now.saturating_sub(self.rng.below(7200) + 1),
            1 => now + 60 * (1 + self.rng.below(240)),
            _ => now + 1 + self.rng.below(40),
        };
        self.high = (self.high + 1).max(wall);
        self.host.tracking().now = self.high;
        self.show_time();
        self.clock.0.store(wall, Ordering::SeqCst);
    }

    /// Makes the engine's time the host's.
    fn show_time(&mut self) {
        let wall = self.clock.0.swap(self.high, Ordering::SeqCst);
        if let Some(e) = self.engine.as_mut() {
            e.now();
        }
        self.clock.0.store(wall, Ordering::SeqCst);
    }

    async fn go(&mut self, steps: u32) -> Result<(), String> {
        self.high = self.clock.now().as_secs();
        self.host.tracking().now = self.high;
        self.remember();
        self.protect().await?;
        self.check().await?;
        for _ in 0..steps {
            self.tick();
            self.step().await?;
            self.check().await?;
        }
        Ok(())
    }

    /// Protects the item (again, after its protection was disabled: a new replica, or
    /// the released one replaced).
    async fn protect(&mut self) -> Result<(), String> {
        let policy = ReplicationPolicy {
            copy_frequency: CopyFrequency::Minutes5,
            retention: Duration::from_secs(3600 * (1 + self.rng.below(3))),
            auto_resync: self.rng.chance(50),
            copy_chunk: 64 << 10,
            ..ReplicationPolicy::default()
        };
        self.note(format!("protect (auto resync {})", policy.auto_resync));
        let disks: Vec<PathBuf> = self.sources();
        let r = self.e().protect(ITEM, &disks, policy, BLOCK).await;
        // What is protected from now on: after a failback to other disks and protection
        // disabled, the original disks again, which the history last saw long ago.
        self.remember();
        self.expect_ok("protect", r.map(drop))
    }

    fn expect_ok(&mut self, what: &str, r: Result<(), Error>) -> Result<(), String> {
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                self.note(format!("{what}: {e}"));
                Ok(())
            }
        }
    }

    async fn step(&mut self) -> Result<(), String> {
        if let Some(v) = self.engine.as_ref().and_then(|e| e.item(ITEM).ok()) {
            self.host.tracking().write_guids =
                v.item.disks.iter().map(|d| d.tracking.write_guid).collect();
        }
        if self.engine.is_none() {
            self.note("restart after a crash");
            self.faults.revive();
            self.open().await?;
            self.show_time();
            let r = self.e().drive().await;
            return self.expect_ok("drive", r);
        }
        if self.rng.chance(6) {
            // The process dies within the next few store requests.
            let n = self.rng.below(40);
            self.note(format!("crash after {n} requests"));
            self.faults.kill_after(n);
        }
        if self.rng.chance(5) {
            let kinds = [
                Request::Put,
                Request::Clear,
                Request::SetSequenceNumber,
                Request::Snapshot,
                Request::PutDoc,
                Request::Read,
                Request::Properties,
            ];
            let kind = kinds[self.rng.below(kinds.len() as u64) as usize];
            let fault = match self.rng.below(6) {
                0 => Fault::Status(503),
                1 => Fault::Timeout,
                2 => Fault::ResetAfterApply,
                3 => Fault::DiskFull,
                // Page writes changed on the way (other requests carry no pages).
                4 => Fault::Corrupt,
                _ => Fault::Status(500),
            };
            let n = 1 + self.rng.below(12) as u32;
            self.note(format!("fault: next {n} {kind:?} fail with {fault:?}"));
            self.faults.fail_next(kind, n, fault);
        }
        let r = match self.rng.below(100) {
            0..=29 => {
                self.guest_writes();
                Ok(())
            }
            30..=44 => {
                self.close_logs();
                Ok(())
            }
            45..=62 => self.deliver().await,
            63..=67 => self.idle().await,
            _ => self.operate().await,
        };
        if self.faults.dead() {
            // The process died: what it held in memory is gone.
            self.note("the process died");
            self.engine = None;
            return Ok(());
        }
        r
    }

    fn source_running(&self) -> bool {
        self.engine
            .as_ref()
            .and_then(|e| e.item(ITEM).ok())
            .is_some_and(|v| {
                v.item.source_running && v.status.state != ProtectionState::FailbackCompleted
            })
    }

    fn guest_writes(&mut self) {
        if !self.source_running() {
            return;
        }
        let n = 1 + self.rng.below(6);
        let big = self.rng.chance(8);
        let sources = self.sources();
        for _ in 0..n {
            let d = self.rng.below(SIZES.len() as u64) as usize;
            let size = SIZES[d];
            let len = if big {
                size / 2 + 512
            } else {
                512 * (1 + self.rng.below(16))
            }
            .min(size);
            let at = self.rng.below((size - len) / 512 + 1) * 512;
            let byte = self.rng.next_u64() as u8;
            let data = vec![byte; len as usize];
            if self.host.disks.write(&sources[d], at, &data).is_ok() {
                let mut t = self.host.tracking();
                if let Some(tr) = t.disks.get_mut(d) {
                    tr.open.push((at, data));
                }
            }
        }
        self.note(format!(
            "guest: {n} write(s){}",
            if big { ", big" } else { "" }
        ));
        self.remember();
    }

    /// The host closes every disk's open log (one round: all disks at once).
    fn close_logs(&mut self) {
        let unclean = self.rng.chance(4);
        self.host.close_round(unclean);
        self.note(format!(
            "host closes logs{}",
            if unclean { " (unclean)" } else { "" }
        ));
    }

    /// Hands over waiting logs: in order, or with one lost, one duplicated, reordered.
    async fn deliver(&mut self) -> Result<(), String> {
        let mut batch: Vec<Closed> = {
            let mut t = self.host.tracking();
            if t.queue.is_empty() {
                return Ok(());
            }
            let n = 1 + self.rng.below(t.queue.len() as u64) as usize;
            t.queue.drain(..n).collect()
        };
        let mut how = String::from("in order");
        match self.rng.below(20) {
            0 => {
                let i = self.rng.below(batch.len() as u64) as usize;
                batch.remove(i);
                how = "one lost".into();
            }
            1 => {
                let i = self.rng.below(batch.len() as u64) as usize;
                batch.push(batch[i].clone());
                how = "one twice".into();
            }
            2 | 3 => {
                batch.reverse();
                how = "reordered".into();
            }
            _ => {}
        }
        let app = self.rng.chance(10);
        let names: Vec<String> = batch
            .iter()
            .map(|c| format!("d{}@{}", c.disk, c.at))
            .collect();
        self.note(format!(
            "deliver {} log(s), {how}: {}",
            batch.len(),
            names.join(" ")
        ));
        let logs: Vec<(usize, PathBuf)> = batch.into_iter().map(|c| (c.disk, c.path)).collect();
        let r = self.e().replicate(ITEM, &logs, app).await;
        self.expect_ok("replicate", r.map(drop))
    }

    /// Time passes: due cycles and retries run.
    async fn idle(&mut self) -> Result<(), String> {
        self.note("idle");
        let now = self.rng.chance(30);
        let r = self.e().resume(now).await;
        self.expect_ok("resume", r)
    }

    async fn operate(&mut self) -> Result<(), String> {
        let Ok(v) = self.e().item(ITEM) else {
            // Protection was disabled (or protecting again failed): protect again.
            return self.protect().await;
        };
        let (state, health) = (v.status.state, v.status.health);
        let test = v.status.test_failover;
        let points: Vec<u64> = v.status.points.iter().map(|p| p.id.0).collect();
        use ProtectionState as S;
        let choice = || -> PointChoice { PointChoice::Latest };
        let pick = self.rng.below(12);
        let point = match self.rng.below(3) {
            0 => choice(),
            1 => PointChoice::LatestProcessed,
            _ => points
                .get(self.rng.below(points.len() as u64) as usize)
                .map_or(PointChoice::Latest, |p| PointChoice::Id(PointId(*p))),
        };
        if health == Health::Critical && self.rng.chance(60) {
            self.faults.fail_next(Request::Put, 0, Fault::Timeout);
            self.note("repair");
            let r = self
                .e()
                .command(Command::RepairReplication { item: ITEM.into() })
                .await;
            return self.expect_ok("repair", r.map(drop));
        }
        match (state, pick) {
            (S::Resynchronizing, 0..=3) => {
                self.note("pause resync");
                let r = self
                    .e()
                    .command(Command::PauseResync { item: ITEM.into() })
                    .await;
                self.expect_ok("pause resync", r.map(drop))
            }
            (S::ResyncPaused, _) => {
                let cmd = if self.rng.chance(20) {
                    Command::CancelResync { item: ITEM.into() }
                } else {
                    Command::ResumeResync { item: ITEM.into() }
                };
                self.note(format!("{cmd:?}"));
                let r = self.e().command(cmd).await;
                self.expect_ok("resume/cancel resync", r.map(drop))
            }
            (S::Protected | S::ResyncRequired, 0..=2) => {
                self.note("resync");
                let r = self
                    .e()
                    .command(Command::Resync { item: ITEM.into() })
                    .await;
                self.expect_ok("resync", r.map(drop))
            }
            (S::Protected, 3..=4) if test == lifeboat_replication::TestFailoverState::None => {
                self.note(format!("test failover to {point:?}"));
                let r = self.e().test_failover(ITEM, point, Export::default()).await;
                self.expect_ok("test failover", r.map(drop))?;
                self.check_materialized(true).await
            }
            (_, 5) if test == lifeboat_replication::TestFailoverState::TestFailoverCompleted => {
                self.note("test failover cleanup");
                let r = self
                    .e()
                    .command(Command::TestFailoverCleanup { item: ITEM.into() })
                    .await;
                self.expect_ok("cleanup", r.map(drop))
            }
            (S::Protected, 6) => {
                // Planned: the host closes its logs once more; all waiting logs are final.
                self.close_logs();
                let logs: Vec<(usize, PathBuf)> = self
                    .host
                    .tracking()
                    .queue
                    .drain(..)
                    .map(|c| (c.disk, c.path))
                    .collect();
                self.note(format!("planned failover with {} final log(s)", logs.len()));
                let want = self.contents();
                let r = self
                    .e()
                    .failover(ITEM, Failover::Planned(logs), Export::default())
                    .await;
                let ok = r.is_ok();
                self.expect_ok("planned failover", r.map(drop))?;
                if ok && self.e().protection(ITEM).ok() == Some(S::PlannedFailoverCompleted) {
                    let got = self.failover_disks().await?;
                    if got != want {
                        return Err("a planned failover lost writes".into());
                    }
                }
                self.check_materialized(false).await
            }
            (S::Protected | S::ResyncRequired | S::Resynchronizing, 7) => {
                self.note(format!("unplanned failover to {point:?}"));
                let r = self
                    .e()
                    .failover(ITEM, Failover::Unplanned(point), Export::default())
                    .await;
                self.expect_ok("unplanned failover", r.map(drop))?;
                self.check_materialized(false).await
            }
            (S::PlannedFailoverCompleted | S::UnplannedFailoverCompleted, 8) => {
                self.note(format!("change point to {point:?}"));
                let r = self
                    .e()
                    .command(Command::ChangeRecoveryPoint {
                        item: ITEM.into(),
                        point,
                    })
                    .await;
                self.expect_ok("change point", r.map(drop))?;
                self.check_materialized(false).await
            }
            (S::PlannedFailoverCompleted | S::UnplannedFailoverCompleted, 9) => {
                let cmd = if self.rng.chance(50) {
                    Command::Commit { item: ITEM.into() }
                } else {
                    Command::CancelFailover { item: ITEM.into() }
                };
                self.note(format!("{cmd:?}"));
                let r = self.e().command(cmd).await;
                self.expect_ok("commit/cancel", r.map(drop))
            }
            (S::Protected | S::ResyncRequired, 10) if self.rng.chance(30) => {
                let delete = self.rng.chance(50);
                self.note(format!("disable protection (delete replica {delete})"));
                let r = self.e().unprotect(ITEM, delete).await;
                self.expect_ok("disable protection", r.map(drop))
            }
            (S::FailoverCommitted, _) => self.failback().await,
            (S::FailbackCompleted, _) => {
                if self.rng.chance(30) {
                    self.note("cancel failback");
                    let to = self
                        .e()
                        .item(ITEM)
                        .map(|v| v.item.failback_to.clone())
                        .unwrap_or_default();
                    let r = self
                        .e()
                        .command(Command::CancelFailback { item: ITEM.into() })
                        .await;
                    self.remember_disks(&to);
                    return self.expect_ok("cancel failback", r.map(drop));
                }
                self.note("reprotect");
                let r = self.e().reprotect(ITEM).await;
                self.expect_ok("reprotect", r.map(drop))?;
                self.remember();
                Ok(())
            }
            _ => {
                self.note("idle");
                let r = self.e().resume(false).await;
                self.expect_ok("resume", r)
            }
        }
    }

    async fn failback(&mut self) -> Result<(), String> {
        // The recovered machine wrote a little; failback to the originals or to new disks.
        let alternate = self.rng.chance(50);
        let to: Vec<PathBuf> = (0..SIZES.len())
            .map(|d| {
                if alternate {
                    format!("alt{}/d{d}", self.high).into()
                } else {
                    format!("src/d{d}").into()
                }
            })
            .collect();
        let full = self.rng.chance(30);
        self.note(format!("failback (alternate {alternate}, full {full})"));
        let r = self.e().failback(ITEM, &to, full).await;
        let ok = r.is_ok();
        self.expect_ok("failback", r)?;
        self.remember_disks(&to);
        if ok && self.e().protection(ITEM).ok() == Some(ProtectionState::FailbackCompleted) {
            let want = self.failover_disks().await?;
            let got: Vec<Vec<u8>> = to
                .iter()
                .map(|p| self.host.disks.disk(p).unwrap_or_default())
                .collect();
            if got != want {
                return Err("failback targets differ from the recovered disks".into());
            }
        }
        Ok(())
    }

    /// The failover disks' bytes (blobs in the store).
    async fn failover_disks(&mut self) -> Result<Vec<Vec<u8>>, String> {
        let v = self.e().item(ITEM).map_err(|e| e.to_string())?;
        let locs = v.item.failover.disks.clone();
        let mut out = Vec::new();
        for (d, l) in locs.iter().enumerate() {
            let Location::Blob { name, .. } = l else {
                return Err("a failover disk is not a blob".into());
            };
            out.push(self.read(name, None, SIZES[d]).await?);
        }
        Ok(out)
    }

    async fn read(&self, blob: &str, snap: Option<&str>, len: u64) -> Result<Vec<u8>, String> {
        // The oracle reads around the fault injector.
        self.faults
            .inner()
            .read(blob, snap, 0, len)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| format!("reading {blob}: {e}"))
    }

    /// Test-failover or failover disks hold their point.
    async fn check_materialized(&mut self, test: bool) -> Result<(), String> {
        let Some(e) = self.engine.as_ref() else {
            return Ok(());
        };
        let Ok(v) = e.item(ITEM) else {
            return Ok(());
        };
        if e.jobs().iter().any(|j| j.ended.is_none()) {
            return Ok(()); // the disks are being (re)made
        }
        let m = if test {
            if v.status.test_failover
                != lifeboat_replication::TestFailoverState::TestFailoverCompleted
            {
                return Ok(());
            }
            &v.item.test
        } else {
            if !matches!(
                v.status.state,
                ProtectionState::PlannedFailoverCompleted
                    | ProtectionState::UnplannedFailoverCompleted
            ) {
                return Ok(());
            }
            &v.item.failover
        };
        let (locs, point) = (m.disks.clone(), m.point);
        if !test && point != v.status.failover_point.map(|p| p.0) {
            return Err(format!(
                "the failover disks hold point {point:?}, the item says {:?}",
                v.status.failover_point
            ));
        }
        let Some(point) = point else {
            return Err("materialized disks without their point".into());
        };
        let Some(p) = v.status.points.iter().find(|p| p.id.0 == point) else {
            return Ok(());
        };
        let want = self
            .at(p.time.as_secs())
            .cloned()
            .ok_or("a point before the source's history")?;
        for (d, l) in locs.iter().enumerate() {
            let Location::Blob { name, .. } = l else {
                continue;
            };
            let got = self.read(name, None, SIZES[d]).await?;
            if got != want[d] {
                return Err(format!(
                    "{} disk {d} differs from point {point} (time {})",
                    if test { "test-failover" } else { "failover" },
                    p.time.as_secs()
                ));
            }
        }
        Ok(())
    }

    /// The oracle, after every step.
    async fn check(&mut self) -> Result<(), String> {
        let Some(e) = self.engine.as_ref() else {
            return Ok(());
        };
        let Ok(v) = e.item(ITEM) else {
            return Ok(());
        };
        let (points, snaps) = (v.status.points.clone(), v.item.points.clone());
        let (state, health) = (v.status.state, v.status.health);
        let high = Duration::from_secs(self.high);
        for p in &points {
            if p.time > high {
                return Err(format!("point {} claims a time in the future", p.id.0));
            }
            let Some(snap) = snaps.get(&p.id.0) else {
                continue; // being made
            };
            let want = self
                .at(p.time.as_secs())
                .cloned()
                .ok_or("a point claims a time before the source's history")?;
            for (d, s) in snap.iter().enumerate() {
                let got = self.read(&replica_blob(ITEM, d), Some(s), SIZES[d]).await?;
                if got != want[d] {
                    let at = got.iter().zip(&want[d]).position(|(a, b)| a != b);
                    let matches: Vec<u64> = self
                        .history
                        .iter()
                        .filter(|(_, c)| c[d] == got)
                        .map(|(t, _)| t - START)
                        .collect();
                    return Err(format!(
                        "point {} (time {}) disk {d} is not the source of that moment (first difference at {at:?}; it is the source at {matches:?})",
                        p.id.0,
                        p.time.as_secs() - START
                    ));
                }
            }
        }
        // Not while a job runs: a cycle applied, its point being made (the engine may
        // have stopped between the two: a catalogue save failed), is ahead of it.
        if state == ProtectionState::Protected
            && health == Health::Normal
            && e.jobs().iter().all(|j| j.ended.is_some())
            && let Some(last) = points.last()
            && let Some(snap) = snaps.get(&last.id.0)
            && snap.len() == SIZES.len()
        {
            for d in 0..SIZES.len() {
                let live = self.read(&replica_blob(ITEM, d), None, SIZES[d]).await?;
                let newest = self
                    .read(&replica_blob(ITEM, d), Some(&snap[d]), SIZES[d])
                    .await?;
                if live != newest {
                    return Err(format!(
                        "health is Normal but replica disk {d} is not its newest point"
                    ));
                }
            }
        }
        // Digests that say they describe the replica's current sequence number do (but
        // for blocks they record unknown: a batch cut short, sent again by a resync).
        for d in 0..SIZES.len() {
            let blob = replica_blob(ITEM, d);
            let store = self.faults.inner();
            if let Ok(Some(digests)) = ReplicaDigests::load(store, &blob).await {
                let (len, bs, seq) = (
                    digests.len(),
                    digests.block_size(),
                    digests.sequence_number(),
                );
                let actual = ReplicaDigests::scan_at(store, &blob, None, len, bs, seq)
                    .await
                    .map_err(|e| e.to_string())?;
                let bad = digests
                    .check(store, &actual)
                    .await
                    .map_err(|e| e.to_string())?
                    .damaged;
                if !bad.is_empty() {
                    return Err(format!(
                        "replica disk {d}'s digests claim its sequence number {} but differ in blocks {bad:?}",
                        digests.sequence_number()
                    ));
                }
            }
        }
        // Nothing outside the item's names (and the store's identity) is ever written.
        let names = self
            .faults
            .inner()
            .list("")
            .await
            .map_err(|e| e.to_string())?;
        for n in names {
            let ours = n == "lifeboat/store.json"
                || n.starts_with("lifeboat/items/vm/")
                || (0..SIZES.len()).any(|d| n == digests_blob(&replica_blob(ITEM, d)));
            if !ours {
                return Err(format!("the store holds {n}, outside the item's names"));
            }
        }
        Ok(())
    }
}
