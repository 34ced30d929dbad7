//! Recovery plans: ordered groups of items failed over group by group, items of a group in
//! parallel, with manual (the plan suspends) or scripted (a `RunHook` action) pre and post
//! actions scoped to test, planned or unplanned failover.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::coordinator::Coordinator;
use crate::error::OpError;
use crate::model::*;

/// Where a running plan is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Phase {
    /// Running pre action `.0` of the group.
    Pre(usize),
    /// The group's items are failing over.
    Items,
    /// Running post action `.0` of the group.
    Post(usize),
}

impl Phase {
    /// The phase after its current pre or post action is done.
    fn next_action(&self) -> Phase {
        match self {
            Phase::Pre(i) => Phase::Pre(i + 1),
            Phase::Post(i) => Phase::Post(i + 1),
            Phase::Items => Phase::Items,
        }
    }
}

/// A recovery plan as the coordinator keeps it: the plan, its jobs, the failover in
/// progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PlanState {
    plan: RecoveryPlan,
    pub(crate) jobs: BTreeMap<u64, Job>,
    next_job: u64,
    run: Option<PlanRun>,
}

/// One recovery plan's whole state (the plan, its jobs, a failover in progress): what a
/// driver persists for the plan, and loads back with [`Coordinator::insert_plan`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord(PlanState);

impl PlanRecord {
    /// A new plan, not yet run: at least one group, no empty group, no item twice. (That
    /// its items exist is for whoever keeps the items to check;
    /// [`Coordinator::create_plan`] does.)
    pub fn new(plan: RecoveryPlan) -> Result<Self, OpError> {
        if plan.groups.is_empty() || plan.groups.iter().any(|g| g.items.is_empty()) {
            return Err(OpError::InvalidPlan {
                plan: plan.name,
                why: "at least one group, and no empty group".into(),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for i in plan.groups.iter().flat_map(|g| &g.items) {
            if !seen.insert(i) {
                return Err(OpError::InvalidPlan {
                    plan: plan.name.clone(),
                    why: format!("{i} appears twice"),
                });
            }
        }
        Ok(PlanRecord(PlanState {
            plan,
            jobs: BTreeMap::new(),
            next_job: 0,
            run: None,
        }))
    }

    /// The same record with its plan replaced (jobs kept); refused while a failover of
    /// the plan is in progress.
    pub fn replaced(self, plan: RecoveryPlan) -> Result<Self, OpError> {
        if self.running() {
            return Err(OpError::PlanRunning(plan.name));
        }
        let fresh = PlanRecord::new(plan)?;
        Ok(PlanRecord(PlanState {
            plan: fresh.0.plan,
            ..self.0
        }))
    }

    /// The plan.
    pub fn plan(&self) -> &RecoveryPlan {
        &self.0.plan
    }

    /// The plan's jobs, oldest first.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> + '_ {
        self.0.jobs.values()
    }

    /// Whether a failover of the plan is in progress.
    pub fn running(&self) -> bool {
        self.0.run.is_some()
    }
}

/// A plan failover in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PlanRun {
    job: u64,
    failover: PlanFailover,
    group: usize,
    phase: Phase,
    /// The current group's item jobs (empty until the group starts).
    item_jobs: Vec<JobId>,
    /// The hook in flight.
    hook: Option<(ActionId, ActionKind)>,
    /// Waiting for an administrator (a manual action).
    manual: bool,
}

pub(crate) fn hook_task(group: usize, pre: bool, hook: &str) -> String {
    format!(
        "Group {}: {} script {hook}",
        group + 1,
        if pre { "pre-action" } else { "post-action" }
    )
}

fn manual_task(group: usize, pre: bool, name: &str) -> String {
    format!(
        "Group {}: {} manual action {name}",
        group + 1,
        if pre { "pre-action" } else { "post-action" }
    )
}

fn items_task(group: usize, items: &[ItemId]) -> String {
    format!("Group {}: fail over {}", group + 1, items.join(", "))
}

fn action_task(group: usize, pre: bool, a: &PlanAction) -> String {
    match &a.kind {
        PlanActionKind::Manual => manual_task(group, pre, &a.name),
        PlanActionKind::Script { hook } => hook_task(group, pre, hook),
    }
}

impl Coordinator {
    /// Creates or replaces a recovery plan. Every item must be protected and appear once;
    /// a plan with a failover in progress cannot be replaced, and a plan may not take an
    /// item's name (jobs are named after their item or plan).
    pub fn create_plan(&mut self, plan: RecoveryPlan) -> Result<(), OpError> {
        if self.has_item(&plan.name) {
            return Err(OpError::InvalidPlan {
                plan: plan.name,
                why: "an item has that name".into(),
            });
        }
        if let Some(i) = plan
            .groups
            .iter()
            .flat_map(|g| &g.items)
            .find(|i| !self.has_item(i))
        {
            return Err(OpError::UnknownItem(i.clone()));
        }
        let record = match self.plans.remove(&plan.name) {
            Some(old) => {
                let old = PlanRecord(old);
                match old.clone().replaced(plan) {
                    Ok(r) => r,
                    Err(e) => {
                        self.plans.insert(old.0.plan.name.clone(), old.0);
                        return Err(e);
                    }
                }
            }
            None => PlanRecord::new(plan)?,
        };
        self.plans.insert(record.0.plan.name.clone(), record.0);
        Ok(())
    }

