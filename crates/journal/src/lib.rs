//! The batch journal: every job and task this node submitted, in one redb
//! file (`DATA_DIR/jobs.redb`). A job is written, in one transaction with
//! all its tasks, before `shoal submit` returns; every change of a task
//! (started under a fence, reported, re-queued) is one transaction. On
//! open, attempts that were running when the agent stopped are re-queued:
//! their executors killed them when the link to this agent broke, and
//! their fences are dead, so a late result cannot commit.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shoal_jobs::attempt::{Task, TaskState};
use shoal_jobs::JobSpec;

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const TASKS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("tasks");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The record format; a journal of another version is refused.
const VERSION: u64 = 1;

mod group;

/// Why the journal could not be used. Nothing was changed by the failed
/// call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// The file is not a journal, or is damaged: kept as it is, for a person.
    #[error("journal {path} is corrupt ({detail}); it was left as it is")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The database refused (disk full, permissions).
    #[error("journal {path}: {detail}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// The error.
        detail: String,
    },
    /// No such job.
    #[error("no job {0}")]
    NoJob(u64),
    /// No such task.
    #[error("no task {0}.{1}")]
    NoTask(u64, u32),
}

/// One job as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id (`shoal submit` prints it).
    pub id: u64,
    /// What was submitted.
    pub spec: JobSpec,
    /// The jobs it waits for, by id.
    pub after: Vec<u64>,
    /// Where it was submitted from (inputs and outputs are relative to it).
    pub dir: PathBuf,
    /// The submitting user.
    pub uid: u32,
    /// The environment its tasks get.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// When, Unix ms.
    pub submitted_ms: u64,
    /// `shoal cancel` was given.
    pub cancelled: bool,
}

/// One task as journaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TaskRecord {
    /// Its attempts (state, fence, failures).
    pub task: Task,
    /// Where it ran last.
    pub node: Option<String>,
    /// The last exit status.
    pub status: Option<i32>,
    /// Why the last attempt did not succeed, if it said.
    pub error: Option<String>,
    /// CPU seconds of the attempt that committed.
    pub cpu_s: Option<f64>,
}

/// A job to add.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// What to run.
    pub spec: JobSpec,
    /// Dependencies on journaled jobs, by id.
    pub after: Vec<u64>,
    /// Dependencies on jobs of the same submission, by position.
    pub after_new: Vec<usize>,
    /// Submit directory.
    pub dir: PathBuf,
    /// Submitting user.
    pub uid: u32,
    /// Environment.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Unix ms.
    pub submitted_ms: u64,
}

/// The journal.
#[derive(Debug)]
pub struct Journal {
    db: Arc<Database>,
    path: PathBuf,
    /// Where [`Journal::update_grouped`] changes are written.
    group: group::Group,
}

/// What opening found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Jobs in the journal.
    pub jobs: usize,
    /// Attempts that were running: they stay `Running` for the batch
    /// runner to adopt from their executors (or re-queue when lost).
    pub running: usize,
}

/// The tasks table of `w` with the fence counter: `f` draws fences from
/// it (each used or not), and the counter is stored back after.
fn with_fences(
    w: &redb::WriteTransaction,
    st: &dyn Fn(&dyn std::fmt::Display) -> JournalError,
    f: impl FnOnce(
        &mut redb::Table<'_, (u64, u32), &'static [u8]>,
        &mut u64,
    ) -> Result<(), JournalError>,
) -> Result<(), JournalError> {
    let mut meta = w.open_table(META).map_err(|e| st(&e))?;
    let mut fence = meta
        .get("next_fence")
        .map_err(|e| st(&e))?
        .map_or(1, |v| v.value());
    let mut tasks = w.open_table(TASKS).map_err(|e| st(&e))?;
    f(&mut tasks, &mut fence)?;
    meta.insert("next_fence", fence).map_err(|e| st(&e))?;
    Ok(())
}

