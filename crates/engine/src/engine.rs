//! The engine: the catalogue in the store, ownership and take-over, the drive loop, and the
//! operations an embedder calls.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_pageblob::{Condition, ETag, Expect, LeaseId, PageStore, StoreError, WriterConfig};
use lifeboat_replication::{
    Action, Command, Coordinator, HealthCause, ItemStatus, Job, JobAction, JobId, JobState,
    Outcome, PlanFailover, PlanRecord, PointChoice, ProtectionState, RecoveryPlan,
    ReplicationPolicy,
};
use lifeboat_resync::BlockSize;
use lifeboat_retry::Classify;

use crate::actions::is_transfer;
use crate::catalog::{self, Disk, Export, Item, Materialized, PlanDoc, SCHEMA, Tracking};
use crate::digest_cache::DigestCache;
use crate::error::{Error, Result, blocking};
use crate::host::{Clock, FileHost, Host, SystemClock};
use crate::site::Site;

/// Steps of copy pieces that sent nothing the catalogue may lag behind (see
/// [`Engine::step`]): 256 GiB of holes in the default 256 MiB pieces.
const UNSAVED_QUIET: u32 = 1024;

/// Something the engine reports while it works.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Bytes of a long task done so far.
    Progress {
        /// The item.
        item: String,
        /// The disk.
        disk: usize,
        /// What is being done.
        task: Task,
        /// Bytes done.
        done: u64,
        /// Bytes in all.
        total: u64,
    },
    /// A cycle's logs were applied to one disk's replica.
    CycleApplied {
        /// The item.
        item: String,
        /// The disk.
        disk: usize,
        /// The cycle.
        cycle: u64,
        /// Bytes sent.
        bytes_sent: u64,
        /// Put Page requests.
        requests: u64,
        /// Fenced batches.
        batches: u64,
    },
    /// A log handed over was taken before: skipped.
    LogSkipped {
        /// The item.
        item: String,
        /// The log.
        path: PathBuf,
        /// Its UniqueId, hex.
        id: String,
    },
    /// Another site's item was taken over by this one.
    TookOver {
        /// The item.
        item: String,
        /// The site that owned it.
        from: String,
    },
    /// An action failed (it is retried on the schedule if recoverable; a non-recoverable
    /// failure makes the item Critical).
    Failed {
        /// The item (or plan).
        item: String,
        /// What failed.
        action: String,
        /// Why.
        message: String,
    },
    /// An action starts.
    Performing {
        /// The item (or plan).
        item: String,
        /// The job task it is ("Initial replication of disk 0").
        task: String,
        /// The action in full (its debug form).
        detail: String,
    },
    /// A drive ended: nothing more is ready.
    Idle,
}

/// A long task [`Event::Progress`] reports on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Task {
    /// Initial replication of a disk.
    InitialCopy,
    /// Comparing a disk with its replica (resync).
    ResyncCompare,
}

/// Receives the engine's [`Event`]s.
pub trait Observer: Send + Sync {
    /// One event.
    fn event(&self, event: &Event);
}

#[derive(Debug)]
struct Quiet;

impl Observer for Quiet {
    fn event(&self, _: &Event) {}
}

/// A catalogue item as this engine last read or wrote it.
#[derive(Debug)]
struct Entry {
    doc: Item,
    etag: ETag,
    /// The bytes last read or written (a save is skipped when nothing changed).
    saved: Vec<u8>,
}

#[derive(Debug)]
struct PlanEntry {
    record: PlanRecord,
    etag: ETag,
    saved: Vec<u8>,
}

/// How an unplanned or planned failover goes.
#[derive(Clone, Debug)]
pub enum Failover {
    /// Planned: the source shuts down, these final logs (disk, file) are applied, zero
    /// loss.
    Planned(Vec<(usize, PathBuf)>),
    /// Unplanned, to a point.
    Unplanned(PointChoice),
}

/// What [`Engine::replicate`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Replicated {
    /// Nothing new was handed over.
    Nothing,
    /// Cycles were applied.
    Applied {
        /// Cycles applied by this call.
        cycles: u64,
        /// Recovery points the item now has.
        points: usize,
    },
    /// The logs cannot be applied: the item needs a resync.
    ResyncRequired(Vec<HealthCause>),
    /// The item is copying its disks (initial replication or resync): the logs wait for
    /// the copy's own cycle.
    Staged {
        /// Logs staged.
        logs: usize,
    },
}

/// An item as the catalogue has it, with its status now.
#[derive(Debug)]
pub struct ItemView<'a> {
    /// The catalogue's record.
    pub item: &'a Item,
    /// State, health, points.
    pub status: ItemStatus,
    /// Whether this site acts for it.
    pub owned: bool,
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    store: Arc<dyn PageStore>,
    store_desc: String,
    site: PathBuf,
    host: Arc<dyn Host>,
    clock: Arc<dyn Clock>,
    observer: Arc<dyn Observer>,
    on_wait: Option<Box<dyn Fn() + Send + Sync>>,
    crash_after: Option<u64>,
    writer: WriterConfig,
    digest_budget: usize,
    transfers: usize,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("store", &self.store_desc)
            .field("site", &self.site)
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// The protected host (default: [`FileHost`], disks are image files).
    pub fn host(mut self, host: Arc<dyn Host>) -> Self {
        self.host = host;
        self
    }

    /// The clock (default: the system's).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Who hears the engine's [`Event`]s (default: nobody).
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// How messages name the store (a path, or a container URL without its secrets).
    pub fn store_description(mut self, desc: impl Into<String>) -> Self {
        self.store_desc = desc.into();
        self
    }

    /// How replica writes are sent: requests in flight, size, the quick per-request retries
    /// (the state machine owns the long schedule), a bandwidth limit.
    pub fn writer(mut self, config: WriterConfig) -> Self {
        self.writer = config;
        self
    }

    /// How much memory replica digests may keep between batches (default 64 MiB). Each
    /// disk's hold the slot pages its last batch wrote (32 bytes per block: 32 KiB for a
    /// 64 MiB batch of 64 KiB blocks), whatever the disk's size; past the budget the least
    /// recently used are dropped (their slots stay in the store).
    pub fn digest_memory(mut self, bytes: usize) -> Self {
        self.digest_budget = bytes;
        self
    }

    /// How many items' transfers (copy pieces, resyncs, cycles' log applies) may run at
    /// once (default 1: one action at a time). Each copy piece in flight holds a few 4 MiB
    /// segments of its bytes in memory (those being sent, up to the writer's requests in
    /// flight, and two read ahead), each resync its disk's digests while it compares; all
    /// share the writer's bandwidth limit.
    pub fn transfers(mut self, n: usize) -> Self {
        self.transfers = n.max(1);
        self
    }

    /// Called before waiting for another engine that holds the site.
    pub fn on_wait(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_wait = Some(Box::new(f));
        self
    }

    /// Crash tests: abort the process after performing action `n` of this engine, before
    /// its outcome is saved (the widest window a crash can hit).
    #[doc(hidden)]
    pub fn crash_after_action(mut self, n: Option<u64>) -> Self {
        self.crash_after = n;
        self
    }

    /// Opens the site (locked while the engine lives), reads the catalogue, and loads the
    /// items and plans this site acts for. Work an interrupted engine left in flight is
    /// ready to [`drive`](Engine::drive).
    pub async fn open(self) -> Result<Engine> {
        let site = Site::open(
            &self.site,
            &*self.store,
            &self.store_desc,
            self.on_wait.as_deref(),
        )
        .await?;
        let mut e = Engine {
            store: self.store,
            host: self.host,
            clock: self.clock,
            observer: self.observer,
            site,
            c: Coordinator::new(),
            items: BTreeMap::new(),
            plans: BTreeMap::new(),
            last: Duration::ZERO,
            performed: 0,
            focus: None,
            unacked: HashMap::new(),
            generation: 0,
            behind: false,
            quiet: 0,
            unsaved: 0,
            crash_after: self.crash_after,
            writer: self.writer,
            digests: Mutex::new(DigestCache::with_budget(self.digest_budget)),
            transfers: self.transfers,
            read_ahead: Mutex::new(None),
            buffers: Arc::new(crate::data::Buffers::default()),
            segment: crate::copy::SEGMENT,
        };
        e.generation = e.site.generation();
        e.load().await?;
        e.forget_disabled().await?;
        Ok(e)
    }
}

