//! The executor's side: a content-addressed cache of file contents and the
//! task trees built from it.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::image::{ImageEntry, ImageNode};
use crate::proto::{Hash, Node, TreeEntry};
use crate::tree::hash;

/// Why the cache refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// Content that does not match its hash: corrupt or forged.
    #[error("content does not match hash {0}")]
    Mismatch(String),
    /// A path in the manifest that would escape the task's tree.
    #[error("unsafe path in the task's tree: {0}")]
    UnsafePath(PathBuf),
    /// A content the manifest names that the cache does not hold.
    #[error("content {0} missing from the cache")]
    Missing(String),
    /// Disk trouble (full disk included), naming the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CasError + '_ {
    move |source| CasError::Io {
        path: path.to_owned(),
        source,
    }
}

fn chown(p: &Path, owner: Option<(u32, u32)>) -> Result<(), CasError> {
    if let Some((u, g)) = owner {
        std::os::unix::fs::lchown(p, Some(u), Some(g)).map_err(io_err(p))?;
    }
    Ok(())
}

/// A name part no other writer in this process or another uses now.
fn unique() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// Renames `tmp` to `to` unless `to` exists (then `tmp` is removed, and
/// false is returned): a content file, once there, is never replaced.
/// Replacing it would drop the last link of the inode a concurrent task
/// may be linking from, and `link` fails (`ENOENT`) on an inode whose last
/// name went meanwhile: two tasks that brought the same content at once
/// made one of them fail.
fn rename_no_replace(tmp: &Path, to: &Path) -> io::Result<bool> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, tmp, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => {
            let _ = fs::remove_file(tmp);
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Empty directories of evicted tree layers, kept to become new layers'
/// directories: a spare renamed into place makes no inode, where `mkdir`
/// makes one and the eviction's `rmdir` frees one. On this project's
/// journal-less ext4 the allocator passes over every inode freed in the
/// last minute or more, each a look-up of its inode table block: at a
/// build's pace a layer's `mkdir` took about a millisecond of CPU.
#[derive(Debug)]
pub struct SpareDirs {
    dir: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    cap: usize,
}

impl SpareDirs {
    /// At most `cap` spares, kept in `dir` (made if absent).
    fn new(dir: PathBuf, cap: usize) -> Self {
        let _ = fs::create_dir_all(&dir);
        Self {
            dir,
            free: Mutex::new(Vec::new()),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spares kept now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts a spare at `at` if one is kept, `at` is absent and its parent
    /// is there; says whether it did.
    fn take(&self, at: &Path) -> bool {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        let Some(s) = self.lock().pop() else {
            return false;
        };
        match renameat_with(CWD, &s, CWD, at, RenameFlags::NOREPLACE) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST | rustix::io::Errno::NOENT) if s.is_dir() => {
                // (`at` is there, or its parent is not: the spare waits.)
                self.lock().push(s);
                false
            }
            Err(_) => {
                let _ = fs::remove_dir(&s);
                false
            }
        }
    }

    /// Empties `dir` (an evicted layer, out of the way already) and keeps
    /// its directories as spares while fewer than the cap are kept; what
    /// is not kept is removed.
    fn recycle(&self, dir: &Path) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    self.recycle(&p);
                } else {
                    let _ = fs::remove_file(&p);
                }
            }
        }
        let empty = fs::read_dir(dir).is_ok_and(|mut r| r.next().is_none());
        if empty {
            let mut free = self.lock();
            if free.len() < self.cap {
                let to = self.dir.join(unique());
                if fs::rename(dir, &to).is_ok() {
                    free.push(to);
                    return;
                }
            }
        }
        let _ = fs::remove_dir_all(dir);
    }
}

/// Makes directory `at` (and its missing parents): a spare put there, or
/// a new one.
fn make_dir(spares: Option<&SpareDirs>, at: &Path) -> io::Result<()> {
    if spares.is_some_and(|s| s.take(at)) {
        return Ok(());
    }
    fs::create_dir_all(at)
}

/// An overlay whiteout at `at`: a `0:0` character device (`CAP_MKNOD`).
fn mknod_whiteout(at: &Path) -> io::Result<()> {
    nix::sys::stat::mknod(
        at,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        nix::sys::stat::makedev(0, 0),
    )
    .map_err(io::Error::from)
}

/// Makes a layer's top directory `dest`: mode 0755, `owner`'s.
fn root_dir(
    dest: &Path,
    owner: Option<(u32, u32)>,
    spares: Option<&SpareDirs>,
) -> Result<(), CasError> {
    make_dir(spares, dest).map_err(io_err(dest))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).map_err(io_err(dest))?;
    chown(dest, owner)
}

/// `dest/rel`, for a manifest path `rel` that stays inside `dest`.
fn inside(dest: &Path, rel: &Path) -> Result<PathBuf, CasError> {
    if rel.as_os_str().is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(CasError::UnsafePath(rel.to_owned()));
    }
    Ok(dest.join(rel))
}

/// A directory of contents named by their hash, with a size cap.
#[derive(Debug, Clone)]
pub struct Cas {
    dir: PathBuf,
    cap_bytes: u64,
    /// Contents seen in the cache (saves a `stat` per file per task);
    /// eviction takes its victims out first.
    known: Arc<Mutex<HashSet<Hash>>>,
    /// Bytes in the cache, once counted (eviction then reads the
    /// directory only when over the cap).
    usage: Arc<Mutex<Option<u64>>>,
    /// When each content (and its executable copy) was last given its
    /// owner and marked used, by owner: linked again within
    /// [`TOUCH_EVERY`], a file costs one `link`, not also an `lchown`, an
    /// `open` and a `futimens` (each of which dirties its inode). A build
    /// makes a tree of hundreds of files whole every few compiles.
    readied: Arc<Mutex<HashMap<Readied, Instant>>>,
}

/// A content, whether its executable copy, and the owner it was given.
type Readied = (Hash, bool, Option<(u32, u32)>);

/// How often a content in use is marked used again (its modification
/// time, by which eviction picks the least recently used).
const TOUCH_EVERY: Duration = Duration::from_secs(60);

