//! The messages.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shoal_files::ChangeSet;

use crate::image::ImageEntry;

/// A content hash (SHA-256).
pub type Hash = [u8; 32];

/// One entry of the submitter's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    /// A regular file.
    File {
        /// Content hash.
        hash: Hash,
        /// Permission bits.
        mode: u32,
        /// Size in bytes.
        size: u64,
    },
    /// A directory.
    Dir {
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: PathBuf,
    },
}

/// A path relative to the tree root and what is there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Relative path (no `..`).
    pub path: PathBuf,
    /// What it is.
    pub node: Node,
}

/// When the task's file changes come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Commit {
    /// Whatever the exit status.
    Always,
    /// Only when it exits 0 (the default).
    Success,
    /// Never.
    Never,
}

/// Resource requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// CPUs' worth of time.
    pub cpus: Option<f64>,
    /// Memory limit, bytes.
    pub memory_bytes: Option<u64>,
    /// Process limit.
    pub pids: Option<u32>,
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Unique id of this task.
    pub task_id: String,
    /// The command and its arguments (bytes: any OS string).
    pub argv: Vec<Vec<u8>>,
    /// Environment (already filtered by the submitter).
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// The submitter's working directory: the tree root, and the working
    /// directory inside the workspace.
    pub cwd: PathBuf,
    /// The tree under `cwd`.
    pub tree: Vec<TreeEntry>,
    /// Resource requests.
    pub resources: Resources,
    /// Host network instead of loopback only.
    pub net_host: bool,
    /// Commit policy.
    pub commit: Commit,
    /// A pseudo-terminal of this size (rows, columns) for the command's
    /// stdin, stdout and stderr (`shoal run -t`); `None`: pipes.
    pub tty: Option<(u16, u16)>,
    /// The software environment: an image by id (`--image`); `None`: the
    /// executor's own system directories.
    pub image: Option<ImageRef>,
    /// A batch attempt: when the link to its submitter breaks, the task
    /// runs on and its result is kept for a while, for the submitter to
    /// collect with [`ToExec::Reattach`] after a restart. Otherwise (`shoal
    /// run`) the task dies with its submitter.
    pub detach: bool,
    /// The submitter has no input for the task (its own stdin is
    /// `/dev/null`, or a terminal without `-t`, or it is a batch
    /// attempt): the task's stdin is
    /// `/dev/null` as well, no pipe is made for it, and no `StdinEof`
    /// follows.
    pub no_input: bool,
}

/// An image a task runs in, by id. The executor asks for its manifest
/// ([`FromExec::NeedImage`]) only when it has not unpacked it yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// The hash of its manifest ([`crate::image::id_of`]).
    pub id: Hash,
    /// Where it came from on the submitter (for messages).
    pub name: String,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Exited with a code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

/// Submitter (or relay) to executor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToExec {
    /// The task; the first message.
    Start(TaskSpec),
    /// Instead of `Start`: the submitter of a detached attempt is back for
    /// its result. The executor waits for the task to end, then sends the
    /// output from these offsets on, the changes and the exit status; or
    /// [`FromExec::Unknown`] when it has no such attempt.
    Reattach {
        /// The attempt's task id.
        task_id: String,
        /// Bytes of stdout the submitter already has.
        stdout_from: u64,
        /// Bytes of stderr the submitter already has.
        stderr_from: u64,
    },
    /// A file's content the executor asked for.
    Blob {
        /// Its hash.
        hash: Hash,
        /// The content.
        data: Vec<u8>,
    },
    /// The manifest of the task's image, when the executor asked for it.
    Image(Vec<ImageEntry>),
    /// Bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// End of stdin.
    StdinEof,
    /// Deliver this signal to the command.
    Signal(i32),
    /// The submitter's terminal changed size (rows, columns).
    Resize(u16, u16),
}

/// Executor to submitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromExec {
    /// The executor lacks the task's image: send its manifest
    /// ([`ToExec::Image`]) before the contents.
    NeedImage,
    /// Contents the executor does not have cached (empty: none).
    Need(Vec<Hash>),
    /// The command started.
    Started {
        /// Executor node name.
        node: String,
    },
    /// Output on stdout.
    Stdout(Vec<u8>),
    /// Output on stderr.
    Stderr(Vec<u8>),
    /// The task's file changes (sent before `Exit` when they are to be
    /// committed). The contents of its streamed files follow as
    /// [`FromExec::Content`].
    Changes(ChangeSet),
    /// The end.
    Exit {
        /// How the command ended.
        status: Status,
        /// The kernel OOM-killed something in the task's memory limit.
        oom: bool,
        /// CPU seconds the task used (its cgroup).
        cpu_s: f64,
        /// Its peak memory, bytes, where the kernel records it.
        mem_peak_bytes: Option<u64>,
    },
    /// The task could not run; the text says why. `code` is the exit status
    /// the submitter should use (127: command not found, 2: bad request,
    /// 125: the executor failed).
    Failed {
        /// Suggested exit status.
        code: i32,
        /// Why.
        message: String,
    },
    /// Answer to a `Reattach`: no such attempt here (it was never
    /// detached, its result expired, or this agent restarted).
    Unknown,
    /// The executor's owner wants the machine back (or it refused the
    /// task for that reason before starting it): nothing of this attempt
    /// stands; run the task elsewhere. Counts against no retry budget.
    Evicted {
        /// The executor.
        node: String,
        /// Why, for `--verbose`.
        reason: String,
    },
    /// The next piece of the streamed files' contents of the last
    /// `Changes` (their bytes one after another, in its order; all of
    /// them come before `Exit`).
    Content(Vec<u8>),
}

impl FromExec {
    /// Whether this is a task's last message (`Exit`, `Failed` or
    /// `Evicted`): its executor then waits for the link's next task.
    pub fn ends_task(&self) -> bool {
        matches!(
            self,
            Self::Exit { .. } | Self::Failed { .. } | Self::Evicted { .. }
        )
    }

    /// Whether `bytes`, one whole encoded message, is a task's last
    /// ([`FromExec::ends_task`]). Only those decode: the first byte is the
    /// variant (postcard: a varint), so output and contents, most of a
    /// link's bytes, are passed by without a copy.
    pub fn encoded_ends_task(bytes: &[u8]) -> bool {
        /// `Exit`, `Failed` and `Evicted` (pinned by a test).
        const LAST: [u8; 3] = [6, 7, 9];
        bytes.first().is_some_and(|v| LAST.contains(v))
            && postcard::from_bytes::<Self>(bytes).is_ok_and(|m| m.ends_task())
    }
}
