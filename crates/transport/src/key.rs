//! The cluster key file.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::TryRng;

/// Why a key file could not be read or written. Nothing is changed on disk
/// by a failed read; a failed write leaves no partial key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be opened or read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file exists but is not 64 hex digits.
    #[error(
        "key file {path} is not a shoal key (expected 64 hex digits, as `shoal keygen` writes)"
    )]
    Format {
        /// The key file.
        path: PathBuf,
    },
    /// Others than the owner may read the key.
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file could not be created or written.
    #[error("cannot write key file {path}: {source}")]
    Write {
        /// The key file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The operating system's random source failed.
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// A 256-bit cluster key shared by every member.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey(pub(crate) [u8; 32]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(…)")
    }
}

impl ClusterKey {
    /// A key from raw bytes (tests and benchmarks).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh key from the operating system's random source.
    ///
    /// # Errors
    /// The random source failed.
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = [0u8; 32];
        rand::rngs::SysRng
            .try_fill_bytes(&mut k)
            .map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(k))
    }

    /// Reads a key file written by [`ClusterKey::write_new`].
    ///
    /// # Errors
    /// Unreadable, malformed, or readable by others than its owner.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(read_err)?;
        let format = || KeyError::Format {
            path: path.to_owned(),
        };
        let bytes = hex::decode(text.trim()).map_err(|_| format())?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| format())?;
        Ok(Self(key))
    }

    /// Writes this key to a new file with mode 0600. Refuses to overwrite.
    ///
    /// # Errors
    /// The file exists or cannot be written.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let write_err = |source| KeyError::Write {
            path: path.to_owned(),
            source,
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write_err)?;
        let res = writeln!(f, "{}", hex::encode(self.0)).and_then(|()| f.sync_all());
        if let Err(e) = res {
            let _ = fs::remove_file(path);
            return Err(write_err(e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-key-test-{}-{name}", std::process::id()));
        let _ = fs::remove_file(&d);
        d
    }

    #[test]
    fn roundtrip_with_mode_0600() {
        let p = tmp("rt");
        let k = ClusterKey::generate().unwrap();
        k.write_new(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(ClusterKey::load(&p).unwrap(), k);
        assert!(matches!(k.write_new(&p), Err(KeyError::Write { .. })));
        fs::remove_file(&p).unwrap();
    }

    #[test]
    fn clear_errors() {
        let p = tmp("bad");
        assert!(matches!(ClusterKey::load(&p), Err(KeyError::Read { .. })));
        fs::write(&p, "not a key\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let e = ClusterKey::load(&p).unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClusterKey::load(&p).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        fs::remove_file(&p).unwrap();
    }
}
