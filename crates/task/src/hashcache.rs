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
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::proto::Hash;
use crate::tree::hash;

/// Format tag at the start of the file (bumped when the layout changes).
const MAGIC: &[u8; 8] = b"shoalhc1";
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

/// File hashes remembered by path and stat data.
#[derive(Debug, Default)]
pub struct HashCache {
    file: Option<PathBuf>,
    /// By the path's bytes (hashing a `Path` walks its components, which
    /// cost more than the `stat` it saves), with whether it was asked for.
    map: HashMap<Box<[u8]>, (Stamp, bool)>,
    dirty: bool,
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
        let map = fs::read(file)
            .ok()
            .and_then(|b| {
                let body = b.strip_prefix(MAGIC.as_slice())?;
                postcard::from_bytes::<Vec<(PathBuf, Stamp)>>(body).ok()
            })
            .map(|v| {
                v.into_iter()
                    .map(|(p, st)| {
                        (
                            p.into_os_string().into_vec().into_boxed_slice(),
                            (st, false),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            file: Some(file.to_owned()),
            map,
            dirty: false,
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
        if let Some((s, used)) = self.map.get_mut(key) {
            if *s
                == (Stamp {
                    hash: s.hash,
                    ..before
                })
            {
                *used = true;
                return Ok(s.hash);
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
            self.map.insert(key.into(), (stamp, true));
            self.dirty = true;
        } else if self.map.remove(key).is_some() {
            // What it says of the file is no longer so.
            self.dirty = true;
        }
        Ok(h)
    }

    /// Writes the cache back (atomically) if it learnt anything or holds
    /// files no longer asked for. Errors are returned for logging; the
    /// cache is optional.
    ///
    /// # Errors
    /// The directory or file cannot be written.
    pub fn save(&self) -> io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let stale = self.map.values().any(|(_, used)| !used);
        if !self.dirty && !stale {
            return Ok(());
        }
        let mut v: Vec<(&Path, &Stamp)> = self
            .map
            .iter()
            .filter(|(_, (_, used))| *used)
            .map(|(p, (st, _))| (Path::new(std::ffi::OsStr::from_bytes(p)), st))
            .collect();
        if v.len() > MAX_ENTRIES {
            v.clear();
        }
        let body = postcard::to_stdvec(&v).map_err(|e| io::Error::other(e.to_string()))?;
        if let Some(d) = file.parent() {
            fs::create_dir_all(d)?;
        }
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&body);
        fs::write(&tmp, bytes)?;
        fs::rename(&tmp, file).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets `p` settle: its change time (which only moves forward) must
    /// be older than the racy window.
    fn old(p: &Path) {
        assert!(p.exists());
        std::thread::sleep(RACY + Duration::from_millis(20));
    }

    #[test]
    fn unchanged_files_are_not_read_again_and_changed_ones_are() {
        let d = std::env::temp_dir().join(format!("shoal-hc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
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
    fn each_tree_has_a_cache_file_of_its_own() {
        let a = HashCache::file_for(Path::new("/home/alice/a"));
        let b = HashCache::file_for(Path::new("/home/alice/b"));
        if a.is_some() {
            assert_ne!(a, b);
            assert_eq!(a, HashCache::file_for(Path::new("/home/alice/a")));
        }
    }
}
