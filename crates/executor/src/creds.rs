//! File work done as a user, by an agent that runs as root.
//!
//! A batch job's inputs are read, and its outputs written, in the
//! submitting user's directories. Done as root, a user could point the
//! agent at files they may not read (another user's home, through a path
//! or a symbolic link swapped in later) or make it write, or `chown`,
//! through a link into `/etc`. HTCondor's schedd switches to the user for
//! such work; so does this: [`spawn_as`] (and [`as_user`], which waits for
//! the result) runs a closure on a worker thread whose credentials (user,
//! group, supplementary groups) are the user's. Linux keeps credentials per
//! thread; the raw system calls below change only the calling thread
//! (glibc's wrappers would change every thread of the agent).
//!
//! A batch does such work several times per task, so a user's workers are
//! kept, their credentials taken once, for as long as they have work (each
//! ends after [`IDLE`] without any, and the next one looks the user up
//! afresh).

use std::collections::HashMap;
use std::io;
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

/// How long a user's worker waits for more work before it ends.
pub const IDLE: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// Workers a user may have at once: file work with `fsync`s waits on the
/// disk, and one user's tasks end many at a time.
const PER_USER: usize = 4;

/// One worker: its generation, where its work goes, and how much of it is
/// waiting or running.
struct Worker {
    generation: u64,
    tx: mpsc::Sender<Job>,
    pending: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The live workers, by uid.
fn workers() -> &'static Mutex<HashMap<u32, Vec<Worker>>> {
    static W: OnceLock<Mutex<HashMap<u32, Vec<Worker>>>> = OnceLock::new();
    W.get_or_init(Default::default)
}

/// Runs `job` as the user `uid` on one of that user's worker threads (an
/// idle one, else a new one while there are fewer than four, else the least
/// busy), and returns at once. A new worker looks the user up and takes the
/// credentials first. A job that panics is caught; its worker goes on.
///
/// # Errors
/// A new worker could not be started or could not take the user's
/// credentials (nothing of `job` ran).
pub fn spawn_as(uid: u32, job: impl FnOnce() + Send + 'static) -> Result<(), CredsError> {
    use std::sync::atomic::Ordering;
    let mut map = workers().lock().unwrap_or_else(|e| e.into_inner());
    let list = map.entry(uid).or_default();
    // Sent under the lock: a worker that ends takes itself out of the map
    // under it first, so whatever was sent before is still run.
    let idle = list
        .iter()
        .position(|w| w.pending.load(Ordering::Acquire) == 0);
    let pick = match idle {
        Some(i) => Some(i),
        None if list.len() < PER_USER => None,
        None => list
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.pending.load(Ordering::Acquire))
            .map(|(i, _)| i),
    };
    let i = match pick {
        Some(i) => i,
        None => {
            list.push(start_worker(uid)?);
            list.len() - 1
        }
    };
    let w = &list[i];
    let pending = w.pending.clone();
    pending.fetch_add(1, Ordering::AcqRel);
    let job: Job = Box::new(move || {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        pending.fetch_sub(1, Ordering::AcqRel);
    });
    w.tx.send(job)
        .map_err(|_| CredsError::Thread(format!("the worker for uid {uid} ended")))
}

