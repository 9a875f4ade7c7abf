//! Batch jobs on the submitting node: the journal, the runner that places
//! queued tasks on executors, and the answers to `shoal jobs`/`status`.
//!
//! ```text
//!  shoal submit ─▶ check (names, DAG, memory) ─▶ Journal::submit (durable) ─▶ job ids
//!  runner, on every wake or 250 ms:
//!     runnable tasks (dependencies done), fair across users then jobs
//!       ─▶ place (free slots × CPU score, minus what is in flight, avoiding
//!          nodes that failed or refused the task)
//!       ─▶ Journal: start under a new fence ─▶ attempt over Noise to the executor
//!  attempt: Start ─▶ Need/Blob ─▶ stdout/stderr into OUTPUT/.shoal-I-FENCE/
//!       ─▶ Changes into .../files ─▶ Exit ─▶ Journal: report(fence) ─▶ Commit:
//!          status.json, then rename to OUTPUT/I (atomic, once) | re-queue | failed
//! ```
//!
//! The executor takes a task only if a guest slot is free now (late
//! binding); a refusal or eviction re-queues it without spending a retry.
//! An executor declared down by membership loses its attempt (re-queued,
//! its fence dead: a late result cannot commit).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shoal_control::{
    JobInfo, JobsReport, NodesReport, Request, Response, StatusReport, TaskStatus,
};
use shoal_executor::creds;
use shoal_jobs::attempt::{Outcome, TaskState, Verdict};
use shoal_jobs::JobSpec;
use shoal_journal::{JobRecord, Journal, NewJob, TaskRecord};
use shoal_task::hashcache::HashCache;
use shoal_task::image::Image;
use shoal_task::link::{self, FrameSink, FrameSource};
use shoal_task::proto::{Commit, FromExec, Hash, ImageRef, Resources, Status, TaskSpec, ToExec};
use shoal_task::tree::{self, Manifest};
use shoal_transport::ClusterKey;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};

use crate::peer::{LinkPool, LinkRx, LinkTx};
use crate::runtime::{ask_main, ControlMsg};