impl Cas {
    /// A cache in `dir` (made if absent) holding at most `cap_bytes`.
    ///
    /// # Errors
    /// The directory cannot be made.
    pub fn open(dir: &Path, cap_bytes: u64) -> Result<Self, CasError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(Self::at(dir, cap_bytes))
    }

    /// A cache handle for `dir` without touching the disk (for an executor
    /// that will refuse tasks anyway).
    pub fn at(dir: &Path, cap_bytes: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            cap_bytes,
            known: Arc::default(),
            usage: Arc::default(),
            readied: Arc::default(),
        }
    }

    fn readied(&self) -> std::sync::MutexGuard<'_, HashMap<Readied, Instant>> {
        self.readied.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets `h`: its file is gone.
    fn forget(&self, h: &Hash) {
        self.known().remove(h);
        self.readied().retain(|k, _| &k.0 != h);
    }

    fn path(&self, h: &Hash) -> PathBuf {
        self.dir.join(hex::encode(h))
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashSet<Hash>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cache holds `h`.
    fn has(&self, h: &Hash) -> bool {
        if self.known().contains(h) {
            return true;
        }
        let there = self.path(h).exists();
        if there {
            self.known().insert(*h);
        }
        there
    }

    fn grew(&self, bytes: u64) {
        if let Some(u) = self
            .usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            *u += bytes;
        }
    }

    /// The hashes among `wanted` that the cache lacks (each once).
    pub fn missing(&self, wanted: impl IntoIterator<Item = Hash>) -> Vec<Hash> {
        let mut out: Vec<Hash> = wanted.into_iter().filter(|h| !self.has(h)).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Stores `data` under `h` after checking that it hashes to `h`.
    ///
    /// # Errors
    /// A mismatch, or the disk refused (nothing partial is left).
    pub fn put(&self, h: &Hash, data: &[u8]) -> Result<(), CasError> {
        if &hash(data) != h {
            return Err(CasError::Mismatch(hex::encode(h)));
        }
        let p = self.path(h);
        if self.has(h) {
            return Ok(()); // another task brought the same content meanwhile
        }
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", hex::encode(&h[..8]), unique()));
        let r = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.set_permissions(fs::Permissions::from_mode(0o644))?;
            rename_no_replace(&tmp, &p)
        })();
        let placed = match r {
            Ok(placed) => placed,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io_err(&p)(e));
            }
        };
        self.known().insert(*h);
        if placed {
            self.grew(data.len() as u64);
        }
        Ok(())
    }

    /// Builds the task's tree at `dest` from the cache: files hard-linked
    /// from it, directories and links made, everything owned by `owner`
    /// (the guest's uid and gid) so that the guest may change its files
    /// (through the overlay; the cache itself is never reachable from the
    /// workspace). File modes are normalised to 0644, or 0755 when any
    /// execute bit is set: the contents are shared between tasks.
    ///
    /// # Errors
    /// Unsafe paths, missing contents, disk trouble.
    pub fn materialize(
        &self,
        tree: &[TreeEntry],
        dest: &Path,
        owner: Option<(u32, u32)>,
    ) -> Result<(), CasError> {
        self.materialize_with(tree, dest, owner, None)
    }

    /// [`Cas::materialize`], its directories spares where there are.
    fn materialize_with(
        &self,
        tree: &[TreeEntry],
        dest: &Path,
        owner: Option<(u32, u32)>,
        spares: Option<&SpareDirs>,
    ) -> Result<(), CasError> {
        let now = SystemTime::now();
        root_dir(dest, owner, spares)?;
        for e in tree {
            self.make(e, dest, owner, now, spares)?;
        }
        Ok(())
    }

    /// Builds at `dest` the layer that shows `tree` when stacked on a
    /// layer showing `base` ([`delta`]): the entries that differ, made as
    /// [`Cas::materialize`] makes them, and whiteouts (`0:0` character
    /// devices, which need `CAP_MKNOD`) for what `tree` lacks.
    ///
    /// # Errors
    /// As [`Cas::materialize`]; no right to make a whiteout.
    pub fn materialize_delta(
        &self,
        d: &Delta<'_>,
        dest: &Path,
        owner: Option<(u32, u32)>,
    ) -> Result<(), CasError> {
        self.materialize_delta_with(d, dest, owner, None)
    }

    /// [`Cas::materialize_delta`], its directories spares where there are.
    fn materialize_delta_with(
        &self,
        d: &Delta<'_>,
        dest: &Path,
        owner: Option<(u32, u32)>,
        spares: Option<&SpareDirs>,
    ) -> Result<(), CasError> {
        let now = SystemTime::now();
        root_dir(dest, owner, spares)?;
        for e in &d.entries {
            self.make(e, dest, owner, now, spares)?;
        }
        for w in &d.whiteouts {
            let target = inside(dest, w)?;
            self.whiteout(&target).map_err(io_err(&target))?;
        }
        Ok(())
    }

    /// Makes a whiteout at `target`: a link to the cache's own (`.whiteout`,
    /// made when first needed, and anew when it has as many links as the
    /// file system allows), as the overlay does in its work directory. A
    /// `0:0` character device made for each whiteout was an inode made and
    /// one freed when its layer went.
    fn whiteout(&self, target: &Path) -> io::Result<()> {
        let master = self.dir.join(".whiteout");
        match fs::hard_link(&master, target) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && master.parent().is_some_and(Path::is_dir) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EMLINK) => {}
            Err(_) => return mknod_whiteout(target),
        }
        // A new one in place of what was not there or is full (the links
        // to a full one stay whiteouts).
        let tmp = self.dir.join(format!(".whiteout.tmp{}", unique()));
        mknod_whiteout(&tmp)?;
        fs::rename(&tmp, &master).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        fs::hard_link(&master, target).or_else(|_| mknod_whiteout(target))
    }

    /// Makes one entry of a task's tree under `dest`.
    fn make(
        &self,
        e: &TreeEntry,
        dest: &Path,
        owner: Option<(u32, u32)>,
        now: SystemTime,
        spares: Option<&SpareDirs>,
    ) -> Result<(), CasError> {
        let target = inside(dest, &e.path)?;
        match &e.node {
            Node::Dir { mode } => {
                make_dir(spares, &target).map_err(io_err(&target))?;
                fs::set_permissions(&target, fs::Permissions::from_mode(*mode | 0o700))
                    .map_err(io_err(&target))?;
                chown(&target, owner)?;
            }
            Node::Symlink { target: to } => {
                std::os::unix::fs::symlink(to, &target).map_err(io_err(&target))?;
                chown(&target, owner)?;
            }
            Node::File { hash: h, mode, .. } => {
                if !self.has(h) {
                    return Err(CasError::Missing(hex::encode(h)));
                }
                let base = self.path(h);
                let exec = mode & 0o111 != 0;
                let src = if exec {
                    let x = base.with_extension("x");
                    if !x.exists() {
                        let tmp = base.with_extension(format!("x.tmp{}", unique()));
                        let n = fs::copy(&base, &tmp).map_err(io_err(&tmp))?;
                        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
                            .map_err(io_err(&tmp))?;
                        chown(&tmp, owner)?;
                        if rename_no_replace(&tmp, &x).map_err(io_err(&x))? {
                            self.grew(n);
                        }
                    }
                    x
                } else {
                    base
                };
                let key = (*h, exec, owner);
                let fresh = self
                    .readied()
                    .get(&key)
                    .is_some_and(|t| t.elapsed() < TOUCH_EVERY);
                if !fresh {
                    chown(&src, owner)?;
                    if let Ok(f) = fs::File::options().write(true).open(&src) {
                        let _ = f.set_modified(now);
                    }
                    self.readied().insert(key, Instant::now());
                }
                // (Once more if the content was evicted and brought back
                // between the look-up of its name and the link.)
                let linked = fs::hard_link(&src, &target).or_else(|err| {
                    if err.kind() == io::ErrorKind::NotFound && src.exists() {
                        fs::hard_link(&src, &target)
                    } else {
                        Err(err)
                    }
                });
                if let Err(err) = linked {
                    if err.kind() == io::ErrorKind::NotFound && !src.exists() {
                        // Evicted since it was seen.
                        self.forget(h);
                        return Err(CasError::Missing(hex::encode(h)));
                    }
                    return Err(io_err(&target)(err));
                }
            }
        }
        Ok(())
    }

    /// Unpacks an image at `dest` exactly: every file a copy of its
    /// content with the image's mode, owner and modification time,
    /// directories and links with theirs (the executor runs as root).
    ///
    /// # Errors
    /// Unsafe paths, missing contents, disk trouble.
    pub fn materialize_image(&self, image: &[ImageEntry], dest: &Path) -> Result<(), CasError> {
        use std::os::unix::fs::lchown;
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        fs::set_permissions(dest, fs::Permissions::from_mode(0o755)).map_err(io_err(dest))?;
        // Directory modes last, so that a read-only directory still takes
        // its entries (root or not).
        let mut dirs = Vec::new();
        for e in image {
            let target = inside(dest, &e.path)?;
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            match &e.node {
                ImageNode::Dir { mode, uid, gid } => {
                    fs::create_dir_all(&target).map_err(io_err(&target))?;
                    lchown(&target, Some(*uid), Some(*gid)).map_err(io_err(&target))?;
                    dirs.push((target, *mode));
                }
                ImageNode::Symlink {
                    target: to,
                    uid,
                    gid,
                } => {
                    std::os::unix::fs::symlink(to, &target).map_err(io_err(&target))?;
                    lchown(&target, Some(*uid), Some(*gid)).map_err(io_err(&target))?;
                }
                ImageNode::File {
                    hash: h,
                    mode,
                    uid,
                    gid,
                    mtime,
                    ..
                } => {
                    let base = self.path(h);
                    if !base.exists() {
                        return Err(CasError::Missing(hex::encode(h)));
                    }
                    fs::copy(&base, &target).map_err(io_err(&target))?;
                    // chown clears set-id bits: the mode comes after it.
                    lchown(&target, Some(*uid), Some(*gid)).map_err(io_err(&target))?;
                    let f = fs::File::options()
                        .write(true)
                        .open(&target)
                        .map_err(io_err(&target))?;
                    f.set_permissions(fs::Permissions::from_mode(*mode))
                        .map_err(io_err(&target))?;
                    let t = u64::try_from(*mtime).map_or(SystemTime::UNIX_EPOCH, |s| {
                        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s)
                    });
                    f.set_modified(t).map_err(io_err(&target))?;
                }
            }
        }
        for (d, mode) in dirs.into_iter().rev() {
            fs::set_permissions(&d, fs::Permissions::from_mode(mode)).map_err(io_err(&d))?;
        }
        Ok(())
    }

    /// Removes the least recently used contents until the cache is under
    /// its cap. Returns the bytes freed.
    pub fn evict(&self) -> u64 {
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        if usage.is_some_and(|u| u <= self.cap_bytes) {
            return 0;
        }
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        let mut freed = 0;
        for (_, len, p) in files {
            if total <= self.cap_bytes {
                break;
            }
            if let Some(h) = p
                .file_name()
                .and_then(|n| hex::decode(n.as_encoded_bytes()).ok())
                .and_then(|v| Hash::try_from(v).ok())
            {
                self.forget(&h);
            }
            if fs::remove_file(&p).is_ok() {
                total -= len;
                freed += len;
            }
        }
        *usage = Some(total);
        freed
    }
}

