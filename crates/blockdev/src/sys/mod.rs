//! Raw kernel interfaces, one module per interface. Everything `unsafe` in this crate lives
//! here, behind safe functions whose arguments make misuse impossible (borrowed file
//! descriptors, owned buffers).

pub mod nbd_ioctl;
pub mod netlink;
pub mod ublk;
