//! The slice frontend from the command line: r3map is the page-fault server for the memory of
//! unmodified programs that hand it their userfaultfd over a UNIX socket.
//!
//! Protocol on the socket (one connection per program):
//! 1. the program sends a `RemoteRequest` (range, pid) with its userfaultfd (SCM_RIGHTS);
//! 2. r3map registers the range and answers one byte: 0 = served, 1 = refused;
//! 3. the program may send `S` at any time: r3map writes the pages it changed back to the
//!    mount (then syncs, which pushes a managed mount) and answers 0 (done) or 1 (failed);
//! 4. when the program closes the socket, r3map writes changed pages back one last time (if
//!    the program still exists) and stops serving it;
//! 5. when r3map itself stops (SIGINT/SIGTERM: [`SliceServer::close`]), it writes back what
//!    every connected program changed since its last sync, then stops serving them: pages a
//!    program never touched raise SIGBUS there from then on, instead of reading as zeros.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use r3map_core::SharedBackend;
use r3map_frontends::slice::{FaultObserver, RegionOptions, RemoteRegion, RemoteRequest};
use r3map_mount::format_bytes;
use tokio::runtime::Handle;

/// The programs being served, by connection number.
type Programs = Arc<Mutex<HashMap<u64, Arc<RemoteRegion>>>>;

/// Accepts programs on a UNIX socket until closed or dropped (then the socket file is removed).
pub struct SliceServer {
    path: PathBuf,
    backend: SharedBackend,
    programs: Programs,
}

impl SliceServer {
    /// Listens at `path` and serves every program that connects from `backend`.
    /// Every served fault is timed by `faults`.
    pub fn start(
        backend: SharedBackend,
        path: &Path,
        runtime: Handle,
        faults: Option<FaultObserver>,
    ) -> Result<Self> {
        let listener =
            UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        let programs = Programs::default();
        let (accept_backend, accept_programs) = (backend.clone(), programs.clone());
        std::thread::spawn(move || {
            let next = AtomicU64::new(0);
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let (backend, runtime, programs) =
                    (accept_backend.clone(), runtime.clone(), accept_programs.clone());
                let options = RegionOptions {
                    fault_observer: faults.clone(),
                    ..RegionOptions::default()
                };
                let id = next.fetch_add(1, Ordering::Relaxed);
                std::thread::spawn(move || {
                    if let Err(err) = serve_program(stream, backend, runtime, options, &programs, id) {
                        eprintln!("slice: {err:#}");
                    }
                });
            }
        });
        Ok(Self {
            path: path.to_path_buf(),
            backend,
            programs,
        })
    }

    /// Writes the pages every connected program changed back to the backend (the caller
    /// syncs it): the flush of a migration's seeder before each dirty list.
    pub async fn write_back(&self) -> Result<()> {
        let programs: Vec<Arc<RemoteRegion>> =
            self.programs.lock().expect("lock").values().cloned().collect();
        for region in programs {
            region.push_dirty().await.with_context(|| {
                format!(
                    "cannot write back the memory of process {}",
                    region.pid().unwrap_or(0)
                )
            })?;
        }
        Ok(())
    }

    /// Stops accepting programs, writes back what each connected program changed since its
    /// last sync (then syncs the backend, which a managed mount pushes), and stops serving
    /// them. Fails if a write-back failed; the programs are then still served, so a retry
    /// can write back again.
    pub async fn close(&self) -> Result<()> {
        let _ = std::fs::remove_file(&self.path);
        let programs: Vec<Arc<RemoteRegion>> =
            self.programs.lock().expect("lock").values().cloned().collect();
        let mut failed = Vec::new();
        for region in &programs {
            let pid = region.pid().unwrap_or(0);
            match region.push_dirty().await {
                Ok(chunks) => {
                    let bytes = chunks.len() as u64 * region.layout().chunk_size();
                    eprintln!(
                        "slice: wrote back {} that process {pid} changed since its last sync",
                        format_bytes(bytes)
                    );
                }
                Err(err) => failed.push(format!("process {pid}: {err}")),
            }
        }
        if !failed.is_empty() {
            bail!("could not write back the changes of {}", failed.join("; "));
        }
        if !programs.is_empty() {
            self.backend
                .sync()
                .await
                .context("syncing the written-back changes")?;
        }
        for region in programs {
            let unfetched = region.stop_serving();
            eprintln!(
                "slice: stopped serving process {}; {unfetched} chunks it never touched raise SIGBUS there from now on",
                region.pid().unwrap_or(0)
            );
        }
        self.programs.lock().expect("lock").clear();
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
    mut stream: UnixStream,
    backend: SharedBackend,
    runtime: Handle,
    options: RegionOptions,
    programs: &Programs,
    id: u64,
) -> Result<()> {
    let (request, uffd) = RemoteRequest::receive(&stream).context("reading the program's request")?;
    let region = match RemoteRegion::serve(uffd, request, backend.clone(), options) {
        Ok(region) => region,
        Err(err) => {
            let _ = stream.write_all(&[1]);
            return Err(err).context(format!("cannot serve the memory of process {}", request.pid));
        }
    };
    let region = Arc::new(region);
    programs.lock().expect("lock").insert(id, region.clone());
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
    // Closed by the program, or by `SliceServer::close` (which wrote back already).
    if programs.lock().expect("lock").remove(&id).is_none() {
        return Ok(());
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
