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

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use r3map_core::SharedBackend;
use r3map_frontends::slice::{RegionOptions, RemoteRegion, RemoteRequest};
use tokio::runtime::Handle;

/// Accepts programs on a UNIX socket until dropped (then the socket file is removed).
pub struct SliceServer {
    path: PathBuf,
}

impl SliceServer {
    /// Listens at `path` and serves every program that connects from `backend`.
    pub fn start(backend: SharedBackend, path: &Path, runtime: Handle) -> Result<Self> {
        let listener =
            UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (backend, runtime) = (backend.clone(), runtime.clone());
                std::thread::spawn(move || {
                    if let Err(err) = serve_program(stream, backend, runtime) {
                        eprintln!("slice: {err:#}");
                    }
                });
            }
        });
        Ok(Self {
            path: path.to_path_buf(),
        })
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

fn serve_program(mut stream: UnixStream, backend: SharedBackend, runtime: Handle) -> Result<()> {
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
