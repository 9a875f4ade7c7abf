//! The agent's configuration: a TOML file, then command-line flags on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default config file.
pub const DEFAULT_CONFIG: &str = "/etc/shoal/shoal.toml";
/// Default cluster key file.
pub const DEFAULT_KEY: &str = "/etc/shoal/cluster.key";
/// Default SWIM (UDP) and bandwidth (TCP) port.
pub const DEFAULT_PORT: u16 = 7946;
/// Default discovery multicast group and port.
pub const DEFAULT_GROUP: &str = "239.255.83.76:7947";

/// Why the configuration could not be loaded. Nothing has started.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Bad TOML, an unknown key or a wrong type.
    #[error("config file {path}, line {line}, column {column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A policy expression or number that is wrong.
    #[error("config file {path}: {source}")]
    Policy {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the key, line and column.
        source: shoal_owner::PolicyError,
    },
    /// A value that parses but makes no sense.
    #[error("config: {key}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Every key of the config file (all optional). See README for each.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Node name.
    pub name: Option<String>,
    /// Cluster name.
    pub cluster: Option<String>,
    /// SWIM bind address.
    pub bind: Option<SocketAddr>,
    /// Address to advertise when `bind` is a wildcard.
    pub advertise: Option<std::net::IpAddr>,
    /// Peers to join.
    #[serde(default)]
    pub join: Vec<SocketAddr>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Cluster key file.
    pub key_file: Option<PathBuf>,
    /// Expected cluster size.
    pub expect: Option<u32>,
    /// Discovery settings.
    #[serde(default)]
    pub discovery: DiscoveryFile,
    /// How often facts are refreshed, ms.
    pub facts_refresh_ms: Option<u64>,
    /// SWIM timing profile: `fast` or `memberlist`.
    pub swim_profile: Option<String>,
    /// Size cap of the executor's content cache, bytes.
    pub cache_bytes: Option<u64>,
    /// Where tasks' scratch (their written files until committed) lives:
    /// `disk` (the default) or `memory`.
    pub scratch: Option<ScratchKind>,
    /// Size cap of the scratch in memory, bytes (default: tmpfs's, half of
    /// the machine's memory).
    pub scratch_bytes: Option<u64>,
    /// Guest slots this machine lends (default: its cores).
    pub slots: Option<u32>,
    /// Warm task cgroups kept ready (default: twice the cores, at least 4;
    /// 0: every task gets a fresh cgroup).
    pub warm_slots: Option<u32>,
    /// The cgroup under which the agent makes its groups, relative to each
    /// hierarchy (default `shoal-<name>`). An agent that is not root needs
    /// one its user owns: a subtree the administrator delegated to it.
    pub cgroup_parent: Option<String>,
    /// The owner's policy (`[policy]`).
    pub policy: Option<shoal_owner::PolicyConfig>,
    /// `policy`, compiled and checked by [`parse_file`].
    #[serde(skip)]
    pub compiled_policy: Option<shoal_owner::Policy>,
}

/// `[discovery]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryFile {
    /// Multicast discovery on or off.
    pub enabled: Option<bool>,
    /// Multicast group and port.
    pub group: Option<SocketAddr>,
    /// Beacon interval, ms.
    pub interval_ms: Option<u64>,
    /// Also send beacons to the broadcast address.
    pub broadcast: Option<bool>,
}

