//! r3map backends (placeholder while the crate is being built).
