//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cutting_proxy;
pub mod slow_backend;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use r3map_core::{Backend, MemoryBackend, SharedBackend};
use r3map_nbd::{Export, Server, ServerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// True if `tool` runs; otherwise prints the line CI counts as a skip.
pub fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false);
    if !found {
        r3map_core::testing::skip(&format!(
            "{tool} is not installed (scripts/install-test-deps installs it)"
        ));
    }
    found
}

/// A running server; dropping it does not stop it, `stop` does (and flushes).
pub struct Running {
    pub uri: String,
    pub backends: Vec<SharedBackend>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), r3map_nbd::ServerError>>>,
}

impl Running {
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
    /// The URI of another export of this server.
    pub fn uri_for(&self, export: &str) -> String {
        self.uri.replacen("/?", &format!("/{export}?"), 1).replacen(
            &format!("{}/", self.uri.trim_end_matches('/')),
            &format!("{}/{export}", self.uri.trim_end_matches('/')),
            if self.uri.contains('?') { 0 } else { 1 },
        )
    }
}

/// Serves `config` on loopback TCP (or on a UNIX socket at `unix`).
pub async fn serve(config: ServerConfig, unix: Option<&Path>) -> Running {
    let backends = config.exports.iter().map(|e| e.backend.clone()).collect();
    let server = match unix {
        Some(path) => Server::bind_unix(config, path).await.unwrap(),
        None => Server::bind_tcp(config, "127.0.0.1:0").await.unwrap(),
    };
    let uri = server.uri("");
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    Running {
        uri,
        backends,
        stop: Some(stop),
        task: Some(task),
    }
}

/// One writable memory export named `name` of `size` bytes.
pub fn memory_config(name: &str, size: u64) -> ServerConfig {
    let backend: SharedBackend = Arc::new(MemoryBackend::new(size));
    ServerConfig::new(vec![Export::new(name, backend)])
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    r3map_core::testing::pattern(seed, len)
}

pub async fn contents(backend: &dyn Backend) -> Vec<u8> {
    let mut all = vec![0u8; backend.size() as usize];
    backend.read_at(0, &mut all).await.unwrap();
    all
}

pub fn temp_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Waits until a server accepts connections on its UNIX socket `path` (at most 30 s; the
/// socket file appears at bind, before the server listens, so its existence proves nothing).
pub async fn wait_for_socket(path: &Path) {
    for _ in 0..3000 {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no server accepts connections on {}", path.display());
}
