//! How long the owner has been away, from every source that can tell.

/// What logind says about the machine's sessions (`IdleHint`,
/// `IdleSinceHint` on `org.freedesktop.login1.Manager`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Logind {
    /// Some session is in use now.
    Active,
    /// Every session has been idle for this many seconds.
    IdleFor(f64),
}

/// Seconds since the owner's last sign of life: the smallest of the
/// terminals' access times, the last input seen, and logind's view. A
/// machine with no source at all has nobody at it (a very large number).
pub fn owner_idle_s(
    atime_idle_s: Option<f64>,
    input_idle_s: Option<f64>,
    logind: Option<Logind>,
) -> f64 {
    let logind = logind.map(|l| match l {
        Logind::Active => 0.0,
        Logind::IdleFor(s) => s.max(0.0),
    });
    [atime_idle_s, input_idle_s, logind]
        .into_iter()
        .flatten()
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))))
        .unwrap_or(1e9)
}

/// logind's answer from its two properties: `IdleSinceHint` is in µs since
/// the epoch, `now_us` likewise.
pub fn from_hint(idle_hint: bool, idle_since_us: u64, now_us: u64) -> Logind {
    if idle_hint {
        Logind::IdleFor(now_us.saturating_sub(idle_since_us) as f64 / 1e6)
    } else {
        Logind::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_recent_sign_wins() {
        assert_eq!(owner_idle_s(None, None, None), 1e9);
        assert_eq!(owner_idle_s(Some(600.0), None, None), 600.0);
        assert_eq!(owner_idle_s(Some(600.0), Some(0.2), None), 0.2);
        assert_eq!(owner_idle_s(Some(600.0), None, Some(Logind::Active)), 0.0);
        assert_eq!(
            owner_idle_s(Some(600.0), Some(900.0), Some(Logind::IdleFor(300.0))),
            300.0
        );
        assert_eq!(
            from_hint(true, 1_000_000, 61_000_000),
            Logind::IdleFor(60.0)
        );
        assert_eq!(from_hint(false, 1_000_000, 61_000_000), Logind::Active);
        assert_eq!(from_hint(true, 9, 1), Logind::IdleFor(0.0));
    }
}
