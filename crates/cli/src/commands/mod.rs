//! One module per subcommand.

pub mod cert;
pub mod delay_proxy;
pub mod migrate;
pub mod mirror;
pub mod mount;
pub mod serve;
pub mod slice_server;
pub mod sync;
pub mod umount;
