//! The owner's side of the agent, a thin shell around `shoal-owner`: it
//! measures the owner's activity, ticks the pure slot machine, and carries
//! its commands out on the guests' cgroups.
//!
//! ```text
//!  a read on a terminal (its access time) or an input device (inotify) ───┐
//!  every 250 ms: /proc/stat − guests' cgroup CPU, load, memory, clock ─────┤
//!  `shoal owner busy|idle|auto`, SIGHUP / `shoal owner reload` ────────────┤
//!                                                                          ▼
//!                   Policy::verdict ─▶ Slots::tick ─▶ freeze / thaw / cap / SIGTERM / SIGKILL
//! ```
//!
//! Every task the executor runs is registered here (for `shoal ps`); guest
//! tasks (from other nodes) also claim a slot, and a slot being evicted
//! makes the executor report the task as evicted instead of its result.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_control::{OwnerReport, PsReport, TaskInfo, VerdictInfo};
use shoal_executor::cgroup::{CgroupManager, GuestClass};
use shoal_owner::activity::{self, Logind};
use shoal_owner::cpu::{self, Sample};
use shoal_owner::{Command, Force, Policy, Refusal, Released, SlotState, Slots, Vars};
use tokio::sync::Notify;

/// How often the policy is evaluated without owner input.
const TICK: Duration = Duration::from_millis(250);
/// The window the owner's CPU share is measured over.
const CPU_WINDOW: Duration = Duration::from_secs(1);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug)]
struct Task {
    guest: bool,
    command: String,
    since: Instant,
    cgroup: Option<String>,
    cpus: Option<f64>,
}

#[derive(Debug)]
struct Inner {
    slots: Slots,
    policy: Policy,
    vars: Vars,
    reload_error: Option<String>,
    samples: Vec<(Instant, Sample)>,
    tasks: HashMap<String, Task>,
}

/// The owner's policy in force on this machine, and every task here.
#[derive(Debug)]
pub struct Owner {
    node: String,
    inner: Mutex<Inner>,
    cgroups: Option<Arc<dyn CgroupManager>>,
    guest_class: Option<GuestClass>,
    wake: Notify,
    /// Unix ms of the latest owner input seen (0: none yet).
    last_input_ms: AtomicU64,
    /// The terminals' newest access time, Unix seconds, as the input
    /// watcher last read it (0: no watcher, or no terminal).
    newest_atime_s: AtomicU64,
    /// logind's view of the sessions, where a logind answers.
    logind: Mutex<Option<Logind>>,
    /// One carrier of commands at a time, so a thaw never overtakes the
    /// freeze before it.
    apply: tokio::sync::Mutex<()>,
    config_path: Option<PathBuf>,
    epoch: Instant,
    ticks_per_s: f64,
}

/// A task registered with the owner's side; releases its slot when
/// dropped (or through [`Claim::finish`]).
#[derive(Debug)]
pub struct Claim {
    owner: Arc<Owner>,
    id: String,
    done: bool,
}

