//! Lays out the release binary's hot functions first (`symbol-order.txt`).
//!
//! `shoal run` starts once per compile of a build, and a spawner clones a
//! pid 1 for every task (and forks a supervisor for some). Each such process maps
//! the binary's code on demand, 64 KiB around each page it touches first,
//! and unmaps it all at exit. Left where the linker puts them, the few
//! hundred functions a client runs are spread over 9 MB of code: about 45
//! page faults per run, and a thousand pages mapped and unmapped. Listed in
//! `symbol-order.txt` (made by `scripts/symbol-order`), lld puts them
//! together at the start of `.text`, where a dozen faults map them all.
//!
//! Only lld knows `--symbol-ordering-file`: it is passed when lld links,
//! which is Rust's default on x86_64 GNU/Linux from 1.90 on, and not when a
//! linker is configured or `SHOAL_SYMBOL_ORDER=0`. A name the file lists
//! that the binary lacks (a function renamed since) is passed by.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=symbol-order.txt");
    println!("cargo:rerun-if-env-changed=SHOAL_SYMBOL_ORDER");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let wanted = var("SHOAL_SYMBOL_ORDER") != "0"
        && var("PROFILE") == "release"
        && var("TARGET") == "x86_64-unknown-linux-gnu"
        // A linker of the user's own (`target.….linker`, `-C linker=`,
        // `-C linker-flavor=`, `-C link-self-contained=`): not ours to
        // guess which.
        && var("RUSTC_LINKER").is_empty()
        && !["linker", "link-self-contained"]
            .iter()
            .any(|f| var("CARGO_ENCODED_RUSTFLAGS").contains(f));
    if !wanted || !rust_lld_is_default() {
        return;
    }
    let file = Path::new(&var("CARGO_MANIFEST_DIR")).join("symbol-order.txt");
    if !file.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=shoal=-Wl,--symbol-ordering-file={}",
        file.display()
    );
    println!("cargo:rustc-link-arg-bin=shoal=-Wl,--no-warn-symbol-ordering");
}

/// Whether this rustc links x86_64 GNU/Linux programs with its own lld by
/// default (Rust 1.90 and later).
fn rust_lld_is_default() -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-V").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let v = String::from_utf8_lossy(&out.stdout);
    let mut parts = v
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok());
    matches!(
        (parts.next(), parts.next()),
        (Some(Some(1)), Some(Some(minor))) if minor >= 90
    )
}
