//! r3map block-device frontends: a backend (or any stage pipeline) as a kernel block device.
//!
//! # Layout
//!
//! - [`nbd`]: [`NbdDevice`], the kernel NBD client (`/dev/nbdX`) connected to an r3map NBD
//!   server in this process over socket pairs (or to any remote NBD server), configured through
//!   generic netlink (several connections) with the `NBD_SET_SOCK`/`NBD_DO_IT` ioctls as the
//!   fallback.
//! - [`ublk`]: [`UblkDevice`], a userspace block device (`/dev/ublkbN`) served through ublk:
//!   one io_uring per queue on its own thread; each request runs as a task on the Tokio runtime.
//! - [`support`]: [`check_nbd_support`] and [`check_ublk_support`], which say which kernel
//!   feature is missing ([`Unsupported`]) and suggest the FUSE + loop frontend instead.
//! - `sys`: the raw kernel interfaces (NBD ioctls, netlink sockets, ublk's mmap and io_uring
//!   commands); the only modules with `unsafe`.

pub mod nbd;
pub mod support;
mod sys;
pub mod ublk;

pub use nbd::{NbdDevice, NbdError, NbdMethod, NbdOptions};
pub use support::{check_nbd_support, check_ublk_support, Unsupported};
pub use ublk::{UblkDevice, UblkError, UblkOptions};
