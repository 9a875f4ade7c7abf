//! Client commands (`shoal nodes`, `shoal leave`, …) talk to the local
//! agent over a Unix socket in the agent's data dir: one JSON [`Request`]
//! per line, one JSON [`Response`] per line back. The socket's file mode
//! (0600, owned by the agent's user) is the access control.
//!
//! The types here are also the documented `--json` output shapes.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The agent's default data dir.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/shoal";
/// The socket's file name inside the data dir.
pub const SOCKET_NAME: &str = "agent.sock";

/// Where a client finds the agent, in order of precedence: `--agent
/// SOCKET`, `$SHOAL_AGENT`, `--data-dir DIR`, `$SHOAL_DATA_DIR`, the default
/// data dir.
pub fn resolve_socket(
    agent: Option<&Path>,
    data_dir: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> PathBuf {
    if let Some(a) = agent {
        return a.to_owned();
    }
    if let Some(a) = env("SHOAL_AGENT").filter(|s| !s.is_empty()) {
        return PathBuf::from(a);
    }
    let dir = data_dir
        .map(Path::to_owned)
        .or_else(|| {
            env("SHOAL_DATA_DIR")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    dir.join(SOCKET_NAME)
}

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The cluster as this agent sees it.
    Nodes {
        /// Also measure bandwidth to every alive peer (takes a moment).
        #[serde(default)]
        bandwidth: bool,
    },
    /// Leave the cluster gracefully and stop the agent.
    Leave,
    /// Run a task (`shoal run`): after the answer, the connection carries
    /// the task protocol (`shoal-task`) in length-prefixed frames.
    Run {
        /// Pinned node.
        #[serde(default)]
        node: Option<String>,
        /// Run on this node.
        #[serde(default)]
        local: bool,
        /// Memory the task asks for, bytes (for placement).
        #[serde(default)]
        memory_bytes: Option<u64>,
        /// Nodes not to use (where an earlier attempt was lost).
        #[serde(default)]
        exclude: Vec<String>,
    },
    /// The owner's state and policy (`shoal owner`), after setting the
    /// override when `force` is `busy`, `idle` or `auto`.
    Owner {
        /// The override to set, if any.
        #[serde(default)]
        force: Option<String>,
    },
    /// Re-read the policy from the config file (as SIGHUP does).
    Reload,
    /// The tasks running on this node (`shoal ps`).
    Ps,
    /// Queue jobs (`shoal submit`): journaled before the answer.
    Submit {
        /// The jobs, checked by the client (`shoal-jobs`), checked again.
        jobs: Vec<shoal_jobs::JobSpec>,
        /// Where they were submitted from.
        dir: PathBuf,
        /// The environment their tasks get.
        env: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Every job this node submitted (`shoal jobs`).
    Jobs,
    /// One job's tasks, and why each waiting one waits (`shoal status`).
    Status {
        /// The job id.
        job: u64,
    },
    /// Cancel a job (`shoal cancel`).
    Cancel {
        /// The job id.
        job: u64,
    },
    /// Queue a job's failed tasks again (`shoal retry --failed`).
    Retry {
        /// The job id.
        job: u64,
    },
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Nodes`].
    Nodes(NodesReport),
    /// The request was carried out.
    Ok,
    /// Answer to [`Request::Run`]: where the task goes; the task protocol
    /// follows on the same connection.
    Run {
        /// The node chosen.
        node: String,
        /// Why it runs here although another node was asked or better, if so.
        fallback: Option<String>,
    },
    /// Answer to [`Request::Owner`] and [`Request::Reload`].
    Owner(OwnerReport),
    /// Answer to [`Request::Ps`].
    Ps(PsReport),
    /// Answer to [`Request::Submit`]: the new jobs' ids, in order.
    Submitted {
        /// Job ids.
        ids: Vec<u64>,
    },
    /// Answer to [`Request::Jobs`].
    Jobs(JobsReport),
    /// Answer to [`Request::Status`].
    Status(StatusReport),
    /// The request failed; the text says why.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// `shoal owner --json`: the owner's side of this machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerReport {
    /// The override: `auto`, `busy` or `idle`.
    pub force: String,
    /// `owner` (no guests may start) or `lending` (guests may start).
    pub state: String,
    /// The policy's verdicts now (after the override).
    pub verdict: VerdictInfo,
    /// The figures the policy was last evaluated over, by variable name.
    pub vars: std::collections::BTreeMap<String, f64>,
    /// The expressions in force, by key, and the two numbers.
    pub policy: std::collections::BTreeMap<String, String>,
    /// Why the last reload was refused (the old policy stays), if it was.
    pub reload_error: Option<String>,
    /// How guests are kept at the idle class: `cpu.idle` or `min-weight`
    /// (empty without cgroups).
    pub guest_class: String,
    /// Every guest slot: `owner`, `unclaimed`, `claimed`, `throttled`,
    /// `suspended` or `evicting`.
    pub slots: Vec<String>,
}

/// The policy's verdicts in [`OwnerReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictInfo {
    /// New guests may start.
    pub start: bool,
    /// Running guests are capped.
    pub throttle: bool,
    /// Running guests are frozen.
    pub suspend: bool,
    /// Frozen guests may continue.
    #[serde(rename = "continue")]
    pub cont: bool,
}

/// `shoal ps --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PsReport {
    /// This node's name.
    pub node: String,
    /// Every task running here.
    pub tasks: Vec<TaskInfo>,
}

/// One task in [`PsReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Task id (`SHOAL_TASK_ID`).
    pub id: String,
    /// `guest` (from another node, under the owner's policy) or `local`
    /// (submitted on this node).
    pub origin: String,
    /// `starting`, `running`, or for guests the slot state: `claimed`,
    /// `throttled`, `suspended`, `evicting`.
    pub state: String,
    /// The command line.
    pub command: String,
    /// Seconds since it arrived.
    pub age_s: f64,
    /// CPU time used so far, seconds.
    pub cpu_s: Option<f64>,
}

/// `shoal jobs --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobsReport {
    /// Every job this node submitted, oldest first.
    pub jobs: Vec<JobInfo>,
}

/// One job in [`JobsReport`] and [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Job id.
    pub id: u64,
    /// Job name.
    pub name: String,
    /// `waiting` (for another job), `queued`, `running`, `done`, `failed`
    /// (done, some tasks failed) or `cancelled`.
    pub state: String,
    /// Tasks in all.
    pub tasks: u32,
    /// Tasks done (committed).
    pub done: u32,
    /// Tasks running.
    pub running: u32,
    /// Tasks queued.
    pub queued: u32,
    /// Tasks failed for good.
    pub failed: u32,
    /// Tasks cancelled.
    pub cancelled: u32,
    /// Where the outputs land (absolute).
    pub output: PathBuf,
    /// Submitted, Unix ms.
    pub submitted_ms: u64,
    /// Jobs it waits for, by id.
    pub after: Vec<u64>,
}

