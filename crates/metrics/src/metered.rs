//! Metered: counts what goes through a backend — bytes, requests, errors, timeouts, latency —
//! without changing it. A mount wraps its remote in it; a server wraps each export.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelValue;
use r3map_core::{Backend, Extent, Result};

use crate::{Metrics, Op, Outcome};

/// Which side of the process a metered backend is.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Role {
    /// What this process fetches from and pushes to.
    remote,
    /// What this process serves to clients.
    export,
    /// What applications ask for through a frontend (FUSE, a block device, a slice region).
    frontend,
}

/// A backend whose traffic is counted.
pub struct Metered<B> {
    inner: B,
    role: Role,
    metrics: Arc<Metrics>,
}

impl<B: Backend> Metered<B> {
    /// Counts the traffic of `inner` under `role`.
    pub fn new(inner: B, role: Role, metrics: Arc<Metrics>) -> Self {
        Self { inner, role, metrics }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    async fn count<T>(&self, op: Op, bytes: u64, request: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let result = request.await;
        self.metrics
            .record(self.role, op, bytes, started, Outcome::of(&result));
        result
    }
}

#[async_trait]
impl<B: Backend> Backend for Metered<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_alignment(&self) -> Option<u64> {
        self.inner.read_alignment()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.count(Op::read, len, self.inner.read_at(offset, buf)).await
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.count(Op::write, data.len() as u64, self.inner.write_at(offset, data))
            .await
    }
    async fn sync(&self) -> Result<()> {
        self.count(Op::sync, 0, self.inner.sync()).await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.count(Op::trim, 0, self.inner.trim(offset, len)).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.count(Op::write_zeroes, 0, self.inner.write_zeroes(offset, len))
            .await
    }
    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.extents(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use r3map_core::{testing, MemoryBackend};

    #[test]
    fn a_metered_backend_matches_the_model_and_counts_what_passed() {
        testing::block_on(async {
            let metrics = Metrics::new();
            let backend = Metered::new(MemoryBackend::new(4096), Role::remote, metrics.clone());
            backend.write_at(100, &[7; 300]).await.unwrap();
            let mut buf = [0u8; 1000];
            backend.read_at(0, &mut buf).await.unwrap();
            assert!(buf[100..400].iter().all(|&b| b == 7) && buf[..100].iter().all(|&b| b == 0));
            backend.read_at(4000, &mut buf).await.unwrap_err(); // past the end
            let text = metrics.encode();
            assert!(
                text.contains(r#"r3map_backend_bytes_total{role="remote",op="write"} 300"#),
                "{text}"
            );
            assert!(
                text.contains(r#"r3map_backend_bytes_total{role="remote",op="read"} 1000"#),
                "{text}"
            );
            assert!(
                text.contains(r#"r3map_backend_requests_total{role="remote",op="read"} 2"#),
                "{text}"
            );
            assert!(
                text.contains(r#"r3map_backend_errors_total{role="remote",op="read"} 1"#),
                "{text}"
            );
            assert!(
                text.contains(r#"r3map_backend_request_duration_seconds_count{role="remote",op="write"} 1"#),
                "{text}"
            );
        });
    }

    #[test]
    fn the_conformance_suite_passes_through_a_metered_backend() {
        testing::block_on(testing::check_concurrent(
            Arc::new(Metered::new(
                MemoryBackend::new(2000),
                Role::export,
                Metrics::new(),
            )),
            1,
            4,
            100,
        ))
        .unwrap();
    }
}