/// A tree as a map, path to node, as a layer remembers it.
///
/// Keyed by the path's bytes: hashing or comparing a `Path` walks its
/// components, and a build compares every tree with a few layers' maps.
/// (A manifest's paths are normal: relative, no `.`, no doubled `/`, so
/// equal bytes are equal paths.)
pub type TreeMap = HashMap<Vec<u8>, Node>;

fn key(p: &Path) -> &[u8] {
    std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str())
}

fn path(k: &[u8]) -> &Path {
    Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(k))
}

/// A tree as a [`TreeMap`].
pub fn tree_map(tree: &[TreeEntry]) -> TreeMap {
    tree.iter()
        .map(|e| (key(&e.path).to_vec(), e.node.clone()))
        .collect()
}

/// What a layer on top of `base` must hold to show `tree`: the entries
/// that differ from the base (with the directories above them) and
/// whiteouts for what the base has and the tree does not.
#[derive(Debug, PartialEq, Eq)]
pub struct Delta<'a> {
    /// Entries to make, in the tree's order (parents first).
    pub entries: Vec<&'a TreeEntry>,
    /// Paths to hide: the topmost of each removed subtree.
    pub whiteouts: Vec<PathBuf>,
}

impl Delta<'_> {
    /// How much making the layer costs, in entries.
    pub fn len(&self) -> usize {
        self.entries.len() + self.whiteouts.len()
    }

    /// Nothing differs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The layer that turns `base` into `tree` under an overlay: where both
/// have a directory, the overlay merges them, so only what differs is
/// made; a non-directory hides whatever the base has at its path; a
/// whiteout hides a removed entry (and everything under it).
pub fn delta<'a>(tree: &'a [TreeEntry], base: &TreeMap) -> Delta<'a> {
    match delta_by(tree, &by_path(tree), base, usize::MAX) {
        Some(d) => d,
        None => unreachable!("no delta holds more than usize::MAX entries"),
    }
}

/// `tree` by path, as [`delta_by`] takes it.
fn by_path(tree: &[TreeEntry]) -> HashMap<&[u8], &Node> {
    tree.iter().map(|e| (key(&e.path), &e.node)).collect()
}

/// [`delta`], with the tree by path made once for many bases; `None` as
/// soon as it is known to hold more than `limit` entries (then it is not
/// worth finishing: a closer base is known already).
fn delta_by<'a>(
    tree: &'a [TreeEntry],
    new: &HashMap<&'a [u8], &'a Node>,
    base: &TreeMap,
    limit: usize,
) -> Option<Delta<'a>> {
    let is_dir = |n: Option<&Node>| matches!(n, Some(Node::Dir { .. }));
    let mut need: HashSet<&[u8]> = HashSet::new();
    fn mark<'p>(need: &mut HashSet<&'p [u8]>, p: &'p Path) {
        for a in p.ancestors() {
            if a.as_os_str().is_empty() || !need.insert(key(a)) {
                break;
            }
        }
    }
    // (Every key marked is one of the tree's own entries, its directories
    // included, so `need` never outgrows the delta's entries.)
    for e in tree {
        if base.get(key(&e.path)) != Some(&e.node) {
            mark(&mut need, &e.path);
            if need.len() > limit {
                return None;
            }
        }
    }
    let mut whiteouts = Vec::new();
    for k in base.keys() {
        if new.contains_key(k.as_slice()) {
            continue;
        }
        if need.len() + whiteouts.len() > limit {
            return None;
        }
        let p = path(k);
        let parent = p.parent().unwrap_or(Path::new(""));
        // Under a directory both have, the overlay would show the base's
        // entry: hide it. Anywhere else a whiteout higher up, or the
        // tree's own non-directory, hides it already.
        let pk = key(parent);
        if parent.as_os_str().is_empty() || (is_dir(new.get(pk).copied()) && is_dir(base.get(pk))) {
            whiteouts.push(p.to_owned());
            if let Some(parent) = new.get_key_value(pk).map(|(k, _)| *k) {
                mark(&mut need, path(parent));
            }
        }
    }
    if need.len() + whiteouts.len() > limit {
        return None;
    }
    whiteouts.sort();
    Some(Delta {
        entries: tree
            .iter()
            .filter(|e| need.contains(key(&e.path)))
            .collect(),
        whiteouts,
    })
}