/// How often the runner looks at the queue without being woken.
const TICK: Duration = Duration::from_millis(250);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A task's place in the runner's memory (the journal is the truth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mem {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

fn mem_of(s: &TaskState) -> Mem {
    match s {
        TaskState::Queued => Mem::Queued,
        TaskState::Running { .. } => Mem::Running,
        TaskState::Done { .. } => Mem::Done,
        TaskState::Failed { .. } => Mem::Failed,
        TaskState::Cancelled => Mem::Cancelled,
    }
}

#[derive(Debug)]
struct JobMem {
    rec: Arc<JobRecord>,
    tasks: Vec<Mem>,
    /// Nodes a task should not go back to (it failed or was refused there).
    avoid: HashMap<u32, Vec<String>>,
    /// The queued tasks, in index order (placement reads only these).
    queued: std::collections::BTreeSet<u32>,
    /// Tasks per state, in `Mem` order.
    counts: [u32; 5],
}

fn slot(m: Mem) -> usize {
    match m {
        Mem::Queued => 0,
        Mem::Running => 1,
        Mem::Done => 2,
        Mem::Failed => 3,
        Mem::Cancelled => 4,
    }
}

impl JobMem {
    fn new(rec: Arc<JobRecord>, tasks: Vec<Mem>) -> Self {
        let mut counts = [0u32; 5];
        let mut queued = std::collections::BTreeSet::new();
        for (i, t) in tasks.iter().enumerate() {
            counts[slot(*t)] += 1;
            if *t == Mem::Queued {
                queued.insert(i as u32);
            }
        }
        Self {
            rec,
            tasks,
            avoid: HashMap::new(),
            queued,
            counts,
        }
    }
    /// Moves task `i` to `m`, keeping the index and counts.
    fn set(&mut self, i: u32, m: Mem) {
        let Some(t) = self.tasks.get_mut(i as usize) else {
            return;
        };
        self.counts[slot(*t)] -= 1;
        self.counts[slot(m)] += 1;
        *t = m;
        if m == Mem::Queued {
            self.queued.insert(i);
        } else {
            self.queued.remove(&i);
        }
    }
    fn count(&self, m: Mem) -> u32 {
        self.counts[slot(m)]
    }
    fn finished(&self) -> bool {
        self.count(Mem::Done) as usize == self.tasks.len()
    }
}

#[derive(Debug, Default)]
struct State {
    jobs: BTreeMap<u64, JobMem>,
    /// Attempts in flight per node.
    inflight: HashMap<String, u32>,
    /// Each job's inputs and image, scanned at its first start.
    manifests: HashMap<u64, Arc<Inputs>>,
    /// Attempts that were running when this agent stopped, to adopt.
    adopt: Vec<Adopt>,
    /// Nodes that refused a task for want of a free slot: not asked again
    /// before this (their gossiped slots lag).
    full_until: HashMap<String, std::time::Instant>,
}

/// The batch side of one agent.
#[derive(Debug)]
pub struct Batch {
    journal: Result<Journal, String>,
    state: Mutex<State>,
    /// Links to executors between attempts (see [`Batch::connect`]).
    links: LinkPool,
    wake: Notify,
    key: ClusterKey,
    cluster: String,
}

/// How an attempt ended, from the runner's side.
#[derive(Debug)]
enum End {
    Exit {
        status: Status,
        cpu_s: f64,
        mem_peak_bytes: Option<u64>,
        oom: bool,
    },
    Failed(i32, String),
    Evicted(String),
    Lost(String),
}

impl Batch {
    /// Opens the journal at `path` (a corrupt one is reported and kept; the
    /// agent then runs without batch jobs), finishes interrupted commits.
    pub fn open(path: &Path, key: ClusterKey, cluster: &str) -> Arc<Self> {
        let journal = match Journal::open(path) {
            Ok((j, rec)) => {
                if rec.jobs > 0 {
                    tracing::info!(
                        jobs = rec.jobs,
                        running = rec.running,
                        "batch journal recovered"
                    );
                }
                Ok(j)
            }
            Err(e) => {
                tracing::error!(error = %e, "batch jobs disabled");
                Err(e.to_string())
            }
        };
        let b = Arc::new(Self {
            journal,
            state: Mutex::new(State::default()),
            links: LinkPool::default(),
            wake: Notify::new(),
            key,
            cluster: cluster.to_owned(),
        });
        if let Err(e) = b.load() {
            tracing::error!(error = %e, "batch journal unreadable");
        }
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn journal(&self) -> Result<&Journal, String> {
        self.journal.as_ref().map_err(Clone::clone)
    }

    /// Mirrors the journal in memory and finishes commits a crash cut
    /// between the journal and the rename of the outputs.
    fn load(&self) -> Result<(), String> {
        let j = self.journal()?;
        let mut st = self.lock();
        for rec in j.jobs().map_err(|e| e.to_string())? {
            let tasks = j.tasks(rec.id).map_err(|e| e.to_string())?;
            let out = output_dir(&rec);
            let done: Vec<(u32, u64)> = tasks
                .iter()
                .filter_map(|(i, t)| match t.task.state {
                    TaskState::Done { fence } => Some((*i, fence)),
                    _ => None,
                })
                .collect();
            // Attempts running when the agent stopped: their executors keep
            // them (detached) for this agent to collect.
            let running: Vec<Adopt> = tasks
                .iter()
                .filter_map(|(i, t)| match &t.task.state {
                    TaskState::Running { node, fence } => Some(Adopt {
                        job: rec.id,
                        index: *i,
                        node: node.clone(),
                        fence: *fence,
                    }),
                    _ => None,
                })
                .collect();
            let keep: Vec<String> = running
                .iter()
                .map(|a| format!(".shoal-{}-{}", a.index, a.fence))
                .collect();
            for a in &running {
                *st.inflight.entry(a.node.clone()).or_insert(0) += 1;
            }
            st.adopt.extend(running);
            // As the submitter, in their directory.
            let r = creds::as_user(rec.uid, move || {
                for (i, fence) in done {
                    let fin = out.join(i.to_string());
                    let stage = out.join(format!(".shoal-{i}-{fence}"));
                    if !fin.exists() && stage.exists() {
                        let _ = std::fs::rename(&stage, &fin);
                    }
                }
                // Attempts that will never report.
                if let Ok(rd) = std::fs::read_dir(&out) {
                    for e in rd.flatten() {
                        let n = e.file_name().to_string_lossy().into_owned();
                        if n.starts_with(".shoal-") && !keep.contains(&n) {
                            let _ = std::fs::remove_dir_all(e.path());
                        }
                    }
                }
            });
            if let Err(e) = r {
                tracing::warn!(job = rec.id, error = %e, "outputs not tidied");
            }
            let id = rec.id;
            st.jobs.insert(
                id,
                JobMem::new(
                    Arc::new(rec),
                    tasks.iter().map(|(_, t)| mem_of(&t.task.state)).collect(),
                ),
            );
        }
        Ok(())
    }

    /// `shoal submit`: checks names, dependencies and resources against
    /// `report`, journals the jobs, returns their ids.
    ///
    /// # Errors
    /// What is wrong, naming the job and key; nothing is queued.
    pub fn submit(
        &self,
        specs: Vec<JobSpec>,
        dir: PathBuf,
        env: Vec<(Vec<u8>, Vec<u8>)>,
        uid: u32,
        report: &NodesReport,
    ) -> Result<Vec<u64>, String> {
        let j = self.journal()?;
        if !dir.is_absolute() || !dir.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        if specs.is_empty() {
            return Err("no job to submit".into());
        }
        let largest = report
            .nodes
            .iter()
            .filter(|n| n.state == "alive" && n.checks.as_deref() == Some("ok"))
            .filter_map(|n| n.mem_total_bytes)
            .max()
            .unwrap_or(0);
        // Names: this submission's, then the journal's (newest wins).
        let existing: BTreeMap<String, u64> = {
            let st = self.lock();
            st.jobs
                .values()
                .filter(|m| !m.rec.cancelled)
                .map(|m| (m.rec.spec.name.clone(), m.rec.id))
                .collect()
        };
        let mut graph: BTreeMap<String, Vec<String>> =
            existing.keys().map(|n| (n.clone(), Vec::new())).collect();
        for s in &specs {
            graph.insert(s.name.clone(), s.after.clone());
        }
        shoal_jobs::dag::order(&graph).map_err(|e| e.to_string())?;
        let mut new = Vec::with_capacity(specs.len());
        for s in &specs {
            if let Some(m) = s.memory_bytes {
                if m > largest {
                    return Err(format!(
                        "job {:?}: mem: no node has {} MiB of memory (the largest has {} MiB)",
                        s.name,
                        m >> 20,
                        largest >> 20
                    ));
                }
            }
            let mut after = Vec::new();
            let mut after_new = Vec::new();
            for a in &s.after {
                match specs.iter().position(|x| &x.name == a) {
                    Some(k) => after_new.push(k),
                    None => after.push(existing[a]),
                }
            }
            new.push(NewJob {
                spec: s.clone(),
                after,
                after_new,
                dir: dir.clone(),
                uid,
                env: env.clone(),
                submitted_ms: unix_ms(),
            });
        }
        let recs = j.submit(new).map_err(|e| e.to_string())?;
        let ids = recs.iter().map(|r| r.id).collect();
        let mut st = self.lock();
        for rec in recs {
            let n = rec.spec.count as usize;
            st.jobs
                .insert(rec.id, JobMem::new(Arc::new(rec), vec![Mem::Queued; n]));
        }
        drop(st);
        self.wake.notify_one();
        Ok(ids)
    }

    /// Cancels a job (its running attempts finish but do not commit).
    ///
    /// # Errors
    /// No such job, or the journal failed.
    pub fn cancel(&self, job: u64) -> Result<(), String> {
        self.journal()?.cancel(job).map_err(|e| e.to_string())?;
        let mut st = self.lock();
        if let Some(m) = st.jobs.get_mut(&job) {
            let mut rec = (*m.rec).clone();
            rec.cancelled = true;
            m.rec = Arc::new(rec);
            for i in 0..m.tasks.len() as u32 {
                if matches!(m.tasks[i as usize], Mem::Queued | Mem::Running) {
                    m.set(i, Mem::Cancelled);
                }
            }
        }
        Ok(())
    }

    /// Queues a job's failed tasks again; how many.
    ///
    /// # Errors
    /// No such job, or the journal failed.
    pub fn retry(&self, job: u64) -> Result<usize, String> {
        let n = self
            .journal()?
            .retry_failed(job)
            .map_err(|e| e.to_string())?;
        let mut st = self.lock();
        if let Some(m) = st.jobs.get_mut(&job) {
            for i in 0..m.tasks.len() as u32 {
                if m.tasks[i as usize] == Mem::Failed {
                    m.set(i, Mem::Queued);
                }
            }
            m.avoid.clear();
        }
        // Its inputs may have been fixed since: scan them again.
        st.manifests.remove(&job);
        drop(st);
        self.wake.notify_one();
        Ok(n)
    }

    fn info(m: &JobMem, st: &State) -> JobInfo {
        let waiting = m
            .rec
            .after
            .iter()
            .any(|a| st.jobs.get(a).is_none_or(|d| !d.finished()));
        let (done, running, queued, failed, cancelled) = (
            m.count(Mem::Done),
            m.count(Mem::Running),
            m.count(Mem::Queued),
            m.count(Mem::Failed),
            m.count(Mem::Cancelled),
        );
        let state = if m.rec.cancelled {
            "cancelled"
        } else if done == m.rec.spec.count {
            "done"
        } else if queued + running == 0 {
            "failed"
        } else if running > 0 || done > 0 || failed > 0 {
            "running"
        } else if waiting {
            "waiting"
        } else {
            "queued"
        };
        JobInfo {
            id: m.rec.id,
            name: m.rec.spec.name.clone(),
            state: state.to_owned(),
            tasks: m.rec.spec.count,
            done,
            running,
            queued,
            failed,
            cancelled,
            output: output_dir(&m.rec),
            submitted_ms: m.rec.submitted_ms,
            after: m.rec.after.clone(),
        }
    }

    /// `shoal jobs`.
    ///
    /// # Errors
    /// The journal is unusable.
    pub fn jobs(&self) -> Result<JobsReport, String> {
        self.journal()?;
        let st = self.lock();
        Ok(JobsReport {
            jobs: st.jobs.values().map(|m| Self::info(m, &st)).collect(),
        })
    }

    /// `shoal status JOB`: every task, and for a queued one why it waits.
    ///
    /// # Errors
    /// No such job, or the journal failed.
    pub fn status(&self, job: u64, report: &NodesReport) -> Result<StatusReport, String> {
        let tasks = self.journal()?.tasks(job).map_err(|e| e.to_string())?;
        let st = self.lock();
        let m = st.jobs.get(&job).ok_or_else(|| format!("no job {job}"))?;
        let info = Self::info(m, &st);
        let waits = why_waiting(m, &st, report);
        Ok(StatusReport {
            job: info,
            tasks: tasks
                .into_iter()
                .map(|(i, t)| {
                    let (state, why) = match &t.task.state {
                        TaskState::Queued => ("queued", Some(waits.clone())),
                        TaskState::Running { .. } => ("running", None),
                        TaskState::Done { .. } => ("done", t.error.clone()),
                        TaskState::Failed { .. } => ("failed", t.error.clone()),
                        TaskState::Cancelled => ("cancelled", None),
                    };
                    TaskStatus {
                        index: i,
                        state: state.to_owned(),
                        node: t.node.clone(),
                        attempts: t.task.attempts,
                        status: t.status,
                        why,
                    }
                })
                .collect(),
        })
    }

    /// The runner: places queued tasks until the agent stops.
    pub async fn run(self: Arc<Self>, main: mpsc::Sender<ControlMsg>) {
        if self.journal.is_err() {
            return;
        }
        let adopt = std::mem::take(&mut self.lock().adopt);
        for a in adopt {
            tokio::spawn(self.clone().adopt(main.clone(), a));
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = self.wake.notified() => {}
            }
            let report = match ask_main(&main, Request::Nodes { bandwidth: false }).await {
                Response::Nodes(r) => r,
                _ => continue,
            };
            let picks = {
                let st = self.lock();
                plan(&st, &report)
            };
            if !picks.is_empty() {
                self.clone().start(main.clone(), picks);
            }
        }
    }

    /// Starts the planned attempts: each journaled durably under a fresh
    /// fence (grouped with whatever else waits for the journal) before it
    /// is driven, so a restarted agent adopts what it started and never
    /// reuses a fence an executor may still hold.
    fn start(self: Arc<Self>, main: mpsc::Sender<ControlMsg>, picks: Vec<Pick>) {
        let Ok(j) = self.journal() else { return };
        // Taken in memory at once (the next plan passes them by), journaled
        // on the journal's thread (the event loop never waits on the disk);
        // each attempt begins once its start is durable.
        let mut started = Vec::with_capacity(picks.len());
        {
            let mut st = self.lock();
            for p in picks {
                let Some(m) = st.jobs.get_mut(&p.job) else {
                    continue;
                };
                m.set(p.index, Mem::Running);
                let rec = m.rec.clone();
                *st.inflight.entry(p.node.clone()).or_insert(0) += 1;
                let node = p.node.clone();
                let journaled = j.update_grouped(p.job, p.index, move |t, fence| {
                    if t.task.start(&node, fence) {
                        t.node = Some(node);
                        Ok(fence)
                    } else {
                        Err(t.task.state.clone())
                    }
                });
                started.push((p, rec, journaled));
            }
        }
        for (p, rec, journaled) in started {
            let (me, main) = (self.clone(), main.clone());
            tokio::spawn(async move {
                let now = match journaled.await {
                    Ok(Ok(fence)) => return me.attempt(main, rec, p, fence).await,
                    // Cancelled (or otherwise moved on) meanwhile.
                    Ok(Err(state)) => mem_of(&state),
                    Err(e) => {
                        tracing::error!(error = %e, "journal: cannot start a task");
                        Mem::Queued
                    }
                };
                if let Some(m) = me.lock().jobs.get_mut(&p.job) {
                    m.set(p.index, now);
                }
                me.release(&p.node);
            });
        }
    }

    /// Adopts an attempt that was running when this agent stopped: waits
    /// for its executor to be alive, collects its result, and lands it as
    /// any attempt's (or, when the executor is gone or no longer has it,
    /// queues the task again under a new fence).
    async fn adopt(self: Arc<Self>, main: mpsc::Sender<ControlMsg>, a: Adopt) {
        let rec = match self.lock().jobs.get(&a.job) {
            Some(m) => m.rec.clone(),
            None => return,
        };
        let addr = wait_alive(&main, &a.node, ADOPT_WAIT).await;
        let p = Pick {
            job: a.job,
            index: a.index,
            node: a.node.clone(),
            addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        };
        let out = output_dir(&rec);
        let stage = out.join(format!(".shoal-{}-{}", a.index, a.fence));
        let end = match addr {
            None => End::Lost(format!("{} did not come back", a.node)),
            Some(_) => {
                tracing::info!(job = a.job, index = a.index, node = %a.node, "adopting a running attempt");
                tokio::select! {
                    e = self.reattach(&rec, &p, a.fence, &stage) => e,
                    state = gone(&main, &a.node) => End::Lost(format!("{} is {state}", a.node)),
                }
            }
        };
        self.finish(&rec, &p, a.fence, end, &out, &stage, None)
            .await;
        self.release(&a.node);
    }

    /// An attempt on `node` is over: one slot more there for placement.
    fn release(&self, node: &str) {
        if let Some(n) = self.lock().inflight.get_mut(node) {
            *n = n.saturating_sub(1);
        }
        self.wake.notify_one();
    }

    async fn manifest(&self, rec: &JobRecord) -> Result<Arc<Inputs>, String> {
        if let Some(m) = self.lock().manifests.get(&rec.id) {
            return Ok(m.clone());
        }
        let dir = rec.dir.clone();
        let inputs = rec.spec.inputs.clone();
        let output = PathBuf::from(&rec.spec.output);
        let image = rec.spec.image.as_ref().map(|i| dir.join(i));
        // Read with the submitter's rights: nothing they may not read
        // reaches a task.
        let m = as_submitter(rec.uid, move || -> Result<Inputs, String> {
            let tree = scan_inputs(&dir, &inputs, &output)?;
            let image = match image {
                Some(p) => Some(Arc::new(
                    shoal_task::image::scan(&p, &mut HashCache::in_memory())
                        .map_err(|e| e.to_string())?,
                )),
                None => None,
            };
            Ok(Inputs { tree, image })
        })
        .await??;
        let m = Arc::new(m);
        self.lock().manifests.insert(rec.id, m.clone());
        Ok(m)
    }

    async fn attempt(
        self: Arc<Self>,
        main: mpsc::Sender<ControlMsg>,
        rec: Arc<JobRecord>,
        p: Pick,
        fence: u64,
    ) {
        let out = output_dir(&rec);
        let stage = out.join(format!(".shoal-{}-{fence}", p.index));
        let mut outputs = None;
        let end = match self.manifest(&rec).await {
            Err(e) => End::Failed(2, format!("inputs: {e}")),
            Ok(man) => match open_outputs(rec.uid, &stage, true).await {
                Err(e) => e,
                Ok(o) => {
                    let o = outputs.insert(o);
                    tokio::select! {
                        e = self.drive(&rec, &p, fence, &man, &stage, o) => e,
                        state = gone(&main, &p.node) => End::Lost(format!("{} is {state}", p.node)),
                    }
                }
            },
        };
        let outputs = match outputs {
            Some(o) => Some(o.into_std().await),
            None => None,
        };
        self.finish(&rec, &p, fence, end, &out, &stage, outputs)
            .await;
        self.release(&p.node);
    }

    async fn drive(
        &self,
        rec: &JobRecord,
        p: &Pick,
        fence: u64,
        inputs: &Inputs,
        stage: &Path,
        outputs: &mut Outputs,
    ) -> End {
        let man = &inputs.tree;
        let (mut rx, mut tx) = match self.connect(p).await {
            Ok(x) => x,
            Err(e) => return e,
        };
        let mut env = rec.env.clone();
        env.push((
            b"SHOAL_TASK_INDEX".to_vec(),
            p.index.to_string().into_bytes(),
        ));
        env.push((b"SHOAL_JOB_ID".to_vec(), rec.id.to_string().into_bytes()));
        let spec = TaskSpec {
            task_id: attempt_id(rec.id, p.index, fence),
            argv: rec
                .spec
                .argv
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect(),
            env,
            cwd: rec.dir.clone(),
            tree: man.entries.clone(),
            resources: Resources {
                cpus: rec.spec.cpus,
                memory_bytes: rec.spec.memory_bytes,
                pids: rec.spec.pids,
            },
            net_host: false,
            commit: Commit::Success,
            tty: None,
            image: inputs.image.as_ref().map(|i| ImageRef {
                id: i.id,
                name: i.origin.display().to_string(),
            }),
            detach: true,
            // (A batch task reads no input.)
            no_input: true,
        };
        if let Err(e) = link::send(&mut tx, &ToExec::Start(spec)).await {
            return End::Lost(e.to_string());
        }
        let end = self
            .receive(rec, Some(inputs), stage, &mut rx, &mut tx, outputs)
            .await;
        if matches!(end, End::Exit { .. }) {
            // Its executor waits on it for the next attempt.
            self.keep_link(p.addr, rx, tx);
        }
        end
    }

    /// A batch link to the attempt's executor: one kept from an earlier
    /// attempt when one is idle there (no connection, no handshake), else
    /// a new one. A kept link is used only while it has been idle for less
    /// than [`crate::peer::LINK_REUSE`] (its executor keeps it for longer) and is still
    /// open and quiet: an executor that restarted or closed it is never
    /// sent an attempt on it.
    async fn connect(&self, p: &Pick) -> Result<(LinkRx, LinkTx), End> {
        let kept = self.links.take(p.addr);
        match kept {
            Some(l) => Ok(l),
            None => crate::peer::connect_task(
                p.addr,
                &self.key,
                &self.cluster,
                crate::peer::Hello::Batch,
            )
            .await
            .map_err(End::Lost),
        }
    }

    /// Keeps a link whose attempt ended cleanly, for the next attempt to
    /// the same executor.
    fn keep_link(&self, addr: SocketAddr, rx: LinkRx, tx: LinkTx) {
        self.links.keep(addr, rx, tx);
    }

    /// Collects an attempt that was running when this agent stopped: its
    /// executor kept it (detached) and gives its result once it ends, with
    /// the output this agent had not written yet.
    async fn reattach(&self, rec: &JobRecord, p: &Pick, fence: u64, stage: &Path) -> End {
        let mut outputs = match open_outputs(rec.uid, stage, false).await {
            Ok(x) => x,
            Err(e) => return e,
        };
        let (mut rx, mut tx) = match self.connect(p).await {
            Ok(x) => x,
            Err(e) => return e,
        };
        let m = ToExec::Reattach {
            task_id: attempt_id(rec.id, p.index, fence),
            stdout_from: outputs.stdout_len,
            stderr_from: outputs.stderr_len,
        };
        if let Err(e) = link::send(&mut tx, &m).await {
            return End::Lost(e.to_string());
        }
        self.receive(rec, None, stage, &mut rx, &mut tx, &mut outputs)
            .await
    }

    /// An attempt's messages, until it ends: contents asked for (from
    /// `inputs`), output appended to the stage, changes applied into it.
    #[allow(clippy::too_many_arguments)] // one attempt's whole context
    async fn receive<R: FrameSource, W: FrameSink>(
        &self,
        rec: &JobRecord,
        inputs: Option<&Inputs>,
        stage: &Path,
        rx: &mut R,
        tx: &mut W,
        outputs: &mut Outputs,
    ) -> End {
        let Outputs {
            stdout: so,
            stderr: se,
            ..
        } = outputs;
        // A commit whose large files are still coming (applied as the
        // submitter, piece by piece, never held in memory).
        let mut streaming: Option<shoal_files::Commit> = None;
        loop {
            let m = match link::recv::<FromExec, _>(rx).await {
                Ok(m) => m,
                Err(e) => return End::Lost(e.to_string()),
            };
            match m {
                FromExec::NeedImage => {
                    let Some(img) = inputs.and_then(|i| i.image.as_ref()) else {
                        return End::Failed(2, "the executor asked for an unknown image".into());
                    };
                    if let Err(e) = link::send(tx, &ToExec::Image(img.entries.clone())).await {
                        return End::Lost(e.to_string());
                    }
                }
                FromExec::Need(hashes) => {
                    let Some(inputs) = inputs else {
                        return End::Lost("protocol: contents asked for on reattach".into());
                    };
                    let man = &inputs.tree;
                    let (of_tree, of_image): (Vec<_>, Vec<_>) = hashes
                        .into_iter()
                        .partition(|h| man.sources.contains_key(h));
                    if !of_image.is_empty() {
                        let Some(img) = &inputs.image else {
                            return End::Failed(2, "the executor asked for unknown content".into());
                        };
                        if let Err(e) = send_image(img, of_image, tx).await {
                            return e;
                        }
                    }
                    for h in of_tree {
                        let Some(path) = man.sources.get(&h) else {
                            return End::Failed(2, "the executor asked for unknown content".into());
                        };
                        let data = match tokio::fs::read(path).await {
                            Ok(d) => d,
                            Err(e) => return End::Failed(2, format!("{}: {e}", path.display())),
                        };
                        if tree::hash(&data) != h {
                            return End::Failed(
                                2,
                                format!("{} changed after the job was submitted", path.display()),
                            );
                        }
                        if let Err(e) = link::send(tx, &ToExec::Blob { hash: h, data }).await {
                            return End::Lost(e.to_string());
                        }
                    }
                }
                // (Its stdin is /dev/null: `no_input`.)
                FromExec::Started { .. } => {}
                FromExec::Stdout(d) => {
                    if let Err(e) = so.write_all(&d).await {
                        return End::Failed(125, format!("writing stdout: {e}"));
                    }
                }
                FromExec::Stderr(d) => {
                    if let Err(e) = se.write_all(&d).await {
                        return End::Failed(125, format!("writing stderr: {e}"));
                    }
                }
                // (Nothing to apply: no trip to the submitter's thread.)
                FromExec::Changes(cs) if cs.is_empty() => {}
                FromExec::Changes(cs) => {
                    let files = stage.join("files");
                    let r = as_submitter(rec.uid, move || {
                        // Made for the first change set only (a task that
                        // changed nothing lands no `files/`).
                        if let Err(source) = std::fs::create_dir_all(&files) {
                            return Err(shoal_files::ApplyError::Io {
                                path: files,
                                source,
                            });
                        }
                        if cs.streamed().next().is_none() {
                            return shoal_files::apply(&files, &cs).map(|()| None);
                        }
                        keep_or_finish(shoal_files::Commit::begin(&files, &cs)?)
                    })
                    .await;
                    match r {
                        Ok(Ok(c)) => streaming = c,
                        Ok(Err(e)) => return End::Failed(125, format!("outputs: {e}")),
                        Err(e) => return End::Failed(125, format!("outputs: {e}")),
                    }
                }
                FromExec::Content(d) => {
                    let Some(mut c) = streaming.take() else {
                        return End::Failed(2, "protocol: file contents without changes".into());
                    };
                    let r = as_submitter(rec.uid, move || {
                        c.feed(&d)?;
                        keep_or_finish(c)
                    })
                    .await;
                    match r {
                        Ok(Ok(c)) => streaming = c,
                        Ok(Err(e)) => return End::Failed(125, format!("outputs: {e}")),
                        Err(e) => return End::Failed(125, format!("outputs: {e}")),
                    }
                }
                FromExec::Exit {
                    status,
                    oom,
                    cpu_s,
                    mem_peak_bytes,
                } => {
                    if streaming.is_some() {
                        return End::Failed(125, "outputs: their contents ended early".into());
                    }
                    let _ = so.flush().await;
                    let _ = se.flush().await;
                    return End::Exit {
                        status,
                        cpu_s,
                        mem_peak_bytes,
                        oom,
                    };
                }
                FromExec::Failed { code, message } => return End::Failed(code, message),
                FromExec::Evicted { reason, .. } => return End::Evicted(reason),
                FromExec::Unknown => {
                    return End::Lost("the executor no longer has the attempt".into())
                }
            }
        }
    }

    /// Records how an attempt ended and lands its outputs (`outputs`: its
    /// stdout and stderr, still open, to sync; `None` for an adopted one,
    /// whose files are opened again).
    #[allow(clippy::too_many_arguments)] // one attempt's whole context
    async fn finish(
        &self,
        rec: &JobRecord,
        p: &Pick,
        fence: u64,
        end: End,
        out: &Path,
        stage: &Path,
        outputs: Option<[std::fs::File; 2]>,
    ) {
        let Ok(j) = self.journal() else { return };
        // A failed task's last line on stderr, read as the submitter.
        let last_words = match &end {
            End::Exit {
                status, oom: false, ..
            } if *status != Status::Code(0) => {
                let p = stage.join("stderr");
                as_submitter(rec.uid, move || last_line(&p))
                    .await
                    .ok()
                    .flatten()
            }
            _ => None,
        };
        let retries = rec.spec.retries;
        let node = p.node.clone();
        let (mut cpu, mut peak, mut oom) = (None, None, false);
        let (outcome, status, error, avoid) = match &end {
            End::Exit {
                status,
                cpu_s,
                mem_peak_bytes,
                oom: o,
            } => {
                cpu = Some(*cpu_s);
                peak = *mem_peak_bytes;
                oom = *o;
                let code = match status {
                    Status::Code(c) => *c,
                    Status::Signal(s) => 128 + s,
                };
                let outcome = if code == 0 {
                    Some(Outcome::Success)
                } else {
                    Some(Outcome::Failure(code))
                };
                let err = (code != 0).then(|| {
                    if *o {
                        format!("killed: out of memory on {node}")
                    } else {
                        // The task's own last word on it, where it said one.
                        match last_words {
                            Some(l) => format!("exit status {code} on {node}: {l}"),
                            None => format!("exit status {code} on {node}"),
                        }
                    }
                });
                (outcome, Some(code), err, code != 0)
            }
            End::Failed(code, m) => (
                Some(Outcome::Failure(*code)),
                Some(*code),
                Some(m.clone()),
                true,
            ),
            End::Evicted(why) => {
                // Refused for want of a slot (late binding): ask it again
                // once its slots are gossiped anew, elsewhere meanwhile.
                // The owner took the machine back: avoid it for this task.
                let full = why.contains("slot");
                if full {
                    self.lock().full_until.insert(
                        node.clone(),
                        std::time::Instant::now() + Duration::from_millis(500),
                    );
                }
                (
                    Some(Outcome::Evicted),
                    None,
                    Some(format!("{node}: {why}")),
                    !full,
                )
            }
            End::Lost(why) => (None, None, Some(format!("lost on {node}: {why}")), false),
        };
        // Grouped with the other results waiting (one sync for all).
        let (lost_on, recorded_error) = (node.clone(), error.clone());
        let r = j
            .update_grouped(rec.id, p.index, move |t: &mut TaskRecord, _| {
                let v = match outcome {
                    Some(o) => t.task.report(fence, o, retries),
                    None => {
                        let ours = matches!(&t.task.state, TaskState::Running { fence: f, .. } if *f == fence);
                        if ours {
                            t.task.node_lost(&lost_on);
                            Verdict::Record
                        } else {
                            Verdict::Stale
                        }
                    }
                };
                if v != Verdict::Stale {
                    t.status = status;
                    // The last failure stays on record after a success, for
                    // `shoal status`.
                    if recorded_error.is_some() {
                        t.error = recorded_error;
                    }
                    t.node = Some(lost_on);
                    if v == Verdict::Commit {
                        t.cpu_s = cpu;
                    }
                }
                (v, t.task.state.clone(), t.task.attempts)
            })
            .await;
        let (verdict, state, attempts) = match r {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "journal: a result could not be recorded");
                remove_stage(rec.uid, stage).await;
                return;
            }
        };
        let land = verdict == Verdict::Commit
            || (verdict == Verdict::Record && matches!(state, TaskState::Failed { .. }));
        if land {
            let summary = serde_json::json!({
                "job": rec.id,
                "index": p.index,
                "node": node,
                "status": status,
                "oom": oom,
                "cpu_s": cpu,
                "mem_peak_bytes": peak,
                "attempts": attempts,
                "fence": fence,
                "error": error,
            });
            let fin = out.join(p.index.to_string());
            let (st, f) = (stage.to_owned(), fin.clone());
            let r = as_submitter(rec.uid, move || {
                write_summary(&st, &summary, outputs)?;
                if f.exists() {
                    // A failed task landed before; `retry` made it run again.
                    std::fs::remove_dir_all(&f)?;
                }
                std::fs::rename(&st, &f)
            })
            .await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, dir = %fin.display(), "outputs not landed")
                }
                Err(e) => tracing::error!(error = %e, dir = %fin.display(), "outputs not landed"),
            }
        } else {
            remove_stage(rec.uid, stage).await;
        }
        let mut st = self.lock();
        if let Some(m) = st.jobs.get_mut(&rec.id) {
            if verdict != Verdict::Stale {
                m.set(p.index, mem_of(&state));
            }
            if avoid {
                m.avoid.entry(p.index).or_default().push(p.node.clone());
            }
        }
    }
}

