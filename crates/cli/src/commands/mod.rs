//! One module per subcommand.

pub mod mirror;
