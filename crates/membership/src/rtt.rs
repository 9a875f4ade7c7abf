//! Smoothed round-trip time from SWIM probes.

use std::time::Duration;

/// A smoothed round-trip time, as TCP computes SRTT (RFC 6298, α = 1/8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rtt {
    srtt_us: f64,
    samples: u64,
}

impl Rtt {
    /// Starts from a first sample.
    pub fn new(sample: Duration) -> Self {
        Self {
            srtt_us: sample.as_secs_f64() * 1e6,
            samples: 1,
        }
    }

    /// Folds in one more sample.
    pub fn update(&mut self, sample: Duration) {
        let s = sample.as_secs_f64() * 1e6;
        self.srtt_us += (s - self.srtt_us) / 8.0;
        self.samples += 1;
    }

    /// The smoothed value.
    pub fn smoothed(&self) -> Duration {
        Duration::from_secs_f64(self.srtt_us.max(0.0) / 1e6)
    }

    /// How many samples were folded in.
    pub fn samples(&self) -> u64 {
        self.samples
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converges_towards_steady_samples() {
        let mut r = Rtt::new(Duration::from_millis(10));
        for _ in 0..60 {
            r.update(Duration::from_millis(1));
        }
        let ms = r.smoothed().as_secs_f64() * 1e3;
        assert!((ms - 1.0).abs() < 0.01, "{ms}");
        assert_eq!(r.samples(), 61);
    }

    #[test]
    fn one_outlier_moves_it_an_eighth() {
        let mut r = Rtt::new(Duration::from_millis(1));
        r.update(Duration::from_millis(9));
        assert_eq!(r.smoothed(), Duration::from_millis(2));
    }
}
