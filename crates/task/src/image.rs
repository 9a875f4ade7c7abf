//! Software environments (`--image PATH`): a root filesystem, as a
//! directory (debootstrap) or a tarball (`docker export`, plain or gzip),
//! described by a manifest of its system directories with exact modes,
//! owners and modification times. The manifest's hash is the image's id:
//! the executor keeps each image it has unpacked under that id, so an image
//! crosses the network once per executor, file contents by hash like a
//! task's tree (two images sharing most files share most contents).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hashcache::HashCache;
use crate::proto::Hash;
use crate::tree::hash;

/// The top-level directories of an image that a workspace mounts (read
/// only); nothing else of an image is shipped.
pub const IMAGE_DIRS: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt",
];

/// Why an image could not be read. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The path names nothing readable.
    #[error("image {path}: {source}")]
    Unreadable {
        /// The image or the file in it.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A directory or archive without `bin` or `usr`.
    #[error("image {0} is not a root filesystem (no bin/ or usr/ at its top)")]
    NotARootfs(PathBuf),
    /// A tarball the `tar` reader refused, or a hard link to nothing.
    #[error("image {path}: not a valid tar archive: {why}")]
    BadArchive {
        /// The archive.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// A file changed while it was being sent.
    #[error("image {0} changed while it was being sent; run again")]
    Changed(PathBuf),
}

/// What is at one path of an image, exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageNode {
    /// A regular file (hard links are separate files with one content).
    File {
        /// Content hash.
        hash: Hash,
        /// Size in bytes.
        size: u64,
        /// Mode bits (permissions, setuid, setgid, sticky).
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// Modification time, seconds since the epoch.
        mtime: i64,
    },
    /// A directory.
    Dir {
        /// Mode bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: PathBuf,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
}

/// A path relative to the image's root and what is there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntry {
    /// Relative path (normal components only).
    pub path: PathBuf,
    /// What it is.
    pub node: ImageNode,
}

/// The id of an image: the hash of its manifest.
pub fn id_of(entries: &[ImageEntry]) -> Hash {
    // A Vec of plain structs always serialises.
    hash(&postcard::to_stdvec(entries).unwrap_or_default())
}

/// Where an image's contents are read from when an executor asks.
#[derive(Debug)]
enum Sources {
    Dir(HashMap<Hash, PathBuf>),
    Tar(PathBuf),
}

/// A scanned image: its manifest and where its contents are.
#[derive(Debug)]
pub struct Image {
    /// Its id.
    pub id: Hash,
    /// Every entry, parents before children.
    pub entries: Vec<ImageEntry>,
    /// Total bytes of file content.
    pub bytes: u64,
    /// The directory or tarball it came from.
    pub origin: PathBuf,
    sources: Sources,
}

/// Whether the first component of `rel` is one of [`IMAGE_DIRS`].
fn wanted(rel: &Path) -> bool {
    match rel.components().next() {
        Some(Component::Normal(n)) => IMAGE_DIRS.iter().any(|d| n == *d),
        _ => false,
    }
}

