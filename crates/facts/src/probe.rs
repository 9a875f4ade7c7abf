//! Reading the machine: `/proc/meminfo`, `/proc/loadavg`, input devices.

use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// `(MemTotal, MemAvailable)` in bytes from the text of `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// The three load averages from the text of `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<[f32; 3]> {
    let mut it = text.split_whitespace().map(|t| t.parse::<f32>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Memory of this machine, `(total, available)` bytes.
pub fn memory() -> Option<(u64, u64)> {
    parse_meminfo(&fs::read_to_string("/proc/meminfo").ok()?)
}

/// Load averages of this machine.
pub fn load() -> Option<[f32; 3]> {
    parse_loadavg(&fs::read_to_string("/proc/loadavg").ok()?)
}

/// Logical CPUs this process may use.
pub fn cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Where owner activity shows: keyboards and mice under `/dev/input`,
/// virtual consoles and serial lines `/dev/tty*`, pseudo-terminals under
/// `/dev/pts`. The kernel updates a device's access time when it is read
/// (input) or written to by a person's session.
pub const ACTIVITY_DIRS: &[(&str, &str)] = &[("/dev/input", ""), ("/dev", "tty"), ("/dev/pts", "")];

/// The latest access time (Unix seconds) among the entries of `dir` whose
/// name starts with `prefix`.
pub fn latest_atime(dir: &Path, prefix: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut latest: Option<u64> = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        if let Ok(m) = e.metadata() {
            let t = m.atime().max(0) as u64;
            latest = Some(latest.map_or(t, |l| l.max(t)));
        }
    }
    latest
}

/// Seconds since the owner last used a keyboard, mouse or terminal, given
/// the latest activity time found and now (both Unix seconds).
pub fn idle_seconds(latest_activity: Option<u64>, now: u64) -> Option<u64> {
    latest_activity.map(|t| now.saturating_sub(t))
}

/// Seconds since the owner's last keyboard, mouse or terminal activity on
/// this machine, or `None` if no device could be read.
pub fn owner_idle() -> Option<u64> {
    let latest = ACTIVITY_DIRS
        .iter()
        .filter_map(|(d, p)| latest_atime(Path::new(d), p))
        .max();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    idle_seconds(latest, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fixture() {
        let t = "MemTotal:       24634444 kB\nMemFree:        23000000 kB\nMemAvailable:   23500000 kB\n";
        assert_eq!(
            parse_meminfo(t),
            Some((24_634_444 * 1024, 23_500_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn loadavg_fixture() {
        assert_eq!(
            parse_loadavg("0.52 1.25 2.00 1/234 5678\n"),
            Some([0.52, 1.25, 2.0])
        );
        assert_eq!(parse_loadavg("garbage"), None);
    }

    #[test]
    fn idle_from_latest_activity() {
        assert_eq!(idle_seconds(Some(100), 400), Some(300));
        assert_eq!(
            idle_seconds(Some(500), 400),
            Some(0),
            "clock skew clamps to 0"
        );
        assert_eq!(idle_seconds(None, 400), None);
    }

    #[test]
    fn latest_atime_picks_the_newest_matching_entry() {
        let d = std::env::temp_dir().join(format!("shoal-atime-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("tty1"), "").unwrap();
        fs::write(d.join("other"), "").unwrap();
        let got = latest_atime(&d, "tty").unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(got) < 60);
        assert_eq!(latest_atime(&d, "nothing-matches"), None);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn this_machine_has_memory_and_load() {
        let (total, avail) = memory().unwrap();
        assert!(total > 0 && avail <= total);
        assert!(load().is_some());
        assert!(cores() >= 1);
    }
}