/// Flags given on the command line; each overrides its key.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--name`.
    pub name: Option<String>,
    /// `--bind`.
    pub bind: Option<SocketAddr>,
    /// `--join`, repeatable.
    pub join: Vec<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--cluster`.
    pub cluster: Option<String>,
    /// `--key`.
    pub key: Option<PathBuf>,
    /// `--expect`.
    pub expect: Option<u32>,
    /// `--no-discovery`.
    pub no_discovery: bool,
    /// `--slots`.
    pub slots: Option<u32>,
    /// `--config`: the file the policy is reloaded from on SIGHUP.
    pub config_path: Option<PathBuf>,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Node name.
    pub name: String,
    /// Cluster name.
    pub cluster: String,
    /// SWIM bind address.
    pub bind: SocketAddr,
    /// Advertised IP when `bind` is a wildcard (else found from the
    /// interfaces).
    pub advertise: Option<std::net::IpAddr>,
    /// Peers to join.
    pub join: Vec<SocketAddr>,
    /// Data directory (control socket, state).
    pub data_dir: PathBuf,
    /// Cluster key file.
    pub key_file: PathBuf,
    /// Expected cluster size (0: none).
    pub expect: u32,
    /// Multicast discovery.
    pub discovery: bool,
    /// Multicast group and port.
    pub group: SocketAddr,
    /// Beacon interval, ms.
    pub beacon_interval_ms: u64,
    /// Broadcast beacons too.
    pub broadcast: bool,
    /// Facts refresh interval, ms.
    pub facts_refresh_ms: u64,
    /// SWIM timing profile.
    pub swim_profile: SwimProfile,
    /// Size cap of the executor's content cache, bytes.
    pub cache_bytes: u64,
    /// Where tasks' scratch lives.
    pub scratch: ScratchKind,
    /// Size cap of the scratch in memory, bytes (`None`: tmpfs's default).
    pub scratch_bytes: Option<u64>,
    /// Guest slots lent (`None`: one per core).
    pub slots: Option<u32>,
    /// Warm task cgroups kept ready (`None`: twice the cores, at least 4).
    pub warm_slots: Option<u32>,
    /// The parent of the agent's cgroups, relative to each hierarchy.
    pub cgroup_parent: String,
    /// The owner's policy.
    pub policy: shoal_owner::Policy,
    /// The config file named on the command line (`None`: the default,
    /// which may be absent), for reloading the policy.
    pub config_path: Option<PathBuf>,
}

impl AgentConfig {
    /// Where the tmpfs of a scratch in memory is mounted.
    #[must_use]
    pub fn memory_scratch_dir(&self) -> PathBuf {
        self.data_dir.join("mem")
    }
}

/// Where tasks' scratch lives: their task directories (the overlay's upper
/// and work layers, which hold what a task writes until it is committed or
/// dropped) and the spools of detached attempts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScratchKind {
    /// In the data directory, on its file system.
    #[default]
    Disk,
    /// On a tmpfs the agent mounts (root only): no inode or writeback cost
    /// per task, but what a task writes takes memory (its cgroup's) until
    /// it ends, up to `scratch_bytes` in all.
    Memory,
}

/// SWIM timing: how fast failures are detected against how much loss is
/// tolerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwimProfile {
    /// Tuned for a LAN: 150 ms probes, 450 ms suspicion (the default).
    Fast,
    /// memberlist's LAN defaults: 1 s probes, suspicion 4 × log10(N) s.
    Memberlist,
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Parses config file text; `path` is only for messages.
///
/// # Errors
/// Bad TOML, unknown keys or wrong types, with line and column.
pub fn parse_file(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    let mut f: FileConfig = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })?;
    if let Some(p) = &f.policy {
        let compiled =
            shoal_owner::Policy::compile(p, text).map_err(|source| ConfigError::Policy {
                path: path.to_owned(),
                source,
            })?;
        f.compiled_policy = Some(compiled);
    }
    Ok(f)
}

/// Reads the config file. A missing file is an error only if it was named
/// explicitly; the default file may be absent.
///
/// # Errors
/// Unreadable or invalid file.
pub fn load_file(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let (p, explicit) = match path {
        Some(p) => (p.to_owned(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    match std::fs::read_to_string(&p) {
        Ok(text) => parse_file(&text, &p),
        Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
            Ok(FileConfig::default())
        }
        Err(source) => Err(ConfigError::Read { path: p, source }),
    }
}

fn default_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "shoal-node".to_owned())
}

/// Merges file and flags into the effective configuration.
///
/// # Errors
/// Values out of range.
pub fn resolve(file: FileConfig, flags: Flags) -> Result<AgentConfig, ConfigError> {
    let name = flags.name.or(file.name).unwrap_or_else(default_name);
    if name.is_empty() || name.len() > 64 {
        return Err(ConfigError::Invalid {
            key: "name",
            message: format!("{name:?} must be 1 to 64 characters"),
        });
    }
    let cluster = flags
        .cluster
        .or(file.cluster)
        .unwrap_or_else(|| "default".to_owned());
    if cluster.is_empty() || cluster.len() > 64 {
        return Err(ConfigError::Invalid {
            key: "cluster",
            message: format!("{cluster:?} must be 1 to 64 characters"),
        });
    }
    if file.scratch_bytes.is_some_and(|b| b < 1 << 20) {
        return Err(ConfigError::Invalid {
            key: "scratch_bytes",
            message: "must be at least 1 MiB (1048576)".into(),
        });
    }
    let mut join = file.join;
    join.extend(flags.join);
    let beacon_interval_ms = file.discovery.interval_ms.unwrap_or(1000);
    let facts_refresh_ms = file.facts_refresh_ms.unwrap_or(2000);
    for (key, v) in [
        ("discovery.interval_ms", beacon_interval_ms),
        ("facts_refresh_ms", facts_refresh_ms),
    ] {
        if !(50..=600_000).contains(&v) {
            return Err(ConfigError::Invalid {
                key,
                message: format!("{v} is outside 50..=600000"),
            });
        }
    }
    let group = file.discovery.group.unwrap_or_else(|| {
        DEFAULT_GROUP
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([239, 255, 83, 76], 7947)))
    });
    if !group.ip().is_multicast() {
        return Err(ConfigError::Invalid {
            key: "discovery.group",
            message: format!("{} is not a multicast address", group.ip()),
        });
    }
    let swim_profile = match file.swim_profile.as_deref() {
        None | Some("fast") => SwimProfile::Fast,
        Some("memberlist") => SwimProfile::Memberlist,
        Some(other) => {
            return Err(ConfigError::Invalid {
                key: "swim_profile",
                message: format!("{other:?} is not one of \"fast\", \"memberlist\""),
            })
        }
    };
    let cgroup_parent = match file.cgroup_parent {
        Some(p) => {
            if shoal_executor::cgroup::check_parent(&p).is_err() {
                return Err(ConfigError::Invalid {
                    key: "cgroup_parent",
                    message: format!(
                        "{p:?} is not a relative cgroup path (names of letters, digits, \
                         '-', '_' and '.', joined by '/')"
                    ),
                });
            }
            p
        }
        None => format!("shoal-{name}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect(),
    };
    Ok(AgentConfig {
        cgroup_parent,
        policy: file.compiled_policy.unwrap_or_default(),
        config_path: flags.config_path,
        swim_profile,
        cache_bytes: file.cache_bytes.unwrap_or(2 << 30),
        scratch: file.scratch.unwrap_or_default(),
        scratch_bytes: file.scratch_bytes,
        slots: flags.slots.or(file.slots),
        warm_slots: file.warm_slots,
        name,
        cluster,
        bind: flags
            .bind
            .or(file.bind)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))),
        advertise: file.advertise,
        join,
        data_dir: flags
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(shoal_control::DEFAULT_DATA_DIR)),
        key_file: flags
            .key
            .or(file.key_file)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY)),
        expect: flags.expect.or(file.expect).unwrap_or(0),
        discovery: !flags.no_discovery && file.discovery.enabled.unwrap_or(true),
        group,
        beacon_interval_ms,
        broadcast: file.discovery.broadcast.unwrap_or(true),
        facts_refresh_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file_parses_and_flags_override() {
        let text = r#"
name = "a"
cluster = "lab"
bind = "10.0.0.1:7000"
join = ["10.0.0.2:7946"]
data_dir = "/tmp/x"
key_file = "/tmp/k"
expect = 3
facts_refresh_ms = 1000
swim_profile = "memberlist"
[discovery]
enabled = false
group = "239.1.2.3:9999"
interval_ms = 500
broadcast = false
"#;
        let f = parse_file(text, Path::new("t.toml")).unwrap();
        let c = resolve(
            f,
            Flags {
                name: Some("b".into()),
                join: vec!["10.0.0.3:7946".parse().unwrap()],
                ..Flags::default()
            },
        )
        .unwrap();
        assert_eq!(c.name, "b");
        assert_eq!(c.cluster, "lab");
        assert_eq!(c.join.len(), 2);
        assert_eq!(c.expect, 3);
        assert!(!c.discovery && !c.broadcast);
        assert_eq!(c.group, "239.1.2.3:9999".parse().unwrap());
        assert_eq!(c.swim_profile, SwimProfile::Memberlist);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = parse_file("name = \"a\"\n\nbogus = 1\n", Path::new("/etc/s.toml")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("/etc/s.toml") && s.contains("line 3") && s.contains("bogus"),
            "{s}"
        );
        let e = parse_file("expect = \"three\"\n", Path::new("s.toml")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("line 1") && s.contains("expect"), "{s}");
        let e = parse_file("[discovery]\ninterval_ms = -1\n", Path::new("s.toml")).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn scratch_is_on_disk_unless_memory_is_asked_for() {
        let c = resolve(FileConfig::default(), Flags::default()).unwrap();
        assert_eq!(c.scratch, ScratchKind::Disk);
        let f = parse_file(
            "scratch = \"memory\"\nscratch_bytes = 1073741824\n",
            Path::new("s.toml"),
        )
        .unwrap();
        let c = resolve(f, Flags::default()).unwrap();
        assert_eq!(c.scratch, ScratchKind::Memory);
        assert_eq!(c.scratch_bytes, Some(1 << 30));
        assert_eq!(c.memory_scratch_dir(), c.data_dir.join("mem"));
        let e = parse_file("\nscratch = \"ram\"\n", Path::new("s.toml")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("line 2") && s.contains("ram") && s.contains("memory"),
            "{s}"
        );
        let f = parse_file("scratch_bytes = 4096\n", Path::new("s.toml")).unwrap();
        let e = resolve(f, Flags::default()).unwrap_err().to_string();
        assert!(e.contains("scratch_bytes") && e.contains("1 MiB"), "{e}");
    }

    #[test]
    fn defaults_and_invalid_values() {
        let c = resolve(FileConfig::default(), Flags::default()).unwrap();
        assert_eq!(c.bind.port(), DEFAULT_PORT);
        assert_eq!(c.cluster, "default");
        assert!(c.discovery);
        let bad = FileConfig {
            discovery: DiscoveryFile {
                group: Some("10.0.0.1:1".parse().unwrap()),
                ..DiscoveryFile::default()
            },
            ..FileConfig::default()
        };
        assert!(resolve(bad, Flags::default())
            .unwrap_err()
            .to_string()
            .contains("discovery.group"));
    }

    #[test]
    fn the_cgroup_parent_is_the_nodes_by_default_or_a_safe_relative_path() {
        let named = |n: &str| Flags {
            name: Some(n.into()),
            ..Flags::default()
        };
        let c = resolve(FileConfig::default(), named("lab pc.1")).unwrap();
        assert_eq!(c.cgroup_parent, "shoal-lab_pc_1");
        let with = |p: &str| FileConfig {
            cgroup_parent: Some(p.into()),
            ..FileConfig::default()
        };
        let c = resolve(with("user.slice/alice/shoal"), named("a")).unwrap();
        assert_eq!(c.cgroup_parent, "user.slice/alice/shoal");
        for bad in ["", "/abs", "a/../b", "a//b", "a b", "x/"] {
            let e = resolve(with(bad), named("a")).unwrap_err().to_string();
            assert!(e.contains("cgroup_parent"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn missing_default_file_is_fine_missing_named_file_is_not() {
        assert!(load_file(Some(Path::new("/nonexistent/shoal.toml"))).is_err());
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("", 0), (1, 1));
    }
}