/// The last non-empty line of a file (its last 4 KiB), trimmed.
fn last_line(p: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(p).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(300).collect())
}

fn output_dir(rec: &JobRecord) -> PathBuf {
    rec.dir.join(&rec.spec.output)
}

/// Runs `f` as the job's submitter, off the runtime's threads: whatever
/// the agent reads or writes in the submitter's directories (inputs,
/// image, outputs), it does with their rights, so that a path or a link
/// swapped in by a user reaches nothing that user may not reach.
/// A streaming commit still waiting for contents, or `None` once it has
/// them all and is finished.
fn keep_or_finish(
    c: shoal_files::Commit,
) -> Result<Option<shoal_files::Commit>, shoal_files::ApplyError> {
    if c.missing() > 0 {
        return Ok(Some(c));
    }
    c.finish().map(|()| None)
}

async fn as_submitter<R: Send + 'static>(
    uid: u32,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    creds::spawn_as(uid, move || {
        let _ = tx.send(f());
    })
    .map_err(|e| e.to_string())?;
    rx.await
        .map_err(|_| format!("the work as uid {uid} panicked"))
}

async fn remove_stage(uid: u32, stage: &Path) {
    let stage = stage.to_owned();
    let _ = as_submitter(uid, move || std::fs::remove_dir_all(&stage)).await;
}

