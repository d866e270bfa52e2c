//! The process's tasks under one root [`CancellationToken`], each with a name, and what their
//! ends mean for the process.
//!
//! - A task that fails, panics, or stops although nothing cancelled it cancels the root (the
//!   others stop too: the process never runs half a pipeline) and is the error the process
//!   exits with, naming the task.
//! - A drain ([`Supervisor::drain`]) cancels the root and waits for every task; one still
//!   running at the deadline is aborted, and the drain is an error naming it.
//!
//! So `orderflow` exits non-zero after a crash or a stuck drain and zero only after a clean
//! stop, which is what a supervisor (Kubernetes, systemd) needs to tell them apart.

use std::{collections::HashMap, future::Future, time::Duration};

use anyhow::{anyhow, Result};
use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Named tasks under one root token.
pub struct Supervisor {
    cancel: CancellationToken,
    set: JoinSet<Result<()>>,
    names: HashMap<Id, &'static str>,
}

impl Supervisor {
    /// Tasks that stop when `cancel` fires (each task is handed its own clone of it).
    pub fn new(cancel: CancellationToken) -> Self {
        Self {
            cancel,
            set: JoinSet::new(),
            names: HashMap::new(),
        }
    }

    /// Runs `task` under `name` (what errors call it: "ingest edge", "saga").
    pub fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<()>> + Send + 'static,
    ) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits until the root is cancelled (`Ok`) or a task ends on its own, which cancels the
    /// root. A task that failed or panicked is an error naming it; so is one that returned
    /// `Ok` although nothing had cancelled it.
    pub async fn wait(&mut self) -> Result<()> {
        let cancel = self.cancel.clone();
        tokio::select! {
            () = cancel.cancelled() => Ok(()),
            finished = self.join_next() => {
                let on_its_own = !self.cancel.is_cancelled();
                self.cancel.cancel();
                let Some((name, joined)) = finished else {
                    return Ok(());
                };
                match ended(name, joined) {
                    Err(e) => {
                        warn!(task = name, error = %format!("{e:#}"), "A task failed; stopping the others.");
                        Err(e)
                    }
                    Ok(()) if on_its_own => {
                        warn!(task = name, "A task stopped on its own; stopping the others.");
                        Err(anyhow!("{name} stopped on its own"))
                    }
                    Ok(()) => Ok(()),
                }
            }
        }
    }

    /// Cancels the root and waits for every task to finish its work and return. Tasks still
    /// running after `deadline` are aborted (their uncommitted work is re-done on the next
    /// start) and the drain is an error naming them; a task that fails or panics while
    /// draining is an error too (the first one).
    pub async fn drain(&mut self, deadline: Duration) -> Result<()> {
        self.cancel.cancel();
        let drained = tokio::time::timeout(deadline, async {
            let mut result = Ok(());
            while let Some((name, joined)) = self.join_next().await {
                if let Err(e) = ended(name, joined) {
                    warn!(task = name, error = %format!("{e:#}"), "A task failed while stopping.");
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
            result
        })
        .await;
        match drained {
            Ok(result) => result,
            Err(_) => {
                let running = self.running();
                warn!(
                    ?deadline,
                    ?running,
                    "Tasks did not stop in time; aborting them."
                );
                self.set.abort_all();
                Err(anyhow!(
                    "{} did not stop within the drain deadline of {deadline:?}",
                    running.join(", ")
                ))
            }
        }
    }

    /// The next task to end, with its name.
    async fn join_next(&mut self) -> Option<(&'static str, Result<Result<()>, JoinError>)> {
        let (id, joined) = match self.set.join_next_with_id().await? {
            Ok((id, result)) => (id, Ok(result)),
            Err(e) => (e.id(), Err(e)),
        };
        let name = self.names.remove(&id).unwrap_or("a task");
        Some((name, joined))
    }

    /// The names of the tasks still running, sorted.
    fn running(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.names.values().copied().collect();
        names.sort_unstable();
        names
    }
}

/// What a joined task's outcome means: its error or its panic, named.
fn ended(name: &'static str, joined: Result<Result<()>, JoinError>) -> Result<()> {
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.context(format!("{name} failed"))),
        Err(e) if e.is_panic() => Err(anyhow!("{name} panicked: {}", panic_message(e))),
        // Cancelled: only `drain` aborts tasks, and it reports them itself.
        Err(_) => Ok(()),
    }
}

