//! The generated protobuf messages and gRPC stubs.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The Go r3map's remote backend service (`com.pojtinger.felicitas.r3map.mount.v1`).
pub mod mount {
    tonic::include_proto!("com.pojtinger.felicitas.r3map.mount.v1");
}

/// The Go r3map's migration seeder service (`com.pojtinger.felicitas.r3map.migration.v1`).
pub mod migration {
    tonic::include_proto!("com.pojtinger.felicitas.r3map.migration.v1");
}

/// r3map's extension services (`r3map.v1`).
pub mod ext {
    tonic::include_proto!("r3map.v1");
}

/// The compiled descriptors of every proto above (`FileDescriptorSet`, protobuf-encoded).
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