/// The closest of `candidates` (key, tree, last use, the largest delta
/// worth building on it) to build `tree` on: the smallest delta within its
/// candidate's cap, the lower key on a tie. Each delta costs a look-up per
/// entry of both trees, and a build makes a new tree for every compile, so
/// the most recently used go first (the last compile's tree is one object
/// file away) and a tree further off than the best so far is passed by: on
/// its entry count alone (the entries one tree has beyond the other are
/// all in the delta), or as soon as its delta outgrows the best.
fn closest<'a, 'k>(
    tree: &'a [TreeEntry],
    candidates: &'k [(String, Arc<TreeMap>, u64, usize)],
) -> Option<(Delta<'a>, &'k String)> {
    let new = by_path(tree);
    let mut order: Vec<&(String, Arc<TreeMap>, u64, usize)> = candidates.iter().collect();
    order.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    let mut best: Option<(Delta<'a>, &'k String)> = None;
    for (k, t, _, cap) in order {
        let limit = best.as_ref().map_or(*cap, |(d, _)| d.len().min(*cap));
        if tree.len().saturating_sub(t.len()) > limit {
            continue;
        }
        let Some(d) = delta_by(tree, &new, t, limit) else {
            continue;
        };
        let better = best
            .as_ref()
            .is_none_or(|(b, bk)| (d.len(), k) < (b.len(), *bk));
        if better {
            best = Some((d, k));
        }
    }
    best
}

/// The largest layer worth making at `depth` (1: on a whole tree) for a
/// tree of `n` entries: half the tree there, half as much again at each
/// depth below. A build adds a file or a few per compile: each compile's
/// layer goes on the last one while it is thin enough for its depth, and
/// when none is, on a shallower one, holding everything since. Like a
/// binary counter, each file is linked again at most about once per depth
/// (2.6 links per added file in the test below; with one cap of an eighth
/// of the tree for every depth, each layer past the deepest held
/// everything since the deepest, and the tree was made whole again every
/// eighth of its size: 30 to 45 links per compile in a simulation of the
/// bench's build), and a tree is made whole again only once it has grown
/// by half.
fn delta_cap(n: usize, depth: usize) -> usize {
    ((n / 2).max(16) >> depth.saturating_sub(1).min(usize::BITS as usize - 1)).max(1)
}

/// How deep a stack of layers may grow before a tree is made whole again
/// (each layer is one more directory for the overlay to look in).
pub const MAX_DEPTH: usize = 8;

/// Read-only lower layers shared by every task with the same tree: a
/// tree is materialised once (hard links into the cache) and then mounted
/// by as many overlays as use it, since an overlay never writes to its
/// lower layer. A batch job's thousand tasks share one.
///
/// A tree close to one made already (the next compile of a build, whose
/// tree has one more object file) is made as a thin layer on top of that
/// one: only what differs, and whiteouts for what is gone. The overlay
/// stacks them (`lowerdir=top:…:base`), up to [`MAX_DEPTH`] deep.
#[derive(Debug)]
pub struct Lowers {
    dir: PathBuf,
    keep: usize,
    state: std::sync::Mutex<State>,
    /// Evicted tree layers' directories, for new ones (none for images,
    /// whose directories have their own owners and modes).
    spares: Option<SpareDirs>,
}

#[derive(Debug, Default)]
struct State {
    /// Holders per layer (a layer's holders hold its bases too).
    in_use: HashMap<String, usize>,
    /// The layers made, by name.
    layers: HashMap<String, Layer>,
    /// Ticks on every use, for eviction.
    clock: u64,
}

#[derive(Debug)]
struct Layer {
    /// The layer it sits on, if any.
    base: Option<String>,
    /// How many layers it sits on.
    depth: usize,
    /// The tree it shows (with its bases), for building on it.
    tree: Option<Arc<TreeMap>>,
    used: u64,
}

impl State {
    /// The layer `key` with its bases, held, if it is made.
    fn hold_made(&mut self, key: &str) -> Option<Vec<String>> {
        if !self.layers.contains_key(key) {
            return None;
        }
        let keys = self.chain(key);
        self.hold(&keys);
        Some(keys)
    }

    /// `key` and the layers it sits on, top first.
    fn chain(&self, key: &str) -> Vec<String> {
        let mut out = vec![key.to_owned()];
        while let Some(b) = out
            .last()
            .and_then(|k| self.layers.get(k))
            .and_then(|l| l.base.clone())
        {
            out.push(b);
        }
        out
    }

    fn hold(&mut self, keys: &[String]) {
        self.clock += 1;
        for k in keys {
            *self.in_use.entry(k.clone()).or_insert(0) += 1;
            if let Some(l) = self.layers.get_mut(k) {
                l.used = self.clock;
            }
        }
    }

    fn release(&mut self, keys: &[String]) {
        for k in keys {
            if let Some(n) = self.in_use.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.in_use.remove(k);
                }
            }
        }
    }
}

/// What [`Lowers::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// The tree's layer, made already, now held.
    Made(Lower),
    /// The tree's layer is still to be made.
    ToMake(ToMake),
}

/// A tree whose layer is to be made ([`Lowers::lookup`],
/// [`Lowers::to_make`]).
#[derive(Debug)]
pub struct ToMake {
    lowers: Arc<Lowers>,
    tree: Vec<TreeEntry>,
    /// Its name, when the lookup worked it out.
    key: Option<String>,
}

impl ToMake {
    /// Makes the layer as [`Lowers::get`] does (or holds it, if it is
    /// made already, by another task meanwhile say). Blocks on the file
    /// system.
    ///
    /// # Errors
    /// As [`Lowers::get`].
    pub fn make(self, cas: &Cas, owner: Option<(u32, u32)>) -> Result<Lower, CasError> {
        let key = match self.key {
            Some(k) => k,
            None => self.lowers.key(&self.tree)?,
        };
        self.lowers.make(cas, &self.tree, key, owner)
    }
}

/// A lower layer in use (with the layers it sits on); released on drop.
#[derive(Debug)]
pub struct Lower {
    lowers: Arc<Lowers>,
    /// Top first.
    keys: Vec<String>,
    /// The top layer's directory.
    pub path: PathBuf,
}

impl Lower {
    /// The layer is made (a task may mount it).
    pub fn ready(&self) -> bool {
        self.lowers.lock().layers.contains_key(&self.keys[0])
    }

    /// The directories to stack, top first (`lowerdir=` in this order).
    pub fn stack(&self) -> Vec<PathBuf> {
        self.keys.iter().map(|k| self.lowers.dir.join(k)).collect()
    }
}

impl Clone for Lower {
    /// Another hold on the same layers (each released on its own drop).
    fn clone(&self) -> Self {
        self.lowers.lock().hold(&self.keys);
        Self {
            lowers: self.lowers.clone(),
            keys: self.keys.clone(),
            path: self.path.clone(),
        }
    }
}

impl Drop for Lower {
    fn drop(&mut self) {
        self.lowers.lock().release(&self.keys);
    }
}

impl Lowers {
    /// Lower layers under `dir` (emptied: layers from an earlier life are
    /// not trusted), keeping at most `keep` unused ones (and what they sit
    /// on).
    pub fn new(dir: &Path, keep: usize) -> Self {
        let _ = fs::remove_dir_all(dir);
        let _ = fs::create_dir_all(dir);
        Self {
            dir: dir.to_owned(),
            keep,
            state: std::sync::Mutex::new(State::default()),
            spares: None,
        }
    }