/// Writes `status.json` and syncs every file, so the rename that follows
/// lands a complete directory: stdout and stderr through `outputs` where
/// they are still open (else opened again), then what is in `files/`.
/// Runs as the submitter (who then owns it all).
fn write_summary(
    stage: &Path,
    v: &serde_json::Value,
    outputs: Option<[std::fs::File; 2]>,
) -> std::io::Result<()> {
    let p = stage.join("status.json");
    let mut f = std::fs::File::create(&p)?;
    std::io::Write::write_all(&mut f, format!("{v:#}\n").as_bytes())?;
    f.sync_all()?;
    let outputs = match outputs {
        Some(o) => o.into_iter().map(Ok).collect(),
        None => vec![
            std::fs::File::open(stage.join("stdout")),
            std::fs::File::open(stage.join("stderr")),
        ],
    };
    for f in outputs.into_iter().flatten() {
        let _ = f.sync_all();
    }
    let files = stage.join("files");
    if files.is_dir() {
        for e in walk(&files) {
            if e.is_file() {
                if let Ok(f) = std::fs::File::open(&e) {
                    let _ = f.sync_all();
                }
            }
        }
    }
    std::fs::File::open(stage)?.sync_all()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        let d = out[i].clone();
        i += 1;
        if d.is_dir() && !d.is_symlink() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                out.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    out
}

