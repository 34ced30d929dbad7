//! Recovery plans: ordered groups of items failed over group by group, items of a group in
//! parallel, with manual (the plan suspends) or scripted (a `RunHook` action) pre and post
//! actions scoped to test, planned or unplanned failover.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::coordinator::{Coordinator, OpError};
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

/// A plan failover in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PlanRun {
    job: JobId,
    failover: PlanFailover,
    group: usize,
    phase: Phase,
    /// The current group's item jobs (empty until the group starts).
    item_jobs: Vec<(ItemId, JobId)>,
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
    /// a plan with a failover in progress cannot be replaced.
    pub fn create_plan(&mut self, plan: RecoveryPlan) -> Result<(), OpError> {
        if self.plan_runs.contains_key(&plan.name) {
            return Err(OpError::Invalid(format!(
                "plan {} has a failover in progress",
                plan.name
            )));
        }
        if plan.groups.is_empty() || plan.groups.iter().any(|g| g.items.is_empty()) {
            return Err(OpError::Invalid(format!(
                "plan {}: at least one group, and no empty group",
                plan.name
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for i in plan.groups.iter().flat_map(|g| &g.items) {
            if !self.items.contains_key(i) {
                return Err(OpError::UnknownItem(i.clone()));
            }
            if !seen.insert(i) {
                return Err(OpError::Invalid(format!(
                    "plan {}: {i} appears twice",
                    plan.name
                )));
            }
        }
        self.plans.insert(plan.name.clone(), plan);
        Ok(())
    }

    /// A recovery plan.
    pub fn plan(&self, name: &str) -> Option<&RecoveryPlan> {
        self.plans.get(name)
    }

    /// Every recovery plan.
    pub fn plans(&self) -> impl Iterator<Item = &RecoveryPlan> + '_ {
        self.plans.values()
    }

    /// Starts a plan failover at `now`: group by group, pre actions, the items' failovers
    /// (in parallel), post actions. Returns the plan's job.
    pub fn start_plan(
        &mut self,
        now: Duration,
        name: &str,
        failover: PlanFailover,
    ) -> Result<JobId, OpError> {
        let plan = self
            .plans
            .get(name)
            .cloned()
            .ok_or_else(|| OpError::Invalid(format!("no recovery plan {name}")))?;
        if self.plan_runs.contains_key(name) {
            return Err(OpError::Invalid(format!(
                "plan {name} has a failover in progress"
            )));
        }
        let scope = failover.scope();
        let job = self.new_job(now, JobKind::RecoveryPlan, name);
        let mut tasks = Vec::new();
        for (g, group) in plan.groups.iter().enumerate() {
            let pre = group.pre.iter().filter(|a| a.applies(scope));
            tasks.extend(pre.map(|a| action_task(g, true, a)));
            tasks.push(items_task(g, &group.items));
            let post = group.post.iter().filter(|a| a.applies(scope));
            tasks.extend(post.map(|a| action_task(g, false, a)));
        }
        if let Some(j) = self.jobs.get_mut(&job) {
            j.tasks = tasks
                .into_iter()
                .map(|name| Task {
                    name,
                    state: JobState::NotStarted,
                })
                .collect();
        }
        self.plan_runs.insert(
            name.to_owned(),
            PlanRun {
                job,
                failover,
                group: 0,
                phase: Phase::Pre(0),
                item_jobs: Vec::new(),
                hook: None,
                manual: false,
            },
        );
        self.pump_plans(now);
        Ok(job)
    }

    /// An administrator finished the manual action the plan waits for: carry on.
    pub fn resume_plan(&mut self, now: Duration, name: &str) -> Result<(), OpError> {
        let run = self
            .plan_runs
            .get_mut(name)
            .filter(|r| r.manual)
            .ok_or_else(|| {
                OpError::Invalid(format!("plan {name} is not waiting for a manual action"))
            })?;
        run.manual = false;
        let job = run.job;
        run.phase = run.phase.next_action();
        self.task_done(job);
        if let Some(j) = self.jobs.get_mut(&job) {
            j.state = JobState::InProgress;
        }
        self.pump_plans(now);
        Ok(())
    }

    /// Takes a hook's outcome; `false` if `id` is not a plan's hook.
    pub(crate) fn plan_outcome(&mut self, now: Duration, id: ActionId, outcome: &Outcome) -> bool {
        let Some((name, run)) = self
            .plan_runs
            .iter_mut()
            .find(|(_, r)| r.hook.as_ref().is_some_and(|(a, _)| *a == id))
        else {
            return false;
        };
        let (name, job) = (name.clone(), run.job);
        run.hook = None;
        match outcome {
            Outcome::Failed { message, .. } => {
                // A failed script fails the plan: the administrator decides what next.
                self.fail_plan(now, &name, format!("hook failed: {message}"));
            }
            Outcome::Done | Outcome::Logs(_) => {
                if let Some(r) = self.plan_runs.get_mut(&name) {
                    r.phase = r.phase.next_action();
                }
                self.task_done(job);
            }
        }
        true
    }

    /// After a restore: hooks in flight are issued again.
    pub(crate) fn resume_plans(&mut self) {
        let names: Vec<String> = self.plan_runs.keys().cloned().collect();
        for n in names {
            let Some((_, kind)) = self.plan_runs[&n].hook.clone() else {
                continue;
            };
            self.next_action += 1;
            let id = ActionId(self.next_action);
            let job = self.plan_runs[&n].job;
            self.ready.push_back(Action {
                id,
                item: n.clone(),
                job: Some(job),
                kind: kind.clone(),
            });
            if let Some(r) = self.plan_runs.get_mut(&n) {
                r.hook = Some((id, kind));
            }
        }
    }

    fn task_done(&mut self, job: JobId) {
        if let Some(j) = self.jobs.get_mut(&job) {
            if let Some(t) = j.tasks.iter_mut().find(|t| !t.state.is_terminal()) {
                t.state = JobState::Succeeded;
            }
            let done = j.tasks.iter().filter(|t| t.state.is_terminal()).count();
            j.progress_permille = (done * 1000 / j.tasks.len().max(1)) as u32;
        }
    }

    fn task_started(&mut self, job: JobId) {
        if let Some(t) = self
            .jobs
            .get_mut(&job)
            .and_then(|j| j.tasks.iter_mut().find(|t| !t.state.is_terminal()))
        {
            t.state = JobState::InProgress;
        }
    }

    /// Moves every running plan as far as it can go.
    pub(crate) fn pump_plans(&mut self, now: Duration) {
        let names: Vec<String> = self.plan_runs.keys().cloned().collect();
        for n in names {
            self.pump_plan(now, &n);
        }
    }

    fn fail_plan(&mut self, now: Duration, name: &str, why: String) {
        if let Some(run) = self.plan_runs.remove(name) {
            if let Some(j) = self.jobs.get_mut(&run.job) {
                j.errors.push(why);
            }
            self.finish_job(now, run.job, JobState::Failed);
        }
    }

    fn pump_plan(&mut self, now: Duration, name: &str) {
        loop {
            let Some(run) = self.plan_runs.get(name).cloned() else {
                return;
            };
            if run.manual || run.hook.is_some() {
                return;
            }
            let Some(group) = self
                .plans
                .get(name)
                .and_then(|p| p.groups.get(run.group))
                .cloned()
            else {
                // Every group done.
                self.plan_runs.remove(name);
                self.finish_job(now, run.job, JobState::Succeeded);
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
            let r = self.plan_runs.get_mut(name).expect("running");
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
                    self.task_started(job);
                    if let Some(j) = self.jobs.get_mut(&job) {
                        j.state = JobState::Suspended;
                    }
                }
                PlanActionKind::Script { hook } => {
                    self.next_action += 1;
                    let id = ActionId(self.next_action);
                    let kind = ActionKind::RunHook {
                        group: run.group,
                        pre,
                        hook: hook.clone(),
                    };
                    r.hook = Some((id, kind.clone()));
                    let job = r.job;
                    self.task_started(job);
                    self.ready.push_back(Action {
                        id,
                        item: name.to_owned(),
                        job: Some(job),
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
            self.task_started(run.job);
            let mut started = Vec::new();
            for item in &group.items {
                match self.command(now, run.failover.command(item.clone())) {
                    Ok(job) => started.push((item.clone(), job)),
                    Err(e) => {
                        self.fail_plan(now, name, format!("group {}: {e}", run.group + 1));
                        return false;
                    }
                }
            }
            if let Some(r) = self.plan_runs.get_mut(name) {
                r.item_jobs = started;
            }
        }
        let jobs = self.plan_runs[name].item_jobs.clone();
        let states: Vec<(ItemId, JobState)> = jobs
            .iter()
            .map(|(i, j)| (i.clone(), self.jobs[j].state))
            .collect();
        if states.iter().any(|(_, s)| !s.is_terminal()) {
            return false;
        }
        if let Some((i, s)) = states.iter().find(|(_, s)| *s != JobState::Succeeded) {
            self.fail_plan(
                now,
                name,
                format!("group {}: {i}'s failover {s:?}", run.group + 1),
            );
            return false;
        }
        self.task_done(run.job);
        if let Some(r) = self.plan_runs.get_mut(name) {
            r.phase = Phase::Post(0);
        }
        true
    }

    /// A running plan's job is accounted for (the invariant check).
    pub(crate) fn plan_job_alive(&self, job: &Job) -> bool {
        self.plan_runs.get(&job.item).is_some_and(|r| {
            r.job == job.id
                && (r.manual
                    || r.hook.is_some()
                    || r.item_jobs
                        .iter()
                        .any(|(_, j)| self.jobs.get(j).is_some_and(|j| !j.state.is_terminal())))
        })
    }
}
