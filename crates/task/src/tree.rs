//! The submitter's side: the manifest of the working tree.

use std::collections::HashMap;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::hashcache::HashCache;
use crate::proto::{Hash, Node, TreeEntry};

/// Why the tree could not be read. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The walk itself failed (ignore-file syntax, loop).
    #[error("walking {0}")]
    Walk(String),
}

/// The manifest of a tree and where each content lives.
#[derive(Debug, Default)]
pub struct Manifest {
    /// Every entry, parents first.
    pub entries: Vec<TreeEntry>,
    /// Where to read each content from.
    pub sources: HashMap<Hash, PathBuf>,
    /// Total bytes of file content.
    pub bytes: u64,
    /// The root holds shoal's own commit bookkeeping (a commit in
    /// progress, or one a crash interrupted): whoever owns the tree runs
    /// `shoal_files::recover` and scans again. Told by the scan, so that a
    /// tree with none is read once, not twice.
    pub internal: bool,
}

/// SHA-256 of `data`.
pub fn hash(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// Scans `root`, honouring `.gitignore`, `.ignore` and `.shoalignore`
/// files (also outside a git repository), and skipping `.git` and shoal's
/// own staging directories.
///
/// # Errors
/// An unreadable file or directory, named.
pub fn scan(root: &Path) -> Result<Manifest, TreeError> {
    scan_with(root, &mut HashCache::in_memory())
}

/// As [`scan`], reading only the files whose stat data changed since
/// `cache` last saw them.
///
/// # Errors
/// An unreadable file or directory, named.
pub fn scan_with(root: &Path, cache: &mut HashCache) -> Result<Manifest, TreeError> {
    scan_filtered(root, cache, |_| true)
}

/// As [`scan_with`], keeping only the paths (relative to `root`) that
/// `keep` accepts; a directory refused is not entered, so nothing under it
/// is read.
///
/// The walk reads each directory once and looks at each entry relative to
/// its directory's descriptor (no path walk per file); ignore files are
/// read only where a directory has them. What it ignores is what the
/// `ignore` crate's walker ignores with the same settings (tested against
/// it): `.shoalignore` before `.ignore` before `.gitignore`, a deeper file
/// before a shallower one, no ignore files above `root` and none of git's
/// global ones.
///
/// # Errors
/// An unreadable file or directory that `keep` accepts, named.
pub fn scan_filtered(
    root: &Path,
    cache: &mut HashCache,
    keep: impl Fn(&Path) -> bool + Send + Sync + 'static,
) -> Result<Manifest, TreeError> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| TreeError::Unreadable {
        path: root.to_owned(),
        source: e.into(),
    })?;
    let mut w = Walker {
        root,
        cache,
        keep: &keep,
        m: Manifest::default(),
        levels: Vec::new(),
    };
    w.dir(fd, Path::new(""))?;
    Ok(w.m)
}

/// The ignore files of one directory on the way down, by precedence:
/// `.shoalignore`, `.ignore`, `.gitignore`, where the directory has one.
/// (A nested repository's `.git` is no boundary: the scan does not require
/// git, and the `ignore` crate then applies every level's files.)
struct Level {
    kinds: [Option<ignore::gitignore::Gitignore>; 3],
}

struct Walker<'a, K> {
    root: &'a Path,
    cache: &'a mut HashCache,
    keep: &'a K,
    m: Manifest,
    levels: Vec<Level>,
}

/// Ignore files, in the order they take precedence.
const IGNORE_FILES: [&str; 3] = [".shoalignore", ".ignore", ".gitignore"];

