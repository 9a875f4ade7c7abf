//! `shoal keygen`.

use std::path::PathBuf;

use clap::Args;
use shoal_transport::ClusterKey;

/// Flags of `shoal keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key; refuses to overwrite.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// Writes a new random cluster key with mode 0600.
pub fn run(a: &KeygenArgs) -> anyhow::Result<()> {
    ClusterKey::generate()?.write_new(&a.out)?;
    eprintln!(
        "wrote a new cluster key to {} (copy it to every member, mode 0600)",
        a.out.display()
    );
    Ok(())
}
