//! Group commit: task changes from any number of callers, applied on the
//! journal's own thread, as many to a transaction as are waiting when it
//! begins, with one sync for them all. A caller's future resolves once its
//! change is durable (or its transaction failed); nobody's thread waits on
//! the disk but the journal's.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use redb::{Database, ReadableTable};

use crate::{with_fences, JournalError, TaskRecord};

/// What a caller is told once its change's transaction ended.
pub(crate) type Done = Box<dyn FnOnce(Result<(), JournalError>) + Send>;

/// One caller's change: run inside the transaction with its task's record
/// and a fresh fence (`None`: no such task); returns what to tell the
/// caller once the transaction ended.
pub(crate) type Apply = Box<dyn for<'a> FnOnce(Option<(&'a mut TaskRecord, u64)>) -> Done + Send>;

/// The most changes in one transaction (a bound on the caller's wait).
const MAX_GROUP: usize = 1024;

/// The journal's thread, and the way to it.
pub(crate) struct Group {
    tx: Option<mpsc::Sender<((u64, u32), Apply)>>,
    /// Transactions committed or tried (for tests of the grouping).
    transactions: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Group")
    }
}

impl Group {
    /// Starts the thread that writes `db` (at `path`, for errors).
    pub(crate) fn start(db: Arc<Database>, path: PathBuf) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<((u64, u32), Apply)>();
        let transactions = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = transactions.clone();
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(c) => group.push(c),
                            Err(_) => break,
                        }
                    }
                    commit(&db, &path, group);
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            transactions,
            thread: Some(thread),
        })
    }

    /// How many transactions the thread has made (read by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn transactions(&self) -> u64 {
        self.transactions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues a change; `false` when the thread is gone.
    pub(crate) fn send(&self, key: (u64, u32), apply: Apply) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.send((key, apply)).is_ok())
    }
}

impl Drop for Group {
    /// Lets the thread finish what was queued, and waits for it (the
    /// database is closed when this returns).
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One transaction for `group`. Every caller whose change was applied is
/// told how the commit went; a change not reached (the transaction failed
/// before it) is dropped unapplied, which its caller sees as not written.
fn commit(db: &Database, path: &std::path::Path, group: Vec<((u64, u32), Apply)>) {
    let st = |e: &dyn std::fmt::Display| JournalError::Storage {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let mut dones: Vec<Done> = Vec::with_capacity(group.len());
    let r = (|| -> Result<(), JournalError> {
        let w = db.begin_write().map_err(|e| st(&e))?;
        with_fences(&w, &st, |tasks, fence| {
            for ((job, idx), apply) in group {
                let found: Option<TaskRecord> = match tasks.get((job, idx)).map_err(|e| st(&e))? {
                    None => None,
                    Some(v) => Some(postcard::from_bytes(v.value()).map_err(|e| {
                        JournalError::Corrupt {
                            path: path.to_owned(),
                            detail: format!("task {job}.{idx}: {e}"),
                        }
                    })?),
                };
                let Some(mut rec) = found else {
                    dones.push(apply(None));
                    continue;
                };
                dones.push(apply(Some((&mut rec, *fence))));
                *fence += 1;
                let b = postcard::to_stdvec(&rec).map_err(|e| st(&e))?;
                tasks.insert((job, idx), b.as_slice()).map_err(|e| st(&e))?;
            }
            Ok(())
        })?;
        w.commit().map_err(|e| st(&e))
    })();
    for d in dones {
        d(r.clone());
    }
}
