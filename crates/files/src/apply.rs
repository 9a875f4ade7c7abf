//! Applying a change set to a tree, all or nothing, with crash recovery.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rand::TryRng;
use serde::{Deserialize, Serialize};

use crate::changes::{check_path, Change, ChangeError, ChangeSet};

/// Name prefix of the staging directories inside a tree.
pub const STAGING_PREFIX: &str = ".shoal-commit-";
/// Name prefix of a staging directory still being set up (before its lock
/// is held it is not a staging directory yet).
const PREP_PREFIX: &str = ".shoal-prep-";

/// Whether a top-level name in a tree is shoal's own bookkeeping (never
/// shipped, never written by a change set).
pub fn is_internal(name: &str) -> bool {
    name.starts_with(STAGING_PREFIX) || name.starts_with(PREP_PREFIX)
}
const JOURNAL: &str = "journal";
/// How old a set-up directory must be before a recovery may take it for
/// abandoned.
const PREP_STALE: std::time::Duration = std::time::Duration::from_secs(60);
/// Held (flock) by the process committing through a staging directory, so
/// that a concurrent `recover` leaves a live commit alone.
const LOCK: &str = "lock";

/// Why a change set was not applied. Before the journal is sealed the tree
/// is untouched; after, [`recover`] finishes the job.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A path that would escape the tree, or touch shoal's own files.
    #[error(transparent)]
    Unsafe(#[from] ChangeError),
    /// A path whose parent inside the tree is a symbolic link: following
    /// it could write outside the tree.
    #[error("refusing to write through the symbolic link {0}")]
    ThroughSymlink(PathBuf),
    /// A filesystem operation failed (disk full, permissions).
    #[error("{path}: {source}")]
    Io {
        /// What was being written.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The journal of an interrupted commit cannot be read.
    #[error("corrupt commit journal {0}")]
    Journal(PathBuf),
    /// The contents of a change set's streamed files did not add up to
    /// what it announced.
    #[error("the changed files' contents {0}")]
    Stream(&'static str),
    /// A change set with streamed files given to [`apply`], which has
    /// no way to receive their contents (use [`Commit`]).
    #[error("the change set's large files were not sent with it")]
    NotInline,
    /// A failure injected by a test.
    #[error("injected crash")]
    Injected,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    move |source| ApplyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One step of a commit, as journaled.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Op {
    /// Move staged file number `n` into place.
    Put(usize),
    Mkdir(u32),
    /// Empty the directory (overlayfs opaque), keeping it.
    Clear(u32),
    Symlink(PathBuf),
    Delete,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    path: PathBuf,
    op: Op,
}

/// Where to stop, for crash tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Crash {
    Never,
    /// After staging this many files, before the journal is sealed.
    Staging(usize),
    /// Before running step `n` (the journal is sealed).
    Step(usize),
}

fn sync_dir(p: &Path) -> Result<(), ApplyError> {
    fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(io_err(p))
}

/// Applies `cs` to the tree at `root`, all or nothing.
///
/// # Errors
/// Unsafe paths (nothing is touched), or a filesystem failure. A failure
/// while staging leaves the tree as it was; a failure after the journal is
/// sealed is finished by [`recover`].
pub fn apply(root: &Path, cs: &ChangeSet) -> Result<(), ApplyError> {
    apply_with(root, cs, Crash::Never)
}

pub(crate) fn apply_with(root: &Path, cs: &ChangeSet, crash: Crash) -> Result<(), ApplyError> {
    check(root, cs)?;
    if cs.is_empty() {
        // Nothing to make atomic: no staging, no journal, no sync (most
        // compiler runs in a build change one file; `true` changes none).
        return Ok(());
    }
    if cs.streamed().next().is_some() {
        return Err(ApplyError::NotInline);
    }
    if let [e] = cs.entries.as_slice() {
        if let Change::File { mode, data } = &e.change {
            if let Some(r) = put_one(root, &e.path, *mode, data, fresh_id(), crash) {
                return r;
            }
        }
    }
    Commit::begin_checked(root, cs, crash)?.finish()
}

/// Refuses, before anything is written, a change set with unsafe paths,
/// paths into shoal's own files, or paths through symbolic links.
fn check(root: &Path, cs: &ChangeSet) -> Result<(), ApplyError> {
    cs.validate()?;
    for e in &cs.entries {
        let first = e
            .path
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        if first.is_some_and(|f| is_internal(&f)) {
            return Err(ChangeError::UnsafePath(e.path.clone()).into());
        }
    }
    preflight(root, cs)
}

/// A change set being applied whose streamed files' contents are still
/// to come ([`crate::Change::Streamed`]): [`Commit::begin`] stages what
/// the change set holds, [`Commit::feed`] takes the streamed contents in
/// order as they arrive (written to the staging directory, never held in
/// memory), [`Commit::finish`] seals the journal and applies it, all or
/// nothing as [`apply`]. Dropped before `finish`, it leaves the tree as
/// it was.
#[derive(Debug)]
pub struct Commit {
    root: PathBuf,
    stage: PathBuf,
    /// Held while the staging directory is ours (see [`recover`]).
    _lock: fs::File,
    steps: Vec<Step>,
    /// Streamed files still to fill, in order: staged path and bytes
    /// still to come.
    pending: std::collections::VecDeque<(PathBuf, u64)>,
    /// The one being filled.
    current: Option<fs::File>,
    /// How many files were staged (for crash tests).
    staged: usize,
    crash: Crash,
    /// The journal is sealed: the staging belongs to the commit (or to
    /// [`recover`]) from now on.
    sealed: bool,
}

impl Commit {
    /// Checks `cs` against the tree at `root` and stages every content it
    /// holds.
    ///
    /// # Errors
    /// Unsafe paths (nothing is touched), or a filesystem failure (the
    /// tree is untouched).
    pub fn begin(root: &Path, cs: &ChangeSet) -> Result<Self, ApplyError> {
        check(root, cs)?;
        Self::begin_checked(root, cs, Crash::Never)
    }

    fn begin_checked(root: &Path, cs: &ChangeSet, crash: Crash) -> Result<Self, ApplyError> {
        let id = fresh_id();
        // Set the directory up under another name, lock it, and only then
        // give it the name `recover` looks at: a concurrent recovery never
        // sees a staging directory whose lock is not held yet.
        let prep = root.join(format!("{PREP_PREFIX}{id:016x}"));
        let stage = root.join(format!("{STAGING_PREFIX}{id:016x}"));
        fs::create_dir(&prep).map_err(io_err(&prep))?;
        let lock_path = prep.join(LOCK);
        let lock = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        fs::rename(&prep, &stage).map_err(io_err(&stage))?;
        let mut c = Self {
            root: root.to_owned(),
            stage,
            _lock: lock,
            steps: Vec::with_capacity(cs.entries.len()),
            pending: std::collections::VecDeque::new(),
            current: None,
            staged: 0,
            crash,
            sealed: false,
        };
        // (On error, dropping `c` removes the staging.)
        c.stage_all(cs)?;
        Ok(c)
    }

    /// Writes every content the change set holds under the staging
    /// directory, and makes the streamed files' (empty) places there.
    fn stage_all(&mut self, cs: &ChangeSet) -> Result<(), ApplyError> {
        for e in &cs.entries {
            let op = match &e.change {
                Change::File { mode, .. } | Change::Streamed { mode, .. } => {
                    if self.crash == Crash::Staging(self.staged) {
                        return Err(ApplyError::Injected);
                    }
                    let n = self.staged;
                    let p = self.stage.join(n.to_string());
                    let mut f = fs::File::create(&p).map_err(io_err(&p))?;
                    f.set_permissions(fs::Permissions::from_mode(*mode & 0o7777))
                        .map_err(io_err(&p))?;
                    match &e.change {
                        Change::Streamed { size, .. } if *size > 0 => {
                            self.pending.push_back((p, *size));
                        }
                        Change::File { data, .. } => {
                            f.write_all(data).map_err(io_err(&p))?;
                            f.sync_all().map_err(io_err(&p))?;
                        }
                        _ => f.sync_all().map_err(io_err(&p))?,
                    }
                    self.staged += 1;
                    Op::Put(n)
                }
                Change::Dir { mode } => Op::Mkdir(*mode),
                Change::OpaqueDir { mode } => Op::Clear(*mode),
                Change::Symlink { target } => Op::Symlink(target.clone()),
                Change::Delete => Op::Delete,
            };
            self.steps.push(Step {
                path: e.path.clone(),
                op,
            });
        }
        Ok(())
    }

    /// Bytes of the streamed files still expected.
    pub fn missing(&self) -> u64 {
        self.pending.iter().map(|(_, n)| n).sum()
    }

    /// Takes the next piece of the streamed files' contents (their bytes
    /// one after another, in the change set's order).
    ///
    /// # Errors
    /// More bytes than announced, or a filesystem failure (the disk
    /// full): the commit is then to be dropped.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), ApplyError> {
        while !data.is_empty() {
            let Some((path, left)) = self.pending.front_mut() else {
                return Err(ApplyError::Stream("are longer than announced"));
            };
            let f = match &mut self.current {
                Some(f) => f,
                None => {
                    let f = fs::OpenOptions::new()
                        .append(true)
                        .open(&*path)
                        .map_err(io_err(path))?;
                    self.current.insert(f)
                }
            };
            let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
            f.write_all(&data[..n]).map_err(io_err(path))?;
            *left -= n as u64;
            data = &data[n..];
            if *left == 0 {
                f.sync_all().map_err(io_err(path))?;
                self.current = None;
                self.pending.pop_front();
            }
        }
        Ok(())
    }

    /// Seals the journal and applies every change.
    ///
    /// # Errors
    /// Contents missing (the tree is untouched), or a filesystem failure:
    /// before the journal is sealed the tree is untouched; after, [`recover`]
    /// finishes the job.
    pub fn finish(mut self) -> Result<(), ApplyError> {
        if !self.pending.is_empty() {
            return Err(ApplyError::Stream("ended before all of them came"));
        }
        if self.crash == Crash::Staging(self.staged) {
            return Err(ApplyError::Injected);
        }
        self.seal()?;
        run(&self.root, &self.stage, &self.steps, self.crash)?;
        fs::remove_dir_all(&self.stage).map_err(io_err(&self.stage))?;
        sync_dir(&self.root)
    }

    /// Makes the journal durable: from here on the commit happens, now or
    /// at recovery.
    fn seal(&mut self) -> Result<(), ApplyError> {
        let stage = &self.stage;
        let bytes =
            postcard::to_stdvec(&self.steps).map_err(|_| ApplyError::Journal(stage.clone()))?;
        let tmp = stage.join("journal.tmp");
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io_err(&tmp))?;
        let j = stage.join(JOURNAL);
        fs::rename(&tmp, &j).map_err(io_err(&j))?;
        self.sealed = true;
        sync_dir(stage)
    }
}