/// `rel` without `./` and `/` prefixes, if it stays inside the root.
fn clean(rel: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn is_rootfs(entries: &BTreeMap<PathBuf, ImageNode>) -> bool {
    matches!(
        entries.get(Path::new("bin")),
        Some(ImageNode::Dir { .. } | ImageNode::Symlink { .. })
    ) || matches!(entries.get(Path::new("usr")), Some(ImageNode::Dir { .. }))
}

/// Scans the image at `path`: a directory, or a tar archive (gzip or not).
///
/// # Errors
/// Unreadable, not a root filesystem, or a bad archive.
pub fn scan(path: &Path, cache: &mut HashCache) -> Result<Image, ImageError> {
    let unreadable = |source| ImageError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(unreadable)?;
    let (map, sources) = if meta.is_dir() {
        let mut map = BTreeMap::new();
        let mut src = HashMap::new();
        for d in IMAGE_DIRS {
            walk(path, Path::new(d), cache, &mut map, &mut src)?;
        }
        (map, Sources::Dir(src))
    } else {
        (scan_tar(path)?, Sources::Tar(path.to_owned()))
    };
    if !is_rootfs(&map) {
        return Err(ImageError::NotARootfs(path.to_owned()));
    }
    let entries: Vec<ImageEntry> = map
        .into_iter()
        .map(|(path, node)| ImageEntry { path, node })
        .collect();
    let bytes = entries
        .iter()
        .map(|e| match e.node {
            ImageNode::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    Ok(Image {
        id: id_of(&entries),
        entries,
        bytes,
        origin: path.to_owned(),
        sources,
    })
}

/// Adds `root/rel` and everything under it (not following links).
fn walk(
    root: &Path,
    rel: &Path,
    cache: &mut HashCache,
    map: &mut BTreeMap<PathBuf, ImageNode>,
    src: &mut HashMap<Hash, PathBuf>,
) -> Result<(), ImageError> {
    let p = root.join(rel);
    let unreadable = |source| ImageError::Unreadable {
        path: p.clone(),
        source,
    };
    let meta = match fs::symlink_metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound && rel.components().count() == 1 => {
            return Ok(()); // an image without lib32, say
        }
        Err(e) => return Err(unreadable(e)),
    };
    let (uid, gid, mode) = (meta.uid(), meta.gid(), meta.mode() & 0o7777);
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(&p).map_err(unreadable)?;
        map.insert(rel.to_owned(), ImageNode::Symlink { target, uid, gid });
    } else if ft.is_dir() {
        map.insert(rel.to_owned(), ImageNode::Dir { mode, uid, gid });
        let mut names: Vec<_> = fs::read_dir(&p)
            .map_err(unreadable)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(unreadable)?;
        names.sort();
        for n in names {
            walk(root, &rel.join(n), cache, map, src)?;
        }
    } else if ft.is_file() {
        let h = cache.hash_file(&p, &meta).map_err(unreadable)?;
        src.entry(h).or_insert_with(|| p.clone());
        map.insert(
            rel.to_owned(),
            ImageNode::File {
                hash: h,
                size: meta.size(),
                mode,
                uid,
                gid,
                mtime: meta.mtime(),
            },
        );
    }
    // Devices, fifos and sockets are not shipped: a workspace has its own
    // /dev and the guest may make neither.
    Ok(())
}

/// Opens a tar archive, gunzipping it when it starts with gzip's magic.
fn open_tar(path: &Path) -> Result<tar::Archive<Box<dyn Read>>, ImageError> {
    let unreadable = |source| ImageError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let mut f = BufReader::new(fs::File::open(path).map_err(unreadable)?);
    let gz = {
        use std::io::BufRead;
        f.fill_buf().map_err(unreadable)?.starts_with(&[0x1f, 0x8b])
    };
    let r: Box<dyn Read> = if gz {
        Box::new(flate2::bufread::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(tar::Archive::new(r))
}

/// Calls `each` with every member of the archive that an image keeps:
/// its cleaned path, its header, and (for a regular file) its content.
fn members(
    path: &Path,
    mut each: impl FnMut(PathBuf, &tar::Header, Option<Vec<u8>>) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let bad = |why: String| ImageError::BadArchive {
        path: path.to_owned(),
        why,
    };
    let mut ar = open_tar(path)?;
    for m in ar.entries().map_err(|e| bad(e.to_string()))? {
        let mut m = m.map_err(|e| bad(e.to_string()))?;
        let raw = m.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let Some(rel) = clean(&raw) else {
            return Err(bad(format!("member {} leaves the root", raw.display())));
        };
        if !wanted(&rel) {
            continue;
        }
        let data = if m.header().entry_type().is_file() {
            let mut d = Vec::with_capacity(usize::try_from(m.size()).unwrap_or(0));
            m.read_to_end(&mut d)
                .map_err(|e| bad(format!("{}: {e}", rel.display())))?;
            Some(d)
        } else {
            None
        };
        let header = m.header().clone();
        each(rel, &header, data)?;
    }
    Ok(())
}

fn scan_tar(path: &Path) -> Result<BTreeMap<PathBuf, ImageNode>, ImageError> {
    let bad = |why: String| ImageError::BadArchive {
        path: path.to_owned(),
        why,
    };
    let mut map = BTreeMap::new();
    members(path, |rel, h, data| {
        let num = |r: io::Result<u64>, what: &str| {
            r.map_err(|e| bad(format!("{}: {what}: {e}", rel.display())))
        };
        let uid = u32::try_from(num(h.uid(), "uid")?).unwrap_or(u32::MAX);
        let gid = u32::try_from(num(h.gid(), "gid")?).unwrap_or(u32::MAX);
        let mode = h
            .mode()
            .map_err(|e| bad(format!("{}: mode: {e}", rel.display())))?
            & 0o7777;
        let node = match (h.entry_type(), data) {
            (_, Some(d)) => ImageNode::File {
                hash: hash(&d),
                size: d.len() as u64,
                mode,
                uid,
                gid,
                mtime: i64::try_from(num(h.mtime(), "mtime")?).unwrap_or(0),
            },
            (tar::EntryType::Directory, None) => ImageNode::Dir { mode, uid, gid },
            (tar::EntryType::Symlink, None) => ImageNode::Symlink {
                target: h
                    .link_name()
                    .map_err(|e| bad(e.to_string()))?
                    .ok_or_else(|| bad(format!("{}: symlink without target", rel.display())))?
                    .into_owned(),
                uid,
                gid,
            },
            (tar::EntryType::Link, None) => {
                let to = h
                    .link_name()
                    .map_err(|e| bad(e.to_string()))?
                    .and_then(|t| clean(&t))
                    .ok_or_else(|| bad(format!("{}: hard link without target", rel.display())))?;
                match map.get(&to) {
                    Some(ImageNode::File {
                        hash, size, mtime, ..
                    }) => ImageNode::File {
                        hash: *hash,
                        size: *size,
                        mode,
                        uid,
                        gid,
                        mtime: *mtime,
                    },
                    _ => {
                        return Err(bad(format!(
                            "{}: hard link to {}, which is not an earlier file",
                            rel.display(),
                            to.display()
                        )))
                    }
                }
            }
            _ => return Ok(()), // devices, fifos: see `walk`
        };
        map.insert(rel, node);
        Ok(())
    })?;
    Ok(map)
}

impl Image {
    /// Reads the contents among `wanted` and gives each to `send` (once
    /// per hash), checking that each still has its hash.
    ///
    /// # Errors
    /// The image cannot be read or changed since it was scanned; or `send`
    /// failed (its error is returned as `Unreadable`).
    pub fn contents(
        &self,
        wanted: &[Hash],
        mut send: impl FnMut(Hash, Vec<u8>) -> io::Result<()>,
    ) -> Result<(), ImageError> {
        let mut left: std::collections::HashSet<Hash> = wanted.iter().copied().collect();
        let sent = |e| ImageError::Unreadable {
            path: self.origin.clone(),
            source: e,
        };
        match &self.sources {
            Sources::Dir(src) => {
                for h in wanted {
                    if !left.remove(h) {
                        continue;
                    }
                    let Some(p) = src.get(h) else {
                        return Err(ImageError::Changed(self.origin.clone()));
                    };
                    let data = fs::read(p).map_err(|e| ImageError::Unreadable {
                        path: p.clone(),
                        source: e,
                    })?;
                    if &hash(&data) != h {
                        return Err(ImageError::Changed(self.origin.clone()));
                    }
                    send(*h, data).map_err(sent)?;
                }
            }
            Sources::Tar(path) => {
                members(path, |_, _, data| {
                    if let Some(d) = data {
                        let h = hash(&d);
                        if left.remove(&h) {
                            send(h, d).map_err(sent)?;
                        }
                    }
                    Ok(())
                })?;
                if !left.is_empty() {
                    return Err(ImageError::Changed(self.origin.clone()));
                }
            }
        }
        Ok(())
    }

    /// The hashes of every file content.
    pub fn hashes(&self) -> impl Iterator<Item = Hash> + '_ {
        self.entries.iter().filter_map(|e| match e.node {
            ImageNode::File { hash, .. } => Some(hash),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-img-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn rootfs(d: &Path) {
        fs::create_dir_all(d.join("usr/bin")).unwrap();
        fs::create_dir_all(d.join("etc")).unwrap();
        fs::create_dir_all(d.join("home/someone")).unwrap();
        fs::write(d.join("usr/bin/tool"), "#!/bin/true\n").unwrap();
        fs::set_permissions(d.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(d.join("etc/secretish"), "x").unwrap();
        fs::set_permissions(d.join("etc/secretish"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(d.join("home/someone/notes"), "not shipped").unwrap();
        std::os::unix::fs::symlink("usr/bin", d.join("bin")).unwrap();
    }

    #[test]
    fn a_directory_and_its_tarball_are_the_same_image() {
        let d = tmp("same");
        let root = d.join("root");
        rootfs(&root);
        let mut cache = HashCache::in_memory();
        let a = scan(&root, &mut cache).unwrap();
        let paths: Vec<String> = a
            .entries
            .iter()
            .map(|e| e.path.display().to_string())
            .collect();
        assert_eq!(
            paths,
            [
                "bin",
                "etc",
                "etc/secretish",
                "usr",
                "usr/bin",
                "usr/bin/tool"
            ]
        );
        let tool = a.entries.iter().find(|e| e.path.ends_with("tool")).unwrap();
        assert!(matches!(tool.node, ImageNode::File { mode: 0o4755, .. }));

        // The same tree as a tarball (with ./ prefixes, as `tar -C root .`
        // writes them), plain and gzipped: the same id.
        let tar_path = d.join("img.tar");
        {
            let mut b = tar::Builder::new(fs::File::create(&tar_path).unwrap());
            b.follow_symlinks(false);
            b.append_dir_all(".", &root).unwrap();
            b.finish().unwrap();
        }
        let b = scan(&tar_path, &mut cache).unwrap();
        assert_eq!(b.entries, a.entries);
        assert_eq!(b.id, a.id);
        let gz_path = d.join("img.tar.gz");
        {
            let mut enc = flate2::write::GzEncoder::new(
                fs::File::create(&gz_path).unwrap(),
                flate2::Compression::fast(),
            );
            io::copy(&mut fs::File::open(&tar_path).unwrap(), &mut enc).unwrap();
            enc.finish().unwrap();
        }
        let c = scan(&gz_path, &mut cache).unwrap();
        assert_eq!(c.id, a.id);

        // Contents come out of either source by hash.
        let want: Vec<Hash> = a.hashes().collect();
        for img in [&a, &c] {
            let mut got = Vec::new();
            img.contents(&want, |h, data| {
                assert_eq!(hash(&data), h);
                got.push(h);
                Ok(())
            })
            .unwrap();
            got.sort();
            let mut w = want.clone();
            w.sort();
            w.dedup();
            assert_eq!(got, w);
        }

        // A mode change is a new image.
        fs::set_permissions(
            root.join("etc/secretish"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        assert_ne!(scan(&root, &mut cache).unwrap().id, a.id);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_what_is_not_a_root_filesystem() {
        let d = tmp("bad");
        fs::create_dir_all(d.join("src")).unwrap();
        let mut cache = HashCache::in_memory();
        assert!(matches!(
            scan(&d, &mut cache),
            Err(ImageError::NotARootfs(_))
        ));
        assert!(matches!(
            scan(&d.join("absent"), &mut cache),
            Err(ImageError::Unreadable { .. })
        ));
        fs::write(d.join("junk.tar"), vec![7u8; 4096]).unwrap();
        assert!(matches!(
            scan(&d.join("junk.tar"), &mut cache),
            Err(ImageError::BadArchive { .. } | ImageError::NotARootfs(_))
        ));
        // A member escaping the root is refused, not skipped.
        let evil = d.join("evil.tar");
        {
            let mut b = tar::Builder::new(fs::File::create(&evil).unwrap());
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // set_path refuses `..`; write the name bytes directly.
            h.as_gnu_mut().unwrap().name[..10].copy_from_slice(b"../usr/x\0\0");
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
            b.finish().unwrap();
        }
        let e = scan(&evil, &mut cache).unwrap_err();
        assert!(e.to_string().contains("leaves the root"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