impl Journal {
    fn storage(&self) -> impl Fn(&dyn std::fmt::Display) -> JournalError + '_ {
        |e| JournalError::Storage {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    fn corrupt(&self, detail: String) -> JournalError {
        JournalError::Corrupt {
            path: self.path.clone(),
            detail,
        }
    }

    /// Opens (or creates) the journal at `path` and checks every record.
    ///
    /// # Errors
    /// A file that is not a journal of this version, a record that does
    /// not decode, or a storage failure.
    pub fn open(path: &Path) -> Result<(Self, Recovered), JournalError> {
        let db = Database::create(path).map_err(|e| JournalError::Corrupt {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        let db = Arc::new(db);
        let group = group::Group::start(db.clone(), path.to_owned()).map_err(|e| {
            JournalError::Storage {
                path: path.to_owned(),
                detail: format!("starting its thread: {e}"),
            }
        })?;
        let j = Self {
            db,
            path: path.to_owned(),
            group,
        };
        let st = j.storage();
        let w = j.db.begin_write().map_err(|e| st(&e))?;
        let mut rec = Recovered::default();
        {
            let mut meta = w.open_table(META).map_err(|e| st(&e))?;
            let version = meta.get("version").map_err(|e| st(&e))?.map(|v| v.value());
            match version {
                None => {
                    meta.insert("version", VERSION).map_err(|e| st(&e))?;
                }
                Some(VERSION) => {}
                Some(v) => {
                    return Err(j.corrupt(format!("format version {v}, this agent reads {VERSION}")))
                }
            }
            let jobs = w.open_table(JOBS).map_err(|e| st(&e))?;
            for r in jobs.iter().map_err(|e| st(&e))? {
                let (k, v) = r.map_err(|e| st(&e))?;
                postcard::from_bytes::<JobRecord>(v.value())
                    .map_err(|e| j.corrupt(format!("job {}: {e}", k.value())))?;
                rec.jobs += 1;
            }
            let tasks = w.open_table(TASKS).map_err(|e| st(&e))?;
            for r in tasks.iter().map_err(|e| st(&e))? {
                let (k, v) = r.map_err(|e| st(&e))?;
                let (job, idx) = k.value();
                let t: TaskRecord = postcard::from_bytes(v.value())
                    .map_err(|e| j.corrupt(format!("task {job}.{idx}: {e}")))?;
                if matches!(t.task.state, TaskState::Running { .. }) {
                    rec.running += 1;
                }
            }
        }
        w.commit().map_err(|e| st(&e))?;
        drop(st);
        Ok((j, rec))
    }

    /// Adds jobs and all their tasks (queued) in one transaction, durable
    /// before it returns; the records written (with their ids), in order.
    ///
    /// # Errors
    /// A storage failure (nothing was added).
    pub fn submit(&self, new: Vec<NewJob>) -> Result<Vec<JobRecord>, JournalError> {
        let st = self.storage();
        let w = self.db.begin_write().map_err(|e| st(&e))?;
        let mut written = Vec::with_capacity(new.len());
        {
            let mut meta = w.open_table(META).map_err(|e| st(&e))?;
            let mut jobs = w.open_table(JOBS).map_err(|e| st(&e))?;
            let mut tasks = w.open_table(TASKS).map_err(|e| st(&e))?;
            let mut next = meta
                .get("next_job")
                .map_err(|e| st(&e))?
                .map_or(1, |v| v.value());
            let empty = postcard::to_stdvec(&TaskRecord::default()).map_err(|e| st(&e))?;
            let first = next;
            for n in new {
                let id = next;
                next += 1;
                let count = n.spec.count;
                let mut after = n.after;
                after.extend(n.after_new.iter().map(|k| first + *k as u64));
                let r = JobRecord {
                    id,
                    spec: n.spec,
                    after,
                    dir: n.dir,
                    uid: n.uid,
                    env: n.env,
                    submitted_ms: n.submitted_ms,
                    cancelled: false,
                };
                let b = postcard::to_stdvec(&r).map_err(|e| st(&e))?;
                jobs.insert(id, b.as_slice()).map_err(|e| st(&e))?;
                for i in 0..count {
                    tasks
                        .insert((id, i), empty.as_slice())
                        .map_err(|e| st(&e))?;
                }
                written.push(r);
            }
            meta.insert("next_job", next).map_err(|e| st(&e))?;
        }
        w.commit().map_err(|e| st(&e))?;
        Ok(written)
    }

    /// Every job, by id.
    ///
    /// # Errors
    /// A storage failure or a record that does not decode.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, JournalError> {
        let st = self.storage();
        let r = self.db.begin_read().map_err(|e| st(&e))?;
        let t = r.open_table(JOBS).map_err(|e| st(&e))?;
        let mut out = Vec::new();
        for e in t.iter().map_err(|e| st(&e))? {
            let (k, v) = e.map_err(|e| st(&e))?;
            out.push(
                postcard::from_bytes(v.value())
                    .map_err(|e| self.corrupt(format!("job {}: {e}", k.value())))?,
            );
        }
        Ok(out)
    }

    /// One job's tasks, by index.
    ///
    /// # Errors
    /// A storage failure or a record that does not decode.
    pub fn tasks(&self, job: u64) -> Result<Vec<(u32, TaskRecord)>, JournalError> {
        let st = self.storage();
        let r = self.db.begin_read().map_err(|e| st(&e))?;
        let t = r.open_table(TASKS).map_err(|e| st(&e))?;
        let mut out = Vec::new();
        for e in t.range((job, 0)..=(job, u32::MAX)).map_err(|e| st(&e))? {
            let (k, v) = e.map_err(|e| st(&e))?;
            let (_, i) = k.value();
            out.push((
                i,
                postcard::from_bytes(v.value())
                    .map_err(|e| self.corrupt(format!("task {job}.{i}: {e}")))?,
            ));
        }
        Ok(out)
    }

    /// Changes one task in a transaction: `f` gets the record and a fresh
    /// fence (drawn from a counter that only grows, used or not). With
    /// `durable` false the commit is not flushed: a crash may undo it.
    ///
    /// # Errors
    /// No such task, a storage failure or a record that does not decode.
    pub fn update<R>(
        &self,
        job: u64,
        idx: u32,
        durable: bool,
        f: impl FnOnce(&mut TaskRecord, u64) -> R,
    ) -> Result<R, JournalError> {
        let mut f = Some(f);
        let mut out = self.update_many(&[(job, idx)], durable, |_, rec, fence| {
            f.take().map(|f| f(rec, fence))
        })?;
        // One key: one call.
        out.pop().flatten().ok_or(JournalError::NoTask(job, idx))
    }

    /// As [`Journal::update`], durable, on the journal's own thread: the
    /// change shares its transaction and sync with whatever other changes
    /// wait when it begins (group commit). Queued at once, in call order;
    /// the future resolves once the change is durable, and no caller's
    /// thread waits on the disk meanwhile.
    ///
    /// # Errors
    /// No such task, or a storage failure (the change was not written).
    pub fn update_grouped<R: Send + 'static>(
        &self,
        job: u64,
        idx: u32,
        f: impl FnOnce(&mut TaskRecord, u64) -> R + Send + 'static,
    ) -> impl Future<Output = Result<R, JournalError>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let apply: group::Apply = Box::new(move |found| -> group::Done {
            match found {
                None => Box::new(move |_| {
                    let _ = tx.send(Err(JournalError::NoTask(job, idx)));
                }),
                Some((rec, fence)) => {
                    let out = f(rec, fence);
                    Box::new(move |r| {
                        let _ = tx.send(r.map(|()| out));
                    })
                }
            }
        });
        let queued = self.group.send((job, idx), apply);
        let path = self.path.clone();
        async move {
            let not_written = |why: &str| JournalError::Storage {
                path,
                detail: why.to_owned(),
            };
            if !queued {
                return Err(not_written("its writer thread has stopped"));
            }
            rx.await
                .unwrap_or_else(|_| Err(not_written("not written: its transaction failed")))
        }
    }

