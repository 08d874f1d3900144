//! r3map mount (placeholder while the crate is being built).
