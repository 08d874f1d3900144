//! One module per subcommand.

pub mod delay_proxy;
pub mod mirror;
pub mod serve;
