//! `shoal __spawner` (hidden): a warm slot's spawner. The agent starts it
//! inside the slot's cgroup with a socket as its stdin, and it forks the
//! slot's tasks from there (`shoal_executor::warm`).

use std::os::fd::AsFd;

/// Serves the agent on stdin until it closes; assembles the slot's root
/// at `root` first, if given.
pub fn run(root: Option<&std::path::Path>) -> anyhow::Result<()> {
    shoal_executor::warm::serve(std::io::stdin().as_fd(), root)?;
    Ok(())
}
