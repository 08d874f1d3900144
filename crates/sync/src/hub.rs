//! The hub: advertisers register the files they offer, receivers ask for one, and the hub pairs
//! each receiver with a fresh data connection from the advertiser and relays bytes both ways.
//! Peers only ever meet peers with the same sync id (the common name of their client
//! certificate); the hub reads nothing but `Hello` frames itself.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use r3map_tls::ServerTls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::conn::{Conn, Counters, Stream};
use crate::source::{check_hello, refuse_identity};
use crate::transport::{self, Identity};
use crate::wire::{Message, Role, MAX_NAME, VERSION};
use crate::Log;

/// Peers connected at once at most.
const MAX_PEERS: usize = 1024;

type Key = (String, String);

#[derive(Default)]
struct Registry {
    /// (sync id, file name) → the advertiser's control connection's queue of tickets.
    advertisers: HashMap<Key, (u64, mpsc::Sender<u64>)>,
    /// ticket → the waiting receiver, with the sync id the data connection must have.
    waiting: HashMap<u64, (String, oneshot::Sender<(Stream, BytesMut)>)>,
}

/// A hub's state.
pub struct Hub {
    registry: Mutex<Registry>,
    next: AtomicU64,
    timeout: Duration,
    allowed: Vec<String>,
    pub counters: Arc<Counters>,
    log: Log,
}

impl Hub {
    /// `allowed`: sync ids accepted (all when empty).
    pub fn new(timeout: Duration, allowed: Vec<String>, log: Log) -> Arc<Self> {
        Arc::new(Self {
            registry: Mutex::default(),
            next: AtomicU64::new(1),
            timeout,
            allowed,
            counters: Arc::default(),
            log,
        })
    }