    /// [`Lowers::new`] for trees' layers, whose evicted directories are
    /// kept (up to `spares`) to become new layers' ([`SpareDirs`]).
    pub fn for_trees(dir: &Path, keep: usize, spares: usize) -> Self {
        let mut l = Self::new(dir, keep);
        l.spares = Some(SpareDirs::new(dir.join(".spare"), spares));
        l
    }

    /// The spare directories, if kept.
    pub fn spares(&self) -> Option<&SpareDirs> {
        self.spares.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The layers made and held now, for tests and diagnostics.
    pub fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.layers.len(), st.in_use.len())
    }

    /// The lower layer of `tree` if it is made already (held, as
    /// [`Lowers::get`] holds it), else what makes it ([`ToMake::make`],
    /// the tree's name worked out once). Touches no file: cheap enough for
    /// an event loop (the tree is serialized and hashed).
    ///
    /// # Errors
    /// The tree cannot be serialized.
    pub fn lookup(self: &Arc<Self>, tree: &[TreeEntry]) -> Result<Lookup, CasError> {
        let key = self.key(tree)?;
        Ok(match self.lock().hold_made(&key) {
            Some(keys) => Lookup::Made(self.lower(keys)),
            None => Lookup::ToMake(ToMake {
                lowers: self.clone(),
                tree: tree.to_vec(),
                key: Some(key),
            }),
        })
    }

    /// What makes `tree`'s layer (or holds it, if it is made already)
    /// without looking it up first: its name is worked out by
    /// [`ToMake::make`], off the caller's thread (a large tree's hashing
    /// would hold up an event loop).
    pub fn to_make(self: &Arc<Self>, tree: Vec<TreeEntry>) -> ToMake {
        ToMake {
            lowers: self.clone(),
            tree,
            key: None,
        }
    }

    /// What names `tree`'s layer: a hash of the tree.
    fn key(&self, tree: &[TreeEntry]) -> Result<String, CasError> {
        let bytes = postcard::to_stdvec(tree).map_err(|e| CasError::Io {
            path: self.dir.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(hex::encode(&hash(&bytes)[..16]))
    }

    /// The lower layer of `tree`, made from `cas` if no task has it yet:
    /// on top of the closest layer made already when that costs less than
    /// making it whole.
    ///
    /// # Errors
    /// As [`Cas::materialize`].
    pub fn get(
        self: &Arc<Self>,
        cas: &Cas,
        tree: &[TreeEntry],
        owner: Option<(u32, u32)>,
    ) -> Result<Lower, CasError> {
        let key = self.key(tree)?;
        self.make(cas, tree, key, owner)
    }

    /// [`Lowers::get`] with the tree's name worked out.
    fn make(
        self: &Arc<Self>,
        cas: &Cas,
        tree: &[TreeEntry],
        key: String,
        owner: Option<(u32, u32)>,
    ) -> Result<Lower, CasError> {
        // Made already (meanwhile, say): hold it with its bases.
        let candidates = {
            let mut st = self.lock();
            if let Some(keys) = st.hold_made(&key) {
                return Ok(self.lower(keys));
            }
            st.layers
                .iter()
                .filter(|(_, l)| l.depth < MAX_DEPTH)
                .filter_map(|(k, l)| {
                    let cap = delta_cap(tree.len(), l.depth + 1);
                    Some((k.clone(), l.tree.clone()?, l.used, cap))
                })
                .collect::<Vec<_>>()
        };
        // The closest layer to build on, if building on it is cheaper.
        let best = closest(tree, &candidates);
        let base = best.and_then(|(d, k)| {
            let mut st = self.lock();
            if !st.layers.contains_key(k) {
                return None; // evicted meanwhile
            }
            let keys = st.chain(k);
            // The overlay's options must fit one page.
            let len: usize = keys
                .iter()
                .map(|k| self.dir.join(k).as_os_str().len() + 1)
                .sum();
            if len + self.dir.as_os_str().len() > 3000 {
                return None;
            }
            st.hold(&keys);
            Some((keys, d))
        });
        let tmp = self.dir.join(format!(".{key}.{}", unique()));
        let built = match &base {
            Some((_, d)) => cas
                .materialize_delta_with(d, &tmp, owner, self.spares())
                .map(|()| true)
                .or_else(|_| {
                    // E.g. no right to make whiteouts: make it whole.
                    let _ = fs::remove_dir_all(&tmp);
                    cas.materialize_with(tree, &tmp, owner, self.spares())
                        .map(|()| false)
                }),
            None => cas
                .materialize_with(tree, &tmp, owner, self.spares())
                .map(|()| false),
        };
        let on_base = match built {
            Ok(b) => b,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                if let Some((keys, _)) = &base {
                    self.lock().release(keys);
                }
                return Err(e);
            }
        };
        let mut st = self.lock();
        let base_keys = base.map(|(k, _)| k).unwrap_or_default();
        if st.layers.contains_key(&key) {
            // Another task made it meanwhile: theirs is as good.
            st.release(&base_keys);
            let keys = st.chain(&key);
            st.hold(&keys);
            drop(st);
            let _ = fs::remove_dir_all(&tmp);
            return Ok(self.lower(keys));
        }
        let path = self.dir.join(&key);
        if let Err(e) = fs::rename(&tmp, &path) {
            st.release(&base_keys);
            drop(st);
            let _ = fs::remove_dir_all(&tmp);
            return Err(io_err(&path)(e));
        }
        let (base_key, depth) = if on_base {
            let d = base_keys
                .first()
                .and_then(|k| st.layers.get(k))
                .map_or(0, |l| l.depth + 1);
            (base_keys.first().cloned(), d)
        } else {
            st.release(&base_keys);
            (None, 0)
        };
        st.layers.insert(
            key.clone(),
            Layer {
                base: base_key,
                depth,
                tree: Some(Arc::new(tree_map(tree))),
                used: 0,
            },
        );
        let mut keys = vec![key];
        if on_base {
            keys.extend(base_keys);
        }
        // The bases are held already; the new layer is held now.
        st.hold(&keys[..1]);
        Ok(self.lower(keys))
    }

    fn lower(self: &Arc<Self>, keys: Vec<String>) -> Lower {
        Lower {
            lowers: self.clone(),
            path: self.dir.join(&keys[0]),
            keys,
        }
    }

    /// The layer named `key`, held (never evicted while the [`Lower`]
    /// lives) whether or not it is made yet ([`Lower::ready`]).
    pub fn hold(self: &Arc<Self>, key: &str) -> Lower {
        let mut st = self.lock();
        let keys = st.chain(key);
        st.hold(&keys);
        drop(st);
        self.lower(keys)
    }

    /// Makes the held layer with `build` (into a fresh directory, renamed
    /// into place whole) unless it is made already.
    ///
    /// # Errors
    /// Whatever `build` returned; nothing partial stays.
    pub fn fill(
        &self,
        lower: &Lower,
        build: impl FnOnce(&Path) -> Result<(), CasError>,
    ) -> Result<(), CasError> {
        if lower.ready() {
            return Ok(());
        }
        let key = &lower.keys[0];
        let tmp = self.dir.join(format!(".{key}.{}", unique()));
        if let Err(e) = build(&tmp) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let mut st = self.lock();
        if st.layers.contains_key(key) {
            // Another task made it meanwhile: theirs is as good.
            drop(st);
            let _ = fs::remove_dir_all(&tmp);
            return Ok(());
        }
        if let Err(e) = fs::rename(&tmp, &lower.path) {
            drop(st);
            let _ = fs::remove_dir_all(&tmp);
            return Err(io_err(&lower.path)(e));
        }
        st.clock += 1;
        let used = st.clock;
        st.layers.insert(
            key.clone(),
            Layer {
                base: None,
                depth: 0,
                tree: None,
                used,
            },
        );
        Ok(())
    }

    /// Removes unused layers beyond the `keep` most recently used (and
    /// the layers those sit on).
    pub fn evict(&self) {
        let mut trash = Vec::new();
        {
            let mut st = self.lock();
            let mut idle: Vec<(u64, &String)> = st
                .layers
                .iter()
                .filter(|(k, _)| !st.in_use.contains_key(*k))
                .map(|(k, l)| (l.used, k))
                .collect();
            if idle.len() <= self.keep {
                return;
            }
            idle.sort_by(|a, b| b.cmp(a));
            let mut keep: HashSet<String> = st.in_use.keys().cloned().collect();
            keep.extend(idle.iter().take(self.keep).map(|(_, k)| (*k).clone()));
            for k in keep.clone() {
                keep.extend(st.chain(&k));
            }
            let victims: Vec<String> = st
                .layers
                .keys()
                .filter(|k| !keep.contains(*k))
                .cloned()
                .collect();
            for v in victims {
                st.layers.remove(&v);
                // Out of the way at once (a task may make the same tree
                // again now); removed after the lock is let go.
                let t = self.dir.join(format!(".trash-{v}.{}", unique()));
                if fs::rename(self.dir.join(&v), &t).is_ok() {
                    trash.push(t);
                }
            }
        }
        for t in trash {
            match &self.spares {
                Some(sp) => sp.recycle(&t),
                None => {
                    let _ = fs::remove_dir_all(t);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-cas-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn put_checks_hashes_and_materialize_builds_the_tree() {
        let d = tmp("m");
        let cas = Cas::open(&d.join("cas"), 1 << 20).unwrap();
        let a = b"hello".to_vec();
        let h = hash(&a);
        assert_eq!(cas.missing([h, h]), vec![h]);
        assert!(matches!(cas.put(&h, b"forged"), Err(CasError::Mismatch(_))));
        cas.put(&h, &a).unwrap();
        assert!(cas.missing([h]).is_empty());
        let tree = vec![
            TreeEntry {
                path: "src".into(),
                node: Node::Dir { mode: 0o755 },
            },
            TreeEntry {
                path: "src/a".into(),
                node: Node::File {
                    hash: h,
                    mode: 0o644,
                    size: 5,
                },
            },
            TreeEntry {
                path: "run.sh".into(),
                node: Node::File {
                    hash: h,
                    mode: 0o755,
                    size: 5,
                },
            },
            TreeEntry {
                path: "l".into(),
                node: Node::Symlink {
                    target: "src/a".into(),
                },
            },
        ];
        cas.materialize(&tree, &d.join("lower"), None).unwrap();
        assert_eq!(fs::read(d.join("lower/src/a")).unwrap(), a);
        assert_eq!(
            fs::metadata(d.join("lower/run.sh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(d.join("lower/l")).unwrap(),
            PathBuf::from("src/a")
        );
        let bad = vec![TreeEntry {
            path: "../x".into(),
            node: Node::Dir { mode: 0o755 },
        }];
        assert!(matches!(
            cas.materialize(&bad, &d.join("l2"), None),
            Err(CasError::UnsafePath(_))
        ));
        let missing = vec![TreeEntry {
            path: "m".into(),
            node: Node::File {
                hash: [9; 32],
                mode: 0o644,
                size: 1,
            },
        }];
        assert!(matches!(
            cas.materialize(&missing, &d.join("l3"), None),
            Err(CasError::Missing(_))
        ));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_content_linked_again_soon_is_not_touched_again() {
        let d = tmp("touch");
        let cas = Cas::open(&d.join("cas"), 1 << 20).unwrap();
        let h = hash(b"obj");
        cas.put(&h, b"obj").unwrap();
        let tree = vec![file("f.o", b"obj")];
        let mtime = || fs::metadata(cas.path(&h)).unwrap().modified().unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let set = |t| {
            fs::File::options()
                .write(true)
                .open(cas.path(&h))
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        set(old);
        // First use: marked used (eviction goes by modification time).
        cas.materialize(&tree, &d.join("l1"), None).unwrap();
        assert!(mtime() > old);
        // Used again within the minute: linked, not touched.
        set(old);
        cas.materialize(&tree, &d.join("l2"), None).unwrap();
        assert_eq!(mtime(), old);
        assert_eq!(fs::read(d.join("l2/f.o")).unwrap(), b"obj");
        // Evicted and brought again: marked anew.
        cas.forget(&h);
        cas.materialize(&tree, &d.join("l3"), None).unwrap();
        assert!(mtime() > old);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_image_is_unpacked_exactly() {
        use std::os::unix::fs::MetadataExt;
        let d = tmp("img");
        let src = d.join("src");
        fs::create_dir_all(src.join("usr/bin")).unwrap();
        fs::create_dir_all(src.join("etc/ro")).unwrap();
        fs::write(src.join("usr/bin/tool"), "tool").unwrap();
        fs::set_permissions(src.join("usr/bin/tool"), fs::Permissions::from_mode(0o4711)).unwrap();
        fs::write(src.join("etc/ro/conf"), "conf").unwrap();
        fs::set_permissions(src.join("etc/ro/conf"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(src.join("etc/ro"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::hard_link(src.join("usr/bin/tool"), src.join("usr/bin/tool2")).unwrap();
        std::os::unix::fs::symlink("usr/bin", src.join("bin")).unwrap();
        let mut hc = crate::hashcache::HashCache::in_memory();
        let img = crate::image::scan(&src, &mut hc).unwrap();
        let cas = Cas::open(&d.join("cas"), 1 << 20).unwrap();
        let want: Vec<Hash> = img.hashes().collect();
        img.contents(&cas.missing(want), |h, data| {
            cas.put(&h, &data)
                .map_err(|e| io::Error::other(e.to_string()))
        })
        .unwrap();
        let out = d.join("out");
        cas.materialize_image(&img.entries, &out).unwrap();
        // Scanned again, the copy is the same image: modes (set-id bits
        // included), owners, times, links.
        let again = crate::image::scan(&out, &mut hc).unwrap();
        assert_eq!(again.entries, img.entries);
        assert_eq!(again.id, img.id);
        // Copies, not links into the cache.
        assert_eq!(fs::metadata(out.join("usr/bin/tool")).unwrap().nlink(), 1);
        // A manifest that escapes the root is refused.
        let mut evil = img.entries.clone();
        evil[0].path = "../escape".into();
        assert!(matches!(
            cas.materialize_image(&evil, &d.join("out2")),
            Err(CasError::UnsafePath(_))
        ));
        fs::set_permissions(src.join("etc/ro"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(out.join("etc/ro"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn eviction_keeps_the_cache_under_its_cap() {
        let d = tmp("e");
        let cas = Cas::open(&d, 10).unwrap();
        for s in ["aaaaaa", "bbbbbb", "cccccc"] {
            cas.put(&hash(s.as_bytes()), s.as_bytes()).unwrap();
        }
        assert_eq!(cas.evict(), 12);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        // Counted once; what is put later is added to the count.
        assert_eq!(cas.evict(), 0);
        cas.put(&hash(b"dddddd"), b"dddddd").unwrap();
        assert_eq!(cas.evict(), 6);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    fn dir(p: &str) -> TreeEntry {
        TreeEntry {
            path: p.into(),
            node: Node::Dir { mode: 0o755 },
        }
    }

    fn file(p: &str, content: &[u8]) -> TreeEntry {
        TreeEntry {
            path: p.into(),
            node: Node::File {
                hash: hash(content),
                mode: 0o644,
                size: content.len() as u64,
            },
        }
    }

    fn map(t: &[TreeEntry]) -> TreeMap {
        tree_map(t)
    }

    #[test]
    fn a_delta_holds_what_differs_and_hides_what_is_gone() {
        let base = vec![
            dir("a"),
            file("a/x", b"1"),
            file("a/y", b"2"),
            file("b", b"3"),
            dir("c"),
            file("c/z", b"4"),
            file("d", b"5"),
            dir("e"),
            file("e/keep", b"6"),
        ];
        let tree = vec![
            dir("a"),
            file("a/x", b"changed"),
            file("b", b"3"),
            file("c", b"c is a file now"),
            dir("e"),
            file("e/keep", b"6"),
            dir("n"),
            file("n/m", b"7"),
        ];
        let d = delta(&tree, &map(&base));
        let made: Vec<&str> = d.entries.iter().map(|e| e.path.to_str().unwrap()).collect();
        // `a` is made to hold `a/x` and the whiteout of `a/y`; `e` and `b`
        // are the base's; `c/z` is hidden by the file `c`.
        assert_eq!(made, ["a", "a/x", "c", "n", "n/m"]);
        assert_eq!(d.whiteouts, [PathBuf::from("a/y"), PathBuf::from("d")]);
        // A mode change alone is a difference; the same tree is none.
        let mut moded = base.clone();
        moded[1].node = Node::File {
            hash: hash(b"1"),
            mode: 0o755,
            size: 1,
        };
        assert_eq!(delta(&moded, &map(&base)).len(), 2);
        assert!(delta(&base, &map(&base)).is_empty());
        // A directory removed whole takes one whiteout.
        let gone: Vec<TreeEntry> = base
            .iter()
            .filter(|e| !e.path.starts_with("a"))
            .cloned()
            .collect();
        assert_eq!(delta(&gone, &map(&base)).whiteouts, [PathBuf::from("a")]);
    }

    #[test]
    fn the_closest_base_is_the_one_an_exhaustive_search_picks() {
        // A build's trees: the sources, then one more object file each.
        let build = |objects: usize, touched: Option<usize>| {
            let mut t = vec![dir("src"), file("Makefile", b"all:")];
            for i in 0..40 {
                let c = if touched == Some(i) {
                    "edited"
                } else {
                    "int f;"
                };
                t.push(file(&format!("src/f{i}.c"), format!("{c}{i}").as_bytes()));
            }
            for i in 0..objects {
                t.push(file(&format!("src/f{i}.o"), format!("obj{i}").as_bytes()));
            }
            t
        };
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for round in 0..200 {
            let n = 2 + next(8) as usize;
            let candidates: Vec<(String, Arc<TreeMap>, u64, usize)> = (0..n)
                .map(|i| {
                    let t = build(next(40) as usize, (next(3) == 0).then(|| next(40) as usize));
                    // Each its own cap (its depth's), some none.
                    let cap = [usize::MAX, 8, 2][(round + next(3) as usize) % 3];
                    (format!("k{i:02}"), Arc::new(map(&t)), next(5), cap)
                })
                .collect();
            let tree = build(next(40) as usize, (next(4) == 0).then(|| next(40) as usize));
            let exhaustive = candidates
                .iter()
                .map(|(k, t, _, cap)| (delta(&tree, t).len(), k, *cap))
                .filter(|(l, _, cap)| l <= cap)
                .map(|(l, k, _)| (l, k))
                .min();
            let found = closest(&tree, &candidates).map(|(d, k)| (d.len(), k));
            assert_eq!(found, exhaustive, "round {round}");
        }
    }

    #[test]
    fn close_trees_stack_thin_layers_and_eviction_keeps_what_they_sit_on() {
        let d = tmp("stack");
        let cas = Cas::open(&d.join("cas"), 1 << 20).unwrap();
        let mut tree = vec![dir("src")];
        for i in 0..20 {
            let c = format!("int f{i};");
            cas.put(&hash(c.as_bytes()), c.as_bytes()).unwrap();
            tree.push(file(&format!("src/f{i}.c"), c.as_bytes()));
        }
        let lowers = Arc::new(Lowers::new(&d.join("lowers"), 1));
        let first = lowers.get(&cas, &tree, None).unwrap();
        assert_eq!(first.stack().len(), 1);
        // One more file (the next compile's object): a layer of its own,
        // holding just that file, on top of the first.
        cas.put(&hash(b"obj"), b"obj").unwrap();
        let mut next = tree.clone();
        next.push(file("src/f0.o", b"obj"));
        let second = lowers.get(&cas, &next, None).unwrap();
        let stack = second.stack();
        assert_eq!(stack, [second.path.clone(), first.path.clone()]);
        let top: Vec<_> = fs::read_dir(second.path.join("src"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(top, ["f0.o"]);
        // The same tree again is the same layer.
        assert_eq!(lowers.get(&cas, &next, None).unwrap().stack(), stack);
        drop(first);
        // The first layer is unused but the second sits on it.
        lowers.evict();
        assert!(stack.iter().all(|p| p.is_dir()));
        // A tree far from both is made whole.
        let far: Vec<TreeEntry> = (0..30).map(|i| file(&format!("o{i}"), b"obj")).collect();
        let far_l = lowers.get(&cas, &far, None).unwrap();
        assert_eq!(far_l.stack().len(), 1);
        drop(second);
        drop(far_l);
        // Keep one unused layer: the most recent (`far`); the stack goes.
        lowers.evict();
        assert!(stack.iter().all(|p| !p.exists()));
        assert_eq!(lowers.counts(), (1, 0));
        // Made again, from scratch, after it was evicted.
        let again = lowers.get(&cas, &next, None).unwrap();
        assert!(again.path.join("src/f0.o").is_file());
        // A clone is a hold of its own: the layers stay until both go.
        let kept = again.clone();
        drop(again);
        let _ = lowers.get(&cas, &far, None).unwrap();
        lowers.evict();
        assert!(kept.stack().iter().all(|p| p.is_dir()), "held by the clone");
        let stack = kept.stack();
        drop(kept);
        lowers.evict();
        assert!(stack.iter().all(|p| !p.exists()), "released by the clone");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn evicted_layers_directories_become_new_layers_directories() {
        use std::os::unix::fs::MetadataExt;
        let d = tmp("spares");
        let cas = Cas::open(&d.join("cas"), 1 << 20).unwrap();
        for c in [b"one".as_slice(), b"two", b"three"] {
            cas.put(&hash(c), c).unwrap();
        }
        let tree_of = |n: usize| -> Vec<TreeEntry> {
            let mut t = vec![dir("src"), dir("src/deep")];
            t[1].node = Node::Dir { mode: 0o750 };
            t.push(file("src/deep/a", b"one"));
            t.push(file(
                &format!("top{n}"),
                [b"two".as_slice(), b"three"][n % 2],
            ));
            t
        };
        // Each tree unrelated enough to be made whole (no base).
        let lowers = Arc::new(Lowers::for_trees(&d.join("lowers"), 0, 2));
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let first = lowers.get(&cas, &tree_of(0), None).unwrap();
        let dirs_of = |l: &Lower| {
            [l.path.clone(), l.path.join("src"), l.path.join("src/deep")]
                .iter()
                .map(|p| ino(p))
                .collect::<HashSet<u64>>()
        };
        let old = dirs_of(&first);
        drop(first);
        lowers.evict();
        let spares = lowers.spares().unwrap();
        assert_eq!(spares.len(), 2, "kept up to the cap, the rest removed");
        let second = lowers
            .get(&cas, &[dir("x"), file("y", b"two")], None)
            .unwrap();
        assert_eq!(spares.len(), 0, "both taken");
        let new = dirs_of_some(&second.path, &["", "x"], ino);
        assert_eq!(new.intersection(&old).count(), 2, "the spares' inodes");
        // Made as a new one would be: the layer's contents, modes and
        // nothing of the evicted layer's.
        assert_eq!(fs::read(second.path.join("y")).unwrap(), b"two");
        let names = |p: &Path| {
            let mut v: Vec<String> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&second.path), ["x", "y"]);
        assert!(names(&second.path.join("x")).is_empty());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&second.path), 0o755);
        assert_eq!(mode(&second.path.join("x")), 0o755);
        drop(second);
        // A directory of the manifest's mode, from a spare.
        lowers.evict();
        let third = lowers.get(&cas, &tree_of(1), None).unwrap();
        assert_eq!(mode(&third.path.join("src/deep")), 0o750);
        assert_eq!(fs::read(third.path.join("src/deep/a")).unwrap(), b"one");
        assert_eq!(fs::read(third.path.join("top1")).unwrap(), b"three");
        drop(third);
        fs::remove_dir_all(&d).unwrap();
    }

    fn dirs_of_some(root: &Path, rel: &[&str], ino: impl Fn(&Path) -> u64) -> HashSet<u64> {
        rel.iter().map(|r| ino(&root.join(r))).collect()
    }

    #[test]
    fn a_layer_made_already_is_found_without_making_and_held() {
        let d = tmp("made");
        let cas = Cas::open(&d.join("cas"), 1 << 20).unwrap();
        cas.put(&hash(b"a"), b"a").unwrap();
        let tree = vec![dir("src"), file("src/a.c", b"a")];
        let lowers = Arc::new(Lowers::new(&d.join("lowers"), 0));
        let made = |tree: &[TreeEntry]| match lowers.lookup(tree).unwrap() {
            Lookup::Made(l) => Some(l),
            Lookup::ToMake(_) => None,
        };
        let Lookup::ToMake(to_make) = lowers.lookup(&tree).unwrap() else {
            panic!("not made yet");
        };
        assert_eq!(lowers.counts(), (0, 0), "and nothing made by looking");
        let first = to_make.make(&cas, None).unwrap();
        assert!(first.path.join("src/a.c").is_file());
        let stack = first.stack();
        drop(first);
        let found = made(&tree).expect("made by the first task");
        assert_eq!(found.stack(), stack);
        // Held: eviction (keeping no unused layer) leaves it.
        lowers.evict();
        assert!(stack.iter().all(|p| p.join("src/a.c").is_file()));
        drop(found);
        lowers.evict();
        assert!(made(&tree).is_none(), "evicted once released");
        // Another tree is not this one.
        assert!(made(&[dir("src")]).is_none());
        // Made meanwhile by another task: making it holds that one.
        let Lookup::ToMake(late) = lowers.lookup(&tree).unwrap() else {
            panic!("evicted");
        };
        let other = lowers.get(&cas, &tree, None).unwrap();
        assert_eq!(late.make(&cas, None).unwrap().stack(), other.stack());
        // So does one not looked up first (a large tree's, named then).
        let unlooked = lowers.to_make(tree.clone()).make(&cas, None).unwrap();
        assert_eq!(unlooked.stack(), other.stack());
        assert_eq!(lowers.counts().0, 1, "one layer, not two");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_content_brought_twice_at_once_never_fails_a_link_from_it() {
        // One task links from a content file while another, which found it
        // missing a moment before, brings the same content and renames it
        // into place: replacing the file dropped the inode being linked,
        // and the link failed (ENOENT).
        let d = tmp("noreplace");
        fs::create_dir_all(d.join("links")).unwrap();
        let p = d.join("content");
        fs::write(&p, "int x;").unwrap();
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let before = ino(&p);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let tmp = d.join(format!(".tmp-{n}"));
                    fs::write(&tmp, "int x;").unwrap();
                    rename_no_replace(&tmp, &p).unwrap();
                    assert!(!tmp.exists(), "the second copy is removed");
                    n += 1;
                }
            });
            let failed = (0..3000).find_map(|i| {
                let l = d.join(format!("links/{i}"));
                let r = fs::hard_link(&p, &l);
                let _ = fs::remove_file(&l);
                r.err().map(|e| format!("link {i}: {e}"))
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(failed, None);
        });
        assert_eq!(ino(&p), before, "the first copy stays");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_growing_tree_links_each_new_file_a_few_times_and_is_made_whole_rarely() {
        let d = tmp("depth");
        let cas = Cas::open(&d.join("cas"), 1 << 24).unwrap();
        let put = |c: &str| cas.put(&hash(c.as_bytes()), c.as_bytes()).unwrap();
        let mut tree = vec![];
        for i in 0..100 {
            let c = format!("{i}");
            put(&c);
            tree.push(file(&format!("f{i:03}"), c.as_bytes()));
        }
        let lowers = Arc::new(Lowers::new(&d.join("lowers"), 64));
        let (mut thin, mut wholes, mut stack) = (0, 0, Vec::new());
        // A build on one host: each compile's tree has one or two object
        // files more than the last.
        let mut added = 0;
        for i in 0..120 {
            for j in 0..1 + i % 2 {
                let c = format!("new {i} {j}");
                put(&c);
                tree.push(file(&format!("n{i:03}.{j}"), c.as_bytes()));
                added += 1;
            }
            let l = lowers.get(&cas, &tree, None).unwrap();
            let here = fs::read_dir(&l.path).unwrap().count();
            let depth = l.stack().len() - 1;
            // No stack deeper than allowed; no layer thicker than its
            // depth's cap.
            assert!(depth <= MAX_DEPTH, "depth {depth}");
            if depth == 0 {
                wholes += 1;
            } else {
                assert!(
                    here <= delta_cap(tree.len(), depth),
                    "{here} at depth {depth}"
                );
                thin += here;
            }
            stack.push(depth);
        }
        // Made whole only at the start and once the tree had grown by half
        // (100 -> 150 -> 225 entries, 180 added).
        assert!(wholes <= 3, "{wholes} made whole: {stack:?}");
        // Beyond those, each added file linked again about once per depth
        // at most (one cap for all depths linked 30 or more per compile).
        eprintln!("{wholes} whole, {thin} linked in thin layers for {added} added");
        assert!(
            thin <= added * MAX_DEPTH / 2,
            "{thin} linked for {added} added: {stack:?}"
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
