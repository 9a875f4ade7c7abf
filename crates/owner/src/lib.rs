//! The owner comes first. Two pure pieces, no clock and no I/O inside:
//!
//! - [`policy`]: the owner's rules, written as CEL expressions in the
//!   agent's TOML config (HTCondor's START / SUSPEND / CONTINUE / PREEMPT,
//!   plus a CPU throttle), compiled and checked at load, evaluated over the
//!   machine's current figures.
//! - [`slots`]: one state machine per guest slot
//!   (owner → unclaimed → claimed → suspended → evicting). Events in
//!   (a tick with the policy's verdicts, a claim, a release), commands out
//!   (freeze, thaw, throttle, terminate, kill). The agent's shell carries the
//!   commands out on cgroups.
//!
//! [`cpu`] turns `/proc/stat` and cgroup counters into the owner's own CPU
//! use (everything outside the guests).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod activity;
pub mod cpu;
pub mod policy;
pub mod slots;

pub use policy::{Policy, PolicyConfig, PolicyError, Vars, Verdict};
pub use slots::{Command, Force, Refusal, Released, SlotState, Slots};