/// The executor's task id of an attempt (the same in `Start` and
/// `Reattach`).
fn attempt_id(job: u64, index: u32, fence: u64) -> String {
    format!("j{job}-{index}-{fence}")
}

/// An attempt that was running when this agent stopped.
#[derive(Debug, Clone)]
struct Adopt {
    job: u64,
    index: u32,
    node: String,
    fence: u64,
}

/// How long a restarted agent waits for the executor of an attempt it
/// adopts to show up in the membership before it runs the task again.
const ADOPT_WAIT: Duration = Duration::from_secs(30);

/// A stage's stdout and stderr, open for appending, with the bytes they
/// held when opened.
struct Outputs {
    stdout: tokio::fs::File,
    stderr: tokio::fs::File,
    stdout_len: u64,
    stderr_len: u64,
}

impl Outputs {
    /// Both files as std files again (their writes done), for syncing.
    async fn into_std(self) -> [std::fs::File; 2] {
        [self.stdout.into_std().await, self.stderr.into_std().await]
    }
}

/// Opens the stage's stdout and stderr for appending, as the submitter, in
/// one trip to their thread: a `fresh` stage is made anew (the output
/// directory on the way), else it is kept as it is (made if missing).
async fn open_outputs(uid: u32, stage: &Path, fresh: bool) -> Result<Outputs, End> {
    let stage = stage.to_owned();
    let at = stage.display().to_string();
    let opened = as_submitter(uid, move || -> std::io::Result<_> {
        if fresh {
            let _ = std::fs::remove_dir_all(&stage);
        }
        std::fs::create_dir_all(&stage)?;
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
        };
        let (o, e) = (open(&stage.join("stdout"))?, open(&stage.join("stderr"))?);
        let (ol, el) = if fresh {
            (0, 0)
        } else {
            (o.metadata()?.len(), e.metadata()?.len())
        };
        Ok((o, e, ol, el))
    })
    .await;
    match opened {
        Ok(Ok((o, e, ol, el))) => Ok(Outputs {
            stdout: tokio::fs::File::from_std(o),
            stderr: tokio::fs::File::from_std(e),
            stdout_len: ol,
            stderr_len: el,
        }),
        Ok(Err(e)) => Err(End::Failed(125, format!("output {at}: {e}"))),
        Err(e) => Err(End::Failed(125, format!("output {at}: {e}"))),
    }
}

