//! The kernel NBD client as a frontend: `/dev/nbdX` served by an r3map NBD server in this
//! process (over socket pairs), or by any NBD server reachable over TCP.
//!
//! The kernel only speaks the transmission phase, so each connection is negotiated here
//! (`connections`, with the r3map-nbd client's handshake) and then handed over, all at once
//! through generic netlink (`genl`: the kernel
//! picks a free device itself, so two attaches never race for one) or one by one through
//! `NBD_SET_SOCK` followed by `NBD_DO_IT` on a thread of its own (the fallback for kernels
//! without the netlink family; a device another process is configuring answers `EBUSY` and
//! the next one is tried). Several connections let the kernel's queues run in parallel, but
//! only with a server that advertises `NBD_FLAG_CAN_MULTI_CONN` (the in-process one does);
//! otherwise one connection is used.
//!
//! A server that dies closes its sockets, and the kernel fails the outstanding and later
//! requests with `EIO`; a server that hangs is cut off after [`NbdOptions::timeout`].

mod connections;
pub mod genl;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use r3map_core::SharedBackend;
use r3map_nbd::{ConnectionError, Export, ServerConfig, ServerError, Service};

use crate::support::{check_nbd_support, Unsupported};
use crate::sys::nbd_ioctl;
pub use connections::Negotiated;
use genl::{Connect, NbdNetlink};

/// The thread blocked in `NBD_DO_IT` (ioctl method only).
type DoIt = JoinHandle<io::Result<()>>;

/// The export name the in-process server uses.
const EXPORT: &str = "r3map";

/// How the kernel NBD client is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NbdMethod {
    /// Netlink where the kernel has it, else the ioctls.
    #[default]
    Auto,
    /// Generic netlink (`NBD_CMD_CONNECT`), Linux 4.12+.
    Netlink,
    /// `NBD_SET_SOCK` + `NBD_DO_IT`.
    Ioctl,
}

/// Options of [`NbdDevice::attach`] and [`NbdDevice::attach_remote`].
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Connections (kernel queues) to the server; at least 1. More than one only if the server
    /// advertises `NBD_FLAG_CAN_MULTI_CONN`.
    pub connections: usize,
    /// How to configure the kernel.
    pub method: NbdMethod,
    /// Logical block size: a power of two from 512 to 4096.
    pub block_size: u32,
    /// A request the server has not answered in this time fails (and the connection with it).
    pub timeout: Duration,
    /// How long to wait for the device to come up (and go away on disconnect).
    pub ready_timeout: Duration,
    /// Export to ask a remote server for ([`NbdDevice::attach_remote`]).
    pub export_name: String,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            connections: std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8)),
            method: NbdMethod::Auto,
            block_size: 4096,
            timeout: Duration::from_secs(30),
            ready_timeout: Duration::from_secs(10),
            export_name: String::new(),
        }
    }
}

/// Why an NBD device could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    #[error("invalid NBD device options: {0}")]
    Options(String),
    #[error("starting the in-process NBD server failed: {0}")]
    Server(#[from] ServerError),
    #[error("connecting to the NBD server {addr} failed: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("NBD handshake on connection {connection} failed: {source}")]
    Handshake {
        connection: usize,
        #[source]
        source: r3map_nbd::ClientError,
    },
    #[error("NBD connection {connection} describes the export as {again:?}, the first one as {first:?}")]
    Inconsistent {
        connection: usize,
        first: Negotiated,
        again: Negotiated,
    },
    #[error("the export is {size} bytes, smaller than one {block_size}-byte block")]
    TooSmall { size: u64, block_size: u32 },
    #[error("the kernel refused the NBD device configuration ({step}): {source}")]
    Kernel {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no free /dev/nbdX device (all are in use; load nbd with a larger nbds_max)")]
    NoFreeDevice,
    #[error("{path} did not become ready within {timeout:?}")]
    NotReady { path: PathBuf, timeout: Duration },
    #[error("{path} was still connected {timeout:?} after the disconnect request")]
    StillConnected { path: PathBuf, timeout: Duration },
    #[error("flushing {path} before disconnecting failed: {source}")]
    Flush {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a blocking task panicked or was cancelled: {0}")]
    Join(String),
}

fn kernel(step: &'static str) -> impl FnOnce(io::Error) -> NbdError {
    move |source| NbdError::Kernel { step, source }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NbdError> + Send + 'static,
) -> Result<T, NbdError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| NbdError::Join(err.to_string()))?
}