impl Owner {
    /// The owner's side of a node with `slots` guest slots under `policy`.
    /// Puts the guests' parent cgroup at the idle class at once.
    pub fn new(
        node: &str,
        slots: usize,
        policy: Policy,
        cgroups: Option<Arc<dyn CgroupManager>>,
        config_path: Option<PathBuf>,
    ) -> Arc<Self> {
        let guest_class = cgroups.as_ref().and_then(|m| match m.guest_class() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "guests not at the idle CPU class");
                None
            }
        });
        let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .map_or(100.0, |t| t as f64);
        Arc::new(Self {
            node: node.to_owned(),
            inner: Mutex::new(Inner {
                slots: Slots::new(slots),
                policy,
                vars: Vars::default(),
                reload_error: None,
                samples: Vec::new(),
                tasks: HashMap::new(),
            }),
            cgroups,
            guest_class,
            wake: Notify::new(),
            last_input_ms: AtomicU64::new(0),
            newest_atime_s: AtomicU64::new(0),
            logind: Mutex::new(None),
            apply: tokio::sync::Mutex::new(()),
            config_path,
            epoch: Instant::now(),
            ticks_per_s,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Starts the activity watcher, the policy loop and the SIGHUP
    /// handler.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("owner-input".into())
            .spawn(move || watch_input(&me))
        {
            tracing::warn!(error = %e, "owner input not watched (atime only)");
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.tick().await;
                tokio::select! {
                    () = tokio::time::sleep(TICK) => {}
                    () = me.wake.notified() => {}
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move { watch_logind(&me).await });
        let me = self.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                let _ = me.reload();
                me.wake.notify_one();
            }
        });
    }

    /// The machine's figures now.
    fn measure(&self, inner: &mut Inner) -> Vars {
        let now = Instant::now();
        let mut v = Vars {
            guests: inner.tasks.values().filter(|t| t.guest).count() as f64,
            ..Vars::default()
        };
        // Input: the terminals' newest access time as the watcher last saw
        // it (the kernel moves it at most every 8 s: coarse, but it covers
        // input before this agent started), and the last input the watcher
        // saw happen. Without a watcher, the devices are read here.
        let newest = self.newest_atime_s.load(Ordering::Relaxed);
        let atime_idle = if newest > 0 {
            Some((unix_ms() / 1000).saturating_sub(newest) as f64)
        } else {
            shoal_facts::probe::owner_idle().map(|s| s as f64)
        };
        let seen = self.last_input_ms.load(Ordering::Relaxed);
        let input_idle = (seen > 0).then(|| unix_ms().saturating_sub(seen) as f64 / 1000.0);
        let logind = *self.logind.lock().unwrap_or_else(|e| e.into_inner());
        v.owner_idle_s = activity::owner_idle_s(atime_idle, input_idle, logind);
        if let Some((busy, total)) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| cpu::parse_proc_stat(&t))
        {
            let guest_s = self
                .cgroups
                .as_ref()
                .and_then(|m| m.parent_cpu_usec().ok())
                .map_or(0.0, |u| u as f64 / 1e6);
            let s = Sample {
                busy_s: busy as f64 / self.ticks_per_s,
                total_s: total as f64 / self.ticks_per_s,
                guest_s,
            };
            // Keep the newest sample at least a window old as the base.
            let keep_from = inner
                .samples
                .iter()
                .rposition(|(t, _)| now.duration_since(*t) >= CPU_WINDOW)
                .unwrap_or(0);
            inner.samples.drain(..keep_from);
            if let Some((_, base)) = inner.samples.first() {
                v.owner_cpu = cpu::owner_share(base, &s);
            }
            inner.samples.push((now, s));
        }
        if let Some(l) = shoal_facts::probe::load() {
            v.load1 = f64::from(l[0]);
        }
        if let Some((total, avail)) = shoal_facts::probe::memory() {
            v.mem_total_bytes = total as f64;
            v.mem_avail_bytes = avail as f64;
        }
        let (hour, weekday) = local_hour_weekday();
        v.hour = hour;
        v.weekday = weekday;
        v
    }

    /// Evaluates the policy now and carries out what changed.
    pub async fn tick(&self) {
        let cmds = {
            let mut g = self.lock();
            let vars = self.measure(&mut g);
            g.vars = vars;
            let verdict = g.policy.verdict(&vars);
            let grace_ms = g.policy.evict_grace_s * 1000;
            let now = self.now_ms();
            let Inner { slots, policy, .. } = &mut *g;
            let cmds = slots.tick(now, verdict, |_, t| policy.evict(&vars, t), grace_ms);
            self.resolve(&g, cmds)
        };
        self.carry_out(cmds).await;
    }

    /// Pairs each command with the task's cgroup and quantum; commands for
    /// a task whose cgroup is not made yet are dropped (its [`Claim::attach`]
    /// applies the slot's state when it is).
    fn resolve(&self, g: &Inner, cmds: Vec<Command>) -> Vec<(Command, String, Option<f64>, f64)> {
        let cap = g.policy.throttle_cpus;
        cmds.into_iter()
            .filter_map(|c| {
                let id = match &c {
                    Command::Freeze(t)
                    | Command::Thaw(t)
                    | Command::Throttle(t)
                    | Command::Unthrottle(t)
                    | Command::Terminate(t)
                    | Command::Kill(t) => t,
                };
                let t = g.tasks.get(id)?;
                Some((c.clone(), t.cgroup.clone()?, t.cpus, cap))
            })
            .collect()
    }

    async fn carry_out(&self, cmds: Vec<(Command, String, Option<f64>, f64)>) {
        if cmds.is_empty() {
            return;
        }
        let Some(m) = self.cgroups.clone() else {
            return;
        };
        let _one = self.apply.lock().await;
        let _ = tokio::task::spawn_blocking(move || {
            for (c, cg, own, cap) in cmds {
                let r = match &c {
                    Command::Freeze(_) => m.set_frozen(&cg, true),
                    Command::Thaw(_) => m.set_frozen(&cg, false),
                    Command::Throttle(_) => m.set_cpus(&cg, Some(own.map_or(cap, |o| o.min(cap)))),
                    Command::Unthrottle(_) => m.set_cpus(&cg, own),
                    Command::Terminate(_) => m.signal_all(&cg, nix::sys::signal::Signal::SIGTERM),
                    Command::Kill(_) => m.kill_all(&cg),
                };
                match r {
                    Ok(()) => tracing::info!(command = ?c, "owner policy"),
                    Err(e) => {
                        tracing::warn!(command = ?c, error = %e, "owner policy command failed")
                    }
                }
            }
        })
        .await;
    }

    /// Registers a task. A guest (from another node) also claims a slot,
    /// which the owner's policy may refuse.
    ///
    /// # Errors
    /// The owner is busy, or every slot is taken.
    pub fn claim(
        self: &Arc<Self>,
        id: &str,
        guest: bool,
        cpus: Option<f64>,
        command: String,
    ) -> Result<Claim, Refusal> {
        let mut g = self.lock();
        if g.tasks.contains_key(id) {
            return Err(Refusal::Duplicate);
        }
        if guest {
            // A throttle in force is applied when the cgroup is attached.
            let now = self.now_ms();
            g.slots.claim(id, now)?;
        }
        g.tasks.insert(
            id.to_owned(),
            Task {
                guest,
                command,
                since: Instant::now(),
                cgroup: None,
                cpus,
            },
        );
        Ok(Claim {
            owner: self.clone(),
            id: id.to_owned(),
            done: false,
        })
    }

    fn release(&self, id: &str) -> Released {
        let mut g = self.lock();
        g.tasks.remove(id);
        g.slots.release(id).unwrap_or(Released::Finished)
    }

    /// Sets the override and evaluates at once.
    pub async fn set_force(&self, f: Force) {
        self.lock().slots.set_force(f);
        tracing::info!(force = f.name(), "owner override");
        self.tick().await;
    }

    /// Re-reads the policy from the config file. A bad policy is refused
    /// and the one in force stays.
    ///
    /// # Errors
    /// The message naming what is wrong.
    pub fn reload(&self) -> Result<(), String> {
        let r = crate::config::load_file(self.config_path.as_deref())
            .map(|f| f.compiled_policy.unwrap_or_default());
        let mut g = self.lock();
        match r {
            Ok(p) => {
                tracing::info!("policy reloaded");
                g.policy = p;
                g.reload_error = None;
                Ok(())
            }
            Err(e) => {
                let m = e.to_string();
                tracing::error!(error = %m, "policy refused; the one in force stays");
                g.reload_error = Some(m.clone());
                Err(m)
            }
        }
    }

    /// Guest tasks registered now.
    pub fn guests(&self) -> u32 {
        self.lock().tasks.values().filter(|t| t.guest).count() as u32
    }

    /// Guest slots free now (none while the owner is busy).
    pub fn slots_free(&self) -> u32 {
        self.lock().slots.free() as u32
    }

    /// How many slots are in each state, for `shoal nodes`.
    pub fn slot_states(&self) -> shoal_facts::SlotCounts {
        let mut c = shoal_facts::SlotCounts::default();
        for s in self.lock().slots.states() {
            c.add(s.name());
        }
        c
    }

    /// `shoal owner`.
    pub fn report(&self) -> OwnerReport {
        let g = self.lock();
        let v = g.slots.verdict();
        let vars = g.vars;
        let mut policy: BTreeMap<String, String> = g
            .policy
            .sources()
            .iter()
            .map(|(k, s)| ((*k).to_owned(), (*s).to_owned()))
            .collect();
        policy.insert("throttle_cpus".into(), g.policy.throttle_cpus.to_string());
        policy.insert("evict_grace_s".into(), g.policy.evict_grace_s.to_string());
        OwnerReport {
            force: g.slots.force().name().to_owned(),
            state: if v.start { "lending" } else { "owner" }.to_owned(),
            verdict: VerdictInfo {
                start: v.start,
                throttle: v.throttle,
                suspend: v.suspend,
                cont: v.cont,
            },
            vars: [
                ("owner_idle_s", vars.owner_idle_s.floor()),
                ("owner_cpu", vars.owner_cpu),
                ("load1", vars.load1),
                ("mem_avail_bytes", vars.mem_avail_bytes),
                ("mem_total_bytes", vars.mem_total_bytes),
                ("hour", vars.hour),
                ("weekday", vars.weekday),
                ("guests", vars.guests),
            ]
            .into_iter()
            .map(|(k, x)| (k.to_owned(), x))
            .collect(),
            policy,
            reload_error: g.reload_error.clone(),
            guest_class: match self.guest_class {
                Some(GuestClass::CpuIdle) => "cpu.idle",
                Some(GuestClass::MinWeight) => "min-weight",
                None => "",
            }
            .to_owned(),
            slots: g
                .slots
                .states()
                .iter()
                .map(|s| s.name().to_owned())
                .collect(),
        }
    }

    /// `shoal ps`.
    pub fn ps(&self) -> PsReport {
        let g = self.lock();
        let mut tasks: Vec<TaskInfo> = g
            .tasks
            .iter()
            .map(|(id, t)| {
                let state = if t.guest {
                    g.slots
                        .state_of(id)
                        .map_or("running", SlotState::name)
                        .to_owned()
                } else if t.cgroup.is_some() {
                    "running".to_owned()
                } else {
                    "starting".to_owned()
                };
                let cpu_s = t.cgroup.as_ref().and_then(|cg| {
                    self.cgroups
                        .as_ref()?
                        .usage(cg)
                        .ok()
                        .map(|u| u.cpu_usec as f64 / 1e6)
                });
                TaskInfo {
                    id: id.clone(),
                    origin: if t.guest { "guest" } else { "local" }.to_owned(),
                    state,
                    command: t.command.clone(),
                    age_s: t.since.elapsed().as_secs_f64(),
                    cpu_s,
                }
            })
            .collect();
        tasks.sort_by(|a, b| b.age_s.total_cmp(&a.age_s));
        PsReport {
            node: self.node.clone(),
            tasks,
        }
    }
}