    /// As [`Journal::update`] for several tasks in one transaction (one
    /// sync for all): `f(i, record, fence)` for the `i`-th key, each with a
    /// fence of its own. A key with no task fails the whole transaction.
    ///
    /// # Errors
    /// No such task or a storage failure (nothing was changed).
    pub fn update_many<R>(
        &self,
        keys: &[(u64, u32)],
        durable: bool,
        mut f: impl FnMut(usize, &mut TaskRecord, u64) -> R,
    ) -> Result<Vec<R>, JournalError> {
        let st = self.storage();
        let mut w = self.db.begin_write().map_err(|e| st(&e))?;
        if !durable {
            w.set_durability(Durability::None).map_err(|e| st(&e))?;
        }
        let mut out = Vec::with_capacity(keys.len());
        with_fences(&w, &st, |tasks, fence| {
            for (i, &(job, idx)) in keys.iter().enumerate() {
                let mut rec: TaskRecord = {
                    let v = tasks
                        .get((job, idx))
                        .map_err(|e| st(&e))?
                        .ok_or(JournalError::NoTask(job, idx))?;
                    postcard::from_bytes(v.value())
                        .map_err(|e| self.corrupt(format!("task {job}.{idx}: {e}")))?
                };
                out.push(f(i, &mut rec, *fence));
                *fence += 1;
                let b = postcard::to_stdvec(&rec).map_err(|e| st(&e))?;
                tasks.insert((job, idx), b.as_slice()).map_err(|e| st(&e))?;
            }
            Ok(())
        })?;
        w.commit().map_err(|e| st(&e))?;
        Ok(out)
    }

    /// Marks a job cancelled and cancels its unfinished tasks.
    ///
    /// # Errors
    /// No such job or a storage failure.
    pub fn cancel(&self, job: u64) -> Result<(), JournalError> {
        self.each_task(job, |t| t.task.cancel(), |j| j.cancelled = true)
    }

