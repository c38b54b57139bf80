//! The worker task: the only owner of the [`PgController`]. It takes one job at a time
//! (observe, plan, apply one action, observe again) and reports each stage on a channel, so the
//! reconcile loop keeps reporting (with the step in progress) while a long action such as a base
//! backup runs.
//!
//! Invariant: at most one controller step runs at a time, and each job plans from an
//! observation taken inside the same job, so the action always matches the server as it is.

use ha_proto::convert::Goal;
use ha_proto::types::GoalState;
use tokio::sync::mpsc;
use tracing::debug;

use crate::pg::{Action, PgController, PgObservation};

/// One reconcile request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The goal to plan for; `None` only observes.
    pub goal: Option<Goal>,
    /// The lease expired: plan as if the goal were `fenced`, whatever it is.
    pub fence: bool,
}

/// What the worker tells the reconcile loop.
#[derive(Debug)]
pub enum WorkerEvent {
    Observed {
        obs: Result<PgObservation, String>,
        postmaster_pid: Option<i32>,
        /// Why the node's TLS material is refused ([`PgController::tls_error`]), if it is.
        tls_error: Option<String>,
    },
    /// An action started (not sent for [`Action::Nothing`]).
    Applying(Action),
    /// The job ended. `action` is `None` when no plan was possible (observation failed).
    Finished {
        job: Job,
        action: Option<Action>,
        result: Result<(), String>,
    },
}

/// The goal the job plans for: the lease overrides a writable goal with `fenced`.
fn effective(job: &Job) -> Option<Goal> {
    job.goal.clone().map(|g| {
        if job.fence {
            Goal {
                state: GoalState::Fenced,
                ..g
            }
        } else {
            g
        }
    })
}

async fn observe(
    ctl: &mut PgController,
    events: &mpsc::Sender<WorkerEvent>,
) -> Option<PgObservation> {
    let obs = ctl.observe().await.map_err(|e| e.to_string());
    let postmaster_pid = ctl.postmaster_pid();
    let local = obs.as_ref().ok().cloned();
    let tls_error = ctl.tls_error().map(str::to_owned);
    let _ = events
        .send(WorkerEvent::Observed {
            obs,
            postmaster_pid,
            tls_error,
        })
        .await;
    local
}

/// Runs jobs until the job channel closes, then hands the controller back (so shutdown can
/// stop PostgreSQL when configured to).
pub async fn run(
    mut ctl: PgController,
    mut jobs: mpsc::Receiver<Job>,
    events: mpsc::Sender<WorkerEvent>,
) -> PgController {
    while let Some(job) = jobs.recv().await {
        let Some(obs) = observe(&mut ctl, &events).await else {
            let _ = events
                .send(WorkerEvent::Finished {
                    job,
                    action: None,
                    result: Err("cannot observe PostgreSQL".into()),
                })
                .await;
            continue;
        };
        let Some(goal) = effective(&job) else {
            let _ = events
                .send(WorkerEvent::Finished {
                    job,
                    action: None,
                    result: Ok(()),
                })
                .await;
            continue;
        };
        let action = crate::pg::plan(&obs.local(), &goal);
        let result = if action == Action::Nothing {
            Ok(())
        } else {
            let _ = events.send(WorkerEvent::Applying(action.clone())).await;
            let r = ctl.apply(&action).await.map(|outcome| {
                debug!(?outcome, "step done");
            });
            observe(&mut ctl, &events).await;
            r.map_err(|e| e.to_string())
        };
        let _ = events
            .send(WorkerEvent::Finished {
                job,
                action: Some(action),
                result,
            })
            .await;
    }
    ctl
}
