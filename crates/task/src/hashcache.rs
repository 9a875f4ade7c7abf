//! The submitter's cache of file hashes: a file whose device, inode, size,
//! modification and change times are what they were when it was last
//! hashed is not read again (git's index does the same). A `make -j16
//! CC="shoal run -- gcc"` scans the tree once per compile, and `--image`
//! scans a whole root filesystem: with the cache each scan is `stat` calls.
//!
//! It is only a cache: a missing or corrupt file gives an empty one, and a
//! failure to save it is ignored. What is sent is hashed again as it is
//! read, and the executor checks every content against its hash, so a
//! stale entry can only make a run fail, never run with wrong input.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::proto::Hash;
use crate::tree::hash;

/// Format tag at the start of the file (bumped when the layout changes;
/// version 1 kept paths as strings, so a tree with a file name that is not
/// UTF-8 could not be saved at all; version 2 was one record, written
/// whole by every save).
///
/// After it come records, each what one save changed (the first, what the
/// file held when it was last written whole): its length (4 bytes, little
/// endian), the changes (postcard), and the first 8 bytes of their SHA-256.
/// A save appends one record under the lock; a record cut short (a reader
/// meeting an append half written, a run killed while appending) ends the
/// file for its readers, and the next save writes it whole again.
const MAGIC: &[u8; 8] = b"shoalhc3";
/// After this many records a save writes the file whole again, merged.
const COMPACT_AFTER: usize = 32;
/// Beyond this many entries the cache starts over (it is rebuilt by use).
const MAX_ENTRIES: usize = 500_000;
/// A file changed this recently may change again within the same
/// timestamp tick, its stat data unchanged: it is hashed but not remembered
/// ("racily clean"). The tick of a file system with nanosecond time stamps
/// is the kernel's clock tick (at most 10 ms)...
const RACY: Duration = Duration::from_millis(100);
/// ...and where time stamps are whole seconds (FAT, old ext3 inodes, some
/// network file systems), up to two seconds.
const RACY_COARSE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    hash: Hash,
}

impl Stamp {
    fn of(meta: &fs::Metadata, hash: Hash) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            hash,
        }
    }

    // (The nanosecond fields are signed on some targets.)
    #[allow(clippy::unnecessary_cast)]
    fn of_stat(st: &rustix::fs::Stat, hash: Hash) -> Self {
        let ns = |s: i64, n: u64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec as u64),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec as u64),
            hash,
        }
    }

    /// Whether a file last changed at this stamp's change time has
    /// settled: see [`RACY`].
    fn settled(&self) -> bool {
        let window = if self.ctime_ns % 1_000_000_000 == 0 {
            RACY_COARSE
        } else {
            RACY
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        now - self.ctime_ns >= window.as_nanos() as i128
    }
}

/// One change a save made to the cache file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Change {
    /// This entry, learnt (it replaces any before it).
    Learnt(Stamp),
    /// The entry that was, if it still is: found untrue, or its file no
    /// longer in the tree (another run may have learnt a newer one since).
    Forget(Stamp),
}

/// What the cache knows of one path.
#[derive(Debug, Clone, Copy)]
struct Entry {
    stamp: Stamp,
    /// Asked for by this run's scan.
    used: bool,
    /// Learnt by this run (not read from the file).
    learnt: bool,
}

/// File hashes remembered by path and stat data.
#[derive(Debug, Default)]
pub struct HashCache {
    file: Option<PathBuf>,
    /// By the path's bytes (hashing a `Path` walks its components, which
    /// cost more than the `stat` it saves).
    map: HashMap<Box<[u8]>, Entry>,
    /// Entries this run found untrue (the file changed), as they were.
    forgotten: Vec<(Box<[u8]>, Stamp)>,
    /// Whole records read from the file (0: none, or it was not a cache),
    /// and whether one was cut short.
    records: usize,
    torn: bool,
    /// Contents actually read and hashed (for tests and `--verbose`).
    pub hashed: u64,
}

