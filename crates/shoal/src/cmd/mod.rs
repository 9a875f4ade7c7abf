//! One module per subcommand.

pub mod agent;
pub mod keygen;
pub mod leave;
pub mod nodes;
pub mod owner;
pub mod ps;
pub mod run;