/// `shoal status JOB --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The job.
    pub job: JobInfo,
    /// Every task.
    pub tasks: Vec<TaskStatus>,
}

/// One task in [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// `$SHOAL_TASK_INDEX`.
    pub index: u32,
    /// `queued`, `running`, `done`, `failed`, `cancelled`.
    pub state: String,
    /// Where it runs or ran last.
    pub node: Option<String>,
    /// Attempts started.
    pub attempts: u32,
    /// Last exit status.
    pub status: Option<i32>,
    /// For a queued task: why it waits. For others: the last error, if any.
    pub why: Option<String>,
}

/// `shoal nodes --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodesReport {
    /// The cluster as a whole.
    pub cluster: ClusterInfo,
    /// Every member this node knows, itself included (`self: true`), by name.
    pub nodes: Vec<NodeInfo>,
    /// Datagrams this node refused, by reason.
    pub rejected: RejectedInfo,
}

/// The cluster line of [`NodesReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Cluster name.
    pub name: String,
    /// `forming (k/N)` or `formed`.
    pub state: String,
    /// Expected size (`expect`), 0 when not set.
    pub expect: u32,
    /// Members alive now, this one included.
    pub alive: u32,
}

/// One member in [`NodesReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// SWIM address.
    pub addr: String,
    /// alive, suspect, down or left.
    pub state: String,
    /// Logical CPUs (null until facts arrive).
    pub cores: Option<u32>,
    /// Memory, bytes.
    pub mem_total_bytes: Option<u64>,
    /// Available memory, bytes.
    pub mem_avail_bytes: Option<u64>,
    /// CPU score (millions of benchmark operations per second per core).
    pub cpu_score: Option<u32>,
    /// 1-minute load average.
    pub load1: Option<f32>,
    /// 5-minute load average.
    pub load5: Option<f32>,
    /// 15-minute load average.
    pub load15: Option<f32>,
    /// Seconds since the owner last used keyboard, mouse or terminal.
    pub owner_idle_s: Option<u64>,
    /// Smoothed round-trip time from this node, ms (null for itself or
    /// before the first probe).
    pub rtt_ms: Option<f64>,
    /// `ok` or the failed start-up checks, comma-separated.
    pub checks: Option<String>,
    /// `coordinator` (first in the pecking order) or `member`.
    pub role: String,
    /// Guest slots free.
    pub slots_free: Option<u32>,
    /// Guest slots lent now (free or holding a guest; not the owner's).
    #[serde(default)]
    pub slots_lent: Option<u32>,
    /// The guest slots by the owner's policy: `2 unclaimed`,
    /// `1 suspended, 1 owner`, … (`-` without slots).
    #[serde(default)]
    pub guests: Option<String>,
    /// True for the node that answered.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// Position in the pecking order (0 = coordinator), null when not alive.
    pub rank: Option<u32>,
    /// Full reasons of failed checks.
    pub checks_failed: Vec<String>,
    /// Agent version.
    pub version: Option<String>,
    /// Measured bandwidth from this node, MB/s (only with `--bandwidth`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bandwidth_mbps: Option<f64>,
}