/// The driver of Lifeboat: it keeps the catalogue in the replica store, acts for the items
/// its site owns, and performs the replication state machine's actions against the
/// host's disks, HRL logs and the store. See the crate docs.
pub struct Engine {
    pub(crate) store: Arc<dyn PageStore>,
    pub(crate) host: Arc<dyn Host>,
    clock: Arc<dyn Clock>,
    pub(crate) observer: Arc<dyn Observer>,
    pub(crate) site: Site,
    pub(crate) c: Coordinator,
    /// Every item in the catalogue (owned or not).
    items: BTreeMap<String, Entry>,
    /// Every plan in the catalogue.
    plans: BTreeMap<String, PlanEntry>,
    /// The last time handed to the state machine (never goes backwards).
    last: Duration,
    pub(crate) performed: u64,
    /// Act only for these items (see [`Engine::focus`]).
    focus: Option<Vec<String>>,
    /// Documents whose last write's reply was lost: the bytes it wrote.
    unacked: HashMap<String, Vec<u8>>,
    /// The site's catalogue-write count as of this engine's last read or write.
    generation: u64,
    /// The store's catalogue may be behind this engine's (a write failed): it is written
    /// before anything more is done.
    behind: bool,
    /// Actions of the current step that changed nothing but the state machine's cursor
    /// (copy pieces the replica held already: holes).
    pub(crate) quiet: usize,
    /// Steps of such actions alone since the catalogue was last saved.
    unsaved: u32,
    crash_after: Option<u64>,
    pub(crate) writer: WriterConfig,
    /// Replica digests as last saved, by blob, within a memory budget.
    pub(crate) digests: Mutex<DigestCache>,
    /// Transfers of different items performed at once, at most.
    transfers: usize,
    /// The next copy piece, read while the current one is sent.
    pub(crate) read_ahead: Mutex<Option<crate::actions::ReadAhead>>,
    /// Copy pieces' buffers, reused from one piece to the next.
    pub(crate) buffers: Arc<crate::data::Buffers>,
    /// Bytes of a copy piece read and sent at a time ([`crate::copy::SEGMENT`]; the
    /// simulation's are smaller, so its small pieces are sent in several).
    pub(crate) segment: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("site", &self.site)
            .field("items", &self.items.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine on the site directory `site` replicating into `store`.
    pub fn builder(store: Arc<dyn PageStore>, site: impl Into<PathBuf>) -> EngineBuilder {
        EngineBuilder {
            store,
            store_desc: "the store".into(),
            site: site.into(),
            host: Arc::new(FileHost),
            clock: Arc::new(SystemClock),
            observer: Arc::new(Quiet),
            on_wait: None,
            crash_after: None,
            writer: WriterConfig::default(),
            digest_budget: crate::digest_cache::DEFAULT_BUDGET,
            transfers: 1,
        }
    }

    /// The site this engine works on.
    pub fn site(&self) -> &Site {
        &self.site
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn PageStore> {
        &self.store
    }

    /// The state machine's clock: the host clock, never going backwards.
    pub fn now(&mut self) -> Duration {
        self.last = self.last.max(self.clock.now());
        self.last
    }

    // ------------------------------------------------------------------ catalogue

    async fn load(&mut self) -> Result<()> {
        let store = self.store.clone();
        let (items, plans) = catalog::read_all(&*store).await?;
        for (item, (doc, etag, saved)) in items {
            self.items.insert(item, Entry { doc, etag, saved });
        }
        for (doc, etag, saved) in plans {
            self.plans.insert(
                doc.record.plan().name.clone(),
                PlanEntry {
                    record: doc.record,
                    etag,
                    saved,
                },
            );
        }
        let mine: Vec<String> = self
            .items
            .iter()
            .filter(|(_, e)| e.doc.owner.site == self.site.id())
            .map(|(n, _)| n.clone())
            .collect();
        for name in mine {
            // The document's lease is ours unless a take-over is under way.
            match store
                .acquire_lease(&catalog::item_doc(&name), self.site.id())
                .await
            {
                Ok(()) => {}
                Err(StoreError::Leased { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
            let e = &self.items[&name];
            self.last = self.last.max(e.doc.clock);
            let record = e.doc.replication.clone();
            let now = self.now();
            self.c.insert_item(now, &name, record);
        }
        let plans: Vec<String> = self.plans.keys().cloned().collect();
        for p in plans {
            self.load_plan_if_mine(&p);
        }
        Ok(())
    }

    /// Loads a plan into the state machine when this site owns every item of it.
    fn load_plan_if_mine(&mut self, plan: &str) {
        let Some(entry) = self.plans.get(plan) else {
            return;
        };
        let all_mine = entry
            .record
            .plan()
            .groups
            .iter()
            .flat_map(|g| &g.items)
            .all(|i| self.c.status(i, Duration::ZERO).is_some());
        if all_mine && self.c.plan(plan).is_none() {
            let record = entry.record.clone();
            let now = self.now();
            self.c.insert_plan(now, record);
        }
    }

    /// Writes every owned item and loaded plan whose state changed since it was last
    /// written, each only if unchanged since (and, for items, as the lease holder).
    pub(crate) async fn persist(&mut self) -> Result<()> {
        self.behind = true;
        let wrote = self.write_catalogue().await?;
        self.behind = false;
        self.unsaved = 0;
        if wrote {
            self.generation = self.site.bump_generation();
        }
        Ok(())
    }

    /// Writes every changed document; whether any was.
    async fn write_catalogue(&mut self) -> Result<bool> {
        let mut wrote = false;
        let names: Vec<String> = self.c.items().map(str::to_owned).collect();
        let now = self.last;
        for name in names {
            let Some(record) = self.c.item_record(&name) else {
                continue;
            };
            let Some(entry) = self.items.get_mut(&name) else {
                continue;
            };
            entry.doc.replication = record;
            entry.doc.clock = now;
            let doc_name = catalog::item_doc(&name);
            let bytes = catalog::encode(&doc_name, &entry.doc)?;
            if bytes == entry.saved {
                continue;
            }
            let mut retried = false;
            loop {
                let expect = Expect::Version(entry.etag.clone());
                match catalog::write(
                    &*self.store,
                    &doc_name,
                    &bytes,
                    expect,
                    Some(self.site.id()),
                )
                .await
                {
                    Ok(etag) => {
                        entry.etag = etag;
                        self.site.cache(&doc_name, &bytes);
                        entry.saved = bytes;
                        self.unacked.remove(&doc_name);
                        wrote = true;
                        break;
                    }
                    Err(StoreError::Changed { .. }) if !retried => {
                        retried = true;
                        let stored = catalog::read::<Item>(&*self.store, &doc_name).await;
                        let Ok(Some((doc, etag, stored))) = stored else {
                            return Err(self.fenced(&name).await);
                        };
                        // A write of ours whose reply was lost landed: carry on from it.
                        if self.unacked.get(&doc_name) == Some(&stored) || stored == bytes {
                            entry.etag = etag;
                            continue;
                        }
                        if doc.owner.site == entry.doc.owner.site && doc.epoch == entry.doc.epoch {
                            // Another engine of this site wrote it (a command beside a
                            // service): read it back; the outcomes not saved here are
                            // performed again.
                            self.reload().await?;
                            return Err(Error::Catalog {
                                name: doc_name,
                                reason: "changed by another process of this site: read again"
                                    .into(),
                            });
                        }
                        return Err(self.fenced(&name).await);
                    }
                    Err(StoreError::Changed { .. } | StoreError::Leased { .. }) => {
                        return Err(self.fenced(&name).await);
                    }
                    Err(e) => {
                        // It may have landed all the same (a lost reply).
                        self.unacked.insert(doc_name, bytes);
                        return Err(e.into());
                    }
                }
            }
        }
        let plans: Vec<String> = self.c.plans().map(|p| p.name.clone()).collect();
        for plan in plans {
            let Some(record) = self.c.plan_record(&plan) else {
                continue;
            };
            let doc_name = catalog::plan_doc(&plan);
            let doc = PlanDoc {
                schema: SCHEMA,
                record: record.clone(),
            };
            let bytes = catalog::encode(&doc_name, &doc)?;
            let expect = match self.plans.get(&plan) {
                Some(e) if e.saved == bytes => continue,
                Some(e) => Expect::Version(e.etag.clone()),
                None => Expect::Absent,
            };
            match catalog::write(&*self.store, &doc_name, &bytes, expect, None).await {
                Ok(etag) => {
                    wrote = true;
                    self.plans.insert(
                        plan,
                        PlanEntry {
                            record,
                            etag,
                            saved: bytes,
                        },
                    );
                }
                Err(StoreError::Changed { .. } | StoreError::AlreadyExists { .. })
                    if let Ok(Some((stored, etag))) = self
                        .store
                        .get_doc(&doc_name)
                        .await
                        .map(|d| d.map(|d| (d.data, d.etag)))
                        && stored == bytes =>
                {
                    // Our write landed; its reply was lost.
                    self.plans.insert(
                        plan,
                        PlanEntry {
                            record,
                            etag,
                            saved: bytes,
                        },
                    );
                }
                Err(StoreError::Changed { .. }) => {
                    return Err(Error::Catalog {
                        name: doc_name,
                        reason: "another site changed the plan; run the command again".into(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(wrote)
    }

    /// Writes the item's document now, changed or not: only its lease holder can, so a
    /// success proves this site still owns the item (done before anything the store does
    /// not fence, such as deleting a snapshot).
    pub(crate) async fn fence(&mut self, name: &str) -> Result<()> {
        if let Some(e) = self.items.get_mut(name) {
            e.saved.clear();
        }
        self.persist().await
    }

    /// The item's document was changed by another site, or its lease taken: this site no
    /// longer acts for it. Reloads the document to say who does.
    async fn fenced(&mut self, name: &str) -> Error {
        self.c.remove_item(name);
        let doc_name = catalog::item_doc(name);
        let owner = match catalog::read::<Item>(&*self.store, &doc_name).await {
            Ok(Some((doc, etag, saved))) => {
                let label = doc.owner.label.clone();
                self.items
                    .insert(name.to_owned(), Entry { doc, etag, saved });
                label
            }
            _ => "another site".into(),
        };
        Error::Fenced {
            item: name.to_owned(),
            owner,
        }
    }

    /// Performs actions until none is ready, saving the catalogue after each (only the
    /// focused items' actions, see [`Engine::focus`]).
    pub async fn drive(&mut self) -> Result<()> {
        while self.perform_next().await? {}
        self.observer.event(&Event::Idle);
        Ok(())
    }

    /// One step of a long-running driver (a service): the work the clock made due is
    /// scheduled, then the next ready action is performed and saved (a copy piece that
    /// sent nothing, holes the replica holds, is saved with the next step that does
    /// something, or when nothing is ready: a crash redoes it). `false` when nothing
    /// was ready: wait for [`Engine::next_wakeup`] (or new work) before the next step. No
    /// step takes longer than one action (a copy is cut into `copy_chunk` pieces, a log
    /// apply into batches).
    pub async fn step(&mut self) -> Result<bool> {
        let now = self.now();
        self.c.handle_timeout(now);
        let worked = self.perform_next().await?;
        if !worked {
            self.persist().await?;
        }
        Ok(worked)
    }

    /// When the clock next makes work due (a cycle, a retry, a scheduled copy or resync),
    /// if anything is scheduled.
    pub fn next_wakeup(&self) -> Option<Duration> {
        self.c.poll_timeout()
    }

    /// Acts only for these items (and the plans over them) from now on: the others' work
    /// waits for whoever acts for them beside this engine (a service on the same site).
    /// `None` acts for every item again.
    pub fn focus(&mut self, items: Option<Vec<String>>) {
        self.focus = items;
    }

    /// The next ready action of a focused item not `taken`, only a transfer if
    /// `transfer`.
    fn poll(&mut self, taken: &[Action], transfer: bool) -> Option<Action> {
        let (items, focus) = (&self.items, &self.focus);
        self.c.poll_action_where(|a| {
            !taken.iter().any(|t| t.item == a.item)
                && focus.as_ref().is_none_or(|f| f.contains(&a.item))
                && (!transfer || is_transfer(doc_of(items, a), a))
        })
    }

    /// Performs the next ready action and saves its outcome; `false` if none was ready.
    /// When it is a transfer (a copy piece, a resync, a cycle's logs) and
    /// [`EngineBuilder::transfers`] allows, other items' ready transfers are performed
    /// beside it.
    async fn perform_next(&mut self) -> Result<bool> {
        let Some(first) = self.poll(&[], false) else {
            if self.unsaved > 0 {
                self.persist().await?;
            }
            return Ok(false);
        };
        self.quiet = 0;
        let mut actions = vec![first];
        if self.transfers > 1 && is_transfer(doc_of(&self.items, &actions[0]), &actions[0]) {
            // Other items' ready transfers, in order (each item has one action out).
            while actions.len() < self.transfers {
                match self.poll(&actions, true) {
                    Some(a) => actions.push(a),
                    None => break,
                }
            }
        }
        // Write-ahead: nothing is done that the store's catalogue does not know is under
        // way (a command whose write failed must not act, and then be forgotten by a
        // crash).
        let ready = match self.behind {
            true => self.persist().await,
            false => Ok(()),
        };
        for a in &actions {
            self.observer.event(&Event::Performing {
                item: a.item.clone(),
                task: a.kind.task(),
                detail: format!("{:?}", a.kind),
            });
        }
        let done: Vec<Result<Outcome>> = match ready {
            Ok(()) if actions.len() == 1 => vec![self.perform(&actions[0]).await],
            Ok(()) => {
                // What each needs first, one by one (a cycle's starting points, saved).
                let mut prepared = Vec::new();
                for a in &actions {
                    prepared.push(self.prepare(a).await);
                }
                let this = &*self;
                let sent = futures::future::join_all(actions.iter().zip(&prepared).filter_map(
                    |(a, p)| p.as_ref().ok().map(|c| this.transfer(a, c.as_ref(), false)),
                ))
                .await;
                let mut sent = sent.into_iter();
                actions
                    .iter()
                    .zip(prepared)
                    .map(|(a, p)| match p {
                        Err(e) => Err(e),
                        Ok(_) => match sent.next() {
                            Some(r) => r.and_then(|t| self.settle(&a.item, t)),
                            None => Err(Error::Invalid(format!("{:?} was not performed", a.kind))),
                        },
                    })
                    .collect()
            }
            Err(e @ Error::Fenced { .. }) => return Err(e),
            Err(e) => {
                let (class, message) = (e.class(), e.to_string());
                let mut done = vec![Err(e)];
                done.extend(actions[1..].iter().map(|a| {
                    self.observer.event(&Event::Failed {
                        item: a.item.clone(),
                        action: format!("{:?}", a.kind),
                        message: message.clone(),
                    });
                    Ok(Outcome::Failed {
                        class,
                        message: message.clone(),
                    })
                }));
                done
            }
        };
        let mut fenced = None;
        for (action, done) in actions.iter().zip(done) {
            let outcome = match done {
                Ok(o) => o,
                Err(e @ Error::Fenced { .. }) => {
                    fenced.get_or_insert(e);
                    continue;
                }
                Err(e) => {
                    self.observer.event(&Event::Failed {
                        item: action.item.clone(),
                        action: format!("{:?}", action.kind),
                        message: e.to_string(),
                    });
                    Outcome::Failed {
                        class: e.class(),
                        message: e.to_string(),
                    }
                }
            };
            let now = self.now();
            self.c.handle_outcome(now, action.id, outcome)?;
            self.performed += 1;
            if self.crash_after == Some(self.performed) {
                std::process::abort();
            }
        }
        if let Some(e) = fenced {
            if actions.len() > 1 {
                self.persist().await?;
            }
            return Err(e);
        }
        // Copy pieces that sent nothing (holes the replica holds: a thin disk is mostly
        // that) leave the catalogue behind, by at most UNSAVED_QUIET steps, until the
        // next step that does something: redone after a crash, such a piece costs a look
        // at the disk's holes and the replica's digests; its save cost two fsyncs.
        if self.quiet == actions.len() && self.unsaved < UNSAVED_QUIET {
            self.unsaved += 1;
            return Ok(true);
        }
        self.persist().await?;
        self.empty_trash();
        let now = self.now();
        if actions.iter().any(|a| {
            self.c.status(&a.item, now).map(|s| s.state)
                == Some(ProtectionState::ProtectionDisabled)
        }) {
            self.forget_disabled().await?;
        }
        Ok(true)
    }

    /// Items whose protection is disabled leave the catalogue: a kept replica's blobs are
    /// released (anyone may use them now), the item's document is deleted, and the site's
    /// staging and cached copy of it go. Done after the disabling job is saved, and again
    /// at open (a crash in between).
    async fn forget_disabled(&mut self) -> Result<()> {
        let now = self.last;
        let done: Vec<String> = self
            .c
            .items()
            .filter(|i| {
                self.c.status(i, now).map(|s| s.state) == Some(ProtectionState::ProtectionDisabled)
            })
            .map(str::to_owned)
            .collect();
        for name in done {
            let disks = self.doc(&name)?.disks.len();
            for d in 0..disks {
                let blob = catalog::replica_blob(&name, d);
                for b in [lifeboat_pageblob::digests_blob(&blob), blob] {
                    match self.store.release_lease(&b, self.site.id()).await {
                        Ok(())
                        | Err(StoreError::NotFound { .. } | StoreError::NotLeased { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            let doc_name = catalog::item_doc(&name);
            match self
                .store
                .delete(&doc_name, Condition::lease(self.site.id()))
                .await
            {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(StoreError::Leased { .. } | StoreError::Changed { .. }) => {
                    return Err(self.fenced(&name).await);
                }
                Err(e) => return Err(e.into()),
            }
            self.c.remove_item(&name);
            self.items.remove(&name);
            for d in 0..disks {
                self.forget_digests(&catalog::replica_blob(&name, d));
            }
            self.site.uncache(&doc_name);
            let _ = std::fs::remove_dir_all(self.site.staging_dir(&name));
            self.generation = self.site.bump_generation();
        }
        Ok(())
    }

    /// Lets another process work on the site if one waits for it (between a service's
    /// steps): the catalogue is saved, the site's lock released until the other has taken
    /// it and is done, then what it wrote is read back. `false` if nobody waited.
    pub async fn yield_site(&mut self) -> Result<bool> {
        if !self.site.wanted() {
            return Ok(false);
        }
        let dir = self.site.dir().to_path_buf();
        self.unlocked(async move {
            // Until the waiters hold the lock (their markers go), or a moment has passed.
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if !crate::site::wanted(&dir) {
                    break;
                }
            }
        })
        .await?;
        Ok(true)
    }

    /// Runs `f` (a service's sleep until its next wakeup, say) without the site's lock,
    /// so other processes can work on the site meanwhile; then takes the lock back and
    /// reads back whatever they wrote.
    ///
    /// If the catalogue cannot be saved first (the store is away), `f` still runs: what
    /// is unsaved is outcomes of actions, which are performed again if another process
    /// wrote the catalogue meanwhile (it is then read back); the save's error is returned
    /// after `f`.
    pub async fn unlocked<F: std::future::Future>(&mut self, f: F) -> Result<F::Output> {
        // Another process may act on the items meanwhile: a piece read ahead is stale.
        *self.read_ahead.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // A service waiting holds no copy buffers.
        self.buffers.clear();
        let saved = self.persist().await;
        self.site.unlock()?;
        let out = f.await;
        let lock = self.site.lock_handle()?;
        let dir = self.site.dir().to_path_buf();
        blocking("locking the site", move || crate::site::relock(&dir, &lock)).await??;
        if self.site.generation() != self.generation {
            self.reload().await?;
        }
        saved?;
        Ok(out)
    }

    /// Reads the catalogue again (another engine on the site wrote it).
    async fn reload(&mut self) -> Result<()> {
        self.c = Coordinator::new();
        self.items.clear();
        self.plans.clear();
        self.unacked.clear();
        self.behind = false;
        self.load().await?;
        self.generation = self.site.generation();
        Ok(())
    }

    /// Deletes the staged files the written catalogue no longer needs.
    fn empty_trash(&mut self) {
        let mine: Vec<String> = self.c.items().map(str::to_owned).collect();
        for name in mine {
            if let Some(e) = self.items.get_mut(&name) {
                for p in std::mem::take(&mut e.doc.trash) {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }

    // ------------------------------------------------------------------ items

    /// Whether the catalogue has the item.
    pub fn has_item(&self, name: &str) -> bool {
        self.items.contains_key(name)
    }

    /// An item, whoever owns it.
    pub fn item(&self, name: &str) -> Result<ItemView<'_>> {
        let e = self
            .items
            .get(name)
            .ok_or_else(|| Error::UnknownItem(name.to_owned()))?;
        Ok(self.view(name, e))
    }

    /// Every item in the catalogue, by name.
    pub fn items(&self) -> impl Iterator<Item = ItemView<'_>> + '_ {
        self.items.iter().map(|(n, e)| self.view(n, e))
    }

    fn view<'a>(&self, name: &str, e: &'a Entry) -> ItemView<'a> {
        let now = self.last.max(self.clock.now());
        let (status, owned) = match self.c.status(name, now) {
            Some(s) => (s, true),
            None => (e.doc.replication.status(now), false),
        };
        ItemView {
            item: &e.doc,
            status,
            owned,
        }
    }

    /// The catalogue record of an item this site acts for.
    pub(crate) fn doc(&self, name: &str) -> Result<&Item> {
        self.require_owned(name)?;
        Ok(&self.items[name].doc)
    }

    /// The same, to change (written with the next save).
    pub(crate) fn doc_mut(&mut self, name: &str) -> Result<&mut Item> {
        self.require_owned(name)?;
        Ok(&mut self.items.get_mut(name).expect("checked").doc)
    }

    /// Fails unless this site acts for the item.
    pub(crate) fn require_owned(&self, name: &str) -> Result<()> {
        match self.items.get(name) {
            None => Err(Error::UnknownItem(name.to_owned())),
            Some(_) if self.c.status(name, Duration::ZERO).is_some() => Ok(()),
            Some(e) => {
                let state = e.doc.replication.state();
                let failed_over = !matches!(
                    state,
                    ProtectionState::EnablingProtection
                        | ProtectionState::InitialReplicationInProgress
                        | ProtectionState::Protected
                        | ProtectionState::ResyncRequired
                        | ProtectionState::Resynchronizing
                        | ProtectionState::ResyncPaused
                );
                let hint = if e.doc.owner.site == self.site.id() {
                    "a take-over by another site is under way".to_owned()
                } else if failed_over {
                    format!(
                        "it failed over ({}) and that site acts for it now: fail back from there, or take it over here with `take-over {name}`",
                        state.to_string().to_lowercase()
                    )
                } else {
                    format!(
                        "this site may only read it; if that site is lost, take it over with `take-over {name}` (its replication is fenced)"
                    )
                };
                Err(Error::NotOwner {
                    item: name.to_owned(),
                    owner: e.doc.owner.label.clone(),
                    hint: Some(hint),
                })
            }
        }
    }

    /// The item's protection state (as this site last saw it).
    pub fn protection(&self, name: &str) -> Result<ProtectionState> {
        Ok(self.item(name)?.status.state)
    }

    // ------------------------------------------------------------------ commands

    /// Starts an operation on an item this site acts for, drives it as far as it goes and
    /// checks how its job ended. A job action goes to [`Engine::job_action`], a plan's
    /// resumption to [`Engine::resume_plan`]; a plan's start needs its outputs and hooks,
    /// so [`Engine::start_plan`] is the way to it.
    pub async fn command(&mut self, cmd: Command) -> Result<JobId> {
        let (job, action) = match cmd {
            Command::CancelJob { job } => (job, JobAction::Cancel),
            Command::RestartJob { job } => (job, JobAction::Restart),
            Command::ResumeJob { job } => (job, JobAction::Resume),
            Command::ResumePlan { plan } => return self.resume_plan(&plan).await,
            Command::StartPlan { plan, .. } => {
                return Err(Error::Invalid(format!(
                    "plan {plan}: start it with Engine::start_plan (it names the outputs and the hooks)"
                )));
            }
            cmd => return self.item_command(cmd).await,
        };
        self.job_action(&job, action).await
    }

    /// [`Engine::command`] for an item's own operation.
    async fn item_command(&mut self, cmd: Command) -> Result<JobId> {
        let item = cmd.item().to_owned();
        self.require_owned(&item)?;
        let now = self.now();
        let job = self.c.handle_command(now, cmd)?;
        self.persist().await?;
        self.drive().await?;
        self.check_job(&item, &job)?;
        Ok(job)
    }

    /// Refuses to write over files that exist (they may be anything: a source disk, say),
    /// unless the export says to.
    fn check_outputs(&self, item: &str, export: &Export) -> Result<()> {
        if export.vhdx && (export.in_store || export.dir.is_none() || export.vhd) {
            return Err(Error::Invalid(
                "VHDX output is written as files at this site (an output directory, not blobs \
                 in the store: Azure attaches fixed VHDs)"
                    .into(),
            ));
        }
        if export.force {
            return Ok(());
        }
        let n = self.doc(item)?.disks.len();
        match export.files(n).into_iter().find(|f| f.exists()) {
            Some(f) => Err(Error::Invalid(format!(
                "{} exists: choose another output directory, or force overwriting it",
                f.display()
            ))),
            None => Ok(()),
        }
    }

    /// Fails with the reason when the item is Critical, retrying, or the job failed.
    fn check_job(&mut self, item: &str, job: &JobId) -> Result<()> {
        let now = self.now();
        if let Some(st) = self.c.status(item, now) {
            for c in &st.causes {
                match c {
                    HealthCause::NonRecoverableError { message } => {
                        return Err(Error::Critical {
                            item: item.to_owned(),
                            message: message.clone(),
                        });
                    }
                    HealthCause::Retrying { message, retries } => {
                        return Err(Error::Retrying {
                            item: item.to_owned(),
                            message: message.clone(),
                            retries: *retries,
                        });
                    }
                    _ => {}
                }
            }
        }
        if let Some(j) = self.c.job(job)
            && matches!(j.state, JobState::Failed | JobState::Cancelled)
        {
            return Err(Error::Job {
                job: job.clone(),
                kind: j.kind,
                state: j.state,
                errors: j.errors.clone(),
            });
        }
        Ok(())
    }

    /// Checks what a [`Engine::protect`] of `item` asks, against the host alone (before a
    /// site or a store is set up, say, so a refused request leaves neither): the item's
    /// name, the block size, and that each disk opens and is a non-zero multiple of 512
    /// bytes, none named twice. The disks' sizes, in order. `protect` checks the same,
    /// then what the catalogue holds.
    ///
    /// ```
    /// use lifeboat_engine::{Engine, MemoryHost};
    /// let host = MemoryHost::default();
    /// host.add_disk("d0", vec![0; 4096]);
    /// let sizes = Engine::check_protect(&host, "vm", &["d0".into()], 64 << 10).unwrap();
    /// assert_eq!(sizes, [4096]);
    /// assert!(Engine::check_protect(&host, "vm", &["d1".into()], 64 << 10).is_err());
    /// assert!(Engine::check_protect(&host, "a/b", &["d0".into()], 64 << 10).is_err());
    /// ```
    pub fn check_protect(
        host: &dyn Host,
        item: &str,
        disks: &[PathBuf],
        block_size: u32,
    ) -> Result<Vec<u64>> {
        catalog::check_name("item", item)?;
        BlockSize::new(block_size)
            .map_err(|_| Error::Invalid(format!("block size {block_size} is not valid")))?;
        let named: std::collections::BTreeSet<_> = disks.iter().collect();
        if named.len() != disks.len() {
            return Err(Error::Invalid(format!("{item} names one disk twice")));
        }
        disks
            .iter()
            .map(|path| {
                let what = || format!("disk {}", path.display());
                let disk = host.open_disk_read(path).map_err(Error::io(what()))?;
                let len = disk.size().map_err(Error::io(what()))?;
                if len == 0 || !len.is_multiple_of(512) {
                    return Err(Error::Invalid(format!(
                        "disk {} is {len} bytes: a disk is a non-zero multiple of 512 bytes",
                        path.display()
                    )));
                }
                Ok(len)
            })
            .collect()
    }

    /// Protects a machine: records it in the catalogue (owned by this site), then runs
    /// initial replication of every disk. `disks` are the host's names for them. Returns
    /// `false` when the item was already protected by this site with these disks.
    pub async fn protect(
        &mut self,
        item: &str,
        disks: &[PathBuf],
        policy: ReplicationPolicy,
        block_size: u32,
    ) -> Result<bool> {
        catalog::check_name("item", item)?;
        if self.plans.contains_key(item) {
            return Err(Error::Invalid(format!(
                "{item}: a recovery plan has that name"
            )));
        }
        if let Some(e) = self.items.get(item) {
            if e.doc.owner.site != self.site.id() {
                return Err(Error::NotOwner {
                    item: item.to_owned(),
                    owner: e.doc.owner.label.clone(),
                    hint: Some("it is already protected from there".into()),
                });
            }
            if e.doc.disks.iter().map(|d| &d.source).ne(disks.iter()) {
                return Err(Error::Invalid(format!(
                    "{item} is already protected with other disks"
                )));
            }
            return Ok(false);
        }
        for path in disks {
            if let Some((other, _)) = self
                .items
                .iter()
                .filter(|(_, e)| e.doc.owner.site == self.site.id())
                .find(|(_, e)| e.doc.disks.iter().any(|d| &d.source == path))
            {
                return Err(Error::Invalid(format!(
                    "disk {} is already protected (item {other})",
                    path.display()
                )));
            }
        }
        let sizes = Self::check_protect(&*self.host, item, disks, block_size)?;
        let docs: Vec<Disk> = disks
            .iter()
            .zip(&sizes)
            .map(|(path, &size)| Disk {
                source: path.clone(),
                size,
                tracking: Tracking::default(),
            })
            .collect();
        let now = self.now();
        let job = self.c.handle_command(
            now,
            Command::EnableProtection {
                item: item.to_owned(),
                disks: sizes,
                policy,
            },
        )?;
        let doc = Item {
            schema: SCHEMA,
            name: item.to_owned(),
            owner: self.site.owner(),
            epoch: 0,
            taken_over: None,
            clock: now,
            replication: self.c.item_record(item).expect("just added"),
            block_size,
            disks: docs,
            points: BTreeMap::new(),
            point_digests: BTreeMap::new(),
            pending: Vec::new(),
            cycles: BTreeMap::new(),
            test: Materialized::default(),
            failover: Materialized::default(),
            failback_to: Vec::new(),
            protective: Vec::new(),
            source_running: true,
            target_running: false,
            last_resync: Vec::new(),
            last_sync_back: Vec::new(),
            trash: Vec::new(),
        };
        let doc_name = catalog::item_doc(item);
        let bytes = catalog::encode(&doc_name, &doc)?;
        // Two sites protecting one name: the store lets one create the document.
        let etag = match catalog::write(&*self.store, &doc_name, &bytes, Expect::Absent, None).await
        {
            Ok(etag) => etag,
            Err(e) => {
                self.c.remove_item(item);
                return Err(match e {
                    StoreError::Changed { .. } | StoreError::AlreadyExists { .. } => {
                        Error::Invalid(format!("{item} is already protected (from another site)"))
                    }
                    other => other.into(),
                });
            }
        };
        self.store.acquire_lease(&doc_name, self.site.id()).await?;
        self.site.cache(&doc_name, &bytes);
        // Another engine on the site (a service) reads the catalogue again.
        self.generation = self.site.bump_generation();
        self.items.insert(
            item.to_owned(),
            Entry {
                doc,
                etag,
                saved: bytes,
            },
        );
        self.drive().await?;
        self.check_job(item, &job)?;
        Ok(true)
    }

    /// Stages logs (see [`Engine::stage_logs`]) and runs a delta cycle now: the logs
    /// staged so far (with those the host closes, see [`Host::close_logs`]) become a
    /// recovery point, app-consistent if `app_consistent` says they were closed at a
    /// quiesced snapshot. While the item copies its disks (initial replication, resync)
    /// the logs are staged for the copy's own cycle; while it waits for a resync they are
    /// not needed (the resync covers their writes).
    ///
    /// [`Host::close_logs`]: crate::Host::close_logs
    pub async fn replicate(
        &mut self,
        item: &str,
        logs: &[(usize, PathBuf)],
        app_consistent: bool,
    ) -> Result<Replicated> {
        self.require_owned(item)?;
        let st = self.protection(item)?;
        match st {
            ProtectionState::Protected => {}
            ProtectionState::InitialReplicationInProgress
            | ProtectionState::Resynchronizing
            | ProtectionState::ResyncPaused => {
                let staged = self.stage_logs(item, logs, app_consistent).await?;
                return Ok(Replicated::Staged {
                    logs: staged.chained + staged.broken,
                });
            }
            ProtectionState::ResyncRequired => {
                return Ok(Replicated::ResyncRequired(self.item(item)?.status.causes));
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "replicate is not allowed while {item} is {}",
                    st.to_string().to_lowercase()
                )));
            }
        }
        let mut staged = self.stage_logs(item, logs, app_consistent).await?;
        let more = self.take_host_logs(item, app_consistent).await?;
        staged.chained += more.chained;
        staged.broken += more.broken;
        if staged.chained + staged.broken == 0 && self.doc(item)?.pending.is_empty() {
            return Ok(Replicated::Nothing);
        }
        let before = self.item(item)?.status.cycles_applied;
        match self
            .command(Command::ReplicateNow {
                item: item.to_owned(),
            })
            .await
        {
            Ok(_) => {}
            // The cycle's logs need a resync: the job failed, saying why.
            Err(Error::Job { .. })
                if matches!(
                    self.protection(item)?,
                    ProtectionState::ResyncRequired
                        | ProtectionState::Resynchronizing
                        | ProtectionState::ResyncPaused
                ) => {}
            Err(e) => return Err(e),
        }
        let s = self.item(item)?.status;
        if s.state != ProtectionState::Protected {
            return Ok(Replicated::ResyncRequired(s.causes));
        }
        Ok(Replicated::Applied {
            cycles: s.cycles_applied - before,
            points: s.points.len(),
        })
    }

    /// Materialises a recovery point's disks as `export` says, without disturbing
    /// replication.
    pub async fn test_failover(
        &mut self,
        item: &str,
        point: PointChoice,
        export: Export,
    ) -> Result<JobId> {
        self.check_outputs(item, &export)?;
        self.doc_mut(item)?.test.export = export;
        self.command(Command::TestFailover {
            item: item.to_owned(),
            point,
        })
        .await
    }

    /// Fails over: planned (source shut down, final logs applied, zero loss) or unplanned
    /// (to a point; this site takes the item over if another site owned it).
    pub async fn failover(&mut self, item: &str, how: Failover, export: Export) -> Result<JobId> {
        if matches!(how, Failover::Unplanned(_)) && self.require_owned(item).is_err() {
            self.take_over(item).await?;
        }
        // Run again after an interruption: the failover completed in the meantime.
        let done = match how {
            Failover::Planned(_) => ProtectionState::PlannedFailoverCompleted,
            Failover::Unplanned(_) => ProtectionState::UnplannedFailoverCompleted,
        };
        if self.protection(item)? == done
            && let Some(j) = self.jobs().into_iter().rev().find(|j| {
                j.item() == item
                    && matches!(
                        j.kind,
                        lifeboat_replication::JobKind::PlannedFailover
                            | lifeboat_replication::JobKind::UnplannedFailover
                    )
            })
        {
            return Ok(j.id.clone());
        }
        self.check_outputs(item, &export)?;
        self.doc_mut(item)?.failover.export = export;
        let cmd = match how {
            Failover::Planned(logs) => {
                if !logs.is_empty() {
                    self.stage_logs(item, &logs, false).await?;
                }
                Command::PlannedFailover {
                    item: item.to_owned(),
                }
            }
            Failover::Unplanned(point) => Command::UnplannedFailover {
                item: item.to_owned(),
                point,
            },
        };
        self.command(cmd).await
    }

    /// Brings on-premises disks (`to`, one per disk: the original ones or alternates) up
    /// to the recovered disks' current content, after a committed failover. A site that
    /// does not own the item takes it over first (the on-premises site acts from here on).
    pub async fn failback(&mut self, item: &str, to: &[PathBuf], full: bool) -> Result<()> {
        if self.require_owned(item).is_err() {
            let st = self.protection(item)?;
            if st != ProtectionState::FailoverCommitted {
                self.require_owned(item)?;
            }
            self.take_over(item).await?;
        }
        let doc = self.doc(item)?;
        if to.len() != doc.disks.len() {
            return Err(Error::Invalid(format!(
                "{item} has {} disk(s); {} target(s) given",
                doc.disks.len(),
                to.len()
            )));
        }
        for (d, (p, disk)) in to.iter().zip(&doc.disks).enumerate() {
            // An alternate disk may not exist yet (it is created); one that exists must fit.
            if let Ok(t) = self.host.open_disk(p) {
                let len = t
                    .size()
                    .map_err(Error::io(format!("disk {}", p.display())))?;
                if len != disk.size {
                    return Err(Error::Invalid(format!(
                        "failback target {} is {len} bytes but disk {d} is {} bytes",
                        p.display(),
                        disk.size
                    )));
                }
                t.check_writable()
                    .map_err(|e| Error::Invalid(format!("failback target {}: {e}", p.display())))?;
            }
        }
        let alternate = doc.disks.iter().map(|d| &d.source).ne(to.iter());
        let st = self.protection(item)?;
        if st == ProtectionState::FailoverCommitted {
            self.doc_mut(item)?.failback_to = to.to_vec();
        }
        // A failback an interrupted run left completed needs nothing more.
        if st != ProtectionState::FailbackCompleted {
            self.command(Command::Failback {
                item: item.to_owned(),
                full,
                alternate,
            })
            .await?;
        }
        Ok(())
    }

    /// Disables protection of an item this site acts for: change tracking stops, logs not
    /// applied are dropped, running initial replication or resync is cancelled, and the
    /// item leaves the catalogue. With `delete_replica` its recovery points and replica
    /// blobs are deleted first; without, the replica stays in the store (its blobs
    /// released: [`replica_blob`](crate::replica_blob) names them) and is no longer
    /// updated. Refused during a failover, failback or test failover, and for an item of
    /// a recovery plan.
    pub async fn unprotect(&mut self, item: &str, delete_replica: bool) -> Result<JobId> {
        self.command(Command::DisableProtection {
            item: item.to_owned(),
            delete_replica,
        })
        .await
    }

    /// After failback: completes it if needed, then resumes replication towards the
    /// recovery site. `false` if the item was protected already.
    pub async fn reprotect(&mut self, item: &str) -> Result<bool> {
        if self.protection(item)? == ProtectionState::Protected {
            return Ok(false);
        }
        if self.protection(item)? == ProtectionState::FailbackCompleted {
            self.command(Command::CompleteFailback {
                item: item.to_owned(),
            })
            .await?;
        }
        self.command(Command::Reprotect {
            item: item.to_owned(),
        })
        .await?;
        Ok(true)
    }

    /// Carries on with interrupted or retrying work; `now` runs scheduled retries and
    /// cycles at once instead of waiting for them.
    pub async fn resume(&mut self, now: bool) -> Result<()> {
        let t = self.now();
        if now {
            self.c.expedite(t);
        } else {
            self.c.handle_timeout(t);
        }
        self.drive().await?;
        self.persist().await
    }

    /// Makes this site act for an item another site owned (a lost site, a disaster):
    /// every blob of the item and its catalogue document are leased to this site, so the
    /// old owner's writes are refused by the store from now on. Logs the old site had
    /// shipped and not applied are lost. `false` if this site owned it already.
    pub async fn take_over(&mut self, item: &str) -> Result<bool> {
        let Some(entry) = self.items.get(item) else {
            return Err(Error::UnknownItem(item.to_owned()));
        };
        if self.c.status(item, Duration::ZERO).is_some() {
            return Ok(false);
        }
        let from = entry.doc.owner.clone();
        let me = self.site.id();
        let store = self.store.clone();
        // Fence first: every blob of the item, then its document, is leased to this site.
        let doc_name = catalog::item_doc(item);
        let mut blobs: Vec<String> = store
            .list(&catalog::item_prefix(item))
            .await?
            .into_iter()
            .filter(|b| *b != doc_name)
            .collect();
        blobs.push(doc_name.clone());
        for b in &blobs {
            take_lease(&*store, b, me).await?;
        }
        let (mut doc, etag, _) = catalog::read::<Item>(&*store, &doc_name)
            .await?
            .ok_or_else(|| Error::UnknownItem(item.to_owned()))?;
        doc.owner = self.site.owner();
        doc.epoch += 1;
        let now = self.now();
        doc.taken_over = Some((from.clone(), now));
        // Logs staged at the old site are lost with it.
        doc.pending.clear();
        doc.cycles.clear();
        doc.trash.clear();
        self.c.insert_item(now, item, doc.replication.clone());
        self.items.insert(
            item.to_owned(),
            Entry {
                doc,
                etag,
                saved: Vec::new(),
            },
        );
        self.c.handle_command(
            now,
            Command::TakeOver {
                item: item.to_owned(),
            },
        )?;
        self.persist().await?;
        self.observer.event(&Event::TookOver {
            item: item.to_owned(),
            from: from.label,
        });
        let plans: Vec<String> = self.plans.keys().cloned().collect();
        for p in plans {
            self.load_plan_if_mine(&p);
        }
        self.drive().await?;
        Ok(true)
    }

    // ------------------------------------------------------------------ jobs and plans

    /// Every job in the catalogue: items', then plans'.
    pub fn jobs(&self) -> Vec<&Job> {
        let mut out: Vec<&Job> = Vec::new();
        for (name, e) in &self.items {
            if self.c.status(name, Duration::ZERO).is_some() {
                out.extend(self.c.jobs().filter(|j| j.item() == name));
            } else {
                out.extend(e.doc.replication.jobs());
            }
        }
        for (name, p) in &self.plans {
            if self.c.plan(name).is_some() {
                out.extend(self.c.jobs().filter(|j| j.item() == name));
            } else {
                out.extend(p.record.jobs());
            }
        }
        out
    }

    /// One job.
    pub fn job(&self, id: &JobId) -> Option<&Job> {
        self.jobs().into_iter().find(|j| &j.id == id)
    }

    /// What an administrator may do with a job now (nothing for another site's).
    pub fn allowed_actions(&self, id: &JobId) -> Vec<JobAction> {
        self.c.allowed_actions(id)
    }

    /// Cancels, restarts or resumes a job this site acts for; returns the job that runs.
    pub async fn job_action(&mut self, id: &JobId, action: JobAction) -> Result<JobId> {
        if self.job(id).is_none() {
            return Err(Error::Invalid(format!("no job {id}")));
        }
        if self.c.job(id).is_none() {
            self.require_owned(&id.item)?;
        }
        let now = self.now();
        let job = id.clone();
        let job = self.c.handle_command(
            now,
            match action {
                JobAction::Cancel => Command::CancelJob { job },
                JobAction::Restart => Command::RestartJob { job },
                JobAction::Resume => Command::ResumeJob { job },
            },
        )?;
        self.persist().await?;
        self.drive().await?;
        Ok(job)
    }

    /// Creates (or replaces) a recovery plan; its items must be in the catalogue.
    pub async fn create_plan(&mut self, plan: RecoveryPlan) -> Result<()> {
        catalog::check_name("plan", &plan.name)?;
        if self.items.contains_key(&plan.name) {
            return Err(Error::Invalid(format!(
                "plan {}: an item has that name",
                plan.name
            )));
        }
        if let Some(i) = plan
            .groups
            .iter()
            .flat_map(|g| &g.items)
            .find(|i| !self.items.contains_key(*i))
        {
            return Err(Error::UnknownItem(i.clone()));
        }
        let name = plan.name.clone();
        let doc_name = catalog::plan_doc(&name);
        let (record, expect) = match self.plans.get(&name) {
            Some(e) => (
                e.record.clone().replaced(plan)?,
                Expect::Version(e.etag.clone()),
            ),
            None => (PlanRecord::new(plan)?, Expect::Absent),
        };
        let doc = PlanDoc {
            schema: SCHEMA,
            record: record.clone(),
        };
        let bytes = catalog::encode(&doc_name, &doc)?;
        let etag = catalog::write(&*self.store, &doc_name, &bytes, expect, None)
            .await
            .map_err(|e| match e {
                StoreError::Changed { .. } => Error::Catalog {
                    name: doc_name.clone(),
                    reason: "another site changed the plan; run the command again".into(),
                },
                other => other.into(),
            })?;
        self.c.remove_plan(&name);
        self.plans.insert(
            name.clone(),
            PlanEntry {
                record,
                etag,
                saved: bytes,
            },
        );
        self.generation = self.site.bump_generation();
        self.load_plan_if_mine(&name);
        Ok(())
    }

    /// Deletes a recovery plan (its items stay protected); refused while a failover of
    /// it is in progress.
    pub async fn delete_plan(&mut self, name: &str) -> Result<()> {
        let Some(entry) = self.plans.get(name) else {
            return Err(Error::Invalid(format!(
                "no recovery plan {name} (`lifeboat plan list` lists them)"
            )));
        };
        let running = match self.c.plan_record(name) {
            Some(r) => r.running(),
            None => entry.record.running(),
        };
        if running {
            return Err(Error::Invalid(format!(
                "plan {name} has a failover in progress: let it finish, or cancel its job first"
            )));
        }
        let doc_name = catalog::plan_doc(name);
        match self.store.delete(&doc_name, Condition::NONE).await {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.c.remove_plan(name);
        self.plans.remove(name);
        self.site.uncache(&doc_name);
        self.generation = self.site.bump_generation();
        Ok(())
    }

    /// Deletes the test-failover disks of every item of a plan that has them (after a
    /// plan's test failover); the items cleaned up, in plan order.
    pub async fn plan_test_cleanup(&mut self, name: &str) -> Result<Vec<String>> {
        let plan = self.plan(name).cloned().ok_or_else(|| {
            Error::Invalid(format!(
                "no recovery plan {name} (`lifeboat plan list` lists them)"
            ))
        })?;
        let mut cleaned = Vec::new();
        for item in plan.groups.iter().flat_map(|g| &g.items) {
            let test = self.item(item)?.status.test_failover;
            if test == lifeboat_replication::TestFailoverState::TestFailoverCompleted {
                self.command(Command::TestFailoverCleanup { item: item.clone() })
                    .await?;
                cleaned.push(item.clone());
            }
        }
        if cleaned.is_empty() {
            return Err(Error::Invalid(format!(
                "no item of plan {name} has test-failover disks to clean up"
            )));
        }
        Ok(cleaned)
    }

    /// A recovery plan.
    pub fn plan(&self, name: &str) -> Option<&RecoveryPlan> {
        self.plans.get(name).map(|p| p.record.plan())
    }

    /// Every recovery plan.
    pub fn plans(&self) -> impl Iterator<Item = &RecoveryPlan> + '_ {
        self.plans.values().map(|p| p.record.plan())
    }

    /// Fails over every item of a plan, group by group; `exports` says where each item's
    /// disks go. An unplanned plan failover takes over the items other sites own; a test
    /// or planned one needs this site to own them all.
    pub async fn start_plan(
        &mut self,
        plan: &str,
        failover: PlanFailover,
        exports: &dyn Fn(&str) -> Export,
    ) -> Result<JobId> {
        let items: Vec<String> = self
            .plan(plan)
            .ok_or_else(|| Error::UnknownPlan(plan.to_owned()))?
            .groups
            .iter()
            .flat_map(|g| g.items.clone())
            .collect();
        for i in &items {
            if self.require_owned(i).is_err() {
                if matches!(failover, PlanFailover::Unplanned(_)) {
                    self.take_over(i).await?;
                } else {
                    self.require_owned(i)?;
                }
            }
        }
        self.load_plan_if_mine(plan);
        for i in &items {
            self.check_outputs(i, &exports(i))?;
        }
        for i in &items {
            let ex = exports(i);
            let doc = self.doc_mut(i)?;
            if matches!(failover, PlanFailover::Test(_)) {
                doc.test.export = ex;
            } else {
                doc.failover.export = ex;
            }
        }
        let now = self.now();
        let start = Command::StartPlan {
            plan: plan.to_owned(),
            failover,
        };
        let job = self.c.handle_command(now, start)?;
        self.persist().await?;
        self.drive().await?;
        Ok(job)
    }

    /// Lets a plan waiting for a manual action carry on.
    pub async fn resume_plan(&mut self, plan: &str) -> Result<JobId> {
        if self.c.plan(plan).is_none() {
            return Err(match self.plans.get(plan) {
                None => Error::UnknownPlan(plan.to_owned()),
                Some(_) => Error::Invalid(format!(
                    "plan {plan} has items another site acts for: resume it there"
                )),
            });
        }
        let now = self.now();
        let plan = plan.to_owned();
        let job = self.c.handle_command(now, Command::ResumePlan { plan })?;
        self.persist().await?;
        self.drive().await?;
        Ok(job)
    }

    /// The plan's latest job.
    pub fn plan_job(&self, plan: &str) -> Option<&Job> {
        self.jobs()
            .into_iter()
            .rev()
            .find(|j| j.kind == lifeboat_replication::JobKind::RecoveryPlan && j.item() == plan)
    }

    /// The disk paths of an item this site acts for (for embedders that write to them,
    /// such as a stand-in guest).
    pub fn disk_path(&self, item: &str, d: usize) -> Result<&Path> {
        let doc = self.doc(item)?;
        doc.disks.get(d).map(|x| x.source.as_path()).ok_or_else(|| {
            Error::Invalid(format!(
                "{item} has {} disk(s); there is no disk {d}",
                doc.disks.len()
            ))
        })
    }
}

/// Breaks whatever lease holds `blob` (unless it is ours) and takes it.
/// The document of the item an action is for, if the catalogue has it.
fn doc_of<'a>(items: &'a BTreeMap<String, Entry>, a: &Action) -> Option<&'a Item> {
    items.get(&a.item).map(|e| &e.doc)
}

async fn take_lease(store: &dyn PageStore, blob: &str, me: LeaseId) -> Result<()> {
    match store.acquire_lease(blob, me).await {
        Ok(()) => Ok(()),
        Err(StoreError::Leased { .. }) => {
            store.break_lease(blob).await?;
            Ok(store.acquire_lease(blob, me).await?)
        }
        Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