impl<K: Fn(&Path) -> bool> Walker<'_, K> {
    /// Whether `abs` (a directory when `is_dir`) is ignored by the ignore
    /// files met on the way down: for each kind in precedence order, the
    /// deepest file with an opinion decides.
    fn ignored(&self, abs: &Path, is_dir: bool) -> bool {
        use ignore::Match;
        for k in 0..IGNORE_FILES.len() {
            for level in self.levels.iter().rev() {
                let Some(g) = &level.kinds[k] else {
                    continue;
                };
                match g.matched(abs, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
        }
        false
    }

    fn dir(&mut self, fd: std::os::fd::OwnedFd, rel: &Path) -> Result<(), TreeError> {
        use rustix::fs::{AtFlags, FileType, Mode, OFlags};
        use std::ffi::OsStr;
        use std::os::fd::AsFd;
        let abs_dir = self.root.join(rel);
        let unreadable = |path: PathBuf| {
            move |e: rustix::io::Errno| TreeError::Unreadable {
                path,
                source: e.into(),
            }
        };
        // (Each entry is stat'ed below anyway: the listing's own type may be
        // unknown on some file systems.)
        let mut names: Vec<std::ffi::CString> = Vec::new();
        let dir = rustix::fs::Dir::read_from(&fd).map_err(unreadable(abs_dir.clone()))?;
        for e in dir {
            let e = e.map_err(unreadable(abs_dir.clone()))?;
            let n = e.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            names.push(e.file_name().to_owned());
        }
        names.sort_unstable();
        let has = |f: &str| names.iter().any(|n| n.to_bytes() == f.as_bytes());
        let pushed = IGNORE_FILES.iter().any(|f| has(f));
        if pushed {
            let mut kinds: [Option<ignore::gitignore::Gitignore>; 3] = [None, None, None];
            for (k, f) in IGNORE_FILES.iter().enumerate() {
                if has(f) {
                    let mut b = ignore::gitignore::GitignoreBuilder::new(&abs_dir);
                    if let Some(e) = b.add(abs_dir.join(f)) {
                        return Err(ignore_error(e, &abs_dir.join(f)));
                    }
                    kinds[k] = Some(b.build().map_err(|e| ignore_error(e, &abs_dir.join(f)))?);
                }
            }
            self.levels.push(Level { kinds });
        }
        for name in &names {
            let os = OsStr::from_bytes(name.to_bytes());
            let n = os.to_string_lossy();
            if n == ".git" {
                continue;
            }
            if shoal_files::is_internal(&n) {
                self.m.internal |= rel.as_os_str().is_empty();
                continue;
            }
            let rel_child = rel.join(os);
            if !(self.keep)(&rel_child) {
                continue;
            }
            let abs = self.root.join(&rel_child);
            // A file deleted since the listing (a build's temporary, say) is
            // simply not part of the tree.
            let st =
                match rustix::fs::statat(fd.as_fd(), name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) {
                    Err(rustix::io::Errno::NOENT) => continue,
                    r => r.map_err(unreadable(abs.clone()))?,
                };
            let kind = FileType::from_raw_mode(st.st_mode);
            if self.ignored(&abs, kind == FileType::Directory) {
                continue;
            }
            let mode = st.st_mode & 0o7777;
            let node = match kind {
                FileType::Symlink => {
                    let target =
                        match rustix::fs::readlinkat(fd.as_fd(), name.as_c_str(), Vec::new()) {
                            Err(rustix::io::Errno::NOENT) => continue,
                            r => r.map_err(unreadable(abs.clone()))?,
                        };
                    Node::Symlink {
                        target: PathBuf::from(OsStr::from_bytes(target.to_bytes())),
                    }
                }
                FileType::Directory => Node::Dir { mode },
                FileType::RegularFile => {
                    let h = match self.cache.hash_at(fd.as_fd(), name.as_c_str(), &abs, &st) {
                        Ok(h) => h,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(source) => {
                            return Err(TreeError::Unreadable {
                                path: abs.clone(),
                                source,
                            })
                        }
                    };
                    let size = u64::try_from(st.st_size).unwrap_or(0);
                    self.m.bytes += size;
                    self.m.sources.entry(h).or_insert_with(|| abs.clone());
                    Node::File {
                        hash: h,
                        mode,
                        size,
                    }
                }
                _ => continue, // sockets, fifos, devices are not shipped
            };
            let is_dir = matches!(node, Node::Dir { .. });
            self.m.entries.push(TreeEntry {
                path: rel_child.clone(),
                node,
            });
            if is_dir {
                let sub = match rustix::fs::openat(
                    fd.as_fd(),
                    name.as_c_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    // Gone since: shipped empty.
                    Err(rustix::io::Errno::NOENT) => continue,
                    r => r.map_err(unreadable(abs.clone()))?,
                };
                self.dir(sub, &rel_child)?;
            }
        }
        if pushed {
            self.levels.pop();
        }
        Ok(())
    }
}

/// An ignore file that could not be read or holds a bad pattern.
fn ignore_error(e: ignore::Error, file: &Path) -> TreeError {
    match e.io_error() {
        Some(io) if io.kind() == io::ErrorKind::PermissionDenied => TreeError::Unreadable {
            path: file.to_owned(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        },
        _ => TreeError::Walk(format!("{}: {e}", file.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// The reference walk: the `ignore` crate's walker with the settings the
    /// scan follows, giving the paths it keeps (what [`scan_filtered`] must
    /// agree with).
    fn reference_paths(root: &Path) -> Vec<PathBuf> {
        ignore::WalkBuilder::new(root)
            .hidden(false)
            .git_ignore(true)
            .git_global(false)
            .git_exclude(false)
            .require_git(false)
            .parents(false)
            .add_custom_ignore_filename(".shoalignore")
            .follow_links(false)
            .sort_by_file_path(|a, b| a.cmp(b))
            .filter_entry(move |e| {
                let n = e.file_name().to_string_lossy();
                n != ".git" && !shoal_files::is_internal(&n)
            })
            .build()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let rel = e.path().strip_prefix(root).ok()?.to_owned();
                let t = e.file_type()?;
                (!rel.as_os_str().is_empty() && (t.is_dir() || t.is_file() || t.is_symlink()))
                    .then_some(rel)
            })
            .collect()
    }

    /// Random trees with nested ignore files (negations, directory-only and
    /// anchored patterns, a nested repository, links): the scan keeps
    /// exactly what the `ignore` crate's walker keeps, in the same order.
    #[test]
    fn ignores_what_the_ignore_crates_walker_ignores() {
        let base = std::env::temp_dir().join(format!("shoal-ign-{}", std::process::id()));
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        const NAMES: &[&str] = &[
            "a.c",
            "b.o",
            "keep.o",
            "x.txt",
            "important.txt",
            ".hidden",
            "deep",
            "notes",
        ];
        const DIRS: &[&str] = &["sub", "target", "build", "dir", "deep", ".cache"];
        const PATTERNS: &[&str] = &[
            "*.o",
            "!keep.o",
            "target/",
            "/build",
            "x.txt",
            "sub/*.c",
            "**/deep",
            ".hidden",
            "!important.txt",
            "*.txt",
            "dir/",
            "a*",
            "!sub",
            "deep/",
            "/notes",
            "!*.c",
            "build",
            "**/*.txt",
            "sub/",
            "!.cache/",
        ];
        const IGNORES: &[&str] = &[".gitignore", ".ignore", ".shoalignore"];
        for case in 0..120 {
            let d = base.join(format!("t{case}"));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            let mut dirs = vec![d.clone()];
            for _ in 0..(3 + rnd(6)) {
                let parent = dirs[rnd(dirs.len() as u64) as usize].clone();
                if parent.components().count() - d.components().count() >= 3 {
                    continue;
                }
                let nd = parent.join(DIRS[rnd(DIRS.len() as u64) as usize]);
                if fs::create_dir(&nd).is_ok() {
                    dirs.push(nd);
                }
            }
            for dir in &dirs {
                for _ in 0..(1 + rnd(4)) {
                    let f = dir.join(NAMES[rnd(NAMES.len() as u64) as usize]);
                    if !f.exists() {
                        fs::write(&f, format!("{case}")).unwrap();
                    }
                }
                if rnd(3) == 0 {
                    let _ = std::os::unix::fs::symlink("a.c", dir.join("link"));
                }
                if rnd(2) == 0 {
                    let kind = IGNORES[rnd(IGNORES.len() as u64) as usize];
                    let lines: Vec<&str> = (0..(1 + rnd(4)))
                        .map(|_| PATTERNS[rnd(PATTERNS.len() as u64) as usize])
                        .collect();
                    fs::write(dir.join(kind), lines.join("\n") + "\n").unwrap();
                }
                if dir != &d && rnd(8) == 0 {
                    fs::create_dir_all(dir.join(".git")).unwrap();
                }
            }
            let want = reference_paths(&d);
            let got: Vec<PathBuf> = scan(&d)
                .unwrap()
                .entries
                .into_iter()
                .map(|e| e.path)
                .collect();
            if got != want {
                let mut listing = String::new();
                for ig in walk_all(&d) {
                    if IGNORES.iter().any(|i| ig.ends_with(i)) {
                        listing +=
                            &format!("{}:\n{}\n", ig.display(), fs::read_to_string(&ig).unwrap());
                    }
                }
                panic!("case {case}: got {got:?}\nwant {want:?}\n{listing}");
            }
        }
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_file_deleted_during_the_scan_is_left_out() {
        let d = std::env::temp_dir().join(format!("shoal-gone-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("sub")).unwrap();
        for f in ["a.c", "gone.o", "sub/gone.tmp", "sub/z.c"] {
            fs::write(d.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink("a.c", d.join("gone-link")).unwrap();
        // Deleted after the directory was listed, just before its turn.
        let root = d.clone();
        let m = scan_filtered(&d, &mut HashCache::in_memory(), move |rel| {
            if rel.to_string_lossy().contains("gone") {
                let _ = fs::remove_file(root.join(rel));
            }
            true
        })
        .unwrap();
        let paths: Vec<String> = m
            .entries
            .iter()
            .map(|e| e.path.display().to_string())
            .collect();
        assert_eq!(paths, ["a.c", "sub", "sub/z.c"]);
        fs::remove_dir_all(&d).unwrap();
    }

    fn walk_all(d: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                out.extend(walk_all(&p));
            }
            out.push(p);
        }
        out
    }

    #[test]
    fn honours_ignore_files_and_dedups_contents() {
        let d = std::env::temp_dir().join(format!("shoal-scan-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("src")).unwrap();
        fs::create_dir_all(d.join("target/debug")).unwrap();
        fs::create_dir_all(d.join(".git")).unwrap();
        fs::write(d.join(".git/HEAD"), "ref").unwrap();
        fs::write(d.join(".gitignore"), "target/\n*.o\n").unwrap();
        fs::write(d.join(".shoalignore"), "secret.txt\n").unwrap();
        fs::write(d.join("src/a.c"), "same").unwrap();
        fs::write(d.join("src/b.c"), "same").unwrap();
        fs::write(d.join("src/a.o"), "obj").unwrap();
        fs::write(d.join("secret.txt"), "s").unwrap();
        fs::write(d.join("target/debug/x"), "x").unwrap();
        std::os::unix::fs::symlink("src/a.c", d.join("link")).unwrap();
        let m = scan(&d).unwrap();
        let paths: Vec<String> = m
            .entries
            .iter()
            .map(|e| e.path.display().to_string())
            .collect();
        assert_eq!(
            paths,
            [
                ".gitignore",
                ".shoalignore",
                "link",
                "src",
                "src/a.c",
                "src/b.c"
            ]
        );
        assert_eq!(m.sources.len(), 3, "a.c and b.c share one content");
        assert!(!m.internal, "no commit's bookkeeping here");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_commits_bookkeeping_at_the_root_is_told_and_never_shipped() {
        let d = std::env::temp_dir().join(format!("shoal-scan-int-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("src/.shoal-commit-00ff")).unwrap();
        fs::write(d.join("src/a.c"), "a").unwrap();
        let paths = |m: &Manifest| -> Vec<String> {
            m.entries
                .iter()
                .map(|e| e.path.display().to_string())
                .collect()
        };
        // Below the root such a name is not a commit's: skipped, not told.
        let m = scan(&d).unwrap();
        assert_eq!(paths(&m), ["src", "src/a.c"]);
        assert!(!m.internal);
        for name in [".shoal-commit-0001", ".shoal-prep-0002"] {
            fs::create_dir_all(d.join(name)).unwrap();
            fs::write(d.join(name).join("lock"), "").unwrap();
            let m = scan(&d).unwrap();
            assert_eq!(paths(&m), ["src", "src/a.c"], "{name}");
            assert!(m.internal, "{name}");
            fs::remove_dir_all(d.join(name)).unwrap();
        }
        fs::remove_dir_all(&d).unwrap();
    }
}