/// Refused datagrams by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedInfo {
    /// All of them.
    pub total: u64,
    /// Failed authentication (wrong key or cluster, tampered).
    pub auth: u64,
    /// Replays.
    pub replay: u64,
    /// Not shoal datagrams.
    pub malformed: u64,
    /// Outside the clock window.
    pub stale: u64,
    /// Authenticated but refused by the membership layer.
    pub protocol: u64,
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent listens on the socket.
    #[error("cannot reach the agent at {path}: {source} (is `shoal agent` running with this data dir? see --data-dir, --agent, SHOAL_DATA_DIR)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    /// The agent's answer was not understood.
    #[error("unexpected answer from the agent: {0}")]
    Decode(#[from] serde_json::Error),
    /// The agent closed without answering.
    #[error("the agent closed the connection without answering")]
    Closed,
}

/// Sends one request and waits up to `timeout` for the answer.
///
/// # Errors
/// No agent, or a broken or garbled exchange.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut r = BufReader::new(s);
    let mut answer = String::new();
    if r.read_line(&mut answer)? == 0 {
        return Err(ClientError::Closed);
    }
    Ok(serde_json::from_str(&answer)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_precedence() {
        let env = |k: &str| match k {
            "SHOAL_AGENT" => Some("/env/agent.sock".to_owned()),
            "SHOAL_DATA_DIR" => Some("/env/data".to_owned()),
            _ => None,
        };
        let none = |_: &str| None;
        assert_eq!(
            resolve_socket(Some(Path::new("/a.sock")), None, env),
            PathBuf::from("/a.sock")
        );
        assert_eq!(
            resolve_socket(None, Some(Path::new("/d")), env),
            PathBuf::from("/env/agent.sock")
        );
        assert_eq!(
            resolve_socket(None, Some(Path::new("/d")), none),
            PathBuf::from("/d/agent.sock")
        );
        let only_dir = |k: &str| (k == "SHOAL_DATA_DIR").then(|| "/env/data".to_owned());
        assert_eq!(
            resolve_socket(None, None, only_dir),
            PathBuf::from("/env/data/agent.sock")
        );
        assert_eq!(
            resolve_socket(None, None, none),
            PathBuf::from("/var/lib/shoal/agent.sock")
        );
    }

    #[test]
    fn wire_shapes() {
        let r: Request = serde_json::from_str(r#"{"op":"nodes"}"#).unwrap();
        assert_eq!(r, Request::Nodes { bandwidth: false });
        assert_eq!(
            serde_json::to_string(&Request::Leave).unwrap(),
            r#"{"op":"leave"}"#
        );
        let e = Response::Error {
            message: "x".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), e);
    }
}
