//! The slice frontend from the command line: r3map is the page-fault server for the memory of
//! unmodified programs that hand it their userfaultfd over a UNIX socket.
//!
//! Protocol on the socket (one connection per program):
//! 1. the program sends a `RemoteRequest` (range, pid) with its userfaultfd (SCM_RIGHTS);
//! 2. r3map registers the range and answers one byte: 0 = served, 1 = refused;
//! 3. the program may send `S` at any time: r3map writes the pages it changed back to the
//!    mount (then syncs, which pushes a managed mount) and answers 0 (done) or 1 (failed);
//! 4. when the program closes the socket, r3map writes changed pages back one last time (if
//!    the program still exists) and stops serving it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use parking_lot::Mutex;
use r3map_core::SharedBackend;
use r3map_frontends::slice::{RegionHandle, RegionOptions, RemoteRegion, RemoteRequest};
use tokio::runtime::Handle;

/// Accepts programs on a UNIX socket until dropped (then the socket file is removed).
pub struct SliceServer {
    path: PathBuf,
    /// The regions of connected programs, for writing all of them back at once.
    regions: Regions,
}

type Regions = Arc<Mutex<HashMap<u64, (i32, RegionHandle)>>>;

impl SliceServer {
    /// Listens at `path` and serves every program that connects from `backend`.
    pub fn start(backend: SharedBackend, path: &Path, runtime: Handle) -> Result<Self> {
        let listener =
            UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        let regions = Regions::default();
        let registry = regions.clone();
        std::thread::spawn(move || {
            for (id, stream) in (0u64..).zip(listener.incoming()) {
                let Ok(stream) = stream else { break };
                let (backend, runtime, regions) = (backend.clone(), runtime.clone(), registry.clone());
                std::thread::spawn(move || {
                    if let Err(err) = serve_program(id, stream, backend, runtime, &regions) {
                        eprintln!("slice: {err:#}");
                    }
                    regions.lock().remove(&id);
                });
            }
        });
        Ok(Self {
            path: path.to_path_buf(),
            regions,
        })
    }

    /// Writes the pages every connected program changed back to the backend (which the caller
    /// syncs); a program that is gone is skipped.
    pub async fn write_back(&self) -> Result<()> {
        let regions: Vec<_> = self.regions.lock().values().cloned().collect();
        for (pid, region) in regions {
            region
                .push_dirty()
                .await
                .with_context(|| format!("cannot write back the memory of process {pid}"))?;
        }
        Ok(())
    }

    /// The socket programs connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SliceServer {
    fn drop(&mut self) {
        // New programs cannot find the socket any more; the accept thread stays parked in
        // accept() until the process exits (programs already connected keep being served).
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_program(
    id: u64,
    mut stream: UnixStream,
    backend: SharedBackend,
    runtime: Handle,
    regions: &Regions,
) -> Result<()> {
    let (request, uffd) = RemoteRequest::receive(&stream).context("reading the program's request")?;
    let options = RegionOptions {
        runtime: Some(runtime.clone()),
        ..RegionOptions::default()
    };
    let region = match RemoteRegion::serve(uffd, request, backend.clone(), options) {
        Ok(region) => region,
        Err(err) => {
            let _ = stream.write_all(&[1]);
            return Err(err).context(format!("cannot serve the memory of process {}", request.pid));
        }
    };
    regions.lock().insert(id, (request.pid, region.handle()));
    stream.write_all(&[0])?;
    eprintln!("slice: serving {} bytes of process {}", request.len, request.pid);
    let write_back = || -> Result<()> {
        runtime.block_on(async {
            region.handle().push_dirty().await?;
            backend.sync().await
        })?;
        Ok(())
    };
    let mut command = [0u8; 1];
    while stream.read(&mut command)? == 1 {
        let ok = command[0] == b'S'
            && write_back()
                .map_err(|err| eprintln!("slice: sync failed: {err:#}"))
                .is_ok();
        stream.write_all(&[u8::from(!ok)])?;
    }
    if let Err(err) = write_back() {
        eprintln!(
            "slice: process {} left before its last changes could be written back: {err:#}",
            request.pid
        );
    }
    eprintln!("slice: process {} disconnected", request.pid);
    Ok(())
}
