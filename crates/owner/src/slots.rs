//! One state machine per guest slot, pure: time comes in with each event,
//! the policy's verdicts come in with each tick, and commands come out for
//! the shell to carry out on the task's cgroup.
//!
//! ```text
//!          start                 claim                suspend
//!  Owner ────────▶ Unclaimed ──────────▶ Claimed ──────────────▶ Suspended
//!        ◀────────           ◀──────────  │  ▲ ◀────────────────   │
//!         !start             release      │  │ continue            │
//!                                 evict   ▼  │ throttle on/off     │ evict
//!                               Evicting ◀───┴─────────────────────┘
//!                  (Terminate; after the grace period, Kill; on release:
//!                   Released::Evicted, so the submitter re-runs it)
//! ```
//!
//! A claim is accepted only by an unclaimed slot: a node whose owner is
//! busy takes no new guests.

use crate::policy::{TaskVars, Verdict};

/// The owner's override (`shoal owner busy|idle|auto`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Force {
    /// Follow the policy.
    #[default]
    Auto,
    /// As if the owner were at the machine: no starts, freeze, no
    /// continue (eviction still follows the policy).
    Busy,
    /// As if the owner were away: start, continue, no suspend, no throttle.
    Idle,
}

impl Force {
    /// The verdict after the override.
    pub fn apply(self, v: Verdict) -> Verdict {
        match self {
            Force::Auto => v,
            Force::Busy => Verdict {
                start: false,
                throttle: v.throttle,
                suspend: true,
                cont: false,
            },
            Force::Idle => Verdict {
                start: true,
                throttle: false,
                suspend: false,
                cont: true,
            },
        }
    }

    /// `auto`, `busy` or `idle`.
    pub fn name(self) -> &'static str {
        match self {
            Force::Auto => "auto",
            Force::Busy => "busy",
            Force::Idle => "idle",
        }
    }
}

/// Where one slot is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// The owner's: no guest may start.
    Owner,
    /// Free for a guest.
    Unclaimed,
    /// A guest runs (capped when `throttled`).
    Claimed {
        /// The task.
        task: String,
        /// When it was claimed.
        claimed_ms: u64,
        /// Capped at the policy's `throttle_cpus`.
        throttled: bool,
    },
    /// A guest is frozen.
    Suspended {
        /// The task.
        task: String,
        /// When it was claimed.
        claimed_ms: u64,
        /// When it was frozen.
        since_ms: u64,
        /// Its cap, kept while frozen.
        throttled: bool,
    },
    /// A guest is being evicted: terminated, killed after the grace period.
    Evicting {
        /// The task.
        task: String,
        /// When the eviction began.
        since_ms: u64,
        /// SIGKILL sent.
        killed: bool,
    },
}

impl SlotState {
    /// The task in this slot, if any.
    pub fn task(&self) -> Option<&str> {
        match self {
            SlotState::Owner | SlotState::Unclaimed => None,
            SlotState::Claimed { task, .. }
            | SlotState::Suspended { task, .. }
            | SlotState::Evicting { task, .. } => Some(task),
        }
    }

    /// `owner`, `unclaimed`, `claimed`, `throttled`, `suspended`, `evicting`.
    pub fn name(&self) -> &'static str {
        match self {
            SlotState::Owner => "owner",
            SlotState::Unclaimed => "unclaimed",
            SlotState::Claimed {
                throttled: true, ..
            } => "throttled",
            SlotState::Claimed { .. } => "claimed",
            SlotState::Suspended { .. } => "suspended",
            SlotState::Evicting { .. } => "evicting",
        }
    }
}

/// What the shell is to do to a task's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Freeze every process of the task.
    Freeze(String),
    /// Thaw them.
    Thaw(String),
    /// Cap the task's CPU at the policy's `throttle_cpus`.
    Throttle(String),
    /// Lift the cap (back to the task's own quantum).
    Unthrottle(String),
    /// SIGTERM every process of the task.
    Terminate(String),
    /// SIGKILL every process of the task.
    Kill(String),
}

/// Why a claim was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The owner is using the machine (or the policy says no guests now).
    #[error("the owner is using this machine")]
    OwnerBusy,
    /// Every slot has a guest.
    #[error("no free guest slot")]
    NoFreeSlot,
    /// A task with this id holds a slot already.
    #[error("this task already holds a slot")]
    Duplicate,
}

/// How a task left its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// It ended by itself (its result stands).
    Finished,
    /// It was evicted: discard its result and run it elsewhere.
    Evicted,
}

/// Every slot of one machine.
#[derive(Debug, Clone)]
pub struct Slots {
    slots: Vec<SlotState>,
    force: Force,
    last: Verdict,
}

impl Slots {
    /// `n` slots, all the owner's until the first tick says otherwise.
    pub fn new(n: usize) -> Self {
        Self {
            slots: vec![SlotState::Owner; n],
            force: Force::Auto,
            last: Verdict::default(),
        }
    }