    /// A recovery plan.
    pub fn plan(&self, name: &str) -> Option<&RecoveryPlan> {
        self.plans.get(name).map(|p| &p.plan)
    }

    /// Every recovery plan.
    pub fn plans(&self) -> impl Iterator<Item = &RecoveryPlan> + '_ {
        self.plans.values().map(|p| &p.plan)
    }

    /// A copy of one plan's state, to persist it on its own.
    pub fn plan_record(&self, name: &str) -> Option<PlanRecord> {
        self.plans.get(name).cloned().map(PlanRecord)
    }

    /// Adds (or replaces) a plan from its persisted record: a hook it had in flight is
    /// issued again (hooks should be idempotent).
    pub fn insert_plan(&mut self, now: Duration, record: PlanRecord) {
        let name = record.0.plan.name.clone();
        self.ready.retain(|a| a.item != name);
        self.plans.insert(name.clone(), record.0);
        self.reissue_hook(&name);
        self.pump_plans(now);
    }

    /// Takes a plan out; a hook of it that is ready is dropped.
    pub fn remove_plan(&mut self, name: &str) -> Option<PlanRecord> {
        self.ready.retain(|a| a.item != name);
        self.plans.remove(name).map(PlanRecord)
    }

    /// Starts a plan failover at `now`: group by group, pre actions, the items' failovers
    /// (in parallel), post actions. Returns the plan's job.
    pub(crate) fn start_plan(
        &mut self,
        now: Duration,
        name: &str,
        failover: PlanFailover,
    ) -> Result<JobId, OpError> {
        let state = self
            .plans
            .get_mut(name)
            .ok_or_else(|| OpError::UnknownPlan(name.to_owned()))?;
        if state.run.is_some() {
            return Err(OpError::PlanRunning(name.to_owned()));
        }
        let scope = failover.scope();
        let mut tasks = Vec::new();
        for (g, group) in state.plan.groups.iter().enumerate() {
            let pre = group.pre.iter().filter(|a| a.applies(scope));
            tasks.extend(pre.map(|a| action_task(g, true, a)));
            tasks.push(items_task(g, &group.items));
            let post = group.post.iter().filter(|a| a.applies(scope));
            tasks.extend(post.map(|a| action_task(g, false, a)));
        }
        state.next_job += 1;
        let n = state.next_job;
        let mut job = Job::new(JobId::new(name, n), JobKind::RecoveryPlan, now);
        job.tasks = tasks
            .into_iter()
            .map(|name| Task {
                name,
                state: JobState::NotStarted,
            })
            .collect();
        state.jobs.insert(n, job);
        state.run = Some(PlanRun {
            job: n,
            failover,
            group: 0,
            phase: Phase::Pre(0),
            item_jobs: Vec::new(),
            hook: None,
            manual: false,
        });
        self.pump_plans(now);
        Ok(JobId::new(name, n))
    }

    /// An administrator finished the manual action the plan waits for: carry on.
    pub(crate) fn resume_plan(&mut self, now: Duration, name: &str) -> Result<JobId, OpError> {
        let state = self
            .plans
            .get_mut(name)
            .filter(|p| p.run.as_ref().is_some_and(|r| r.manual))
            .ok_or_else(|| OpError::PlanNotWaiting(name.to_owned()))?;
        let run = state.run.as_mut().expect("checked above");
        run.manual = false;
        run.phase = run.phase.next_action();
        let job = run.job;
        state.task_done(job);
        if let Some(j) = state.jobs.get_mut(&job) {
            j.state = JobState::InProgress;
        }
        self.pump_plans(now);
        Ok(JobId::new(name, job))
    }

