//! r3map frontends over FUSE: how an application sees a backend as a file or a block device.
//!
//! # Layout
//!
//! - [`file`]: the *file* frontend, [`FileMount`]: a one-file FUSE filesystem (pure-Rust
//!   `fuser`, no libfuse) whose file is the backend. Requests are answered by tasks on a shared
//!   Tokio runtime, so many are in flight at once.
//! - [`loopdev`]: loop devices ([`LoopDevice`]): `LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE` with
//!   direct I/O and autoclear.
//! - [`disk`]: the *path* frontend, [`DiskMount`]: a loop device over the file frontend, so the
//!   application gets `/dev/loopN`.
//! - [`stale`]: finds and cleans the mounts and loop devices a crashed run left behind.
//! - `sys`: the raw loop ioctls and the page size; the only module with `unsafe`.

pub mod disk;
mod error;
pub mod file;
pub mod loopdev;
pub mod stale;
mod sys;

pub use disk::DiskMount;
pub use error::{FuseError, Result};
pub use file::{enable_uring, uring_status, FileMount, FileOptions, Transport, UringSwitch};
pub use loopdev::{LoopDevice, LoopOptions};
pub use stale::{clean, find_stale, StaleItem};