/// The r3map NBD server behind a device attached with [`NbdDevice::attach`].
struct LocalServer {
    service: Service,
    connections: Vec<tokio::task::JoinHandle<Result<(), ConnectionError>>>,
}

/// A kernel NBD device (`/dev/nbdX`). Detach it with [`NbdDevice::disconnect`]; dropping it
/// asks the kernel to disconnect without waiting or reporting errors.
pub struct NbdDevice {
    index: u32,
    path: PathBuf,
    method: NbdMethod,
    size: u64,
    ready_timeout: Duration,
    server: Option<LocalServer>,
    do_it: Option<DoIt>,
    disconnected: bool,
}

impl std::fmt::Debug for NbdDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDevice")
            .field("path", &self.path)
            .field("method", &self.method)
            .field("size", &self.size)
            .field("in_process_server", &self.server.is_some())
            .finish()
    }
}

impl NbdDevice {
    /// Serves `backend` with an in-process NBD server over `options.connections` socket pairs
    /// and connects a free `/dev/nbdX` to it. Needs a Tokio runtime (the server runs on it).
    pub async fn attach(backend: SharedBackend, options: NbdOptions) -> Result<Self, NbdError> {
        let method = resolve_method(options.method)?;
        validate(&options)?;
        let service = Service::new(ServerConfig::new(vec![Export::new(EXPORT, backend)]))?;
        let mut server = LocalServer {
            service,
            connections: Vec::with_capacity(options.connections),
        };
        let negotiated =
            connections::open_connections(options.connections, EXPORT, || std::future::ready(server.pair()))
                .await;
        let (sockets, negotiated) = match negotiated {
            Ok(done) => done,
            Err(err) => {
                server.abort();
                return Err(err);
            }
        };
        match Self::connect(sockets, negotiated, method, &options).await {
            Ok(mut device) => {
                device.server = Some(server);
                Ok(device)
            }
            Err(err) => {
                server.abort();
                Err(err)
            }
        }
    }

    /// Connects a free `/dev/nbdX` to the NBD server at `addr` (`host:port`, TCP) with
    /// `options.connections` connections to export `options.export_name`. Kernel NBD has no
    /// TLS: use it on trusted networks only.
    pub async fn attach_remote(addr: &str, options: NbdOptions) -> Result<Self, NbdError> {
        let method = resolve_method(options.method)?;
        validate(&options)?;
        let (sockets, negotiated) = open_remote(addr, &options).await?;
        Self::connect(sockets, negotiated, method, &options).await
    }

    async fn connect(
        sockets: Vec<OwnedFd>,
        negotiated: Negotiated,
        method: NbdMethod,
        options: &NbdOptions,
    ) -> Result<Self, NbdError> {
        let block_size = options.block_size;
        let size = negotiated.size - negotiated.size % u64::from(block_size);
        if size == 0 {
            return Err(NbdError::TooSmall {
                size: negotiated.size,
                block_size,
            });
        }
        if size != negotiated.size {
            tracing::warn!(
                "export size {} is not a multiple of the {block_size}-byte block size; the last {} bytes are not visible",
                negotiated.size,
                negotiated.size - size
            );
        }
        let flags = u64::from(negotiated.transmission_flags);
        let timeout = options.timeout;
        let (index, do_it) = blocking(move || match method {
            NbdMethod::Ioctl => ioctl_connect(sockets, size, block_size, flags, timeout),
            _ => {
                let fds: Vec<_> = sockets.iter().map(|s| s.as_raw_fd()).collect();
                let index = NbdNetlink::open()
                    .and_then(|mut nl| {
                        nl.connect(&Connect {
                            index: None,
                            sockets: &fds,
                            size,
                            block_size: u64::from(block_size),
                            timeout,
                            server_flags: flags,
                        })
                    })
                    .map_err(kernel("netlink NBD_CMD_CONNECT"))?;
                // The kernel holds its own references to the sockets now.
                drop(sockets);
                Ok((index, None))
            }
        })
        .await?;
        let mut device = Self {
            index,
            path: PathBuf::from(format!("/dev/nbd{index}")),
            method,
            size,
            ready_timeout: options.ready_timeout,
            server: None,
            do_it,
            disconnected: false,
        };
        let (index, wait) = (device.index, device.ready_timeout);
        let ready =
            blocking(move || Ok(wait_until(wait, || is_connected(index) && sysfs_size(index) > 0))).await?;
        if !ready {
            let err = NbdError::NotReady {
                path: device.path.clone(),
                timeout: wait,
            };
            device.request_disconnect().ok();
            return Err(err);
        }
        tracing::info!(path = %device.path.display(), ?method, size, "NBD device attached");
        Ok(device)
    }