impl Drop for Commit {
    fn drop(&mut self) {
        if !self.sealed {
            // Not committed: nothing of it may stay.
            let _ = fs::remove_dir_all(&self.stage);
        }
    }
}

fn fresh_id() -> u64 {
    let mut id = [0u8; 8];
    if rand::rngs::SysRng.try_fill_bytes(&mut id).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        id = (t ^ u64::from(std::process::id())).to_be_bytes();
    }
    u64::from_be_bytes(id)
}

/// A change set of one file (a compiler's object file: most tasks of a
/// build) where its directory is there already and no directory stands
/// at its path: written beside the tree's root under a set-up name,
/// synced, and renamed into place. The rename is the commit; there is
/// nothing to journal, and a crash before it leaves only the set-up file,
/// which [`recover`] removes once stale. `None` when the general path
/// must do it.
fn put_one(
    root: &Path,
    rel: &Path,
    mode: u32,
    data: &[u8],
    id: u64,
    crash: Crash,
) -> Option<Result<(), ApplyError>> {
    let target = root.join(rel);
    let parent = target.parent()?;
    if !fs::symlink_metadata(parent).is_ok_and(|m| m.is_dir())
        || fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir())
    {
        return None;
    }
    let tmp = root.join(format!("{PREP_PREFIX}{id:016x}"));
    let r = (|| {
        if crash == Crash::Staging(0) {
            return Err(ApplyError::Injected);
        }
        let mut f = fs::File::create_new(&tmp).map_err(io_err(&tmp))?;
        f.write_all(data).map_err(io_err(&tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))
            .map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        // The commit point: no step comes after it to crash in.
        fs::rename(&tmp, &target).map_err(io_err(&target))
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    Some(r)
}

/// Refuses, before anything is written, a change set that would write
/// through a symbolic link: one already in the tree (unless the change set
/// turns it into a directory first) or one the change set itself makes.
fn preflight(root: &Path, cs: &ChangeSet) -> Result<(), ApplyError> {
    use std::collections::HashMap;
    let kinds: HashMap<&Path, &Change> = cs
        .entries
        .iter()
        .map(|e| (e.path.as_path(), &e.change))
        .collect();
    for e in &cs.entries {
        let mut anc = PathBuf::new();
        let comps: Vec<_> = e.path.components().collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            anc.push(c);
            match kinds.get(anc.as_path()) {
                Some(Change::Symlink { .. }) => {
                    return Err(ApplyError::ThroughSymlink(root.join(&anc)))
                }
                Some(Change::Dir { .. } | Change::OpaqueDir { .. }) => continue,
                _ => {}
            }
            if fs::symlink_metadata(root.join(&anc)).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(ApplyError::ThroughSymlink(root.join(&anc)));
            }
        }
    }
    Ok(())
}

