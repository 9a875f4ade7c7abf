//! Reading what a task changed from an overlayfs upper directory.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One change to one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A new or modified regular file, with its permission bits.
    File {
        /// Permission bits (0o7777 at most).
        mode: u32,
        /// The whole content.
        data: Vec<u8>,
    },
    /// A new or modified regular file whose content is not in the change
    /// set (too large to hold in memory with the rest): it follows the
    /// change set, these files in order, as raw bytes
    /// ([`crate::Commit::feed`]).
    Streamed {
        /// Permission bits (0o7777 at most).
        mode: u32,
        /// Its length in bytes.
        size: u64,
    },
    /// A directory that must exist, with its permission bits.
    Dir {
        /// Permission bits.
        mode: u32,
    },
    /// A directory whose old contents are gone (overlayfs "opaque"): made
    /// empty first, then filled by the entries under it.
    OpaqueDir {
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points.
        target: PathBuf,
    },
    /// The path was deleted.
    Delete,
}

/// A path, relative to the tree root, and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path; no `..`, no root, no empty components.
    pub path: PathBuf,
    /// What happened.
    pub change: Change,
}

/// Every change of one task, parents before children.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSet {
    /// The entries, in an order that can be applied front to back.
    pub entries: Vec<Entry>,
}

/// Why a change set could not be read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The upper directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// What was being read.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A path that would escape the tree.
    #[error("unsafe path in change set: {0}")]
    UnsafePath(PathBuf),
    /// A special file (device, socket, fifo) that a task may not create.
    #[error("unsupported file type at {0}")]
    Unsupported(PathBuf),
}

/// Checks that `p` stays inside the tree: relative, no `..`.
pub(crate) fn check_path(p: &Path) -> Result<(), ChangeError> {
    let ok = !p.as_os_str().is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(ChangeError::UnsafePath(p.to_owned()))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ChangeError + '_ {
    move |source| ChangeError::Io {
        path: path.to_owned(),
        source,
    }
}

fn is_opaque(p: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|a| matches!(xattr::get(p, a), Ok(Some(v)) if v == b"y"))
}

impl ChangeSet {
    /// Reads the changes recorded in overlayfs upper directory `upper`:
    /// files and symlinks are new or modified, a character device 0:0 is a
    /// deletion (a whiteout), a directory marked opaque replaced the one
    /// below it.
    ///
    /// # Errors
    /// Unreadable entries or special files.
    pub fn from_upper(upper: &Path) -> Result<Self, ChangeError> {
        Self::from_upper_within(upper, u64::MAX)
    }

    /// As [`ChangeSet::from_upper`], holding at most `inline` bytes of
    /// file content: a file that does not fit in what is left is
    /// [`Change::Streamed`], to be read from `upper` and sent after the
    /// change set (a task's outputs may be larger than the memory of
    /// either side).
    ///
    /// # Errors
    /// Unreadable entries or special files.
    pub fn from_upper_within(upper: &Path, inline: u64) -> Result<Self, ChangeError> {
        let mut cs = Self::default();
        let mut left = inline;
        walk(upper, Path::new(""), &mut cs, &mut left)?;
        Ok(cs)
    }

    /// The streamed files, in the order their contents follow the change
    /// set, with their lengths.
    pub fn streamed(&self) -> impl Iterator<Item = (&Path, u64)> {
        self.entries.iter().filter_map(|e| match e.change {
            Change::Streamed { size, .. } => Some((e.path.as_path(), size)),
            _ => None,
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the task changed nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks every path (for a change set that came over the network).
    ///
    /// # Errors
    /// A path that would escape the tree.
    pub fn validate(&self) -> Result<(), ChangeError> {
        self.entries.iter().try_for_each(|e| check_path(&e.path))
    }
}

fn walk(dir: &Path, rel: &Path, cs: &mut ChangeSet, left: &mut u64) -> Result<(), ChangeError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    names.sort();
    for name in names {
        let p = dir.join(&name);
        let r = rel.join(&name);
        let meta = fs::symlink_metadata(&p).map_err(io_err(&p))?;
        let ft = meta.file_type();
        let mode = meta.permissions().mode() & 0o7777;
        if ft.is_char_device() && meta.rdev() == 0 {
            cs.entries.push(Entry {
                path: r,
                change: Change::Delete,
            });
        } else if ft.is_symlink() {
            let target = fs::read_link(&p).map_err(io_err(&p))?;
            cs.entries.push(Entry {
                path: r,
                change: Change::Symlink { target },
            });
        } else if ft.is_file() && meta.len() > *left {
            cs.entries.push(Entry {
                path: r,
                change: Change::Streamed {
                    mode,
                    size: meta.len(),
                },
            });
        } else if ft.is_file() {
            let data = fs::read(&p).map_err(io_err(&p))?;
            *left = left.saturating_sub(data.len() as u64);
            cs.entries.push(Entry {
                path: r,
                change: Change::File { mode, data },
            });
        } else if ft.is_dir() {
            let change = if is_opaque(&p) {
                Change::OpaqueDir { mode }
            } else {
                Change::Dir { mode }
            };
            cs.entries.push(Entry {
                path: r.clone(),
                change,
            });
            walk(&p, &r, cs, left)?;
        } else {
            return Err(ChangeError::Unsupported(r));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_inside() {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(check_path(Path::new(bad)).is_err(), "{bad}");
        }
        assert!(check_path(Path::new("a/b.c")).is_ok());
    }

    #[test]
    fn reads_files_dirs_and_symlinks_in_order() {
        let d = std::env::temp_dir().join(format!("shoal-cs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("sub/b"), "B").unwrap();
        fs::write(d.join("a"), "A").unwrap();
        fs::set_permissions(d.join("a"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a", d.join("link")).unwrap();
        let cs = ChangeSet::from_upper(&d).unwrap();
        let paths: Vec<_> = cs
            .entries
            .iter()
            .map(|e| e.path.to_string_lossy().into_owned())
            .collect();
        assert_eq!(paths, ["a", "link", "sub", "sub/b"]);
        assert_eq!(
            cs.entries[0].change,
            Change::File {
                mode: 0o755,
                data: b"A".to_vec()
            }
        );
        assert_eq!(cs.entries[1].change, Change::Symlink { target: "a".into() });
        cs.validate().unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_beyond_the_inline_budget_are_streamed_in_order() {
        let d = std::env::temp_dir().join(format!("shoal-cs-budget-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("a"), vec![b'a'; 40]).unwrap();
        fs::write(d.join("b"), vec![b'b'; 100]).unwrap();
        fs::write(d.join("c"), vec![b'c'; 50]).unwrap();
        fs::write(d.join("sub/d"), vec![b'd'; 10]).unwrap();
        let cs = ChangeSet::from_upper_within(&d, 95).unwrap();
        // a fits (55 left), b does not, c does (5 left), sub/d does not.
        let streamed: Vec<_> = cs
            .streamed()
            .map(|(p, n)| (p.to_string_lossy().into_owned(), n))
            .collect();
        assert_eq!(streamed, [("b".to_owned(), 100), ("sub/d".to_owned(), 10)]);
        let inline: usize = cs
            .entries
            .iter()
            .map(|e| match &e.change {
                Change::File { data, .. } => data.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(inline, 90);
        assert_eq!(ChangeSet::from_upper(&d).unwrap().streamed().count(), 0);
        fs::remove_dir_all(&d).unwrap();
    }
}