impl Claim {
    /// The task's cgroup exists now: bring it to its slot's state (a
    /// throttle or a freeze decided while it was being set up).
    pub async fn attach(&self, cgroup: &str) {
        let cmds = {
            let mut g = self.owner.lock();
            let Some(t) = g.tasks.get_mut(&self.id) else {
                return;
            };
            t.cgroup = Some(cgroup.to_owned());
            let id = self.id.clone();
            let cmds = match g.slots.state_of(&id) {
                Some(SlotState::Claimed {
                    throttled: true, ..
                }) => vec![Command::Throttle(id)],
                Some(SlotState::Suspended { throttled, .. }) => {
                    let mut v = vec![Command::Freeze(id.clone())];
                    if *throttled {
                        v.push(Command::Throttle(id));
                    }
                    v
                }
                Some(SlotState::Evicting { killed, .. }) => {
                    if *killed {
                        vec![Command::Kill(id)]
                    } else {
                        vec![Command::Terminate(id)]
                    }
                }
                _ => Vec::new(),
            };
            self.owner.resolve(&g, cmds)
        };
        self.owner.carry_out(cmds).await;
    }

    /// Whether the owner's policy is evicting this task.
    pub fn evicting(&self) -> bool {
        matches!(
            self.owner.lock().slots.state_of(&self.id),
            Some(SlotState::Evicting { .. })
        )
    }