    /// Sets the owner's override; it takes effect at the next tick.
    pub fn set_force(&mut self, f: Force) {
        self.force = f;
    }

    /// The override in force.
    pub fn force(&self) -> Force {
        self.force
    }

    /// The verdict of the last tick, after the override.
    pub fn verdict(&self) -> Verdict {
        self.last
    }

    /// Every slot.
    pub fn states(&self) -> &[SlotState] {
        &self.slots
    }

    /// The slot of `task`.
    pub fn state_of(&self, task: &str) -> Option<&SlotState> {
        self.slots.iter().find(|s| s.task() == Some(task))
    }

    /// Slots free for a guest now.
    pub fn free(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| **s == SlotState::Unclaimed)
            .count()
    }

    /// Re-evaluates every slot at `now_ms` with the policy's node-wide
    /// `verdict` (before the override), `evict` deciding per task and
    /// `grace_ms` between SIGTERM and SIGKILL.
    pub fn tick(
        &mut self,
        now_ms: u64,
        verdict: Verdict,
        evict: impl Fn(&str, &TaskVars) -> bool,
        grace_ms: u64,
    ) -> Vec<Command> {
        let v = self.force.apply(verdict);
        self.last = v;
        let mut out = Vec::new();
        let secs = |from: u64| now_ms.saturating_sub(from) as f64 / 1000.0;
        for s in &mut self.slots {
            let next = match s {
                SlotState::Owner if v.start => Some(SlotState::Unclaimed),
                SlotState::Unclaimed if !v.start => Some(SlotState::Owner),
                SlotState::Owner | SlotState::Unclaimed => None,
                SlotState::Claimed {
                    task,
                    claimed_ms,
                    throttled,
                } => {
                    let tv = TaskVars {
                        suspended_s: 0.0,
                        running_s: secs(*claimed_ms),
                    };
                    if evict(task, &tv) {
                        out.push(Command::Terminate(task.clone()));
                        Some(SlotState::Evicting {
                            task: task.clone(),
                            since_ms: now_ms,
                            killed: false,
                        })
                    } else if v.suspend {
                        out.push(Command::Freeze(task.clone()));
                        Some(SlotState::Suspended {
                            task: task.clone(),
                            claimed_ms: *claimed_ms,
                            since_ms: now_ms,
                            throttled: *throttled,
                        })
                    } else if v.throttle != *throttled {
                        out.push(if v.throttle {
                            Command::Throttle(task.clone())
                        } else {
                            Command::Unthrottle(task.clone())
                        });
                        *throttled = v.throttle;
                        None
                    } else {
                        None
                    }
                }
                SlotState::Suspended {
                    task,
                    claimed_ms,
                    since_ms,
                    throttled,
                } => {
                    let tv = TaskVars {
                        suspended_s: secs(*since_ms),
                        running_s: secs(*claimed_ms),
                    };
                    if evict(task, &tv) {
                        // A frozen process cannot act on SIGTERM: thaw it.
                        out.push(Command::Terminate(task.clone()));
                        out.push(Command::Thaw(task.clone()));
                        Some(SlotState::Evicting {
                            task: task.clone(),
                            since_ms: now_ms,
                            killed: false,
                        })
                    } else if v.cont && !v.suspend {
                        out.push(Command::Thaw(task.clone()));
                        if v.throttle != *throttled {
                            out.push(if v.throttle {
                                Command::Throttle(task.clone())
                            } else {
                                Command::Unthrottle(task.clone())
                            });
                        }
                        Some(SlotState::Claimed {
                            task: task.clone(),
                            claimed_ms: *claimed_ms,
                            throttled: v.throttle,
                        })
                    } else {
                        None
                    }
                }
                SlotState::Evicting { .. } => None,
            };
            if let Some(n) = next {
                *s = n;
            }
            if let SlotState::Evicting {
                task,
                since_ms,
                killed,
            } = s
            {
                if !*killed && now_ms >= since_ms.saturating_add(grace_ms) {
                    out.push(Command::Kill(task.clone()));
                    *killed = true;
                }
            }
        }
        out
    }

    /// A guest asks for a slot at `now_ms`. On success, the commands to
    /// carry out before it starts (a throttle in force).
    ///
    /// # Errors
    /// The owner is busy, every slot is taken, or the task holds one.
    pub fn claim(&mut self, task: &str, now_ms: u64) -> Result<Vec<Command>, Refusal> {
        if self.state_of(task).is_some() {
            return Err(Refusal::Duplicate);
        }
        let Some(s) = self.slots.iter_mut().find(|s| **s == SlotState::Unclaimed) else {
            return Err(if self.slots.contains(&SlotState::Owner) {
                Refusal::OwnerBusy
            } else {
                Refusal::NoFreeSlot
            });
        };
        let throttled = self.last.throttle;
        *s = SlotState::Claimed {
            task: task.to_owned(),
            claimed_ms: now_ms,
            throttled,
        };
        Ok(if throttled {
            vec![Command::Throttle(task.to_owned())]
        } else {
            Vec::new()
        })
    }

    /// `task` ended (by itself or killed). `None` when it held no slot.
    pub fn release(&mut self, task: &str) -> Option<Released> {
        let start = self.last.start;
        let s = self.slots.iter_mut().find(|s| s.task() == Some(task))?;
        let how = if matches!(s, SlotState::Evicting { .. }) {
            Released::Evicted
        } else {
            Released::Finished
        };
        *s = if start {
            SlotState::Unclaimed
        } else {
            SlotState::Owner
        };
        Some(how)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    const AWAY: Verdict = Verdict {
        start: true,
        throttle: false,
        suspend: false,
        cont: true,
    };
    const BACK: Verdict = Verdict {
        start: false,
        throttle: false,
        suspend: true,
        cont: false,
    };

    fn after(secs: f64) -> impl Fn(&str, &TaskVars) -> bool {
        move |_, t| t.suspended_s >= secs
    }

    #[test]
    fn the_owner_returns_then_leaves() {
        let mut s = Slots::new(2);
        assert_eq!(s.claim("t1", 0), Err(Refusal::OwnerBusy));
        assert!(s.tick(0, AWAY, after(600.0), 10_000).is_empty());
        assert_eq!(s.free(), 2);
        assert_eq!(s.claim("t1", 0), Ok(vec![]));
        assert_eq!(s.claim("t1", 0), Err(Refusal::Duplicate));
        // Input: freeze at once, no new guests.
        let c = s.tick(100, BACK, after(600.0), 10_000);
        assert_eq!(c, vec![Command::Freeze("t1".into())]);
        assert_eq!(s.claim("t2", 100), Err(Refusal::OwnerBusy));
        assert_eq!(s.state_of("t1").map(SlotState::name), Some("suspended"));
        // Away again: thaw.
        let c = s.tick(5_000, AWAY, after(600.0), 10_000);
        assert_eq!(c, vec![Command::Thaw("t1".into())]);
        assert_eq!(s.release("t1"), Some(Released::Finished));
        assert_eq!(s.release("t1"), None);
        assert_eq!(s.free(), 2);
    }

    #[test]
    fn a_long_suspension_evicts_then_kills_after_the_grace() {
        let mut s = Slots::new(1);
        s.tick(0, AWAY, after(600.0), 10_000);
        s.claim("t", 0).unwrap();
        s.tick(1_000, BACK, after(600.0), 10_000);
        assert!(s.tick(600_999, BACK, after(600.0), 10_000).is_empty());
        let c = s.tick(601_000, BACK, after(600.0), 10_000);
        assert_eq!(
            c,
            vec![Command::Terminate("t".into()), Command::Thaw("t".into())]
        );
        assert!(s.tick(610_999, BACK, after(600.0), 10_000).is_empty());
        assert_eq!(
            s.tick(611_000, BACK, after(600.0), 10_000),
            vec![Command::Kill("t".into())]
        );
        assert!(s.tick(612_000, BACK, after(600.0), 10_000).is_empty());
        assert_eq!(s.release("t"), Some(Released::Evicted));
        assert_eq!(s.states(), &[SlotState::Owner]);
    }

    #[test]
    fn forcing_overrides_the_policy() {
        let mut s = Slots::new(1);
        s.set_force(Force::Idle);
        s.tick(0, BACK, after(600.0), 0);
        s.claim("t", 0).unwrap();
        s.set_force(Force::Busy);
        assert_eq!(
            s.tick(1, AWAY, after(600.0), 0),
            vec![Command::Freeze("t".into())]
        );
        s.set_force(Force::Auto);
        assert_eq!(
            s.tick(2, AWAY, after(600.0), 0),
            vec![Command::Thaw("t".into())]
        );
    }

    #[test]
    fn throttling_follows_the_verdict_and_survives_a_freeze() {
        let mut s = Slots::new(1);
        let hot = Verdict {
            throttle: true,
            ..AWAY
        };
        s.tick(0, hot, after(600.0), 0);
        assert_eq!(s.claim("t", 0), Ok(vec![Command::Throttle("t".into())]));
        s.tick(1, BACK, after(600.0), 0);
        // Thawed into a cool machine: the cap goes too.
        assert_eq!(
            s.tick(2, AWAY, after(600.0), 0),
            vec![Command::Thaw("t".into()), Command::Unthrottle("t".into())]
        );
        assert_eq!(
            s.tick(3, hot, after(600.0), 0),
            vec![Command::Throttle("t".into())]
        );
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Tick {
            dt: u64,
            v: (bool, bool, bool, bool),
        },
        Claim,
        Release(usize),
        Force(u8),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            4 => (0u64..400_000, any::<(bool, bool, bool, bool)>())
                .prop_map(|(dt, v)| Ev::Tick { dt, v }),
            2 => Just(Ev::Claim),
            2 => (0usize..8).prop_map(Ev::Release),
            1 => (0u8..3).prop_map(Ev::Force),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Under any sequence of owner activity, claims, releases and
        /// overrides: no guest runs while its slot is suspended, a frozen
        /// task is only ever in a suspended slot, an evicted task is killed
        /// once its grace is over, and every eviction ends with the task
        /// reported as evicted (so it runs again or fails to its submitter).
        #[test]
        fn invariants_hold(events in proptest::collection::vec(ev(), 1..120), n in 1usize..4) {
            const GRACE: u64 = 10_000;
            let mut s = Slots::new(n);
            let mut now = 0u64;
            let mut next_id = 0u32;
            let mut frozen: BTreeSet<String> = BTreeSet::new();
            let mut termed: BTreeMap<String, u64> = BTreeMap::new();
            let mut killed: BTreeSet<String> = BTreeSet::new();
            let mut held: Vec<String> = Vec::new();
            let apply = |cmds: Vec<Command>, held: &[String], frozen: &mut BTreeSet<String>,
                             termed: &mut BTreeMap<String, u64>, killed: &mut BTreeSet<String>, now: u64|
                -> Result<(), TestCaseError> {
                for c in cmds {
                    match c {
                        Command::Freeze(t) => { prop_assert!(held.contains(&t)); prop_assert!(frozen.insert(t)); }
                        Command::Thaw(t) => { prop_assert!(held.contains(&t)); prop_assert!(frozen.remove(&t)); }
                        Command::Throttle(t) | Command::Unthrottle(t) => prop_assert!(held.contains(&t)),
                        Command::Terminate(t) => { prop_assert!(held.contains(&t)); prop_assert!(termed.insert(t, now).is_none()); }
                        Command::Kill(t) => {
                            let at = termed.get(&t).copied();
                            prop_assert!(at.is_some_and(|at| now >= at + GRACE), "kill before the grace");
                            prop_assert!(killed.insert(t));
                        }
                    }
                }
                Ok(())
            };
            for e in events {
                match e {
                    Ev::Tick { dt, v } => {
                        now += dt;
                        let verdict = Verdict { start: v.0, throttle: v.1, suspend: v.2, cont: v.3 };
                        let cmds = s.tick(now, verdict, |_, t| t.suspended_s >= 600.0, GRACE);
                        apply(cmds, &held, &mut frozen, &mut termed, &mut killed, now)?;
                        let v = s.verdict();
                        for st in s.states() {
                            match st {
                                // Freeze at once: after a tick that says
                                // suspend, nothing claimed still runs.
                                SlotState::Claimed { .. } => prop_assert!(!v.suspend),
                                SlotState::Evicting { task, .. } => {
                                    let at = termed[task];
                                    prop_assert_eq!(killed.contains(task), now >= at + GRACE);
                                }
                                SlotState::Owner => prop_assert!(!v.start),
                                SlotState::Unclaimed => prop_assert!(v.start),
                                SlotState::Suspended { .. } => {}
                            }
                        }
                    }
                    Ev::Claim => {
                        let id = format!("t{next_id}");
                        next_id += 1;
                        let free_before = s.free();
                        match s.claim(&id, now) {
                            Ok(cmds) => {
                                prop_assert!(free_before > 0 && s.verdict().start);
                                held.push(id);
                                apply(cmds, &held, &mut frozen, &mut termed, &mut killed, now)?;
                            }
                            Err(_) => prop_assert_eq!(free_before, 0),
                        }
                    }
                    Ev::Release(i) if !held.is_empty() => {
                        let t = held.remove(i % held.len());
                        let how = s.release(&t);
                        let was_termed = termed.contains_key(&t);
                        prop_assert_eq!(how, Some(if was_termed { Released::Evicted } else { Released::Finished }));
                        // A frozen task that ends (killed from outside) is
                        // no longer frozen.
                        frozen.remove(&t);
                    }
                    Ev::Release(_) => {}
                    Ev::Force(f) => s.set_force([Force::Auto, Force::Busy, Force::Idle][usize::from(f)]),
                }
                // Frozen exactly when suspended.
                for st in s.states() {
                    if let Some(t) = st.task() {
                        let is_frozen = frozen.contains(t);
                        prop_assert_eq!(is_frozen, matches!(st, SlotState::Suspended { .. }), "{:?}", st);
                    }
                }
                prop_assert_eq!(held.len(), s.states().iter().filter(|s| s.task().is_some()).count());
            }
        }
    }
}