    /// Cancels a plan's failover: no further group starts; failovers already started run
    /// to their end.
    pub(crate) fn cancel_plan(&mut self, now: Duration, name: &str) {
        if let Some(p) = self.plans.get_mut(name)
            && let Some(run) = p.run.take()
            && let Some(j) = p.jobs.get_mut(&run.job)
        {
            j.errors.push("cancelled by an administrator".into());
            j.finish(now, JobState::Cancelled);
        }
    }

    /// Takes a hook's outcome; `false` if `id` is not a plan's hook.
    pub(crate) fn plan_outcome(&mut self, now: Duration, id: ActionId, outcome: &Outcome) -> bool {
        let Some(name) = self
            .plans
            .iter()
            .find(|(_, p)| {
                p.run
                    .as_ref()
                    .is_some_and(|r| r.hook.as_ref().is_some_and(|(a, _)| *a == id))
            })
            .map(|(n, _)| n.clone())
        else {
            return false;
        };
        let state = self.plans.get_mut(&name).expect("found");
        let run = state.run.as_mut().expect("found running");
        run.hook = None;
        match outcome {
            Outcome::Failed { message, .. } => {
                // A failed script fails the plan: the administrator decides what next.
                self.fail_plan(now, &name, format!("hook failed: {message}"));
            }
            Outcome::Done | Outcome::Logs(_) | Outcome::CopiedThrough(_) => {
                run.phase = run.phase.next_action();
                let job = run.job;
                state.task_done(job);
            }
        }
        true
    }

    /// After a restore: hooks in flight are issued again.
    pub(crate) fn resume_plans(&mut self) {
        let names: Vec<String> = self.plans.keys().cloned().collect();
        for n in names {
            self.reissue_hook(&n);
        }
    }

    fn reissue_hook(&mut self, name: &str) {
        let Some(run) = self.plans.get(name).and_then(|p| p.run.as_ref()) else {
            return;
        };
        let Some((_, kind)) = run.hook.clone() else {
            return;
        };
        let job = run.job;
        self.next_action += 1;
        let id = ActionId(self.next_action);
        self.ready.push_back(Action {
            id,
            item: name.to_owned(),
            job: Some(JobId::new(name, job)),
            kind: kind.clone(),
        });
        if let Some(r) = self.plans.get_mut(name).and_then(|p| p.run.as_mut()) {
            r.hook = Some((id, kind));
        }
    }

    /// Moves every running plan as far as it can go.
    pub(crate) fn pump_plans(&mut self, now: Duration) {
        let names: Vec<String> = self.plans.keys().cloned().collect();
        for n in names {
            self.pump_plan(now, &n);
        }
    }

    fn fail_plan(&mut self, now: Duration, name: &str, why: String) {
        if let Some(p) = self.plans.get_mut(name)
            && let Some(run) = p.run.take()
            && let Some(j) = p.jobs.get_mut(&run.job)
        {
            j.errors.push(why);
            j.finish(now, JobState::Failed);
        }
    }

