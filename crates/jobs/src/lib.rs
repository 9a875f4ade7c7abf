//! Batch jobs (`shoal submit`), the pure parts: no clock, no I/O.
//!
//! - [`spec`]: the job file (`job.toml`, or the flags of `shoal submit`)
//!   parsed and checked, every error with its line and column.
//! - [`dag`]: dependencies between jobs (`after = ["build"]`): unknown
//!   names and cycles are refused at submit; a job becomes runnable when
//!   everything it follows has succeeded.
//! - [`attempt`]: one task's attempts under fencing ids, so that a late
//!   result from an executor declared down is refused and nothing commits
//!   twice.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod attempt;
pub mod dag;
pub mod spec;

pub use spec::{JobSpec, SpecError};
