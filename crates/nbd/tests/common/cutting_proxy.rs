//! A loopback TCP proxy whose link can be cut: on a cut, both sides of every open connection
//! are reset (the server side first), as when a link between client and server fails. A
//! connection may also be cut by itself after a number of client-to-server bytes, so cuts land
//! at chosen points of a request stream (mid-request included), independent of timing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Where the proxy forwards to.
#[derive(Clone, Debug)]
pub enum Upstream {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Client-to-server bytes connection number `n` (from 1) forwards before it is cut; `None`
/// never cuts it.
pub type CutPolicy = Arc<dyn Fn(u64) -> Option<u64> + Send + Sync>;

pub struct CuttingProxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    relays: Arc<Mutex<JoinSet<()>>>,
    policy: Arc<Mutex<CutPolicy>>,
    accepted: Arc<AtomicU64>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    pub async fn start(upstream: Upstream) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(0u64);
        let relays = Arc::new(Mutex::new(JoinSet::new()));
        let policy: Arc<Mutex<CutPolicy>> = Arc::new(Mutex::new(Arc::new(|_| None)));
        let accepted = Arc::new(AtomicU64::new(0));
        let accept_task = tokio::spawn({
            let (cut, relays, policy, accepted) =
                (cut.clone(), relays.clone(), policy.clone(), accepted.clone());
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let number = accepted.fetch_add(1, Ordering::SeqCst) + 1;
                    let budget = (policy.lock())(number);
                    let upstream = upstream.clone();
                    // Under the lock, so a cut either sees this relay or the relay sees it.
                    let mut relays = relays.lock();
                    let cut = cut.subscribe();
                    relays.spawn(async move {
                        client.set_nodelay(true).unwrap();
                        match &upstream {
                            Upstream::Tcp(addr) => {
                                let Ok(server) = TcpStream::connect(addr).await else {
                                    return reset(&client);
                                };
                                server.set_nodelay(true).unwrap();
                                relay(client, server, budget, cut, reset).await
                            }
                            Upstream::Unix(path) => {
                                let Ok(server) = UnixStream::connect(path).await else {
                                    return reset(&client);
                                };
                                relay(client, server, budget, cut, |_| {}).await
                            }
                        }
                    });
                }
            }
        });
        Self {
            addr,
            cut,
            relays,
            policy,
            accepted,
            accept_task,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Sets how later connections are cut.
    pub fn set_policy(&self, policy: CutPolicy) {
        *self.policy.lock() = policy;
    }

    /// Cuts every open connection; returns once all of them are closed on both sides.
    pub async fn cut(&self) {
        let mut relays = {
            let mut relays = self.relays.lock();
            self.cut.send_modify(|n| *n += 1);
            std::mem::take(&mut *relays)
        };
        while relays.join_next().await.is_some() {}
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Closes a TCP socket with a reset (unsent data dropped), as a failed link does.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Forwards both ways until either side closes, `budget` client bytes were forwarded, or a cut.
/// The server side is closed first.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: TcpStream,
    mut server: S,
    mut budget: Option<u64>,
    mut cut: watch::Receiver<u64>,
    reset_server: impl Fn(&S),
) {
    let mut up = vec![0u8; 64 << 10];
    let mut down = vec![0u8; 64 << 10];
    let graceful = loop {
        if budget == Some(0) {
            break false;
        }
        tokio::select! {
            read = client.read(&mut up) => {
                let n = match read { Ok(0) | Err(_) => break true, Ok(n) => n };
                let n = budget.map_or(n, |b| n.min(b as usize));
                if server.write_all(&up[..n]).await.is_err() {
                    break true;
                }
                if let Some(b) = &mut budget {
                    *b -= n as u64;
                }
            }
            read = server.read(&mut down) => {
                let n = match read { Ok(0) | Err(_) => break true, Ok(n) => n };
                if client.write_all(&down[..n]).await.is_err() {
                    break true;
                }
            }
            _ = cut.changed() => break false,
        }
    };
    if !graceful {
        reset_server(&server);
        reset(&client);
    }
    drop(server);
    drop(client);
}
