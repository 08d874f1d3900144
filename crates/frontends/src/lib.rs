//! r3map frontends (placeholder while the crate is being built).