/// What a job's tasks are given: its input tree and its image.
#[derive(Debug)]
struct Inputs {
    tree: Manifest,
    image: Option<Arc<Image>>,
}

/// Sends the image's contents among `wanted`, read on the blocking pool
/// (a tarball is read through once).
async fn send_image<W: FrameSink>(
    img: &Arc<Image>,
    wanted: Vec<Hash>,
    tx: &mut W,
) -> Result<(), End> {
    let (btx, mut brx) = mpsc::channel::<(Hash, Vec<u8>)>(4);
    let img = img.clone();
    let reading = tokio::task::spawn_blocking(move || {
        img.contents(&wanted, |h, d| {
            btx.blocking_send((h, d))
                .map_err(|_| std::io::Error::other("the link closed"))
        })
    });
    while let Some((hash, data)) = brx.recv().await {
        if let Err(e) = link::send(tx, &ToExec::Blob { hash, data }).await {
            return Err(End::Lost(e.to_string()));
        }
    }
    match reading.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Failed(2, format!("image: {e}"))),
        Err(e) => Err(End::Failed(125, format!("image: {e}"))),
    }
}

/// The job's inputs: the listed paths under `dir`, or the whole tree
/// (less `shoal-out/`, where jobs' outputs land by default) when none is
/// listed; never the job's own output directory.
fn scan_inputs(dir: &Path, inputs: &[String], output: &Path) -> Result<Manifest, String> {
    let (listed, out) = (inputs.to_vec(), output.to_owned());
    // Only the inputs are walked: nothing else of the directory is read
    // (nor need be readable), its outputs least of all.
    let keep = move |rel: &Path| {
        // Its own outputs, and every job's under the default root, are
        // not its inputs (unless listed).
        let in_output =
            rel.starts_with(&out) || (rel.starts_with("shoal-out") && listed.is_empty());
        // A listed input, or a directory on the way to one.
        let wanted = listed.is_empty()
            || listed.iter().any(|i| {
                let i = Path::new(i.trim_end_matches('/'));
                rel.starts_with(i) || i.starts_with(rel)
            });
        wanted && !in_output
    };
    let m =
        tree::scan_filtered(dir, &mut HashCache::in_memory(), keep).map_err(|e| e.to_string())?;
    for i in inputs {
        let p = Path::new(i.trim_end_matches('/'));
        if !m.entries.iter().any(|e| e.path.starts_with(p)) {
            return Err(format!("{i}: no such input under {}", dir.display()));
        }
    }
    Ok(m)
}