    fn pump_plan(&mut self, now: Duration, name: &str) {
        loop {
            let Some(state) = self.plans.get(name) else {
                return;
            };
            let Some(run) = state.run.clone() else {
                return;
            };
            if run.manual || run.hook.is_some() {
                return;
            }
            let Some(group) = state.plan.groups.get(run.group).cloned() else {
                // Every group done.
                let state = self.plans.get_mut(name).expect("present");
                state.run = None;
                if let Some(j) = state.jobs.get_mut(&run.job) {
                    j.finish(now, JobState::Succeeded);
                }
                return;
            };
            let scope = run.failover.scope();
            let (pre, i) = match run.phase {
                Phase::Pre(i) => (true, i),
                Phase::Post(i) => (false, i),
                Phase::Items => {
                    if !self.pump_items(now, name, &run, &group) {
                        return;
                    }
                    continue;
                }
            };
            let list: Vec<&PlanAction> = if pre { &group.pre } else { &group.post }
                .iter()
                .filter(|a| a.applies(scope))
                .collect();
            let state = self.plans.get_mut(name).expect("present");
            let r = state.run.as_mut().expect("running");
            let Some(action) = list.get(i) else {
                if pre {
                    r.phase = Phase::Items;
                } else {
                    r.group += 1;
                    r.phase = Phase::Pre(0);
                    r.item_jobs.clear();
                }
                continue;
            };
            match &action.kind {
                PlanActionKind::Manual => {
                    r.manual = true;
                    let job = r.job;
                    state.task_started(job);
                    if let Some(j) = state.jobs.get_mut(&job) {
                        j.state = JobState::Suspended;
                    }
                }
                PlanActionKind::Script { hook } => {
                    self.next_action += 1;
                    let id = ActionId(self.next_action);
                    let kind = ActionKind::RunHook {
                        plan: name.to_owned(),
                        group: run.group,
                        pre,
                        hook: hook.clone(),
                    };
                    r.hook = Some((id, kind.clone()));
                    let job = r.job;
                    state.task_started(job);
                    self.ready.push_back(Action {
                        id,
                        item: name.to_owned(),
                        job: Some(JobId::new(name, job)),
                        kind,
                    });
                }
            }
            return;
        }
    }

    /// Starts the group's failovers, or checks on them; `true` when the group is done and
    /// the plan moved on to its post actions.
    fn pump_items(&mut self, now: Duration, name: &str, run: &PlanRun, group: &PlanGroup) -> bool {
        if run.item_jobs.is_empty() {
            if let Some(p) = self.plans.get_mut(name) {
                p.task_started(run.job);
            }
            let mut started = Vec::new();
            for item in &group.items {
                match self.command(now, run.failover.command(item.clone())) {
                    Ok(job) => started.push(job),
                    Err(e) => {
                        self.fail_plan(now, name, format!("group {}: {e}", run.group + 1));
                        return false;
                    }
                }
            }
            if let Some(r) = self.plans.get_mut(name).and_then(|p| p.run.as_mut()) {
                r.item_jobs = started;
            }
        }
        let Some(jobs) = self
            .plans
            .get(name)
            .and_then(|p| p.run.as_ref())
            .map(|r| r.item_jobs.clone())
        else {
            return false;
        };
        // A job that vanished (its item was taken out) counts as failed.
        let states: Vec<(JobId, JobState)> = jobs
            .into_iter()
            .map(|j| {
                let s = self.job(&j).map_or(JobState::Failed, |x| x.state);
                (j, s)
            })
            .collect();
        if states.iter().any(|(_, s)| !s.is_terminal()) {
            return false;
        }
        if let Some((j, s)) = states.iter().find(|(_, s)| *s != JobState::Succeeded) {
            self.fail_plan(
                now,
                name,
                format!(
                    "group {}: {}'s failover {}",
                    run.group + 1,
                    j.item,
                    s.to_string().to_lowercase()
                ),
            );
            return false;
        }
        let state = self.plans.get_mut(name).expect("present");
        state.task_done(run.job);
        if let Some(r) = state.run.as_mut() {
            r.phase = Phase::Post(0);
        }
        true
    }

    /// A running plan's job is accounted for (the invariant check).
    pub(crate) fn plan_job_alive(&self, job: &Job) -> bool {
        self.plans
            .get(job.item())
            .and_then(|p| p.run.as_ref())
            .is_some_and(|r| {
                r.job == job.id.n
                    && (r.manual
                        || r.hook.is_some()
                        || r.item_jobs
                            .iter()
                            .any(|j| self.job(j).is_some_and(|j| !j.state.is_terminal())))
            })
    }
}

impl PlanState {
    fn task_done(&mut self, job: u64) {
        if let Some(j) = self.jobs.get_mut(&job) {
            if let Some(t) = j.tasks.iter_mut().find(|t| !t.state.is_terminal()) {
                t.state = JobState::Succeeded;
            }
            let done = j.tasks.iter().filter(|t| t.state.is_terminal()).count();
            j.progress_permille = (done * 1000 / j.tasks.len().max(1)) as u32;
        }
    }

    fn task_started(&mut self, job: u64) {
        if let Some(t) = self
            .jobs
            .get_mut(&job)
            .and_then(|j| j.tasks.iter_mut().find(|t| !t.state.is_terminal()))
        {
            t.state = JobState::InProgress;
        }
    }
}