    /// Queues a job's failed tasks again with fresh retries; how many.
    ///
    /// # Errors
    /// No such job or a storage failure.
    pub fn retry_failed(&self, job: u64) -> Result<usize, JournalError> {
        let mut n = 0;
        self.each_task(
            job,
            |t| {
                if t.task.retry() {
                    n += 1;
                }
            },
            |_| {},
        )?;
        Ok(n)
    }

    fn each_task(
        &self,
        job: u64,
        mut f: impl FnMut(&mut TaskRecord),
        g: impl FnOnce(&mut JobRecord),
    ) -> Result<(), JournalError> {
        let st = self.storage();
        let w = self.db.begin_write().map_err(|e| st(&e))?;
        {
            let mut jobs = w.open_table(JOBS).map_err(|e| st(&e))?;
            let mut jr: JobRecord = {
                let v = jobs
                    .get(job)
                    .map_err(|e| st(&e))?
                    .ok_or(JournalError::NoJob(job))?;
                postcard::from_bytes(v.value())
                    .map_err(|e| self.corrupt(format!("job {job}: {e}")))?
            };
            g(&mut jr);
            let b = postcard::to_stdvec(&jr).map_err(|e| st(&e))?;
            jobs.insert(job, b.as_slice()).map_err(|e| st(&e))?;
            let mut tasks = w.open_table(TASKS).map_err(|e| st(&e))?;
            let mut all = Vec::new();
            for e in tasks
                .range((job, 0)..=(job, u32::MAX))
                .map_err(|e| st(&e))?
            {
                let (k, v) = e.map_err(|e| st(&e))?;
                let (_, i) = k.value();
                let t: TaskRecord = postcard::from_bytes(v.value())
                    .map_err(|e| self.corrupt(format!("task {job}.{i}: {e}")))?;
                all.push((i, t));
            }
            for (i, mut t) in all {
                f(&mut t);
                let b = postcard::to_stdvec(&t).map_err(|e| st(&e))?;
                tasks.insert((job, i), b.as_slice()).map_err(|e| st(&e))?;
            }
        }
        w.commit().map_err(|e| st(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_jobs::attempt::{Outcome, Verdict};

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-journal-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn job(name: &str, count: u32) -> NewJob {
        let spec = shoal_jobs::spec::parse(
            &format!("name = \"{name}\"\ncommand = [\"true\"]\ncount = {count}\n"),
            "x",
        )
        .unwrap()
        .remove(0);
        NewJob {
            spec,
            after: vec![],
            after_new: vec![],
            dir: "/tmp".into(),
            uid: 1000,
            env: vec![],
            submitted_ms: 1,
        }
    }

    #[test]
    fn jobs_survive_a_reopen_and_running_attempts_stay_for_adoption() {
        let d = tmp("reopen");
        let p = d.join("jobs.redb");
        let first_fence;
        {
            let (j, rec) = Journal::open(&p).unwrap();
            assert_eq!(rec, Recovered::default());
            let recs = j.submit(vec![job("a", 3), job("b", 2)]).unwrap();
            let ids: Vec<u64> = recs.iter().map(|r| r.id).collect();
            assert_eq!(ids, vec![1, 2]);
            assert_eq!(recs[1].spec.name, "b");
            let f = j.update(1, 0, false, |t, fence| {
                assert!(t.task.start("h1", fence));
                fence
            });
            let f = f.unwrap();
            j.update(1, 1, false, |t, fence| t.task.start("h2", fence))
                .unwrap();
            let v = j
                .update(1, 1, true, |t, _| {
                    let TaskState::Running { fence, .. } = t.task.state else {
                        panic!()
                    };
                    t.task.report(fence, Outcome::Success, 2)
                })
                .unwrap();
            assert_eq!(v, Verdict::Commit);
            assert!(f > 0);
            first_fence = f;
            // The agent dies here, with 1.0 running on h1.
        }
        let (j, rec) = Journal::open(&p).unwrap();
        let f = first_fence;
        assert_eq!(
            rec,
            Recovered {
                jobs: 2,
                running: 1
            }
        );
        let t = j.tasks(1).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[0].1.task.state,
            TaskState::Running {
                node: "h1".into(),
                fence: f
            }
        );
        assert!(matches!(t[1].1.task.state, TaskState::Done { .. }));
        assert_eq!(j.tasks(2).unwrap().len(), 2);
        assert_eq!(j.jobs().unwrap()[1].spec.name, "b");
        // Fences keep growing across lives: a new start never reuses one.
        let g = j.update(1, 0, false, |_, fence| fence).unwrap();
        assert!(g > 2);
        j.cancel(2).unwrap();
        assert!(j.jobs().unwrap()[1].cancelled);
        assert!(j
            .tasks(2)
            .unwrap()
            .iter()
            .all(|(_, t)| t.task.state == TaskState::Cancelled));
        assert!(matches!(j.cancel(9), Err(JournalError::NoJob(9))));
        assert!(matches!(
            j.update(1, 7, true, |_, _| ()),
            Err(JournalError::NoTask(1, 7))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn many_starts_in_one_transaction_each_get_their_own_fence() {
        let d = tmp("many");
        let p = d.join("jobs.redb");
        let (j, _) = Journal::open(&p).unwrap();
        j.submit(vec![job("a", 3)]).unwrap();
        let before = j.update(1, 0, false, |_, f| f).unwrap();
        let fences = j
            .update_many(&[(1, 1), (1, 2)], true, |i, t, f| {
                assert!(t.task.start(&format!("h{i}"), f));
                f
            })
            .unwrap();
        assert_eq!(fences, vec![before + 1, before + 2]);
        assert!(matches!(
            j.update_many(&[(1, 0), (1, 9)], true, |_, t, f| t.task.start("x", f)),
            Err(JournalError::NoTask(1, 9))
        ));
        // Nothing of the failed transaction stays.
        assert_eq!(j.tasks(1).unwrap()[0].1.task.state, TaskState::Queued);
        drop(j);
        let (j, rec) = Journal::open(&p).unwrap();
        assert_eq!(rec.running, 2);
        assert!(j.update(1, 0, false, |_, f| f).unwrap() > before + 2);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupt_journal_is_reported_and_kept() {
        let d = tmp("corrupt");
        let p = d.join("jobs.redb");
        std::fs::write(&p, vec![0x5a; 8192]).unwrap();
        let e = Journal::open(&p).unwrap_err();
        assert!(matches!(e, JournalError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("jobs.redb"), "{e}");
        assert_eq!(
            std::fs::read(&p).unwrap(),
            vec![0x5a; 8192],
            "left as it is"
        );
        // A damaged record inside a sound file is found at open too.
        let p2 = d.join("rec.redb");
        {
            let (j, _) = Journal::open(&p2).unwrap();
            j.submit(vec![job("a", 1)]).unwrap();
            let w = j.db.begin_write().unwrap();
            {
                let mut t = w.open_table(TASKS).unwrap();
                t.insert((1, 0), [0xffu8, 0xff, 0xff].as_slice()).unwrap();
            }
            w.commit().unwrap();
        }
        let e = Journal::open(&p2).unwrap_err();
        assert!(e.to_string().contains("task 1.0"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn grouped_changes_share_transactions_keep_their_order_and_survive_a_reopen() {
        let d = tmp("group");
        let p = d.join("jobs.redb");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let n = 200u32;
        let fences: Vec<u64> = {
            let (j, _) = Journal::open(&p).unwrap();
            j.submit(vec![job("a", n)]).unwrap();
            // All queued before any is awaited: the thread takes what waits.
            let starts: Vec<_> = (0..n)
                .map(|i| {
                    j.update_grouped(1, i, move |t, fence| {
                        assert!(t.task.start("h1", fence));
                        fence
                    })
                })
                .collect();
            // The same task twice in a row: the second sees the first.
            let again = j.update_grouped(1, 0, |t, _| t.task.start("h2", 99));
            let missing = j.update_grouped(1, n, |_, fence| fence);
            let fences: Vec<u64> = rt.block_on(async {
                let mut v = Vec::new();
                for s in starts {
                    v.push(s.await.unwrap());
                }
                v
            });
            assert!(!rt.block_on(again).unwrap(), "task 1.0 was running already");
            let e = rt.block_on(missing).unwrap_err();
            assert!(matches!(e, JournalError::NoTask(1, 200)), "{e}");
            let tx = j.group.transactions();
            assert!(tx < u64::from(n) / 4, "{tx} transactions for {n} changes");
            fences
        };
        let mut sorted = fences.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), n as usize, "a fence each");
        // Durable: a fresh open finds every start, under its fence.
        let (j, rec) = Journal::open(&p).unwrap();
        assert_eq!(rec.running, n as usize);
        for (i, t) in j.tasks(1).unwrap() {
            assert_eq!(
                t.task.state,
                TaskState::Running {
                    node: "h1".into(),
                    fence: fences[i as usize]
                }
            );
        }
        drop(j);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
