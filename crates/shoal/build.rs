//! Links `shoal` as a position-dependent executable.
//!
//! `shoal run` is started once per command of a build
//! (`make CC="shoal run -- gcc"`), so its start-up is paid on every compile.
//! As a position-independent executable, the dynamic loader applied about
//! 38,000 relative relocations at each start, writing (and so copying) every
//! page of its read-only-after-relocation data: 0.33 ms of a 1.4 ms start
//! (BENCHMARKS.md, session 6). The objects stay position-independent code;
//! only the final link is fixed. The libraries, stack and heap are still
//! placed at random; the executable's own code and data are not.

fn main() {
    // Only where the toolchain links through a C compiler driver that knows
    // the flag (GNU/Linux targets).
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
