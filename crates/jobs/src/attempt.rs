//! One task's attempts, with fencing ids: the rule that makes results land
//! exactly once.
//!
//! Every start of a task gets a new, larger fence. A result is committed
//! only if it carries the task's current fence and the task is running:
//! a late result from an executor that was declared down and came back
//! (its attempt was re-queued under a new fence) is refused, and so is a
//! second result of the same attempt.

/// Where a task is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TaskState {
    /// Waiting for a node.
    Queued,
    /// Running on `node` under `fence`.
    Running {
        /// The executor.
        node: String,
        /// This attempt's fence.
        fence: u64,
    },
    /// Succeeded; its outputs were committed under `fence`.
    Done {
        /// The attempt that committed.
        fence: u64,
    },
    /// Failed more often than its retries allow; the last exit status.
    Failed {
        /// The attempt that failed last.
        fence: u64,
        /// Its exit status.
        status: i32,
    },
    /// Cancelled by the submitter.
    Cancelled,
}

/// How an attempt ended, as its executor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0: commit its outputs.
    Success,
    /// A non-zero exit status (its own failure: spends a retry).
    Failure(i32),
    /// Evicted by the executor's owner (no retry spent).
    Evicted,
}

/// What to do with a reported result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Commit the outputs (once: the task is now done).
    Commit,
    /// Keep the record (stdout, status) but nothing to commit; the task was
    /// re-queued or has failed for good.
    Record,
    /// A stale or repeated result: refuse it, commit nothing.
    Stale,
}

/// One task's record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Task {
    /// Where it is.
    pub state: TaskState,
    /// Failures so far (its own, not lost nodes or evictions).
    pub failures: u32,
    /// Attempts started so far.
    pub attempts: u32,
}

impl Default for Task {
    fn default() -> Self {
        Self {
            state: TaskState::Queued,
            failures: 0,
            attempts: 0,
        }
    }
}

impl Task {
    /// Starts an attempt on `node` under `fence` (which the caller draws
    /// from a counter that only grows). Only a queued task starts.
    pub fn start(&mut self, node: &str, fence: u64) -> bool {
        if self.state != TaskState::Queued {
            return false;
        }
        self.state = TaskState::Running {
            node: node.to_owned(),
            fence,
        };
        self.attempts += 1;
        true
    }

    /// An executor reports how the attempt under `fence` ended.
    pub fn report(&mut self, fence: u64, outcome: Outcome, retries: u32) -> Verdict {
        match &self.state {
            TaskState::Running { fence: f, .. } if *f == fence => {}
            _ => return Verdict::Stale,
        }
        match outcome {
            Outcome::Success => {
                self.state = TaskState::Done { fence };
                Verdict::Commit
            }
            Outcome::Evicted => {
                self.state = TaskState::Queued;
                Verdict::Record
            }
            Outcome::Failure(status) => {
                self.failures += 1;
                self.state = if self.failures > retries {
                    TaskState::Failed { fence, status }
                } else {
                    TaskState::Queued
                };
                Verdict::Record
            }
        }
    }

    /// `node` was declared down (or left): an attempt running there is
    /// lost and the task goes back to the queue (no retry spent). Its
    /// fence dies with it.
    pub fn node_lost(&mut self, node: &str) -> bool {
        match &self.state {
            TaskState::Running { node: n, .. } if n == node => {
                self.state = TaskState::Queued;
                true
            }
            _ => false,
        }
    }

    /// The submitter cancels; a finished task stays as it is.
    pub fn cancel(&mut self) {
        if matches!(self.state, TaskState::Queued | TaskState::Running { .. }) {
            self.state = TaskState::Cancelled;
        }
    }

    /// `shoal retry --failed`: a failed task is queued again with a fresh
    /// retry budget.
    pub fn retry(&mut self) -> bool {
        if matches!(self.state, TaskState::Failed { .. }) {
            self.state = TaskState::Queued;
            self.failures = 0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_late_result_from_a_lost_node_is_refused() {
        let mut t = Task::default();
        assert!(t.start("h1", 1));
        assert!(t.node_lost("h1"));
        assert!(t.start("h2", 2));
        // h1 comes back and reports: refused.
        assert_eq!(t.report(1, Outcome::Success, 2), Verdict::Stale);
        assert_eq!(t.report(2, Outcome::Success, 2), Verdict::Commit);
        assert_eq!(t.report(2, Outcome::Success, 2), Verdict::Stale, "once");
        assert_eq!(t.state, TaskState::Done { fence: 2 });
    }

    #[test]
    fn failures_spend_retries_evictions_and_lost_nodes_do_not() {
        let mut t = Task::default();
        let mut fence = 0;
        let mut next = || {
            fence += 1;
            fence
        };
        let f = next();
        t.start("a", f);
        assert_eq!(t.report(f, Outcome::Evicted, 1), Verdict::Record);
        let f = next();
        t.start("b", f);
        t.node_lost("b");
        let f = next();
        t.start("c", f);
        assert_eq!(t.report(f, Outcome::Failure(3), 1), Verdict::Record);
        assert_eq!(t.state, TaskState::Queued);
        let f = next();
        t.start("d", f);
        t.report(f, Outcome::Failure(4), 1);
        assert_eq!(
            t.state,
            TaskState::Failed {
                fence: f,
                status: 4
            }
        );
        assert_eq!((t.failures, t.attempts), (2, 4));
        assert!(t.retry());
        assert_eq!(t.failures, 0);
        t.cancel();
        assert_eq!(t.state, TaskState::Cancelled);
        assert!(!t.start("e", next()));
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Start(u8),
        Report(u8, u8),
        Lost(u8),
    }

    proptest! {
        /// Whatever order starts, losses and (possibly late, possibly
        /// repeated) reports come in: at most one commit per task, and only
        /// for the attempt that was running when it reported.
        #[test]
        fn at_most_one_commit(events in proptest::collection::vec(
            prop_oneof![
                (0u8..3).prop_map(Ev::Start),
                (0u8..8, 0u8..3).prop_map(|(f, o)| Ev::Report(f, o)),
                (0u8..3).prop_map(Ev::Lost),
            ], 1..60)
        ) {
            let mut t = Task::default();
            let mut fence = 0u64;
            let mut commits = 0;
            for e in events {
                match e {
                    Ev::Start(n) => {
                        fence += 1;
                        t.start(&format!("n{n}"), fence);
                    }
                    Ev::Report(f, o) => {
                        let running = match &t.state { TaskState::Running { fence: cur, .. } => Some(*cur), _ => None };
                        let outcome = [Outcome::Success, Outcome::Failure(1), Outcome::Evicted][usize::from(o)];
                        let v = t.report(u64::from(f), outcome, 2);
                        if v == Verdict::Commit {
                            commits += 1;
                            prop_assert_eq!(running, Some(u64::from(f)));
                        }
                        if running != Some(u64::from(f)) {
                            prop_assert_eq!(v, Verdict::Stale);
                        }
                    }
                    Ev::Lost(n) => { t.node_lost(&format!("n{n}")); }
                }
                prop_assert!(commits <= 1);
            }
        }
    }
}
