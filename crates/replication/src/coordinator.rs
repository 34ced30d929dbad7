//! The coordinator: commands, outcomes and time in; actions and deadlines out.
//!
//! Every transition is one item's own ([`item`]): admitting a command ([`admission`]),
//! following an action's outcome ([`outcomes`]), the schedule of retries, cycles and
//! resyncs ([`schedule`]), and the item's health and status ([`health`]). The coordinator
//! routes commands, outcomes and time to items, and turns their steps into actions.
//! Plans are in `crate::plan`; the documented invariants are checked in [`invariants`].

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::OpError;
use crate::model::*;

pub use self::health::ItemStatus;
use self::item::Item;
use self::outcomes::Done;

mod admission;
mod health;
mod invariants;
mod item;
mod outcomes;
mod schedule;

/// The replication brain for any number of protected items. It never performs I/O and
/// never reads a clock: feed it [`Command`]s, action [`Outcome`]s and the time; take
/// [`Action`]s from [`Coordinator::poll_action`] and wake it at
/// [`Coordinator::poll_timeout`]. Its whole state is serialisable, so a restarted driver
/// deserialises it, calls [`Coordinator::restore`] and carries on.
///
/// Per item, one action is in flight at a time; every action is idempotent, so one
/// re-issued after a crash is safe.
///
/// Each item's state, its jobs included, stands on its own ([`ItemRecord`]): a driver may
/// persist items one by one, and load only those it acts for
/// ([`Coordinator::insert_item`], [`Coordinator::item_record`]). Recovery plans likewise
/// ([`PlanRecord`](crate::PlanRecord)).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Coordinator {
    items: BTreeMap<ItemId, Item>,
    pub(crate) ready: VecDeque<Action>,
    pub(crate) next_action: u64,
    /// Recovery plans by name, with their jobs and the failover in progress.
    #[serde(default)]
    pub(crate) plans: BTreeMap<String, crate::plan::PlanState>,
}

/// One item's whole replication state (its jobs and recovery points included): what a
/// driver persists for the item, and loads back with [`Coordinator::insert_item`]. It
/// answers read-only questions without a coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ItemRecord(Item);

impl ItemRecord {
    /// The item's state, health and points at `now`.
    pub fn status(&self, now: Duration) -> ItemStatus {
        self.0.status(now)
    }

    /// The item's jobs, oldest first.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.0.jobs.values()
    }

    /// The item's protection state.
    pub fn state(&self) -> ProtectionState {
        self.0.state
    }

    /// The item's replication policy.
    pub fn policy(&self) -> &ReplicationPolicy {
        &self.0.policy
    }
}

impl Coordinator {
    /// An empty coordinator.
    pub fn new() -> Self {
        Coordinator::default()
    }

    /// Starts an operation at `now`, the one way in for every operation: an item's, a
    /// recovery plan's, or a job action. Returns the job it started (the plan's job for
    /// [`Command::StartPlan`] and [`Command::ResumePlan`], the job acted on for
    /// [`Command::CancelJob`] and [`Command::ResumeJob`], the new job for
    /// [`Command::RestartJob`]).
    pub fn handle_command(&mut self, now: Duration, cmd: Command) -> Result<JobId, OpError> {
        let r = self.command(now, cmd);
        self.pump_plans(now);
        r
    }

    /// [`Coordinator::handle_command`] without pumping plans (a plan's own item
    /// failovers come in here).
    pub(crate) fn command(&mut self, now: Duration, cmd: Command) -> Result<JobId, OpError> {
        let cmd = match cmd {
            Command::StartPlan { plan, failover } => return self.start_plan(now, &plan, failover),
            Command::ResumePlan { plan } => return self.resume_plan(now, &plan),
            Command::CancelJob { job } => return self.cancel_job(now, &job).map(|()| job),
            Command::RestartJob { job } => return self.restart_job(now, &job),
            Command::ResumeJob { job } => return self.resume_job(now, &job).map(|()| job),
            cmd => cmd,
        };
        let original = cmd.clone();
        let name = cmd.item().to_owned();
        let job = self.admit(now, cmd)?;
        if let Some(j) = self.item_mut(&name).jobs.get_mut(&job)
            && j.command.is_none()
        {
            j.command = Some(original);
        }
        Ok(JobId::new(name, job))
    }

    /// Reports how action `id` ended, at `now`.
    pub fn handle_outcome(
        &mut self,
        now: Duration,
        id: ActionId,
        outcome: Outcome,
    ) -> Result<(), OpError> {
        if self.plan_outcome(now, id, &outcome) {
            self.pump_plans(now);
            return Ok(());
        }
        let name = self
            .items
            .iter()
            .find(|(_, it)| it.in_flight.as_ref().is_some_and(|(a, _)| *a == id))
            .map(|(n, _)| n.clone())
            .ok_or(OpError::UnknownAction(id))?;
        let it = self.item_mut(&name);
        let (_, step) = it.in_flight.take().ok_or(OpError::UnknownAction(id))?;
        match outcome {
            Outcome::Failed { class, message } => it.on_failed(now, step, class, message),
            Outcome::Done => it.on_done(now, step, Done::default()),
            Outcome::Logs(logs) => it.on_done(now, step, Done { logs, through: 0 }),
            Outcome::CopiedThrough(end) => it.on_done(
                now,
                step,
                Done {
                    logs: Vec::new(),
                    through: end,
                },
            ),
        }
        self.pump(&name, now);
        self.pump_plans(now);
        Ok(())
    }

