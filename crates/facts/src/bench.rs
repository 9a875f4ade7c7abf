//! The start-up CPU benchmark.
//!
//! A fixed integer-and-floating-point kernel (a xorshift-multiply mix and
//! a dependent multiply-add chain, about what a compiler or a numeric loop
//! does), timed in short rounds; the score is the best round, which is the
//! stable statistic on a machine with other work (the slower rounds are
//! the ones something else interrupted). Time is read through the
//! `clock` argument so tests can drive it.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Operations in one round.
const ROUND_OPS: u64 = 2_000_000;

/// One round of the kernel; returns a value that depends on every step.
pub fn kernel(ops: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut f: f64 = 1.000_000_1;
    for i in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(i);
        f = f * 1.000_000_01 + 1e-9;
    }
    black_box(x ^ f.to_bits())
}

/// Score from the best round's duration: millions of operations per second.
pub fn score_from(best: Duration, ops: u64) -> u32 {
    let s = best.as_secs_f64();
    if s <= 0.0 {
        return 0;
    }
    (ops as f64 / s / 1e6).round().min(f64::from(u32::MAX)) as u32
}

/// Runs `rounds` rounds and returns the score of the fastest.
pub fn run(rounds: u32) -> u32 {
    let mut best = Duration::MAX;
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        black_box(kernel(black_box(ROUND_OPS)));
        best = best.min(t.elapsed());
    }
    score_from(best, ROUND_OPS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_is_ops_per_microsecond() {
        assert_eq!(score_from(Duration::from_millis(10), 2_000_000), 200);
        assert_eq!(score_from(Duration::ZERO, 1), 0);
    }

    #[test]
    fn kernel_is_deterministic_and_depends_on_length() {
        assert_eq!(kernel(1000), kernel(1000));
        assert_ne!(kernel(1000), kernel(1001));
    }

    #[test]
    fn a_real_run_scores_above_zero() {
        assert!(run(2) > 0);
    }
}