impl HashCache {
    /// A cache that lives only as long as this value.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// The per-user cache file of the tree at `root`:
    /// `$XDG_CACHE_HOME/shoal/trees/ID`, else `~/.cache/shoal/trees/ID`,
    /// where ID is named after `root`. One file per tree, so that a run
    /// reads the entries of its own tree and nothing else.
    pub fn file_for(root: &Path) -> Option<PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        let id = hex::encode(&hash(root.as_os_str().as_bytes())[..12]);
        Some(Self::cache_dir()?.join("trees").join(id))
    }

    fn cache_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache"))
            })?;
        Some(base.join("shoal"))
    }

    /// The cache of the tree at `root` ([`HashCache::file_for`]), or one in
    /// memory when there is no home to keep it in.
    pub fn for_root(root: &Path) -> Self {
        Self::file_for(root).map_or_else(Self::in_memory, |f| Self::load(&f))
    }

    /// The cache kept in `file`; empty if the file is absent, unreadable
    /// or not a cache.
    pub fn load(file: &Path) -> Self {
        let (entries, records, torn) = read_entries(file);
        let map = entries
            .into_iter()
            .map(|(k, stamp)| {
                let e = Entry {
                    stamp,
                    used: false,
                    learnt: false,
                };
                (k, e)
            })
            .collect();
        Self {
            file: Some(file.to_owned()),
            map,
            forgotten: Vec::new(),
            records,
            torn,
            hashed: 0,
        }
    }

    /// The hash and size of the regular file at `path` (whose metadata,
    /// not following links, is `meta`), read only when it changed.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn hash_file(&mut self, path: &Path, meta: &fs::Metadata) -> io::Result<Hash> {
        let before = Stamp::of(meta, [0; 32]);
        self.hash_with(path, before, || {
            let data = fs::read(path)?;
            let after = fs::symlink_metadata(path)?;
            Ok((data, Stamp::of(&after, [0; 32])))
        })
    }

    /// As [`HashCache::hash_file`], for the file `name` in the directory
    /// open as `dir` (no path walk), known here as `path`, whose stat data
    /// are `st`.
    ///
    /// # Errors
    /// The file cannot be opened or read.
    pub fn hash_at(
        &mut self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &std::ffi::CStr,
        path: &Path,
        st: &rustix::fs::Stat,
    ) -> io::Result<Hash> {
        use rustix::fs::{Mode, OFlags};
        let before = Stamp::of_stat(st, [0; 32]);
        self.hash_with(path, before, || {
            let fd = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY,
                Mode::empty(),
            )?;
            let mut f = fs::File::from(fd);
            let mut data = Vec::with_capacity(usize::try_from(st.st_size).unwrap_or(0));
            io::Read::read_to_end(&mut f, &mut data)?;
            // The very file read, not whatever the name means now.
            let after = rustix::fs::fstat(&f)?;
            Ok((data, Stamp::of_stat(&after, [0; 32])))
        })
    }

    /// The hash of the file at `path` whose stat data were `before`: the
    /// cached one when they match, else what `read` gives (its contents and
    /// its stat data once read), remembered when nothing moved meanwhile
    /// and the file has settled.
    fn hash_with(
        &mut self,
        path: &Path,
        before: Stamp,
        read: impl FnOnce() -> io::Result<(Vec<u8>, Stamp)>,
    ) -> io::Result<Hash> {
        let key = path.as_os_str().as_bytes();
        if let Some(e) = self.map.get_mut(key) {
            if e.stamp
                == (Stamp {
                    hash: e.stamp.hash,
                    ..before
                })
            {
                e.used = true;
                return Ok(e.stamp.hash);
            }
        }
        let (data, after) = read()?;
        let h = hash(&data);
        self.hashed += 1;
        // The file may have changed while it was read: remember the hash
        // only if its stat data still match and it is not racily new.
        let stamp = Stamp { hash: h, ..after };
        if stamp == (Stamp { hash: h, ..before })
            && stamp.settled()
            && data.len() as u64 == after.size
        {
            let e = Entry {
                stamp,
                used: true,
                learnt: true,
            };
            if let Some(old) = self.map.insert(key.into(), e) {
                self.forgotten.push((key.into(), old.stamp));
            }
        } else if let Some(old) = self.map.remove(key) {
            // What it says of the file is no longer so.
            self.forgotten.push((key.into(), old.stamp));
        }
        Ok(h)
    }

    /// Writes what this run changed to the cache file, if it learnt
    /// anything or holds files no longer asked for. Errors are returned for
    /// logging; the cache is optional.
    ///
    /// Other runs over the same tree (the compiles of a `make -j`) save
    /// the same file meanwhile, so a save appends its changes as one
    /// record, under a lock: what this run learnt goes in, what it found
    /// untrue or no longer in the tree goes out unless another run has
    /// learnt it again since (the records are replayed in order), and what
    /// other runs learnt stays. Every [`COMPACT_AFTER`] records (or when
    /// the file is new, not a cache, or cut short) the file is written
    /// whole instead, merged, and renamed into place: a save then reads
    /// and writes the whole cache, where an append writes a few entries.
    /// A lock held elsewhere for long (a stopped run) makes this skip the
    /// save rather than wait.
    ///
    /// # Errors
    /// The directory, lock or file cannot be written.
    pub fn save(&self) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let mut changes: Vec<(&[u8], Change)> = Vec::new();
        for (k, e) in &self.map {
            if e.learnt {
                changes.push((k, Change::Learnt(e.stamp)));
            } else if !e.used {
                // Not in this run's tree: gone, or ignored now.
                changes.push((k, Change::Forget(e.stamp)));
            }
        }
        for (k, old) in &self.forgotten {
            changes.push((k, Change::Forget(*old)));
        }
        if changes.is_empty() {
            return Ok(());
        }
        if let Some(d) = file.parent() {
            fs::create_dir_all(d)?;
        }
        let Some(_lock) = lock(&file.with_extension("lock"))? else {
            return Ok(());
        };
        if self.records > 0 && self.records < COMPACT_AFTER && !self.torn {
            // (Written whole by another run since, it is still a cache:
            // the record goes after whatever that run wrote.)
            if let Ok(mut f) = fs::File::options().append(true).open(file) {
                return io::Write::write_all(&mut f, &record(&changes)?);
            }
        }
        let (mut now, _, _) = read_entries(file);
        apply(&mut now, changes);
        let mut whole: Vec<(&[u8], Change)> = now
            .iter()
            .map(|(p, st)| (&**p, Change::Learnt(*st)))
            .collect();
        if whole.len() > MAX_ENTRIES {
            whole.clear();
        }
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&record(&whole)?);
        fs::write(&tmp, bytes)?;
        fs::rename(&tmp, file).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }
}