/// Makes every ancestor of `rel` inside `root` a real directory, refusing
/// to pass through a symbolic link.
fn parents(root: &Path, rel: &Path) -> Result<(), ApplyError> {
    let mut p = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => return Err(ApplyError::ThroughSymlink(p)),
            Ok(m) if m.is_dir() => {}
            Ok(_) => fs::remove_file(&p)
                .and_then(|()| fs::create_dir(&p))
                .map_err(io_err(&p))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&p).map_err(io_err(&p))?
            }
            Err(e) => return Err(io_err(&p)(e)),
        }
    }
    Ok(())
}

/// Removes whatever is at `p` (file, link or whole directory).
fn remove_any(p: &Path) -> Result<(), ApplyError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(io_err(p)),
        Ok(_) => fs::remove_file(p).map_err(io_err(p)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(p)(e)),
    }
}

/// Runs the journaled steps. Every step can run again after a crash with
/// the same result: a staged file already moved is skipped, a deletion of
/// nothing succeeds, and a directory clearing (or a deletion that later
/// steps write beneath) is marked done before the step after it runs.
fn run(root: &Path, stage: &Path, steps: &[Step], crash: Crash) -> Result<(), ApplyError> {
    for (i, s) in steps.iter().enumerate() {
        if crash == Crash::Step(i) {
            return Err(ApplyError::Injected);
        }
        check_path(&s.path)?;
        parents(root, &s.path)?;
        let target = root.join(&s.path);
        match &s.op {
            Op::Put(n) => {
                let src = stage.join(n.to_string());
                if src.exists() {
                    if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                        remove_any(&target)?;
                    }
                    fs::rename(&src, &target).map_err(io_err(&target))?;
                }
            }
            Op::Mkdir(mode) | Op::Clear(mode) => {
                let marker = stage.join(format!("cleared-{i}"));
                let clear = matches!(s.op, Op::Clear(_)) && !marker.exists();
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() && !clear => {}
                    Ok(_) => {
                        remove_any(&target)?;
                        fs::create_dir(&target).map_err(io_err(&target))?;
                    }
                    Err(_) => fs::create_dir(&target).map_err(io_err(&target))?,
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(*mode & 0o7777))
                    .map_err(io_err(&target))?;
                if clear {
                    fs::File::create(&marker).map_err(io_err(&marker))?;
                    sync_dir(stage)?;
                }
            }
            Op::Symlink(to) => {
                remove_any(&target)?;
                std::os::unix::fs::symlink(to, &target).map_err(io_err(&target))?;
            }
            Op::Delete => {
                // A deletion that later steps write beneath (a directory
                // removed and made again) must not run twice: a replay
                // would remove what those steps already put there.
                let beneath = steps[i + 1..]
                    .iter()
                    .any(|l| l.path.starts_with(&s.path) && l.path != s.path);
                if !beneath {
                    remove_any(&target)?;
                } else {
                    let marker = stage.join(format!("deleted-{i}"));
                    if !marker.exists() {
                        remove_any(&target)?;
                        fs::File::create(&marker).map_err(io_err(&marker))?;
                        sync_dir(stage)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Finishes or undoes every commit that a crash interrupted in the tree at
/// `root`: a sealed journal is rolled forward, an unsealed staging is
/// removed. Returns how many commits it rolled forward.
///
/// # Errors
/// A journal that cannot be read (left in place, for a person to look at),
/// or a filesystem failure.
pub fn recover(root: &Path) -> Result<usize, ApplyError> {
    let mut done = 0;
    let mut touched = false;
    for e in fs::read_dir(root).map_err(io_err(root))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREP_PREFIX) {
            // A set-up that died before it could lock. A live one lives
            // for microseconds but may not have locked yet (its lock file
            // made, not yet held): only an old one with a free lock, or
            // none, is abandoned.
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|d| d >= PREP_STALE));
            let free = match fs::File::open(e.path().join(LOCK)) {
                Ok(l) => l.try_lock().is_ok(),
                Err(_) => true,
            };
            if old && free {
                // A directory, or the file of a one-file commit.
                let _ = remove_any(&e.path());
            }
            continue;
        }
        if !name.starts_with(STAGING_PREFIX) {
            continue;
        }
        let stage = e.path();
        // A commit in progress (its lock held), or one that has not even
        // made its lock yet, is not ours to touch.
        let Ok(lock) = fs::File::open(stage.join(LOCK)) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        let j = stage.join(JOURNAL);
        if j.exists() {
            let bytes = fs::read(&j).map_err(io_err(&j))?;
            let steps: Vec<Step> =
                postcard::from_bytes(&bytes).map_err(|_| ApplyError::Journal(j.clone()))?;
            run(root, &stage, &steps, Crash::Never)?;
            done += 1;
        }
        // Its committer may have finished and removed it between our open
        // and our lock.
        match fs::remove_dir_all(&stage) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&stage)(e)),
            _ => {}
        }
        touched = true;
    }
    // Only a recovery that changed something pays for a directory sync
    // (this runs before every `shoal run`).
    if touched {
        sync_dir(root)?;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::changes::Entry;

    /// What a tree holds, for comparisons: path → kind and content.
    fn snapshot(root: &Path) -> BTreeMap<String, String> {
        fn go(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
            let mut es: Vec<_> = fs::read_dir(dir).unwrap().flatten().collect();
            es.sort_by_key(|e| e.file_name());
            for e in es {
                let name = e.file_name().to_string_lossy().into_owned();
                let r = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                let m = fs::symlink_metadata(e.path()).unwrap();
                let mode = m.permissions().mode() & 0o777;
                if m.file_type().is_symlink() {
                    out.insert(
                        r,
                        format!("link {}", fs::read_link(e.path()).unwrap().display()),
                    );
                } else if m.is_dir() {
                    out.insert(r.clone(), format!("dir {mode:o}"));
                    go(&e.path(), &r, out);
                } else {
                    out.insert(
                        r,
                        format!(
                            "file {mode:o} {}",
                            String::from_utf8_lossy(&fs::read(e.path()).unwrap())
                        ),
                    );
                }
            }
        }
        let mut out = BTreeMap::new();
        go(root, "", &mut out);
        out
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-apply-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn base(root: &Path) {
        fs::create_dir_all(root.join("src/old")).unwrap();
        fs::write(root.join("src/main.c"), "int main;").unwrap();
        fs::write(root.join("src/old/x.c"), "x").unwrap();
        fs::write(root.join("README"), "hi").unwrap();
        fs::write(root.join("gone"), "bye").unwrap();
    }

    fn e(path: &str, change: Change) -> Entry {
        Entry {
            path: path.into(),
            change,
        }
    }

    fn sample() -> ChangeSet {
        ChangeSet {
            entries: vec![
                e(
                    "README",
                    Change::File {
                        mode: 0o644,
                        data: b"changed".to_vec(),
                    },
                ),
                e("build", Change::Dir { mode: 0o755 }),
                e(
                    "build/a.o",
                    Change::File {
                        mode: 0o755,
                        data: b"obj".to_vec(),
                    },
                ),
                e("gone", Change::Delete),
                e(
                    "latest",
                    Change::Symlink {
                        target: "build/a.o".into(),
                    },
                ),
                e("src", Change::Dir { mode: 0o755 }),
                e("src/old", Change::OpaqueDir { mode: 0o700 }),
                e(
                    "src/old/y.c",
                    Change::File {
                        mode: 0o600,
                        data: b"y".to_vec(),
                    },
                ),
            ],
        }
    }

    #[test]
    fn applies_every_kind_of_change() {
        let d = tmp("kinds");
        base(&d);
        apply(&d, &sample()).unwrap();
        let s = snapshot(&d);
        assert_eq!(s["README"], "file 644 changed");
        assert_eq!(s["build/a.o"], "file 755 obj");
        assert!(!s.contains_key("gone"));
        assert_eq!(s["latest"], "link build/a.o");
        assert_eq!(s["src/old"], "dir 700");
        assert!(!s.contains_key("src/old/x.c"), "opaque dir cleared");
        assert_eq!(s["src/old/y.c"], "file 600 y");
        assert_eq!(s["src/main.c"], "file 644 int main;");
        assert!(!s.keys().any(|k| k.starts_with(STAGING_PREFIX)), "{s:?}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_crash_at_any_point_then_recovery_gives_all_or_nothing() {
        let clean = tmp("clean");
        base(&clean);
        let before = snapshot(&clean);
        apply(&clean, &sample()).unwrap();
        let after = snapshot(&clean);
        let files = sample()
            .entries
            .iter()
            .filter(|e| matches!(e.change, Change::File { .. }))
            .count();
        for k in 0..=files {
            let d = tmp(&format!("s{k}"));
            base(&d);
            assert!(matches!(
                apply_with(&d, &sample(), Crash::Staging(k)),
                Err(ApplyError::Injected)
            ));
            assert_eq!(recover(&d).unwrap(), 0);
            assert_eq!(
                snapshot(&d),
                before,
                "crash while staging file {k}: tree must be untouched"
            );
            fs::remove_dir_all(&d).unwrap();
        }
        for k in 0..sample().len() {
            let d = tmp(&format!("r{k}"));
            base(&d);
            assert!(matches!(
                apply_with(&d, &sample(), Crash::Step(k)),
                Err(ApplyError::Injected)
            ));
            assert_eq!(recover(&d).unwrap(), 1);
            assert_eq!(
                snapshot(&d),
                after,
                "crash before step {k}: recovery must finish the commit"
            );
            // Recovering twice changes nothing.
            assert_eq!(recover(&d).unwrap(), 0);
            assert_eq!(snapshot(&d), after);
            fs::remove_dir_all(&d).unwrap();
        }
        fs::remove_dir_all(&clean).unwrap();
    }

    #[test]
    fn unsafe_change_sets_touch_nothing() {
        let d = tmp("unsafe");
        base(&d);
        let before = snapshot(&d);
        for bad in ["../escape", "/etc/passwd", ".shoal-commit-x/journal"] {
            let cs = ChangeSet {
                entries: vec![e(bad, Change::Delete)],
            };
            assert!(apply(&d, &cs).is_err(), "{bad}");
        }
        // A link in the tree pointing out, then a write through it.
        let outside = tmp("outside");
        std::os::unix::fs::symlink(&outside, d.join("out")).unwrap();
        let cs = ChangeSet {
            entries: vec![e(
                "out/pwned",
                Change::File {
                    mode: 0o644,
                    data: b"x".to_vec(),
                },
            )],
        };
        assert!(matches!(apply(&d, &cs), Err(ApplyError::ThroughSymlink(_))));
        // A link the change set makes itself, then a write through it.
        let cs = ChangeSet {
            entries: vec![
                e(
                    "evil",
                    Change::Symlink {
                        target: outside.clone(),
                    },
                ),
                e(
                    "evil/pwned",
                    Change::File {
                        mode: 0o644,
                        data: b"x".to_vec(),
                    },
                ),
            ],
        };
        assert!(matches!(apply(&d, &cs), Err(ApplyError::ThroughSymlink(_))));
        assert!(!outside.join("pwned").exists());
        fs::remove_file(d.join("out")).unwrap();
        assert_eq!(snapshot(&d), before);
        fs::remove_dir_all(&d).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn recovery_leaves_a_live_commit_alone() {
        let d = tmp("live");
        let stage = d.join(format!("{STAGING_PREFIX}live"));
        fs::create_dir_all(&stage).unwrap();
        let lock = fs::File::create(stage.join(LOCK)).unwrap();
        lock.lock().unwrap();
        // Another process's recovery must not see it as abandoned; a
        // second open file description stands in for that process.
        assert_eq!(recover(&d).unwrap(), 0);
        assert!(stage.exists());
        drop(lock);
        assert_eq!(recover(&d).unwrap(), 0);
        assert!(!stage.exists(), "abandoned staging removed");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_empty_change_set_writes_nothing() {
        // Not even a staging directory: a task that wrote nothing succeeds
        // in a tree the submitter cannot write to (here: one that is gone),
        // as it would have locally.
        let d = tmp("empty");
        let gone = d.join("gone");
        apply(&gone, &ChangeSet::default()).unwrap();
        assert!(!gone.exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn one_file_commits_by_a_rename_and_a_crash_before_it_leaves_nothing() {
        let d = tmp("one");
        base(&d);
        let before = snapshot(&d);
        let cs = ChangeSet {
            entries: vec![e(
                "src/new.o",
                Change::File {
                    mode: 0o640,
                    data: b"object".to_vec(),
                },
            )],
        };
        // Crashed while writing: the tree is as it was, bar the set-up
        // file, which a recovery removes once it is stale.
        assert!(matches!(
            apply_with(&d, &cs, Crash::Staging(0)),
            Err(ApplyError::Injected)
        ));
        assert_eq!(snapshot(&d), before);
        let leftover = d.join(format!("{PREP_PREFIX}0123456789abcdef"));
        fs::write(&leftover, "half an object").unwrap();
        assert_eq!(recover(&d).unwrap(), 0);
        assert!(leftover.exists(), "a fresh one may be a live commit's");
        let old = std::time::SystemTime::now() - PREP_STALE * 2;
        fs::File::options()
            .write(true)
            .open(&leftover)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(recover(&d).unwrap(), 0);
        assert_eq!(snapshot(&d), before);
        // Applied: the file with its mode, and nothing else left over.
        apply(&d, &cs).unwrap();
        let after = snapshot(&d);
        assert_eq!(
            after.get("src/new.o").map(String::as_str),
            Some("file 640 object")
        );
        assert_eq!(after.len(), before.len() + 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn recovery_leaves_a_fresh_set_up_alone_even_before_it_locks() {
        let d = tmp("prep");
        // A concurrent commit between making its lock file and taking it:
        // the race `make -j` hit with every job committing in one tree.
        let prep = d.join(format!("{PREP_PREFIX}fresh"));
        fs::create_dir_all(&prep).unwrap();
        fs::File::create(prep.join(LOCK)).unwrap();
        assert_eq!(recover(&d).unwrap(), 0);
        assert!(prep.exists(), "a fresh set-up is not abandoned");
        // The same, long abandoned, is removed.
        let old = std::time::SystemTime::now() - PREP_STALE * 2;
        fs::File::open(&prep).unwrap().set_modified(old).unwrap();
        assert_eq!(recover(&d).unwrap(), 0);
        assert!(!prep.exists(), "an abandoned set-up is removed");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupt_journal_is_reported_and_kept() {
        let d = tmp("corrupt");
        let stage = d.join(format!("{STAGING_PREFIX}0000"));
        fs::create_dir_all(&stage).unwrap();
        fs::write(stage.join(LOCK), "").unwrap();
        fs::write(stage.join(JOURNAL), [0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(recover(&d), Err(ApplyError::Journal(_))));
        assert!(stage.exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_replayed_deletion_keeps_what_later_steps_wrote_beneath_it() {
        // Found by the property below: `d` deleted then `d/x`, `d/y` written;
        // a crash before `d/y` must not make the replay remove `d/x`.
        let file = || Change::File {
            mode: 0o644,
            data: b"new".to_vec(),
        };
        let cs = ChangeSet {
            entries: vec![
                e("src/old", Change::Delete),
                e("src/old/x.c", file()),
                e("src/old/y.c", file()),
            ],
        };
        let clean = tmp("rdclean");
        base(&clean);
        apply(&clean, &cs).unwrap();
        for at in 0..3 {
            let d = tmp("rdcrash");
            base(&d);
            assert!(apply_with(&d, &cs, Crash::Step(at)).is_err());
            recover(&d).unwrap();
            assert_eq!(snapshot(&d), snapshot(&clean), "crash before step {at}");
            fs::remove_dir_all(&d).unwrap();
        }
        fs::remove_dir_all(&clean).unwrap();
    }

    fn arb_change() -> impl Strategy<Value = (usize, Change)> {
        (
            0usize..6,
            prop_oneof![
                "[a-z]{0,3}".prop_map(|s| Change::File {
                    mode: 0o644,
                    data: s.into_bytes()
                }),
                Just(Change::Dir { mode: 0o755 }),
                Just(Change::OpaqueDir { mode: 0o755 }),
                Just(Change::Symlink { target: "t".into() }),
                Just(Change::Delete),
            ],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// For random change sets and a crash before a random step, the
        /// recovered tree equals the cleanly applied one.
        #[test]
        fn recovery_equals_clean_apply(changes in proptest::collection::vec(arb_change(), 1..8), at in 0usize..8) {
            const NAMES: [&str; 6] = ["a", "b", "d", "d/x", "d/y", "e"];
            // Keep parents before children and each path once.
            let mut seen = std::collections::BTreeSet::new();
            let mut entries: Vec<Entry> = Vec::new();
            for (i, c) in changes {
                if seen.insert(i) {
                    entries.push(e(NAMES[i], c));
                }
            }
            entries.sort_by(|a, b| a.path.cmp(&b.path));
            let cs = ChangeSet { entries };
            let clean = tmp("pclean");
            base(&clean);
            let ok = apply(&clean, &cs).is_ok();
            let d = tmp("pcrash");
            base(&d);
            let r = apply_with(&d, &cs, Crash::Step(at));
            if ok {
                if r.is_err() {
                    recover(&d).unwrap();
                }
                prop_assert_eq!(snapshot(&d), snapshot(&clean));
            }
            fs::remove_dir_all(&clean).unwrap();
            fs::remove_dir_all(&d).unwrap();
        }
    }

    /// `sample()` with two of its files streamed: their contents follow.
    fn streamed_sample() -> (ChangeSet, Vec<u8>) {
        let mut cs = sample();
        let mut follow = Vec::new();
        for e in &mut cs.entries {
            if let Change::File { mode, data } = &e.change {
                if e.path.as_os_str() != "README" {
                    follow.extend_from_slice(data);
                    e.change = Change::Streamed {
                        mode: *mode,
                        size: data.len() as u64,
                    };
                }
            }
        }
        // And an empty one, which takes no bytes.
        cs.entries.push(e(
            "empty",
            Change::Streamed {
                mode: 0o640,
                size: 0,
            },
        ));
        (cs, follow)
    }

    #[test]
    fn streamed_contents_fed_in_pieces_give_the_same_tree() {
        let (whole, streamed) = (tmp("whole"), tmp("streamed"));
        base(&whole);
        base(&streamed);
        apply(&whole, &sample()).unwrap();
        fs::write(whole.join("empty"), "").unwrap();
        fs::set_permissions(whole.join("empty"), fs::Permissions::from_mode(0o640)).unwrap();
        let (cs, follow) = streamed_sample();
        assert!(matches!(apply(&streamed, &cs), Err(ApplyError::NotInline)));
        assert_eq!(
            snapshot(&streamed).get("README").unwrap(),
            "file 644 hi",
            "untouched"
        );
        let mut c = Commit::begin(&streamed, &cs).unwrap();
        assert_eq!(c.missing(), follow.len() as u64);
        // Pieces that straddle the files' boundaries.
        for piece in follow.chunks(2) {
            c.feed(piece).unwrap();
        }
        assert_eq!(c.missing(), 0);
        c.finish().unwrap();
        assert_eq!(snapshot(&whole), snapshot(&streamed));
        fs::remove_dir_all(&whole).unwrap();
        fs::remove_dir_all(&streamed).unwrap();
    }

    #[test]
    fn streamed_contents_short_or_long_leave_the_tree_as_it_was() {
        let d = tmp("short");
        base(&d);
        let before = snapshot(&d);
        let (cs, follow) = streamed_sample();
        // Short: finish refuses.
        let mut c = Commit::begin(&d, &cs).unwrap();
        c.feed(&follow[..follow.len() - 1]).unwrap();
        assert!(matches!(c.finish(), Err(ApplyError::Stream(_))));
        assert_eq!(snapshot(&d), before, "nothing applied, no staging left");
        // Long: feed refuses; dropped, nothing stays.
        let mut c = Commit::begin(&d, &cs).unwrap();
        let mut more = follow.clone();
        more.push(b'!');
        assert!(matches!(c.feed(&more), Err(ApplyError::Stream(_))));
        drop(c);
        assert_eq!(snapshot(&d), before);
        // Abandoned half-way (the link broke): nothing stays either.
        let mut c = Commit::begin(&d, &cs).unwrap();
        c.feed(&follow[..1]).unwrap();
        drop(c);
        assert_eq!(snapshot(&d), before);
        fs::remove_dir_all(&d).unwrap();
    }
}