/// One task to start.
#[derive(Debug, Clone)]
struct Pick {
    job: u64,
    index: u32,
    node: String,
    addr: SocketAddr,
}

/// Which queued tasks start now, and where: runnable tasks (their job not
/// cancelled, every job they wait for done), taken in turn across users
/// then across each user's jobs (oldest first), each on the best node with
/// a free slot once what is in flight is counted, avoiding nodes where it
/// failed or was refused.
fn plan(st: &State, report: &NodesReport) -> Vec<Pick> {
    let now = std::time::Instant::now();
    let mut free: BTreeMap<String, (i64, SocketAddr, &shoal_control::NodeInfo)> = BTreeMap::new();
    for n in &report.nodes {
        let Ok(addr) = n.addr.parse::<SocketAddr>() else {
            continue;
        };
        if n.state != "alive" || n.checks.as_deref() != Some("ok") {
            continue;
        }
        if st.full_until.get(&n.name).is_some_and(|t| *t > now) {
            continue;
        }
        // The slots it lends less our attempts there. Gossiped free slots
        // lag our own starts and ends by a facts period, so they are not
        // used; other submitters' guests show up as refusals (late
        // binding), after which the node rests until its facts are new.
        let ours = i64::from(st.inflight.get(&n.name).copied().unwrap_or(0));
        let lent = i64::from(n.slots_lent.or(n.slots_free).unwrap_or(0));
        free.insert(n.name.clone(), ((lent - ours).max(0), addr, n));
    }
    let total_free: i64 = free.values().map(|v| v.0).sum();
    // Runnable tasks per user, each user's jobs oldest first.
    let mut per_user: BTreeMap<u32, Vec<(u64, u32, Option<u64>)>> = BTreeMap::new();
    for m in st.jobs.values() {
        if m.rec.cancelled {
            continue;
        }
        let ready = m
            .rec
            .after
            .iter()
            .all(|a| st.jobs.get(a).is_some_and(JobMem::finished));
        if !ready {
            continue;
        }
        // No user can get more than every free slot: look no further.
        let q = per_user.entry(m.rec.uid).or_default();
        let room = (total_free.max(0) as usize).saturating_sub(q.len());
        for i in m.queued.iter().take(room) {
            q.push((m.rec.id, *i, m.rec.spec.memory_bytes));
        }
    }
    let mut queues: Vec<std::collections::VecDeque<(u64, u32, Option<u64>)>> =
        per_user.into_values().map(Into::into).collect();
    let mut picks = Vec::new();
    while (picks.len() as i64) < total_free && queues.iter().any(|q| !q.is_empty()) {
        let mut progressed = false;
        for q in &mut queues {
            let Some((job, index, mem)) = q.pop_front() else {
                continue;
            };
            let avoid = st
                .jobs
                .get(&job)
                .and_then(|m| m.avoid.get(&index))
                .cloned()
                .unwrap_or_default();
            let best = free
                .iter()
                .filter(|(name, v)| v.0 > 0 && !avoid.contains(name))
                .filter(|(_, v)| mem.is_none_or(|m| v.2.mem_avail_bytes.is_none_or(|a| a >= m)))
                .max_by(|a, b| {
                    let s = |v: &(i64, SocketAddr, &shoal_control::NodeInfo)| {
                        v.0 as f64 * f64::from(v.2.cpu_score.unwrap_or(1).max(1))
                            / (1.0 + v.2.rtt_ms.unwrap_or(0.0))
                    };
                    s(a.1).total_cmp(&s(b.1)).then_with(|| b.0.cmp(a.0))
                })
                .map(|(n, v)| (n.clone(), v.1));
            if let Some((node, addr)) = best {
                if let Some(v) = free.get_mut(&node) {
                    v.0 -= 1;
                }
                picks.push(Pick {
                    job,
                    index,
                    node,
                    addr,
                });
                progressed = true;
            } else if avoid.len() >= free.len() && !avoid.is_empty() {
                // Every node was tried: start afresh rather than starve.
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    picks
}

/// Why a job's queued tasks wait, for `shoal status`.
fn why_waiting(m: &JobMem, st: &State, report: &NodesReport) -> String {
    if m.rec.cancelled {
        return "the job is cancelled".into();
    }
    for a in &m.rec.after {
        match st.jobs.get(a) {
            Some(d) if !d.finished() => {
                return format!(
                    "dependency pending: job {a} ({}) has {} of {} tasks done",
                    d.rec.spec.name,
                    d.count(Mem::Done),
                    d.rec.spec.count
                )
            }
            None => return format!("dependency pending: job {a} is not known"),
            _ => {}
        }
    }
    let up: Vec<&shoal_control::NodeInfo> = report
        .nodes
        .iter()
        .filter(|n| n.state == "alive" && n.checks.as_deref() == Some("ok"))
        .collect();
    if up.is_empty() {
        return "no node is up with its checks passed".into();
    }
    if let Some(want) = m.rec.spec.memory_bytes {
        let most = up
            .iter()
            .filter_map(|n| n.mem_avail_bytes)
            .max()
            .unwrap_or(0);
        if want > most {
            return format!(
                "no node with enough memory: asks {} MiB, the most available is {} MiB",
                want >> 20,
                most >> 20
            );
        }
    }
    let busy = up
        .iter()
        .filter(|n| {
            n.slots_free == Some(0)
                && n.guests
                    .as_deref()
                    .is_some_and(|g| g.contains("owner") || g.contains("suspended"))
        })
        .count();
    if busy == up.len() {
        return format!("owners busy on every node ({busy})");
    }
    if up.iter().all(|n| n.slots_free == Some(0)) {
        return "every guest slot is taken".into();
    }
    "next in line".into()
}

/// `node`'s address once it is alive in the membership, or `None` after
/// `wait`.
async fn wait_alive(
    main: &mpsc::Sender<ControlMsg>,
    node: &str,
    wait: Duration,
) -> Option<SocketAddr> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        if let Response::Nodes(rep) = ask_main(main, Request::Nodes { bandwidth: false }).await {
            let addr = rep
                .nodes
                .iter()
                .find(|n| n.name == node && n.state == "alive")
                .and_then(|n| n.addr.parse().ok());
            if addr.is_some() {
                return addr;
            }
        }
        if tokio::time::Instant::now() >= until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resolves when `node` is no longer alive (or suspect) in the membership.
pub(crate) async fn gone(main: &mpsc::Sender<ControlMsg>, node: &str) -> String {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Response::Nodes(rep) = ask_main(main, Request::Nodes { bandwidth: false }).await {
            let state = rep
                .nodes
                .iter()
                .find(|n| n.name == node)
                .map(|n| n.state.clone());
            if !matches!(state.as_deref(), Some("alive" | "suspect")) {
                return state.unwrap_or_else(|| "gone".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use shoal_control::{ClusterInfo, NodeInfo, RejectedInfo};

    fn node(name: &str, lent: u32, mem_gib: u64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            addr: format!("10.0.0.{}:7946", name.len()),
            state: "alive".into(),
            cores: Some(lent),
            mem_total_bytes: Some(mem_gib << 30),
            mem_avail_bytes: Some(mem_gib << 30),
            cpu_score: Some(300),
            load1: None,
            load5: None,
            load15: None,
            owner_idle_s: None,
            rtt_ms: Some(0.2),
            checks: Some("ok".into()),
            role: "member".into(),
            slots_free: Some(lent),
            slots_lent: Some(lent),
            guests: None,
            is_self: false,
            rank: None,
            checks_failed: vec![],
            version: None,
            bandwidth_mbps: None,
        }
    }

    fn report(nodes: Vec<NodeInfo>) -> NodesReport {
        let mut nodes = nodes;
        for (i, n) in nodes.iter_mut().enumerate() {
            n.addr = format!("10.0.0.{}:7946", i + 1);
        }
        NodesReport {
            cluster: ClusterInfo {
                name: "t".into(),
                state: "formed".into(),
                expect: 0,
                alive: nodes.len() as u32,
            },
            nodes,
            rejected: RejectedInfo {
                total: 0,
                auth: 0,
                replay: 0,
                malformed: 0,
                stale: 0,
                protocol: 0,
            },
        }
    }

    fn job(id: u64, uid: u32, count: u32, after: Vec<u64>, mem: Option<u64>) -> JobMem {
        let mut spec = shoal_jobs::spec::parse(
            &format!("name = \"j{id}\"\ncommand = [\"true\"]\ncount = {count}\n"),
            "x",
        )
        .unwrap()
        .remove(0);
        spec.memory_bytes = mem;
        JobMem::new(
            Arc::new(JobRecord {
                id,
                spec,
                after,
                dir: "/tmp".into(),
                uid,
                env: vec![],
                submitted_ms: 0,
                cancelled: false,
            }),
            vec![Mem::Queued; count as usize],
        )
    }

    #[test]
    fn users_take_turns_and_dependencies_wait() {
        let mut st = State::default();
        st.jobs.insert(1, job(1, 1000, 50, vec![], None));
        st.jobs.insert(2, job(2, 1001, 50, vec![], None));
        st.jobs.insert(3, job(3, 1002, 5, vec![1], None));
        let r = report(vec![node("a", 2, 8), node("b", 2, 8)]);
        let p = plan(&st, &r);
        assert_eq!(p.len(), 4);
        let by = |j| p.iter().filter(|x| x.job == j).count();
        assert_eq!((by(1), by(2), by(3)), (2, 2, 0), "{p:?}");
        // Job 1 done: job 3 may start.
        let j1 = st.jobs.get_mut(&1).unwrap();
        for i in 0..50 {
            j1.set(i, Mem::Done);
        }
        let p = plan(&st, &r);
        let by = |j| p.iter().filter(|x| x.job == j).count();
        assert_eq!((by(2), by(3)), (2, 2), "{p:?}");
    }

    #[test]
    fn memory_refusals_and_in_flight_attempts_are_respected() {
        let mut st = State::default();
        st.jobs.insert(1, job(1, 1, 10, vec![], Some(6 << 30)));
        let r = report(vec![node("small", 4, 4), node("big", 2, 16)]);
        st.inflight.insert("big".into(), 1);
        let p = plan(&st, &r);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].node, "big");
        st.jobs
            .get_mut(&1)
            .unwrap()
            .avoid
            .insert(0, vec!["big".into()]);
        let p = plan(&st, &r);
        assert!(p.iter().all(|x| x.index != 0), "{p:?}");
        st.full_until.insert(
            "big".into(),
            std::time::Instant::now() + Duration::from_secs(60),
        );
        assert!(plan(&st, &r).is_empty());
    }

    proptest! {
        /// For any set of jobs, users, nodes, slots, tasks in flight and
        /// avoid lists: no task is picked twice, only queued tasks of
        /// runnable, uncancelled jobs are picked, no node gets more than
        /// its lent slots less what is in flight, no task goes to a node it
        /// avoids or without the memory, and users' shares differ by at
        /// most one while each still has runnable tasks.
        #[test]
        fn plans_are_sound_and_fair(
            jobs in proptest::collection::vec((0u32..3, 1u32..20, any::<bool>(), proptest::option::of(1u64..12)), 1..6),
            nodes in proptest::collection::vec((0u32..5, 1u64..16, 0u32..3), 1..5),
            avoid_seed in any::<u64>(),
        ) {
            let mut st = State::default();
            for (i, (uid, count, dep, mem)) in jobs.iter().enumerate() {
                let id = i as u64 + 1;
                let after = if *dep && id > 1 { vec![id - 1] } else { vec![] };
                let mut m = job(id, *uid, *count, after, mem.map(|g| g << 30));
                for k in 0..*count {
                    if (avoid_seed >> (k % 64)) & 3 == 0 { m.set(k, Mem::Done); }
                }
                if avoid_seed % 7 == 0 {
                    m.avoid.insert(0, vec!["n0".into()]);
                }
                st.jobs.insert(id, m);
            }
            let infos: Vec<NodeInfo> = nodes.iter().enumerate()
                .map(|(i, (lent, mem, _))| node(&format!("n{i}"), *lent, *mem)).collect();
            for (i, (_, _, fl)) in nodes.iter().enumerate() {
                st.inflight.insert(format!("n{i}"), *fl);
            }
            let r = report(infos);
            let p = plan(&st, &r);
            let mut seen = std::collections::HashSet::new();
            let mut per_node: HashMap<String, u32> = HashMap::new();
            let mut per_user: BTreeMap<u32, u32> = BTreeMap::new();
            for x in &p {
                prop_assert!(seen.insert((x.job, x.index)), "picked twice");
                let m = &st.jobs[&x.job];
                prop_assert_eq!(m.tasks[x.index as usize], Mem::Queued);
                prop_assert!(m.rec.after.iter().all(|a| st.jobs[a].finished()));
                let avoid = m.avoid.get(&x.index).cloned().unwrap_or_default();
                prop_assert!(!avoid.contains(&x.node));
                let n = r.nodes.iter().find(|n| n.name == x.node).unwrap();
                if let Some(want) = m.rec.spec.memory_bytes {
                    prop_assert!(n.mem_avail_bytes.unwrap() >= want);
                }
                *per_node.entry(x.node.clone()).or_insert(0) += 1;
                *per_user.entry(m.rec.uid).or_insert(0) += 1;
            }
            for n in &r.nodes {
                let lent = n.slots_lent.unwrap();
                let fl = st.inflight[&n.name];
                prop_assert!(per_node.get(&n.name).copied().unwrap_or(0) <= lent.saturating_sub(fl));
            }
            // Fairness: with no memory limits or avoid lists, users who
            // still have runnable tasks get picks within one of each other.
            let simple = st.jobs.values().all(|m| m.rec.spec.memory_bytes.is_none() && m.avoid.is_empty());
            if simple {
                let runnable = |uid: u32| st.jobs.values().filter(|m| m.rec.uid == uid
                    && m.rec.after.iter().all(|a| st.jobs[a].finished()))
                    .map(|m| m.count(Mem::Queued)).sum::<u32>();
                let users: Vec<u32> = per_user.keys().copied().collect();
                for a in &users {
                    for b in &users {
                        let (pa, pb) = (per_user[a], per_user[b]);
                        if pa > pb + 1 {
                            prop_assert!(runnable(*b) == pb, "user {} got {} and {} got {}", a, pa, b, pb);
                        }
                    }
                }
            }
        }
    }
}
