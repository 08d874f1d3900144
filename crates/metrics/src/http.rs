//! The `/metrics` endpoint: HTTP/1.1 on a TCP listener (hyper), loopback unless told otherwise.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::Metrics;

/// Content type of the OpenMetrics text format that prometheus-client writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A running `/metrics` endpoint; dropping it stops it.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on (with the port chosen when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `metrics` at `http://ADDR/metrics` (needs a Tokio runtime).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr).await.map_err(|err| {
        std::io::Error::new(err.kind(), format!("cannot listen for metrics on {addr}: {err}"))
    })?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics are served beyond loopback, without authentication");
    }
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "accepting a metrics connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(respond(&metrics, &request)) }
                });
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%err, "metrics connection ended with an error");
                }
            });
        }
    });
    Ok(MetricsServer { addr, task })
}

fn respond(metrics: &Metrics, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a response from constant parts is valid")
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, CONTENT_TYPE, metrics.encode()),
        (&Method::GET, _) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "r3map serves /metrics only\n".into(),
        ),
        _ => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn metrics_are_served_over_http_and_follow_their_sources() {
        let metrics = Metrics::new();
        let value = Arc::new(std::sync::atomic::AtomicU64::new(5));
        metrics.counter_from("r3map_chunks_fetched_total", {
            let value = value.clone();
            move || value.load(std::sync::atomic::Ordering::Relaxed)
        });
        metrics.gauge_from("r3map_dirty_bytes", || 4096);
        let server = serve("127.0.0.1:0".parse().unwrap(), metrics).await.unwrap();
        let first = get(server.local_addr(), "/metrics").await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(first.contains("r3map_chunks_fetched_total 5\n"), "{first}");
        assert!(first.contains("r3map_dirty_bytes 4096\n"), "{first}");
        assert!(
            first.contains("# HELP r3map_chunks_fetched Chunks fetched"),
            "{first}"
        );
        value.store(12, std::sync::atomic::Ordering::Relaxed);
        let second = get(server.local_addr(), "/metrics").await;
        assert!(second.contains("r3map_chunks_fetched_total 12\n"), "{second}");
        assert!(get(server.local_addr(), "/other")
            .await
            .starts_with("HTTP/1.1 404"));
    }
}
