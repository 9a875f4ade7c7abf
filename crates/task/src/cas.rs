//! The executor's side: a content-addressed cache of file contents and the
//! task trees built from it.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

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

/// A name part no other writer in this process or another uses now.
fn unique() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
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
}

impl Cas {
    /// A cache in `dir` (made if absent) holding at most `cap_bytes`.
    ///
    /// # Errors
    /// The directory cannot be made.
    pub fn open(dir: &Path, cap_bytes: u64) -> Result<Self, CasError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(Self {
            dir: dir.to_owned(),
            cap_bytes,
        })
    }

    /// A cache handle for `dir` without touching the disk (for an executor
    /// that will refuse tasks anyway).
    pub fn at(dir: &Path, cap_bytes: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            cap_bytes,
        }
    }

    fn path(&self, h: &Hash) -> PathBuf {
        self.dir.join(hex::encode(h))
    }

    /// The hashes among `wanted` that the cache lacks (each once).
    pub fn missing(&self, wanted: impl IntoIterator<Item = Hash>) -> Vec<Hash> {
        let mut out: Vec<Hash> = wanted
            .into_iter()
            .filter(|h| !self.path(h).exists())
            .collect();
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
        if p.exists() {
            return Ok(()); // another task brought the same content meanwhile
        }
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", hex::encode(&h[..8]), unique()));
        let r = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.set_permissions(fs::Permissions::from_mode(0o644))?;
            fs::rename(&tmp, &p)
        })();
        if let Err(e) = r {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&p)(e));
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
        let chown = |p: &Path| -> Result<(), CasError> {
            if let Some((u, g)) = owner {
                std::os::unix::fs::lchown(p, Some(u), Some(g)).map_err(io_err(p))?;
            }
            Ok(())
        };
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        chown(dest)?;
        let now = SystemTime::now();
        for e in tree {
            let target = inside(dest, &e.path)?;
            match &e.node {
                Node::Dir { mode } => {
                    fs::create_dir_all(&target).map_err(io_err(&target))?;
                    fs::set_permissions(&target, fs::Permissions::from_mode(*mode | 0o700))
                        .map_err(io_err(&target))?;
                    chown(&target)?;
                }
                Node::Symlink { target: to } => {
                    std::os::unix::fs::symlink(to, &target).map_err(io_err(&target))?;
                    chown(&target)?;
                }
                Node::File { hash: h, mode, .. } => {
                    let base = self.path(h);
                    if !base.exists() {
                        return Err(CasError::Missing(hex::encode(h)));
                    }
                    let src = if mode & 0o111 != 0 {
                        let x = base.with_extension("x");
                        if !x.exists() {
                            let tmp = base.with_extension(format!("x.tmp{}", unique()));
                            fs::copy(&base, &tmp).map_err(io_err(&tmp))?;
                            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
                                .map_err(io_err(&tmp))?;
                            chown(&tmp)?;
                            fs::rename(&tmp, &x).map_err(io_err(&x))?;
                        }
                        x
                    } else {
                        base
                    };
                    chown(&src)?;
                    if let Ok(f) = fs::File::options().write(true).open(&src) {
                        let _ = f.set_modified(now);
                    }
                    fs::hard_link(&src, &target).map_err(io_err(&target))?;
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
            if fs::remove_file(&p).is_ok() {
                total -= len;
                freed += len;
            }
        }
        freed
    }
}

/// Read-only lower layers shared by every task with the same tree: a
/// tree is materialised once (hard links into the cache) and then mounted
/// by as many overlays as use it, since an overlay never writes to its
/// lower layer. A batch job's thousand tasks share one.
#[derive(Debug)]
pub struct Lowers {
    dir: PathBuf,
    keep: usize,
    in_use: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// A lower layer in use; released on drop.
#[derive(Debug)]
pub struct Lower {
    lowers: std::sync::Arc<Lowers>,
    key: String,
    /// The directory to mount.
    pub path: PathBuf,
}

impl Lower {
    /// The layer is made (a task may mount it).
    pub fn ready(&self) -> bool {
        self.path.is_dir()
    }
}

impl Drop for Lower {
    fn drop(&mut self) {
        let mut g = self.lowers.lock();
        if let Some(n) = g.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.key);
            }
        }
    }
}

impl Lowers {
    /// Lower layers under `dir` (emptied: layers from an earlier life are
    /// not trusted), keeping at most `keep` unused ones.
    pub fn new(dir: &Path, keep: usize) -> Self {
        let _ = fs::remove_dir_all(dir);
        let _ = fs::create_dir_all(dir);
        Self {
            dir: dir.to_owned(),
            keep,
            in_use: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, usize>> {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lower layer of `tree`, made from `cas` if no task has it yet.
    ///
    /// # Errors
    /// As [`Cas::materialize`].
    pub fn get(
        self: &std::sync::Arc<Self>,
        cas: &Cas,
        tree: &[TreeEntry],
        owner: Option<(u32, u32)>,
    ) -> Result<Lower, CasError> {
        let bytes = postcard::to_stdvec(tree).map_err(|e| CasError::Io {
            path: self.dir.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        let lower = self.hold(&hex::encode(hash(&bytes)));
        self.fill(&lower, |tmp| cas.materialize(tree, tmp, owner))?;
        Ok(lower)
    }

    /// The layer named `key`, held (never evicted while the [`Lower`]
    /// lives) whether or not it is made yet ([`Lower::ready`]).
    pub fn hold(self: &std::sync::Arc<Self>, key: &str) -> Lower {
        *self.lock().entry(key.to_owned()).or_insert(0) += 1;
        Lower {
            lowers: self.clone(),
            key: key.to_owned(),
            path: self.dir.join(key),
        }
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
        let tmp = self.dir.join(format!(".{}.{}", lower.key, unique()));
        if let Err(e) = build(&tmp) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        // Another task may have made it meanwhile: theirs is as good.
        if fs::rename(&tmp, &lower.path).is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        Ok(())
    }

    /// Removes unused layers beyond the `keep` most recently made.
    pub fn evict(&self) {
        // Held throughout, so that no task takes a layer being removed.
        let in_use = self.lock();
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut idle: Vec<(SystemTime, PathBuf)> = rd
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                !n.starts_with('.') && !in_use.contains_key(&n)
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        idle.sort();
        let n = idle.len().saturating_sub(self.keep);
        for (_, p) in idle.into_iter().take(n) {
            let _ = fs::remove_dir_all(p);
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
        fs::remove_dir_all(&d).unwrap();
    }
}
