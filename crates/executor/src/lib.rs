//! The privileged side of shoal.
//!
//! Everything that needs root or kernel features (namespaces, mounts,
//! cgroups, the freezer) lives in this crate behind narrow functions, so
//! the rest of the workspace is testable without root: the start-up probes
//! (can this machine create the namespaces and the cgroups a workspace
//! needs?), the cgroup managers for v1 and v2 (the resource quantum, the
//! freezer, kill and accounting) behind the [`CgroupManager`] trait with a
//! recording fake, the workspaces themselves ([`workspace`]), warm slots
//! that start tasks in cgroups made ahead of time ([`warm`]), and running
//! a closure as another user ([`creds`]), and the tmpfs for task scratch
//! in memory ([`memfs`]).
#![deny(missing_docs)]

pub mod cgroup;
pub mod creds;
pub mod memfs;
pub mod namespaces;
pub mod warm;
pub mod workspace;

pub use cgroup::{
    open as open_cgroups, probe_cgroups, CgroupError, CgroupManager, CgroupVersion, Limits, Usage,
};
pub use namespaces::{probe_namespaces, NamespaceError};