    /// Serves peers on `listener` until an error.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Option<ServerTls>) -> io::Result<()> {
        let peers = Arc::new(Semaphore::new(MAX_PEERS));
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    (self.log)(format!("accept failed: {err}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = peers.clone().try_acquire_owned() else {
                (self.log)(format!("refused {addr}: {MAX_PEERS} peers are connected"));
                continue;
            };
            let hub = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(reason) = hub.peer(tcp, &addr.to_string(), tls.as_ref()).await {
                    (hub.log)(format!("peer {addr}: {reason}"));
                }
            });
        }
    }

    async fn peer(
        &self,
        tcp: tokio::net::TcpStream,
        addr: &str,
        tls: Option<&ServerTls>,
    ) -> Result<(), String> {
        let (stream, identity) = transport::handshake(tcp, addr, tls, self.timeout, self.counters.clone())
            .await
            .map_err(|err| err.to_string())?;
        let mut conn = Conn::new(stream, self.timeout).with_max_frame(MAX_NAME + 64);
        if let Some(reason) = refuse_identity(&identity, &self.allowed) {
            conn.refuse(&reason).await;
            return Err(reason);
        }
        let hello = conn.recv().await.map_err(|err| err.to_string())?;
        let Message::Hello {
            role, name, ticket, ..
        } = hello.clone()
        else {
            let reason = check_hello(&hello, Role::Receiver, "").unwrap_err();
            conn.refuse(&reason).await;
            return Err(reason);
        };
        if let Err(reason) = check_hello(&hello, role, "") {
            conn.refuse(&reason).await;
            return Err(reason);
        }
        let key = (identity.sync_id().to_string(), name);
        match role {
            Role::Advertiser => self.advertiser(conn, key, &identity).await,
            Role::Receiver => self.receiver(conn, key, hello).await,
            Role::Data => self.data(conn, key.0, ticket).await,
        }
    }

    async fn advertiser(&self, mut conn: Conn, key: Key, identity: &Identity) -> Result<(), String> {
        let (tx, mut tickets) = mpsc::channel(64);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.registry
            .lock()
            .unwrap()
            .advertisers
            .insert(key.clone(), (id, tx));
        (self.log)(format!("advertiser of {:?} connected ({identity})", key.1));
        let welcome = Message::Welcome {
            version: VERSION,
            block_size: 0,
        };
        let keepalive = self.timeout / 3;
        let mut result = conn.send(&welcome).await;
        while result.is_ok() {
            result = tokio::select! {
                ticket = tickets.recv() => match ticket {
                    Some(ticket) => conn.send(&Message::Open { ticket }).await,
                    None => break,
                },
                _ = tokio::time::sleep(keepalive) => conn.send(&Message::Idle).await,
            };
        }
        let mut registry = self.registry.lock().unwrap();
        if registry
            .advertisers
            .get(&key)
            .is_some_and(|(current, _)| *current == id)
        {
            registry.advertisers.remove(&key);
        }
        drop(registry);
        (self.log)(format!("advertiser of {:?} left", key.1));
        result.map_err(|err| err.to_string())
    }

    async fn receiver(&self, conn: Conn, key: Key, hello: Message) -> Result<(), String> {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let advertiser = {
            let mut registry = self.registry.lock().unwrap();
            let advertiser = registry.advertisers.get(&key).map(|(_, tx)| tx.clone());
            if advertiser.is_some() {
                registry.waiting.insert(ticket, (key.0.clone(), tx));
            }
            advertiser
        };
        let Some(advertiser) = advertiser else {
            let reason = format!(
                "no advertiser offers {:?} for sync id {:?} (start `r3map sync advertise` first, with a certificate of the same common name)",
                key.1, key.0
            );
            conn.refuse(&reason).await;
            return Err(reason);
        };
        let _ = advertiser.send(ticket).await;
        let paired = tokio::time::timeout(self.timeout, rx).await;
        self.registry.lock().unwrap().waiting.remove(&ticket);
        let Ok(Ok((data, data_leftover))) = paired else {
            let reason = format!(
                "the advertiser of {:?} did not open a data connection in time",
                key.1
            );
            conn.refuse(&reason).await;
            return Err(reason);
        };
        (self.log)(format!("relaying {:?} to a receiver (ticket {ticket})", key.1));
        let (receiver, receiver_leftover) = conn.into_parts();
        // The advertiser's side reads the receiver's Hello first, as a direct advertiser would.
        let mut first = BytesMut::new();
        hello.encode(&mut first);
        first.extend_from_slice(&receiver_leftover);
        let receiver: Stream = Box::new(Prefixed::new(first.freeze(), receiver));
        let data: Stream = Box::new(Prefixed::new(data_leftover.freeze(), data));
        relay(receiver, data, self.timeout).await;
        Ok(())
    }

    async fn data(&self, conn: Conn, sync_id: String, ticket: u64) -> Result<(), String> {
        let waiting = {
            let mut registry = self.registry.lock().unwrap();
            match registry.waiting.get(&ticket) {
                Some((owner, _)) if *owner == sync_id => registry.waiting.remove(&ticket),
                _ => None,
            }
        };
        let Some((_, tx)) = waiting else {
            let reason = format!("no receiver waits for ticket {ticket} under this sync id");
            conn.refuse(&reason).await;
            return Err(reason);
        };
        let _ = tx.send(conn.into_parts());
        Ok(())
    }
}

/// Copies both ways until either side closes, fails, or is silent for `timeout` (the endpoints
/// send keep-alives, so silence means a dead peer).
async fn relay(a: Stream, b: Stream, timeout: Duration) {
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    tokio::select! {
        _ = pump(a_read, b_write, timeout) => {}
        _ = pump(b_read, a_write, timeout) => {}
    }
}

async fn pump(
    mut from: tokio::io::ReadHalf<Stream>,
    mut to: tokio::io::WriteHalf<Stream>,
    timeout: Duration,
) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match tokio::time::timeout(timeout, from.read(&mut buf)).await {
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            Ok(read) => read?,
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        match tokio::time::timeout(timeout, to.write_all(&buf[..n])).await {
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            Ok(written) => written?,
        }
    }
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed {
    prefix: Bytes,
    inner: Stream,
}

impl Prefixed {
    pub fn new(prefix: Bytes, inner: Stream) -> Self {
        Self { prefix, inner }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