    /// The block device, `/dev/nbdX`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device number X of `/dev/nbdX`.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Size of the device in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How the kernel was configured.
    pub fn method(&self) -> NbdMethod {
        self.method
    }

    fn request_disconnect(&mut self) -> io::Result<()> {
        self.disconnected = true;
        match self.method {
            NbdMethod::Ioctl => {
                let device = File::open(&self.path)?;
                nbd_ioctl::disconnect(device.as_fd())
            }
            _ => NbdNetlink::open()?.disconnect(self.index),
        }
    }

    /// Flushes the device, disconnects it, waits until the kernel released it, and stops the
    /// in-process server after flushing its backend. The first error is returned after every
    /// step was tried.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        let path = self.path.clone();
        let flushed = blocking(move || {
            File::open(&path)
                .and_then(|device| device.sync_all())
                .map_err(|source| NbdError::Flush { path, source })
        })
        .await;
        let mut first = flushed.err();
        if let Err(source) = self.request_disconnect() {
            first.get_or_insert(NbdError::Kernel {
                step: "disconnect",
                source,
            });
        }
        if let Some(thread) = self.do_it.take() {
            let joined = blocking(move || {
                thread
                    .join()
                    .map_err(|_| NbdError::Join("NBD_DO_IT thread panicked".into()))
            })
            .await;
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    tracing::debug!("NBD_DO_IT ended with {source}");
                }
                Err(err) => {
                    first.get_or_insert(err);
                }
            }
        }
        let (index, wait) = (self.index, self.ready_timeout);
        let gone = blocking(move || Ok(wait_until(wait, || !is_connected(index)))).await?;
        if !gone {
            first.get_or_insert(NbdError::StillConnected {
                path: self.path.clone(),
                timeout: wait,
            });
        }
        if let Some(server) = self.server.take() {
            server.service.shutdown();
            for connection in server.connections {
                let _ = connection.await;
            }
            if let Err(err) = server.service.flush_all().await {
                first.get_or_insert(NbdError::Server(err));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        if !self.disconnected {
            if let Err(err) = self.request_disconnect() {
                tracing::warn!("disconnecting {} on drop failed: {err}", self.path.display());
            }
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// Negotiates the connections of [`NbdDevice::attach_remote`] (one without
/// `NBD_FLAG_CAN_MULTI_CONN`).
async fn open_remote(addr: &str, options: &NbdOptions) -> Result<(Vec<OwnedFd>, Negotiated), NbdError> {
    connections::open_connections(options.connections, &options.export_name, || {
        connections::connect_tcp(addr)
    })
    .await
}

impl LocalServer {
    /// A socket pair whose server end this server serves; the client end, for the handshake.
    fn pair(&mut self) -> Result<tokio::net::UnixStream, NbdError> {
        let (client, server) = tokio::net::UnixStream::pair().map_err(kernel("socketpair"))?;
        let service = self.service.clone();
        self.connections.push(tokio::spawn(async move {
            let outcome = service.serve_stream(server).await;
            if let Err(err) = &outcome {
                tracing::warn!("NBD connection of the kernel client ended: {err}");
            }
            outcome
        }));
        Ok(client)
    }

    fn abort(self) {
        self.service.shutdown();
        for connection in self.connections {
            connection.abort();
        }
    }
}

fn resolve_method(requested: NbdMethod) -> Result<NbdMethod, NbdError> {
    let available = check_nbd_support()?;
    Ok(match requested {
        NbdMethod::Auto => available,
        NbdMethod::Netlink if available == NbdMethod::Ioctl => {
            return Err(NbdError::Unsupported(Unsupported {
                frontend: "nbd",
                feature: "the NBD netlink interface (Linux 4.12+)",
                detail: "the generic netlink family \"nbd\" is missing; NbdMethod::Ioctl works".into(),
            }))
        }
        other => other,
    })
}

fn validate(options: &NbdOptions) -> Result<(), NbdError> {
    if options.connections == 0 {
        return Err(NbdError::Options("at least one connection is needed".into()));
    }
    if !options.block_size.is_power_of_two() || !(512..=4096).contains(&options.block_size) {
        return Err(NbdError::Options(format!(
            "block size {} is not a power of two from 512 to 4096",
            options.block_size
        )));
    }
    Ok(())
}

/// Whether `/dev/nbd{index}` has a connection (the kernel shows the `pid` attribute then).
fn is_connected(index: u32) -> bool {
    Path::new(&format!("/sys/block/nbd{index}/pid")).exists()
}

/// Size of `/dev/nbd{index}` in 512-byte sectors.
fn sysfs_size(index: u32) -> u64 {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls `done` (a kernel state without an event to wait for) until it holds or `timeout`.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The NBD devices that exist, in index order.
fn nbd_indexes() -> Vec<u32> {
    let mut indexes: Vec<u32> = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.strip_prefix("nbd")?.parse().ok())
        .collect();
    indexes.sort_unstable();
    indexes
}

/// Configures a free device with the ioctls on a thread that then runs `NBD_DO_IT` (the kernel
/// wants every `NBD_SET_SOCK` of a device from one task).
fn ioctl_connect(
    sockets: Vec<OwnedFd>,
    size: u64,
    block_size: u32,
    flags: u64,
    timeout: Duration,
) -> Result<(u32, Option<DoIt>), NbdError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("nbd-do-it".into())
        .spawn(move || {
            let setup = ioctl_setup(&sockets, size, block_size, flags, timeout);
            drop(sockets);
            match setup {
                Ok((index, device)) => {
                    let _ = tx.send(Ok(index));
                    let outcome = nbd_ioctl::do_it(device.as_fd());
                    let _ = nbd_ioctl::clear_que(device.as_fd());
                    let _ = nbd_ioctl::clear_sock(device.as_fd());
                    outcome
                }
                Err(err) => {
                    let _ = tx.send(Err(err));
                    Ok(())
                }
            }
        })
        .map_err(kernel("spawning the NBD_DO_IT thread"))?;
    match rx.recv() {
        Ok(Ok(index)) => Ok((index, Some(thread))),
        Ok(Err(err)) => {
            let _ = thread.join();
            Err(err)
        }
        Err(_) => Err(NbdError::Join("NBD_DO_IT thread ended during setup".into())),
    }
}

fn ioctl_setup(
    sockets: &[OwnedFd],
    size: u64,
    block_size: u32,
    flags: u64,
    timeout: Duration,
) -> Result<(u32, File), NbdError> {
    for index in nbd_indexes() {
        if is_connected(index) {
            continue;
        }
        let Ok(device) = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/dev/nbd{index}"))
        else {
            continue;
        };
        match nbd_ioctl::set_sock(device.as_fd(), sockets[0].as_fd()) {
            Ok(()) => {}
            // Configured by another process (EBUSY) or through netlink (EINVAL): next one.
            Err(err) if matches!(err.raw_os_error(), Some(libc::EBUSY | libc::EINVAL)) => continue,
            Err(source) => {
                return Err(NbdError::Kernel {
                    step: "NBD_SET_SOCK",
                    source,
                })
            }
        }
        let configure = || -> Result<(), NbdError> {
            for socket in &sockets[1..] {
                nbd_ioctl::set_sock(device.as_fd(), socket.as_fd()).map_err(kernel("NBD_SET_SOCK"))?;
            }
            nbd_ioctl::set_blksize(device.as_fd(), u64::from(block_size))
                .map_err(kernel("NBD_SET_BLKSIZE"))?;
            nbd_ioctl::set_size(device.as_fd(), size).map_err(kernel("NBD_SET_SIZE"))?;
            nbd_ioctl::set_flags(device.as_fd(), flags).map_err(kernel("NBD_SET_FLAGS"))?;
            nbd_ioctl::set_timeout(device.as_fd(), timeout.as_secs().max(1))
                .map_err(kernel("NBD_SET_TIMEOUT"))?;
            Ok(())
        };
        if let Err(err) = configure() {
            let _ = nbd_ioctl::clear_sock(device.as_fd());
            return Err(err);
        }
        return Ok((index, device));
    }
    Err(NbdError::NoFreeDevice)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use r3map_core::{Backend, MemoryBackend};
    use r3map_nbd::wire::{cmd, transmission_flags, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC};
    use r3map_nbd::{ListenAddr, Server};

    use super::*;

    fn local(export: Export) -> LocalServer {
        LocalServer {
            service: Service::new(ServerConfig::new(vec![export])).unwrap(),
            connections: Vec::new(),
        }
    }

    /// After the handshake each socket is in the transmission phase, blocking, exactly where
    /// the kernel takes over: a raw compact NBD read request gets a simple reply with the
    /// backend's bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshake_leaves_the_sockets_ready_for_the_kernel() {
        let backend = Arc::new(MemoryBackend::new(1 << 20));
        backend.write_at(8192, b"kernel-visible").await.unwrap();
        let mut server = local(Export::new(EXPORT, backend.clone()));
        let (sockets, negotiated) =
            connections::open_connections(3, EXPORT, || std::future::ready(server.pair()))
                .await
                .unwrap();
        assert_eq!(negotiated.size, 1 << 20);
        let flags = negotiated.transmission_flags;
        assert_ne!(flags & transmission_flags::HAS_FLAGS, 0);
        assert_ne!(flags & transmission_flags::SEND_FLUSH, 0);
        assert_ne!(flags & transmission_flags::CAN_MULTI_CONN, 0);
        assert_eq!(sockets.len(), 3);
        assert_eq!(server.connections.len(), 3);
        for (i, socket) in sockets.into_iter().enumerate() {
            let handle = 40 + i as u64;
            let data = tokio::task::spawn_blocking(move || {
                let mut client = UnixStream::from(socket);
                let mut request = Vec::new();
                request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                request.extend_from_slice(&0u16.to_be_bytes());
                request.extend_from_slice(&cmd::READ.to_be_bytes());
                request.extend_from_slice(&handle.to_be_bytes());
                request.extend_from_slice(&8192u64.to_be_bytes());
                request.extend_from_slice(&14u32.to_be_bytes());
                client.write_all(&request).unwrap();
                let mut reply = [0u8; 16 + 14];
                client.read_exact(&mut reply).unwrap();
                assert_eq!(
                    u32::from_be_bytes(reply[0..4].try_into().unwrap()),
                    SIMPLE_REPLY_MAGIC
                );
                assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0, "no error");
                assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), handle);
                reply[16..].to_vec()
            })
            .await
            .unwrap();
            assert_eq!(data, b"kernel-visible");
        }
        server.abort();
    }

    /// Without `NBD_FLAG_CAN_MULTI_CONN` only one connection is opened, however many were asked
    /// for (the in-process server and a remote one over TCP).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_connections_only_with_can_multi_conn() {
        for multi_conn in [false, true] {
            let mut export = Export::new(EXPORT, Arc::new(MemoryBackend::new(1 << 20)));
            export.multi_conn = multi_conn;
            let mut server = local(export);
            let (sockets, negotiated) =
                connections::open_connections(4, EXPORT, || std::future::ready(server.pair()))
                    .await
                    .unwrap();
            let advertised = negotiated.transmission_flags & transmission_flags::CAN_MULTI_CONN != 0;
            assert_eq!(advertised, multi_conn);
            let expected = if multi_conn { 4 } else { 1 };
            assert_eq!(sockets.len(), expected, "multi_conn {multi_conn}");
            assert_eq!(server.connections.len(), expected, "connections opened");
            server.abort();

            let mut export = Export::new("remote", Arc::new(MemoryBackend::new(1 << 20)));
            export.multi_conn = multi_conn;
            let remote = Server::bind_tcp(ServerConfig::new(vec![export]), "127.0.0.1:0")
                .await
                .unwrap();
            let ListenAddr::Tcp(addr) = remote.local_addr().clone() else {
                panic!("a TCP listener");
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let serving = tokio::spawn(remote.serve(async move {
                let _ = stopped.await;
            }));
            let options = NbdOptions {
                connections: 4,
                export_name: "remote".into(),
                ..NbdOptions::default()
            };
            let (sockets, _) = open_remote(&addr.to_string(), &options).await.unwrap();
            assert_eq!(sockets.len(), expected, "remote, multi_conn {multi_conn}");
            drop(sockets);
            let _ = stop.send(());
            serving.await.unwrap().unwrap();
        }
    }

    /// The handshake is `NBD_OPT_GO`, so a refusal carries the server's message (with
    /// `NBD_OPT_EXPORT_NAME` the server could only close the connection).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshake_for_a_missing_export_names_it() {
        let mut server = local(Export::new(EXPORT, Arc::new(MemoryBackend::new(1 << 20))));
        let err = connections::open_connections(2, "nope", || std::future::ready(server.pair()))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                NbdError::Handshake {
                    connection: 0,
                    source: r3map_nbd::ClientError::Refused { .. }
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("no export named \"nope\""), "{err}");
        server.abort();
    }

    #[test]
    fn options_are_validated() {
        let bad_block = NbdOptions {
            block_size: 1000,
            ..NbdOptions::default()
        };
        assert!(matches!(validate(&bad_block), Err(NbdError::Options(_))));
        let no_connections = NbdOptions {
            connections: 0,
            ..NbdOptions::default()
        };
        assert!(matches!(validate(&no_connections), Err(NbdError::Options(_))));
        assert!(validate(&NbdOptions::default()).is_ok());
    }
}