    /// Wakes the coordinator at `now` (a retry or a delta cycle may be due).
    pub fn handle_timeout(&mut self, now: Duration) {
        let names: Vec<ItemId> = self.items.keys().cloned().collect();
        for n in names {
            self.pump(&n, now);
        }
        self.pump_plans(now);
    }

    /// Runs at `now` what would wait for a later time: scheduled retries and delta cycles
    /// (an administrator's "now"; the policy's own waits, scheduled initial replication and
    /// a resync window, stay).
    pub fn expedite(&mut self, now: Duration) {
        for it in self.items.values_mut() {
            it.expedite(now);
        }
        self.handle_timeout(now);
    }

    /// After deserialising a coordinator: re-issues every action that was in flight
    /// (actions are idempotent) and drops actions the old driver never took.
    pub fn restore(&mut self, now: Duration) {
        self.ready.clear();
        let names: Vec<ItemId> = self.items.keys().cloned().collect();
        for n in names {
            let it = self.item_mut(&n);
            it.name.clone_from(&n);
            it.requeue_in_flight();
            self.pump(&n, now);
        }
        self.resume_plans();
        self.pump_plans(now);
    }

    /// A copy of one item's state, to persist it on its own.
    pub fn item_record(&self, name: &str) -> Option<ItemRecord> {
        self.items.get(name).cloned().map(ItemRecord)
    }

    /// Adds (or replaces) an item from its persisted record and resumes it at `now`: the
    /// action it had in flight is issued again (actions are idempotent).
    pub fn insert_item(&mut self, now: Duration, name: &str, record: ItemRecord) {
        self.ready.retain(|a| a.item != name);
        let mut it = record.0;
        name.clone_into(&mut it.name);
        it.requeue_in_flight();
        self.items.insert(name.to_owned(), it);
        self.pump(name, now);
        self.pump_plans(now);
    }

    /// Takes an item out (another driver acts for it now); its ready actions are dropped.
    pub fn remove_item(&mut self, name: &str) -> Option<ItemRecord> {
        self.ready.retain(|a| a.item != name);
        self.items.remove(name).map(ItemRecord)
    }

    /// The next action to perform.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.ready.pop_front()
    }

    /// The next ready action of one of `items` (plan actions count as their plan's); the
    /// others stay ready. For a driver acting for some items while another one, beside
    /// it, acts for the rest.
    pub fn poll_action_for(&mut self, items: &[&str]) -> Option<Action> {
        self.poll_action_where(|a| items.contains(&a.item.as_str()))
    }

    /// The first ready action `wanted` accepts; the others stay ready, in order. For a
    /// driver performing several items' transfers at once (each item has one action out
    /// at a time, so actions of different items are independent).
    pub fn poll_action_where(&mut self, wanted: impl Fn(&Action) -> bool) -> Option<Action> {
        let i = self.ready.iter().position(wanted)?;
        self.ready.remove(i)
    }

    /// When to call [`Coordinator::handle_timeout`] next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.items.values().filter_map(Item::wake_at).min()
    }

    /// An item's state, health and points at `now`.
    pub fn status(&self, item: &str, now: Duration) -> Option<ItemStatus> {
        self.items.get(item).map(|it| it.status(now))
    }

    /// The protected items.
    pub fn items(&self) -> impl Iterator<Item = &str> + '_ {
        self.items.keys().map(String::as_str)
    }

    /// Every job: each item's, oldest first, then each plan's.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.items
            .values()
            .flat_map(|it| it.jobs.values())
            .chain(self.plans.values().flat_map(|p| p.jobs.values()))
    }

    /// One job.
    pub fn job(&self, id: &JobId) -> Option<&Job> {
        match self.items.get(&id.item) {
            Some(it) => it.jobs.get(&id.n),
            None => self.plans.get(&id.item)?.jobs.get(&id.n),
        }
    }

    // ------------------------------------------------------------------ internals

    /// Whether `name` is a protected item.
    pub(crate) fn has_item(&self, name: &str) -> bool {
        self.items.contains_key(name)
    }

    fn item_mut(&mut self, name: &str) -> &mut Item {
        self.items
            .get_mut(name)
            .expect("item exists: callers check")
    }

    /// Emits the next step of `name` as an action, if one may go out at `now`.
    fn pump(&mut self, name: &str, now: Duration) {
        let Some(it) = self.items.get_mut(name) else {
            return;
        };
        let Some(step) = it.next_step(now) else {
            return;
        };
        self.next_action += 1;
        let id = ActionId(self.next_action);
        self.ready.push_back(Action {
            id,
            item: name.to_owned(),
            job: step.job.map(|n| JobId::new(name, n)),
            kind: step.kind.clone(),
        });
        it.in_flight = Some((id, step));
    }
}
