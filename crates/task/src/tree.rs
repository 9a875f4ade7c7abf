//! The submitter's side: the manifest of the working tree.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
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
/// # Errors
/// An unreadable file or directory that `keep` accepts, named.
pub fn scan_filtered(
    root: &Path,
    cache: &mut HashCache,
    keep: impl Fn(&Path) -> bool + Send + Sync + 'static,
) -> Result<Manifest, TreeError> {
    let root_owned = root.to_owned();
    let mut m = Manifest::default();
    let walker = ignore::WalkBuilder::new(root)
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
            let rel = e.path().strip_prefix(&root_owned).unwrap_or(e.path());
            n != ".git"
                && !shoal_files::is_internal(&n)
                && (rel.as_os_str().is_empty() || keep(rel))
        })
        .build();
    for item in walker {
        let e = item.map_err(|err| match err.io_error() {
            Some(io) if io.kind() == io::ErrorKind::PermissionDenied => TreeError::Unreadable {
                path: path_of(&err).unwrap_or_else(|| root.to_owned()),
                source: io::Error::from(io::ErrorKind::PermissionDenied),
            },
            _ => TreeError::Walk(err.to_string()),
        })?;
        let p = e.path();
        let Ok(rel) = p.strip_prefix(root) else {
            continue;
        };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let unreadable = |source| TreeError::Unreadable {
            path: p.to_owned(),
            source,
        };
        let meta = fs::symlink_metadata(p).map_err(unreadable)?;
        let mode = meta.permissions().mode() & 0o7777;
        let node = if meta.file_type().is_symlink() {
            Node::Symlink {
                target: fs::read_link(p).map_err(unreadable)?,
            }
        } else if meta.is_dir() {
            Node::Dir { mode }
        } else if meta.is_file() {
            let h = cache.hash_file(p, &meta).map_err(unreadable)?;
            m.bytes += meta.len();
            m.sources.entry(h).or_insert_with(|| p.to_owned());
            Node::File {
                hash: h,
                mode,
                size: meta.len(),
            }
        } else {
            continue; // sockets, fifos, devices are not shipped
        };
        m.entries.push(TreeEntry {
            path: rel.to_owned(),
            node,
        });
    }
    Ok(m)
}

fn path_of(err: &ignore::Error) -> Option<PathBuf> {
    match err {
        ignore::Error::WithPath { path, .. } => Some(path.clone()),
        ignore::Error::WithDepth { err, .. } | ignore::Error::WithLineNumber { err, .. } => {
            path_of(err)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        fs::remove_dir_all(&d).unwrap();
    }
}