fn panic_message(e: JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task that runs until cancelled, then returns `Ok`.
    fn well_behaved(
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let cancel = cancel.clone();
        async move {
            cancel.cancelled().await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failing_task_stops_the_others_and_is_the_error_naming_it() {
        let cancel = CancellationToken::new();
        let mut tasks = Supervisor::new(cancel.clone());
        tasks.spawn("ingest edge", well_behaved(&cancel));
        tasks.spawn("saga", async {
            Err(anyhow!("the broker refused the batch"))
        });
        let error = tasks.wait().await.expect_err("a failure");
        assert!(cancel.is_cancelled(), "the others are told to stop");
        assert_eq!(
            format!("{error:#}"),
            "saga failed: the broker refused the batch"
        );
        tasks
            .drain(Duration::from_secs(5))
            .await
            .expect("the others drain");
    }

    #[tokio::test]
    async fn a_panicking_task_is_the_error_naming_it_with_its_message() {
        let cancel = CancellationToken::new();
        let mut tasks = Supervisor::new(cancel.clone());
        tasks.spawn("query API", well_behaved(&cancel));
        tasks.spawn("inventory projection", async {
            let values: Vec<i32> = Vec::new();
            if values.is_empty() {
                panic!("index out of bounds in the fold");
            }
            Ok(())
        });
        let error = tasks.wait().await.expect_err("a panic");
        assert!(cancel.is_cancelled());
        assert_eq!(
            error.to_string(),
            "inventory projection panicked: index out of bounds in the fold"
        );
    }

    #[tokio::test]
    async fn a_task_that_stops_unasked_is_an_error_too() {
        let cancel = CancellationToken::new();
        let mut tasks = Supervisor::new(cancel.clone());
        tasks.spawn("metrics listener", well_behaved(&cancel));
        tasks.spawn("payments", async { Ok(()) });
        let error = tasks.wait().await.expect_err("stopped on its own");
        assert_eq!(error.to_string(), "payments stopped on its own");
        assert!(cancel.is_cancelled());
    }

    #[tokio::test]
    async fn a_cancelled_root_is_a_clean_stop_and_a_clean_drain() {
        let cancel = CancellationToken::new();
        let mut tasks = Supervisor::new(cancel.clone());
        tasks.spawn("ingest edge", well_behaved(&cancel));
        tasks.spawn("saga", well_behaved(&cancel));
        cancel.cancel();
        tasks.wait().await.expect("a signal is a clean stop");
        tasks
            .drain(Duration::from_secs(5))
            .await
            .expect("clean drain");
    }

    #[tokio::test]
    async fn a_drain_past_its_deadline_is_an_error_naming_what_hung() {
        let cancel = CancellationToken::new();
        let mut tasks = Supervisor::new(cancel.clone());
        tasks.spawn("ingest edge", well_behaved(&cancel));
        tasks.spawn("orders projection", std::future::pending());
        let error = tasks
            .drain(Duration::from_millis(200))
            .await
            .expect_err("the projection never returns");
        assert_eq!(
            error.to_string(),
            "orders projection did not stop within the drain deadline of 200ms"
        );
    }

    #[tokio::test]
    async fn a_failure_while_draining_is_the_error() {
        let cancel = CancellationToken::new();
        let mut tasks = Supervisor::new(cancel.clone());
        let on_cancel = cancel.clone();
        tasks.spawn("inventory", async move {
            on_cancel.cancelled().await;
            Err(anyhow!("the last commit failed"))
        });
        let error = tasks
            .drain(Duration::from_secs(5))
            .await
            .expect_err("failed");
        assert_eq!(
            format!("{error:#}"),
            "inventory failed: the last commit failed"
        );
    }
}