/// Applies `changes` to `map` in order.
fn apply<K: AsRef<[u8]>>(
    map: &mut HashMap<Box<[u8]>, Stamp>,
    changes: impl IntoIterator<Item = (K, Change)>,
) {
    for (k, c) in changes {
        let k = k.as_ref();
        match c {
            Change::Learnt(st) => {
                map.insert(k.into(), st);
            }
            Change::Forget(old) => {
                if map.get(k) == Some(&old) {
                    map.remove(k);
                }
            }
        }
    }
}

/// One record of the cache file (see [`MAGIC`]).
fn record(changes: &[(&[u8], Change)]) -> io::Result<Vec<u8>> {
    let body = postcard::to_stdvec(changes).map_err(|e| io::Error::other(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(body.len() + 12);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&hash(&body)[..8]);
    Ok(out)
}

/// The entries of the cache file `file`, how many whole records it holds,
/// and whether one was cut short; none if it is absent, unreadable or not
/// a cache.
fn read_entries(file: &Path) -> (HashMap<Box<[u8]>, Stamp>, usize, bool) {
    let mut map = HashMap::new();
    let Some(bytes) = fs::read(file).ok() else {
        return (map, 0, false);
    };
    let Some(mut rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        return (map, 0, false);
    };
    let mut records = 0;
    while !rest.is_empty() {
        let Some((len, after)) = rest.split_first_chunk::<4>() else {
            return (map, records, true);
        };
        let len = u32::from_le_bytes(*len) as usize;
        let (Some(body), Some(check)) = (after.get(..len), after.get(len..len + 8)) else {
            return (map, records, true);
        };
        if hash(body)[..8] != *check {
            return (map, records, true);
        }
        let Ok(changes) = postcard::from_bytes::<Vec<(Box<[u8]>, Change)>>(body) else {
            return (map, records, true);
        };
        apply(&mut map, changes);
        records += 1;
        rest = &after[len + 8..];
    }
    (map, records, false)
}

/// How long [`lock`] tries before it gives up.
const LOCK_PATIENCE: Duration = Duration::from_millis(200);

/// An exclusive lock on the file `path` (made if absent), released when
/// the returned file is closed; `None` if another holder keeps it for
/// [`LOCK_PATIENCE`].
fn lock(path: &Path) -> io::Result<Option<fs::File>> {
    use rustix::fs::{flock, FlockOperation};
    let f = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(Some(f)),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new empty directory for one test, `shoal-NAME-PID` under the
    /// temporary directory.
    fn empty_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Lets `p` settle: its change time (which only moves forward) must
    /// be older than the racy window.
    fn old(p: &Path) {
        assert!(p.exists());
        std::thread::sleep(RACY + Duration::from_millis(20));
    }

    #[test]
    fn unchanged_files_are_not_read_again_and_changed_ones_are() {
        let d = empty_dir("hc");
        let (a, store) = (d.join("a"), d.join("cache/hashes"));
        fs::write(&a, "one").unwrap();
        old(&a);
        let mut c = HashCache::load(&store);
        let m = fs::symlink_metadata(&a).unwrap();
        assert_eq!(c.hash_file(&a, &m).unwrap(), hash(b"one"));
        assert_eq!(c.hashed, 1);
        c.save().unwrap();

        let mut c = HashCache::load(&store);
        assert_eq!(c.hash_file(&a, &m).unwrap(), hash(b"one"));
        assert_eq!(c.hashed, 0, "served from the saved cache");

        // Same size, new content: the change time moves, so it is re-read.
        fs::write(&a, "two").unwrap();
        let m = fs::symlink_metadata(&a).unwrap();
        assert_eq!(c.hash_file(&a, &m).unwrap(), hash(b"two"));
        assert_eq!(c.hashed, 1);
        // Just written: racily clean, so not remembered.
        assert_eq!(c.hash_file(&a, &m).unwrap(), hash(b"two"));
        assert_eq!(c.hashed, 2);

        // A modification time set back (`touch -d`) does not make a file
        // just written settled: its change time says when it changed.
        fs::write(&a, "three").unwrap();
        fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
        let m = fs::symlink_metadata(&a).unwrap();
        let before = c.hashed;
        c.hash_file(&a, &m).unwrap();
        c.hash_file(&a, &m).unwrap();
        assert_eq!(c.hashed, before + 2, "racily clean, read each time");
        old(&a);
        c.hash_file(&a, &m).unwrap();
        assert_eq!(c.hash_file(&a, &m).unwrap(), hash(b"three"));
        assert_eq!(c.hashed, before + 3, "settled: read once more, then kept");
        let m = fs::symlink_metadata(&a).unwrap();

        // A file gone from the tree is dropped from the saved cache.
        let b = d.join("b");
        fs::write(&b, "bee").unwrap();
        old(&b);
        let mut c = HashCache::load(&store);
        let mb = fs::symlink_metadata(&b).unwrap();
        c.hash_file(&b, &mb).unwrap();
        c.save().unwrap();
        let c = HashCache::load(&store);
        assert_eq!(
            c.map.keys().map(|k| &**k).collect::<Vec<_>>(),
            [b.as_os_str().as_bytes()],
            "only b was asked for"
        );

        // A corrupt cache file is an empty cache.
        fs::write(&store, b"shoalhc1\xff\xff\xff").unwrap();
        let mut c = HashCache::load(&store);
        assert_eq!(c.hash_file(&a, &m).unwrap(), hash(b"three"));
        assert_eq!(c.hashed, 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn runs_saving_the_same_cache_keep_what_each_learnt() {
        let d = empty_dir("hc-merge");
        let store = d.join("cache/hashes");
        let [a, b, c, gone] = ["a", "b", "c", "gone"].map(|n| d.join(n));
        for p in [&a, &b, &c, &gone] {
            fs::write(p, p.as_os_str().as_bytes()).unwrap();
        }
        old(&a);
        let meta = |p: &Path| fs::symlink_metadata(p).unwrap();
        let mut first = HashCache::load(&store);
        for p in [&a, &gone] {
            first.hash_file(p, &meta(p)).unwrap();
        }
        first.save().unwrap();

        // Two runs start from the same saved cache; `gone` is deleted
        // before either scans. Each learns a file of its own, as two
        // compiles of one build see the object file the other just made.
        fs::remove_file(&gone).unwrap();
        let mut one = HashCache::load(&store);
        let mut two = HashCache::load(&store);
        one.hash_file(&a, &meta(&a)).unwrap();
        one.hash_file(&b, &meta(&b)).unwrap();
        two.hash_file(&a, &meta(&a)).unwrap();
        two.hash_file(&c, &meta(&c)).unwrap();
        one.save().unwrap();
        two.save().unwrap();

        let mut after = HashCache::load(&store);
        let mut keys: Vec<&[u8]> = after.map.keys().map(|k| &**k).collect();
        keys.sort_unstable();
        let want = [&a, &b, &c].map(|p| p.as_os_str().as_bytes());
        assert_eq!(keys, want, "both runs' files kept, the deleted one dropped");
        for p in [&a, &b, &c] {
            after.hash_file(p, &meta(p)).unwrap();
        }
        assert_eq!(after.hashed, 0, "nothing read again");

        // A run that finds a file changed takes its entry out, but not an
        // entry another run has learnt for the file since.
        let mut stale = HashCache::load(&store);
        let mut fresh = HashCache::load(&store);
        fs::write(&b, "changed").unwrap();
        fs::write(&c, "changed").unwrap();
        for p in [&a, &b, &c] {
            stale.hash_file(p, &meta(p)).unwrap();
        }
        old(&c);
        fs::write(&b, "changed again").unwrap();
        for p in [&a, &b, &c] {
            fresh.hash_file(p, &meta(p)).unwrap();
        }
        assert_eq!(fresh.hashed, 2);
        fresh.save().unwrap();
        stale.save().unwrap();
        let mut after = HashCache::load(&store);
        for p in [&a, &b, &c] {
            after.hash_file(p, &meta(p)).unwrap();
        }
        assert_eq!(
            after.hashed, 1,
            "only b (not yet settled) is read: c as the later run learnt it"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_name_that_is_not_utf8_is_kept_too() {
        use std::ffi::OsStr;
        let d = empty_dir("hc-bytes");
        let store = d.join("cache/hashes");
        let f = d.join(OsStr::from_bytes(b"caf\xe9.c"));
        fs::write(&f, "int x;").unwrap();
        old(&f);
        let m = fs::symlink_metadata(&f).unwrap();
        let mut c = HashCache::load(&store);
        c.hash_file(&f, &m).unwrap();
        c.save().unwrap();
        let mut c = HashCache::load(&store);
        assert_eq!(c.hash_file(&f, &m).unwrap(), hash(b"int x;"));
        assert_eq!(c.hashed, 0, "served from the saved cache");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn saves_append_records_and_the_file_is_written_whole_now_and_then() {
        let d = empty_dir("hc-append");
        let store = d.join("cache/hashes");
        let meta = |p: &Path| fs::symlink_metadata(p).unwrap();
        let files: Vec<PathBuf> = (0..COMPACT_AFTER + 3)
            .map(|i| d.join(format!("f{i}")))
            .collect();
        for p in &files {
            fs::write(p, p.as_os_str().as_bytes()).unwrap();
        }
        old(&files[0]);
        // Each run learns one more file (as the compiles of a build do):
        // its save appends a record of it alone.
        let mut inodes = Vec::new();
        for n in 1..=files.len() {
            let mut c = HashCache::load(&store);
            for p in &files[..n] {
                c.hash_file(p, &meta(p)).unwrap();
            }
            assert_eq!(c.hashed, 1, "run {n}: only the new file read");
            c.save().unwrap();
            inodes.push(fs::metadata(&store).unwrap().ino());
        }
        let c = HashCache::load(&store);
        assert_eq!(c.map.len(), files.len());
        // Appended to the same file, not written anew (a new file, renamed
        // into place), but every COMPACT_AFTER records.
        let anew = inodes.windows(2).filter(|w| w[0] != w[1]).count();
        assert!((1..=2).contains(&anew), "{inodes:?}");
        assert!(c.records < COMPACT_AFTER, "{} records", c.records);

        // A record cut short (a run killed while appending) ends the file
        // for readers: what came before it stays, and the next save writes
        // the file whole again.
        let mut bytes = fs::read(&store).unwrap();
        let whole = bytes.len();
        let extra = d.join("extra");
        fs::write(&extra, "x").unwrap();
        old(&extra);
        let mut c = HashCache::load(&store);
        for p in files.iter().chain([&extra]) {
            c.hash_file(p, &meta(p)).unwrap();
        }
        c.save().unwrap();
        let appended = fs::read(&store).unwrap();
        bytes.extend_from_slice(&appended[whole..appended.len() - 3]);
        fs::write(&store, &bytes).unwrap();
        let mut c = HashCache::load(&store);
        assert!(c.torn);
        assert_eq!(c.map.len(), files.len(), "the cut record left out");
        for p in files.iter().chain([&extra]) {
            c.hash_file(p, &meta(p)).unwrap();
        }
        assert_eq!(c.hashed, 1);
        c.save().unwrap();
        let c = HashCache::load(&store);
        assert_eq!(
            (c.records, c.torn, c.map.len()),
            (1, false, files.len() + 1)
        );

        // A record whose bytes were damaged is not believed.
        let mut bytes = fs::read(&store).unwrap();
        let at = bytes.len() - 20;
        bytes[at] ^= 0x55;
        fs::write(&store, &bytes).unwrap();
        let c = HashCache::load(&store);
        assert!(c.torn && c.map.is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_saves_append_and_compact_without_losing_or_tearing() {
        let d = empty_dir("hc-threads");
        let store = d.join("cache/hashes");
        const ROUNDS: usize = 40;
        let files: Vec<PathBuf> = (0..16 + ROUNDS).map(|i| d.join(format!("f{i}"))).collect();
        for p in &files {
            fs::write(p, p.as_os_str().as_bytes()).unwrap();
        }
        old(&files[0]);
        // Eight runs at a time over a tree that grows by a file a round
        // (as the compiles of a `make -j8`): all eight learn it and save at
        // once, appending; past 32 records one of them writes the file
        // whole while the others wait to append.
        let (loaded, saved) = (std::sync::Barrier::new(8), std::sync::Barrier::new(8));
        std::thread::scope(|sc| {
            for _ in 0..8 {
                sc.spawn(|| {
                    for r in 0..ROUNDS {
                        let mut c = HashCache::load(&store);
                        loaded.wait();
                        for p in &files[..=16 + r] {
                            c.hash_file(p, &fs::symlink_metadata(p).unwrap()).unwrap();
                        }
                        c.save().unwrap();
                        saved.wait();
                    }
                });
            }
        });
        let mut c = HashCache::load(&store);
        assert!(!c.torn, "a record cut short");
        assert!(c.records < COMPACT_AFTER + 8, "{} records", c.records);
        for p in &files[..16 + ROUNDS] {
            c.hash_file(p, &fs::symlink_metadata(p).unwrap()).unwrap();
        }
        assert_eq!(c.hashed, 0, "every file served from the cache");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn each_tree_has_a_cache_file_of_its_own() {
        let a = HashCache::file_for(Path::new("/home/alice/a"));
        let b = HashCache::file_for(Path::new("/home/alice/b"));
        if a.is_some() {
            assert_ne!(a, b);
            assert_eq!(a, HashCache::file_for(Path::new("/home/alice/a")));
        }
    }
}
