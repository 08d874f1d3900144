//! r3map nbd (placeholder while the crate is being built).