/// Starts a worker for `uid` and waits until it took the credentials.
fn start_worker(uid: u32) -> Result<Worker, CredsError> {
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), CredsError>>();
    std::thread::Builder::new()
        .name(format!("as-uid-{uid}"))
        .spawn(move || {
            let user = User::lookup(uid);
            if nix::unistd::geteuid().as_raw() != uid {
                if let Err(source) = switch(&user) {
                    let _ = ready_tx.send(Err(CredsError::Switch { uid, source }));
                    return;
                }
            }
            let _ = ready_tx.send(Ok(()));
            loop {
                match rx.recv_timeout(IDLE) {
                    Ok(job) => job(),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let mut map = workers().lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(list) = map.get_mut(&uid) {
                            list.retain(|w| w.generation != generation);
                            if list.is_empty() {
                                map.remove(&uid);
                            }
                        }
                        drop(map);
                        // Sent before it left the map: run them still.
                        while let Ok(job) = rx.try_recv() {
                            job();
                        }
                        return;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        })
        .map_err(|e| CredsError::Thread(e.to_string()))?;
    ready_rx
        .recv()
        .map_err(|_| CredsError::Thread("the worker ended before it was ready".into()))??;
    Ok(Worker {
        generation,
        tx,
        pending: Default::default(),
    })
}

/// A user to act as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl User {
    /// The user `uid` as the system's user and group databases have it:
    /// its primary group and supplementary groups. A uid without an entry
    /// gets its own number as group and no supplementary groups.
    ///
    /// Not through glibc's NSS in this process: `shoal` is linked
    /// statically, and a static glibc that loads an NSS module (systemd,
    /// sss, LDAP: whatever `/etc/nsswitch.conf` names after `files`) into
    /// itself crashes (seen here: `_nss_systemd_getpwuid_r`, for a uid
    /// `/etc/passwd` lacks). The system's `getent` asks NSS in a process of
    /// its own; where it cannot run, `/etc/passwd` and `/etc/group` are
    /// read directly.
    pub fn lookup(uid: u32) -> Self {
        let found = match getent(&["passwd", &uid.to_string()]) {
            Getent::Found(p) => parse_passwd(&p, uid).map(|(name, gid)| {
                let groups = match getent(&["initgroups", &name]) {
                    Getent::Found(g) => parse_initgroups(&g),
                    _ => Vec::new(),
                };
                Self::with_groups(uid, gid, groups)
            }),
            Getent::NotFound => None,
            Getent::Unavailable => {
                let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
                from_files(uid, &read("/etc/passwd"), &read("/etc/group"))
            }
        };
        found.unwrap_or_else(|| Self {
            uid,
            gid: uid,
            groups: Vec::new(),
        })
    }

    /// As `getgrouplist(3)` lists them: the primary group first, then the
    /// others, each once.
    fn with_groups(uid: u32, gid: u32, others: impl IntoIterator<Item = u32>) -> Self {
        let mut groups = vec![gid];
        for g in others {
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        Self { uid, gid, groups }
    }
}

/// What `getent` answered.
enum Getent {
    /// Its output.
    Found(String),
    /// No such entry (its exit status 2).
    NotFound,
    /// It could not be run, or failed otherwise.
    Unavailable,
}

fn getent(args: &[&str]) -> Getent {
    let out = std::process::Command::new("getent")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Getent::Found(String::from_utf8_lossy(&o.stdout).into()),
        Ok(o) if o.status.code() == Some(2) => Getent::NotFound,
        _ => Getent::Unavailable,
    }
}

/// The name and primary group of `uid` in `passwd(5)` lines.
fn parse_passwd(text: &str, uid: u32) -> Option<(String, u32)> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || f[0].is_empty() || f[2].parse::<u32>().ok()? != uid {
            return None;
        }
        Some((f[0].to_owned(), f[3].parse().ok()?))
    })
}

/// The groups in `getent initgroups NAME`'s line: the name, then group
/// ids (not the primary group, which comes from the user's entry).
fn parse_initgroups(text: &str) -> Vec<u32> {
    text.lines()
        .next()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `uid` as `/etc/passwd` and `/etc/group` (their texts) have it: NSS's
/// `files` source.
fn from_files(uid: u32, passwd: &str, group: &str) -> Option<User> {
    let (name, gid) = parse_passwd(passwd, uid)?;
    let others = group.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || !f[3].split(',').any(|m| m == name) {
            return None;
        }
        f[2].parse().ok()
    });
    Some(User::with_groups(uid, gid, others))
}

/// Why [`spawn_as`] or [`as_user`] could not run the closure.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    /// The thread could not take the user's credentials (the agent is not
    /// root, say).
    #[error("cannot act as uid {uid}: {source}")]
    Switch {
        /// The user.
        uid: u32,
        /// The OS error.
        source: io::Error,
    },
    /// The thread could not be started, or the closure panicked.
    #[error("worker thread: {0}")]
    Thread(String),
}

/// Runs `f` as the user `uid` on one of that user's workers ([`spawn_as`])
/// and waits for its result. When the process already runs as that user,
/// `f` runs on a worker all the same, with nothing to change.
///
/// # Errors
/// The credentials could not be taken (nothing of `f` ran), or `f`
/// panicked.
pub fn as_user<R: Send + 'static>(
    uid: u32,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, CredsError> {
    let (tx, rx) = mpsc::channel();
    spawn_as(uid, move || {
        let _ = tx.send(f());
    })?;
    rx.recv()
        .map_err(|_| CredsError::Thread("the closure panicked".into()))
}

