//! Prints the CPU score ten times: `cargo run --release -p shoal-facts --example score`.
//! Used for the run-to-run spread recorded in BENCHMARKS.md.
fn main() {
    let scores: Vec<u32> = (0..10).map(|_| shoal_facts::bench::run(7)).collect();
    let min = scores.iter().min().copied().unwrap_or(0);
    let max = scores.iter().max().copied().unwrap_or(0);
    println!(
        "scores {scores:?} min {min} max {max} spread {:.1}%",
        100.0 * f64::from(max - min) / f64::from(max.max(1))
    );
}
