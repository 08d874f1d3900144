//! r3map frontends: how an application sees a resource.
//!
//! # Layout
//!
//! - [`slice`](mod@slice): the *slice* frontend, a memory region (`&mut [u8]` / raw pointer) whose pages
//!   are fetched from a backend on first touch (userfaultfd), populated in the background by
//!   the puller, and whose writes are tracked per chunk (async write-protect + PAGEMAP_SCAN).
//!   A region in another process can be served too (the userfaultfd travels over a UNIX
//!   socket).
//! - [`uffd`]: the raw kernel interfaces (userfaultfd, PAGEMAP_SCAN, mmap, fd passing) behind
//!   small safe wrappers. It is the only module with `unsafe`.

pub mod slice;
pub mod uffd;