    /// The task ended: frees its slot and says whether it was evicted.
    pub fn finish(mut self) -> Released {
        self.done = true;
        self.owner.release(&self.id)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.done {
            self.owner.release(&self.id);
        }
    }
}

/// Local hour (0–23) and weekday (0 = Sunday), from the system's time zone.
fn local_hour_weekday() -> (f64, f64) {
    use chrono::{Datelike, Timelike};
    let now = chrono::Local::now();
    (
        f64::from(now.hour()),
        f64::from(now.weekday().num_days_from_sunday()),
    )
}

/// Asks logind (over the system D-Bus, where one answers) every second
/// whether the sessions are idle, and since when.
async fn watch_logind(owner: &Owner) {
    let bus = [
        "/run/dbus/system_bus_socket",
        "/var/run/dbus/system_bus_socket",
    ];
    if std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_none()
        && !bus.iter().any(|p| Path::new(p).exists())
    {
        tracing::debug!("no system D-Bus: owner idle time without logind");
        return;
    }
    let proxy = async {
        let conn = zbus::Connection::system().await?;
        zbus::Proxy::new(
            &conn,
            "org.freedesktop.login1",
            "/org/freedesktop/login1",
            "org.freedesktop.login1.Manager",
        )
        .await
    };
    let proxy = match proxy.await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "no logind: owner idle time without it");
            return;
        }
    };
    loop {
        let hint = proxy.get_property::<bool>("IdleHint").await;
        let since = proxy.get_property::<u64>("IdleSinceHint").await;
        let view = match (hint, since) {
            (Ok(h), Ok(s)) => Some(activity::from_hint(h, s, unix_ms() * 1000)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "logind did not answer");
                None
            }
        };
        let changed = {
            let mut g = owner.logind.lock().unwrap_or_else(|e| e.into_inner());
            let was_idle = matches!(*g, Some(Logind::IdleFor(_)));
            *g = view;
            was_idle && view == Some(Logind::Active)
        };
        if changed {
            // Someone came back: evaluate now.
            owner.wake.notify_one();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How often the terminals' access times are polled.
const INPUT_POLL: Duration = Duration::from_millis(50);

/// The terminals whose access time moves when the owner types: virtual
/// consoles and serial lines (`/dev/tty*`) and pseudo-terminals
/// (`/dev/pts/N`; `ptmx` is the masters' side, read when a terminal shows
/// output).
fn terminals() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for (dir, prefix) in [("/dev", "tty"), ("/dev/pts", "")] {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(prefix) && n != "ptmx" {
                    v.push(e.path());
                }
            }
        }
    }
    v
}