/// Sets this thread's groups, group and user (in that order: once the user
/// is changed the rest may no longer be).
#[allow(unsafe_code)]
fn switch(user: &User) -> io::Result<()> {
    let groups: Vec<libc::gid_t> = user.groups.clone();
    let check = |r: libc::c_long| {
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: raw setgroups(2) with a pointer to `groups.len()` valid gid_t
    // values that outlive the call; it changes this thread's credentials
    // only (the kernel's credentials are per thread).
    check(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })?;
    let g = user.gid;
    // SAFETY: raw setresgid(2) with plain integers; this thread only.
    check(unsafe { libc::syscall(libc::SYS_setresgid, g, g, g) })?;
    let u = user.uid;
    // SAFETY: raw setresuid(2) with plain integers; this thread only.
    check(unsafe { libc::syscall(libc::SYS_setresuid, u, u, u) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_read_from_passwd_and_group_texts_as_nss_files_does() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      # a comment\n\
                      alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash\n\
                      bob:x:1001:100::/home/bob:/bin/sh\n\
                      broken:x:notanumber:1\n";
        let group = "root:x:0:\n\
                     users:x:100:alice\n\
                     alice:x:1000:\n\
                     wheel:x:10:bob,alice\n\
                     audio:x:29:alicexyz\n";
        let alice = from_files(1000, passwd, group).unwrap();
        assert_eq!(alice.gid, 1000);
        assert_eq!(
            alice.groups,
            vec![1000, 100, 10],
            "primary first, each once"
        );
        let bob = from_files(1001, passwd, group).unwrap();
        assert_eq!(
            bob.groups,
            vec![100, 10],
            "the primary group is not listed twice"
        );
        assert!(from_files(4242, passwd, group).is_none());
        assert_eq!(
            parse_initgroups("alice      100 10 27\n"),
            vec![100, 10, 27]
        );
        assert_eq!(
            parse_initgroups("root                 \n"),
            Vec::<u32>::new()
        );
        assert_eq!(parse_passwd(passwd, 0), Some(("root".into(), 0)));
    }

    #[test]
    fn lookup_agrees_with_this_system_and_survives_uids_it_lacks() {
        // uid 0 is in every /etc/passwd.
        let root = User::lookup(0);
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.groups.first(), Some(&0));
        // A uid no database has (with NSS modules beyond `files`, that was
        // a crash in the static binary).
        let none = User::lookup(4_000_000_123);
        assert_eq!(
            none,
            User {
                uid: 4_000_000_123,
                gid: 4_000_000_123,
                groups: Vec::new()
            }
        );
    }

    #[test]
    fn a_users_worker_is_reused_survives_a_panic_and_keeps_the_agent_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root to change credentials");
            return;
        }
        let uid = 65533; // a uid of its own: no other test's worker
        let ask = || {
            let (tx, rx) = mpsc::channel();
            spawn_as(uid, move || {
                let _ = tx.send((nix::unistd::geteuid().as_raw(), std::thread::current().id()));
            })
            .unwrap();
            rx.recv_timeout(Duration::from_secs(5)).unwrap()
        };
        let mut threads = std::collections::HashSet::new();
        for i in 0..20 {
            if i == 5 {
                spawn_as(uid, || panic!("a job that panics (expected)")).unwrap();
            }
            let (u, t) = ask();
            assert_eq!(u, uid);
            assert_ne!(t, std::thread::current().id());
            threads.insert(t);
        }
        assert!(
            threads.len() <= PER_USER,
            "{} threads for 21 jobs: the workers are reused, also after a panic",
            threads.len()
        );
        assert!(nix::unistd::geteuid().is_root(), "only the worker changed");
    }

    #[test]
    fn a_closure_runs_with_the_users_credentials_and_the_agent_keeps_its_own() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root to change credentials");
            return;
        }
        let d = std::env::temp_dir().join(format!("shoal-creds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("rootonly"), "secret").unwrap();
        std::fs::set_permissions(
            d.join("rootonly"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let (p, made) = (d.join("rootonly"), d.join("made"));
        let (read, wrote, ids) = as_user(65534, move || {
            (
                std::fs::read(&p).map_err(|e| e.kind()),
                std::fs::write(&made, "x").map_err(|e| e.kind()),
                (
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                ),
            )
        })
        .unwrap();
        assert_eq!(read, Err(io::ErrorKind::PermissionDenied));
        assert_eq!(wrote, Err(io::ErrorKind::PermissionDenied));
        assert_eq!(ids, (65534, 65534));
        assert!(nix::unistd::geteuid().is_root(), "only that thread changed");
        assert!(std::fs::read(d.join("rootonly")).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
