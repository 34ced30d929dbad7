//! What an administrator can do with a job: cancel, restart, resume.

use std::time::Duration;

use crate::coordinator::{Coordinator, ItemStatus};
use crate::error::OpError;
use crate::model::*;

impl Coordinator {
    /// The actions `job` allows now (the jobs view's "allowed actions").
    pub fn allowed_actions(&self, job: &JobId) -> Vec<JobAction> {
        match self.job(job) {
            Some(j) => allowed_actions(j, self.status(j.item(), Duration::ZERO).as_ref()),
            None => Vec::new(),
        }
    }

    /// Cancels a running resync (the item stays resync-required) or a recovery plan (no
    /// further group starts; failovers already started run to their end).
    pub(crate) fn cancel_job(&mut self, now: Duration, job: &JobId) -> Result<(), OpError> {
        let j = self.job_or_err(job)?;
        if j.state.is_terminal() {
            return Err(OpError::JobActionRefused {
                job: job.clone(),
                why: "it is over".into(),
            });
        }
        match j.kind {
            JobKind::Resynchronize => {
                let item = job.item.clone();
                self.command(now, Command::CancelResync { item })
                    .map(|_| ())
            }
            JobKind::RecoveryPlan => {
                self.cancel_plan(now, &job.item);
                Ok(())
            }
            kind => Err(OpError::JobActionRefused {
                job: job.clone(),
                why: format!(
                    "a {} job cannot be cancelled",
                    kind.to_string().to_lowercase()
                ),
            }),
        }
    }

    /// Runs a failed or cancelled job's operation again, as a new job.
    pub(crate) fn restart_job(&mut self, now: Duration, job: &JobId) -> Result<JobId, OpError> {
        let j = self.job_or_err(job)?;
        if !matches!(j.state, JobState::Failed | JobState::Cancelled) {
            return Err(OpError::JobActionRefused {
                job: job.clone(),
                why: format!(
                    "it is {}: only a failed or cancelled job restarts",
                    j.state.to_string().to_lowercase()
                ),
            });
        }
        let cmd = j.command.clone().ok_or_else(|| OpError::JobActionRefused {
            job: job.clone(),
            why: "it has no command to run again".into(),
        })?;
        self.command(now, cmd)
    }

    /// Lets a suspended job continue: repairs a Critical item, resumes a paused resync, or
    /// resumes a plan waiting for a manual action.
    pub(crate) fn resume_job(&mut self, now: Duration, job: &JobId) -> Result<(), OpError> {
        let j = self.job_or_err(job)?;
        if j.state != JobState::Suspended {
            return Err(OpError::JobActionRefused {
                job: job.clone(),
                why: format!(
                    "it is {}, not suspended",
                    j.state.to_string().to_lowercase()
                ),
            });
        }
        if j.kind == JobKind::RecoveryPlan {
            let plan = job.item.clone();
            return self.resume_plan(now, &plan).map(|_| ());
        }
        let cmd = self
            .resume_command(j)
            .ok_or_else(|| OpError::JobActionRefused {
                job: job.clone(),
                why: "it cannot be resumed".into(),
            })?;
        self.command(now, cmd).map(|_| ())
    }

    fn job_or_err(&self, job: &JobId) -> Result<&Job, OpError> {
        self.job(job)
            .ok_or_else(|| OpError::UnknownJob(job.clone()))
    }

    /// The command that lets a suspended item job go on (plans resume through
    /// `Coordinator::resume_plan`).
    fn resume_command(&self, j: &Job) -> Option<Command> {
        resume_command(j, self.status(j.item(), Duration::ZERO).as_ref())
    }
}

/// The actions a job allows, given its item's status (`None` for a plan's job): what the
/// jobs view shows, from a coordinator or from a persisted record alike.
pub fn allowed_actions(j: &Job, item: Option<&ItemStatus>) -> Vec<JobAction> {
    let mut out = Vec::new();
    let running = !j.state.is_terminal();
    if running && matches!(j.kind, JobKind::Resynchronize | JobKind::RecoveryPlan) {
        out.push(JobAction::Cancel);
    }
    if j.state == JobState::Suspended
        && (j.kind == JobKind::RecoveryPlan || resume_command(j, item).is_some())
    {
        out.push(JobAction::Resume);
    }
    if matches!(j.state, JobState::Failed | JobState::Cancelled) && j.command.is_some() {
        out.push(JobAction::Restart);
    }
    out
}

/// What resuming a suspended item job does: repair a Critical item, or resume its paused
/// resync.
fn resume_command(j: &Job, st: Option<&ItemStatus>) -> Option<Command> {
    let st = st?;
    let item = j.item().to_owned();
    if st
        .causes
        .iter()
        .any(|c| matches!(c, HealthCause::NonRecoverableError { .. }))
    {
        Some(Command::RepairReplication { item })
    } else if st.state == ProtectionState::ResyncPaused && j.kind == JobKind::Resynchronize {
        Some(Command::ResumeResync { item })
    } else {
        None
    }
}
