//! The owner's CPU use: all CPU time on the machine (`/proc/stat`) minus
//! the guests' (their parent cgroup's counter), over the capacity of the
//! interval. Not the load average, which counts guests too.

/// Cumulative counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// CPU seconds spent busy on the whole machine (all cores).
    pub busy_s: f64,
    /// CPU seconds elapsed on the whole machine (busy + idle, all cores).
    pub total_s: f64,
    /// CPU seconds used by every guest.
    pub guest_s: f64,
}

/// Busy and total ticks from the first (`cpu `) line of `/proc/stat`.
/// Busy is user + nice + system + irq + softirq + steal (guest time is
/// already inside user and nice); total adds idle and iowait.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    if f.len() < 4 {
        return None;
    }
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    Some((busy, busy + at(3) + at(4)))
}

/// The owner's share of the machine between two samples, 0 to 1.
pub fn owner_share(prev: &Sample, cur: &Sample) -> f64 {
    let total = cur.total_s - prev.total_s;
    if total <= 0.0 {
        return 0.0;
    }
    let busy = cur.busy_s - prev.busy_s;
    let guest = (cur.guest_s - prev.guest_s).max(0.0);
    ((busy - guest) / total).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fixture() {
        let t = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nintr 1\n";
        assert_eq!(parse_proc_stat(t), Some((161, 1181)));
        assert_eq!(parse_proc_stat("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_proc_stat("cpu  x y\n"), None);
        assert_eq!(parse_proc_stat(""), None);
    }

    #[test]
    fn guests_do_not_count_as_the_owner() {
        let a = Sample {
            busy_s: 10.0,
            total_s: 100.0,
            guest_s: 5.0,
        };
        // 2 cores for 1 s: 2 CPU-seconds, all busy, 1.5 of them guests.
        let b = Sample {
            busy_s: 12.0,
            total_s: 102.0,
            guest_s: 6.5,
        };
        assert!((owner_share(&a, &b) - 0.25).abs() < 1e-9);
        // Counters read a moment apart can cross; never below 0 or above 1.
        let c = Sample {
            busy_s: 11.0,
            total_s: 102.0,
            guest_s: 9.0,
        };
        assert_eq!(owner_share(&a, &c), 0.0);
        assert_eq!(owner_share(&b, &a), 0.0);
    }
}
