//! The privileged side of shoal.
//!
//! Everything that needs root or kernel features (namespaces, mounts,
//! cgroups, the freezer) lives in this crate behind narrow functions, so
//! the rest of the workspace is testable without root. Today it holds the
//! start-up probes of the formation issue: can this machine create the
//! namespaces and the cgroups a workspace needs?
#![deny(missing_docs)]

pub mod cgroup;
pub mod namespaces;

pub use cgroup::{probe_cgroups, CgroupError, CgroupVersion};
pub use namespaces::{probe_namespaces, NamespaceError};
