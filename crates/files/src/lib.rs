//! A task's file changes, from the executor's overlay to the submitter's
//! tree.
//!
//! ```text
//!  executor: overlay upper dir ──ChangeSet::from_upper──▶ ChangeSet (serde)
//!                                                            │ (wire)
//!  submitter: tree ◀──apply (staged + journal, then renames)─┘
//!             (large files: Commit::begin, feed their bytes, finish)
//!                  ◀──recover (after a crash: roll the journal forward,
//!                      or drop an unfinished staging)
//! ```
//!
//! A change set is applied all or nothing: every new content is first
//! written under a staging directory inside the tree (same filesystem, so
//! the final step is renames), then a journal listing every step is made
//! durable, then the steps run. A crash before the journal is sealed
//! leaves the tree untouched (recovery removes the staging); a crash after
//! it is rolled forward by [`recover`], whose steps are idempotent.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod apply;
mod changes;

pub use apply::{apply, is_internal, recover, ApplyError, Commit, STAGING_PREFIX};
pub use changes::{Change, ChangeError, ChangeSet, Entry};