/// When the machine booted (seconds since the epoch), from `/proc/stat`.
fn boot_time_s() -> Option<i64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The terminals among `all` that were ever used since boot: a virtual
/// console nobody opened keeps the times its device node got at boot.
/// Only these are polled every 50 ms (a machine has 60-odd unused
/// consoles, and polling them all would cost the agent more than
/// everything else it does while idle); the full list is looked at again
/// every 2 s.
fn used_terminals(all: Vec<PathBuf>, boot_s: Option<i64>) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let Some(boot) = boot_s else {
        return all;
    };
    all.into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.atime().max(m.mtime()) > boot + 60))
        .collect()
}

/// Watches for the owner's input and wakes the policy loop at once.
///
/// Terminals: the kernel sends no inotify events for ttys, but a read
/// (a shell reading a key) sets the terminal's access time, at once when
/// the last update is more than 8 s old (finer updates are withheld, so
/// that keystroke timing does not leak): polling the access times every
/// 50 ms sees the owner come back within 50 ms. Writes (output, the
/// agent's own log) move the modification time only. Input devices
/// (`/dev/input`, read by a display server) do not update access times,
/// but do send inotify access events.
fn watch_input(owner: &Arc<Owner>) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::unix::fs::MetadataExt;
    let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .ok()
        .filter(|i| {
            i.add_watch(Path::new("/dev/input"), AddWatchFlags::IN_ACCESS)
                .is_ok()
        });
    let boot = boot_time_s();
    let mut ttys = used_terminals(terminals(), boot);
    let mut listed = Instant::now();
    let latest = |ttys: &[PathBuf]| {
        ttys.iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| (m.atime(), m.atime_nsec()))
            .max()
    };
    let mut last = latest(&ttys);
    loop {
        std::thread::sleep(INPUT_POLL);
        if listed.elapsed() > Duration::from_secs(2) {
            // New terminals (a login, a new window) join the watch.
            ttys = used_terminals(terminals(), boot);
            listed = Instant::now();
            last = last.max(latest(&ttys));
        }
        let now = latest(&ttys);
        let typed = now > last;
        last = last.max(now);
        if let Some((secs, _)) = last {
            owner
                .newest_atime_s
                .store(u64::try_from(secs).unwrap_or(0), Ordering::Relaxed);
        }
        let moved = ino
            .as_ref()
            .and_then(|i| i.read_events().ok())
            .is_some_and(|ev| !ev.is_empty());
        if typed || moved {
            owner.last_input_ms.store(unix_ms(), Ordering::Relaxed);
            owner.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_terminals_used_since_boot_are_polled() {
        let d = crate::test_dir("ttys");
        let (unused, used) = (d.join("tty40"), d.join("pts-3"));
        for p in [&unused, &used] {
            std::fs::write(p, "").unwrap();
        }
        // The unused one keeps the times it got at boot.
        let boot = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let f = std::fs::File::options().write(true).open(&unused).unwrap();
        f.set_times(
            std::fs::FileTimes::new()
                .set_accessed(boot)
                .set_modified(boot),
        )
        .unwrap();
        let all = vec![unused.clone(), used.clone()];
        assert_eq!(used_terminals(all.clone(), Some(1_000_000)), vec![used]);
        // Without a boot time, every terminal is polled.
        assert_eq!(used_terminals(all.clone(), None), all);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
