//! The advertiser: keeps the hashes of its file current from change events and runs one
//! session per receiver, directly (it listens) or through a hub (it dials the hub for each
//! receiver the hub announces).

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use r3map_tls::{ClientTls, ServerTls};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::conn::{Conn, ConnError, Counters};
use crate::delta::{DeltaError, HashList, Plan};
use crate::hashes::{read_exact_at, BlockHashes};
use crate::transport::{self, Identity};
use crate::wire::{Message, Role, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, VERSION};
use crate::Log;

/// What an advertiser needs to know.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub path: PathBuf,
    /// The name receivers ask for.
    pub name: String,
    pub block_size: u32,
    /// Threads for a hash pass.
    pub threads: usize,
    /// Deadline of every network read and write; keep-alives go out at a third of it.
    pub timeout: Duration,
}

/// Bytes a flush leaves queued at most while blocks are sent.
const FLUSH_AT: usize = 1 << 20;
/// Receivers served at once.
const MAX_SESSIONS: usize = 64;

/// An advertised file and its current version's hashes.
pub struct Source {
    config: SourceConfig,
    current: watch::Sender<Arc<BlockHashes>>,
    /// Socket bytes of every session.
    pub counters: Arc<Counters>,
    log: Log,
}

impl Source {
    /// Hashes the file once; `log` receives one line per notable event.
    pub async fn open(config: SourceConfig, log: Log) -> io::Result<Arc<Self>> {
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&config.block_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("block size must be between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes"),
            ));
        }
        let hashes = hash_file(
            config.path.clone(),
            BlockHashes::empty(config.block_size),
            config.threads,
        )
        .await?;
        Ok(Arc::new(Self {
            config,
            current: watch::Sender::new(Arc::new(hashes)),
            counters: Arc::default(),
            log,
        }))
    }

    /// The hashes of the version receivers are given now.
    pub fn version(&self) -> Arc<BlockHashes> {
        self.current.borrow().clone()
    }

    /// Rehashes only `blocks` (ascending indices) from `data`, the whole file as it is now (an
    /// advertiser that maps the file and knows which blocks were written). A new version goes
    /// to the sessions if the digest changed; returns whether it did. Indices past the end are
    /// ignored; the size cannot change this way.
    pub fn update_blocks(&self, blocks: &[u64], data: &[u8]) -> bool {
        let before = self.version();
        let mut after = (*before).clone();
        let count = after.blocks();
        for &index in blocks.iter().filter(|&&index| index < count) {
            let (offset, len) = after.range(index);
            let offset = offset as usize;
            after.set_block(index, &data[offset..offset + len]);
        }
        self.publish(&before, after)
    }

    /// Hands `after` to the sessions if it differs from `before`.
    fn publish(&self, before: &BlockHashes, after: BlockHashes) -> bool {
        if after.digest() == before.digest() {
            return false;
        }
        (self.log)(format!(
            "changed: {} now {} bytes, version {}",
            self.config.name,
            after.size(),
            hex8(&after.digest())
        ));
        self.current.send_replace(Arc::new(after));
        true
    }

    /// Rehashes after every change event (xxh3 of every block, blake3 only of blocks whose
    /// xxh3 changed) and hands new versions to the sessions. Runs until an error.
    pub async fn follow_changes(&self) -> io::Result<()> {
        let mut watch = crate::watch::FileWatch::new(&self.config.path)?;
        loop {
            watch.changed().await?;
            let before = self.version();
            let after = hash_file(self.config.path.clone(), (*before).clone(), self.config.threads).await?;
            self.publish(&before, after);
        }
    }

    /// Accepts receivers on `listener` (direct mode), with TLS if `tls`; peers whose identity
    /// is not in `allowed` (when it is not empty) are refused.
    pub async fn listen(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<ServerTls>,
        allowed: Vec<String>,
    ) -> io::Result<()> {
        let sessions = Arc::new(Semaphore::new(MAX_SESSIONS));
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    (self.log)(format!("accept failed: {err}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = sessions.clone().try_acquire_owned() else {
                (self.log)(format!(
                    "refused {addr}: {MAX_SESSIONS} receivers are being served"
                ));
                continue;
            };
            let source = self.clone();
            let tls = tls.clone();
            let allowed = allowed.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let peer = addr.to_string();
                if let Err(err) = source.accept_direct(tcp, &peer, tls.as_ref(), &allowed).await {
                    (source.log)(format!("receiver {peer}: {err}"));
                }
            });
        }
    }

    async fn accept_direct(
        &self,
        tcp: tokio::net::TcpStream,
        peer: &str,
        tls: Option<&ServerTls>,
        allowed: &[String],
    ) -> Result<(), SessionError> {
        let timeout = self.config.timeout;
        let (stream, identity) = transport::handshake(tcp, peer, tls, timeout, self.counters.clone()).await?;
        let mut conn = Conn::new(stream, timeout).with_max_frame(crate::wire::MAX_NAME + 64);
        if let Some(reason) = refuse_identity(&identity, allowed) {
            conn.refuse(&reason).await;
            return Err(SessionError::Refused(reason));
        }
        let hello = match conn.recv().await {
            Ok(hello) => hello,
            Err(err @ (ConnError::Wire(_) | ConnError::Protocol(_))) => {
                let reason = err.to_string();
                conn.refuse(&reason).await;
                return Err(SessionError::Refused(reason));
            }
            Err(err) => return Err(err.into()),
        };
        if let Err(reason) = check_hello(&hello, Role::Receiver, &self.config.name) {
            conn.refuse(&reason).await;
            return Err(SessionError::Refused(reason));
        }
        let (stream, leftover) = conn.into_parts();
        self.serve(
            restore(stream, leftover, timeout),
            &format!("{peer} ({identity})"),
        )
        .await
    }

    /// Offers the file through the hub at `hub`: keeps a control connection and opens a data
    /// connection for every receiver the hub announces. Reconnects after failures.
    pub async fn advertise(self: Arc<Self>, hub: String, tls: Option<ClientTls>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.clone().control(&hub, tls.as_ref()).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(err) => (self.log)(format!("hub {hub}: {err}; reconnecting in {backoff:?}")),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn control(self: Arc<Self>, hub: &str, tls: Option<&ClientTls>) -> Result<(), SessionError> {
        let timeout = self.config.timeout;
        let stream = transport::connect(hub, tls, timeout, self.counters.clone()).await?;
        let mut conn = Conn::new(stream, timeout).with_max_frame(4096);
        conn.send(&hello(Role::Advertiser, &self.config.name, 0)).await?;
        match conn.recv().await? {
            Message::Welcome { .. } => {}
            other => return Err(unexpected("Welcome", &other).into()),
        }
        (self.log)(format!("advertising {} at hub {hub}", self.config.name));
        loop {
            match conn.recv().await? {
                Message::Idle => {}
                Message::Open { ticket } => {
                    let source = self.clone();
                    let hub = hub.to_string();
                    let tls = tls.cloned();
                    tokio::spawn(async move {
                        if let Err(err) = source.data(&hub, tls.as_ref(), ticket).await {
                            (source.log)(format!("receiver via hub (ticket {ticket}): {err}"));
                        }
                    });
                }
                other => return Err(unexpected("Open", &other).into()),
            }
        }
    }

    async fn data(&self, hub: &str, tls: Option<&ClientTls>, ticket: u64) -> Result<(), SessionError> {
        let timeout = self.config.timeout;
        let stream = transport::connect(hub, tls, timeout, self.counters.clone()).await?;
        let mut conn = Conn::new(stream, timeout);
        conn.send(&hello(Role::Data, &self.config.name, ticket)).await?;
        // The hub relays the receiver's Hello, then every byte both ways.
        let hello = conn.recv().await?;
        if let Err(reason) = check_hello(&hello, Role::Receiver, &self.config.name) {
            conn.refuse(&reason).await;
            return Err(SessionError::Refused(reason));
        }
        self.serve(conn, &format!("via hub (ticket {ticket})")).await
    }

    /// Runs a session; a peer that broke the protocol is told why before the connection closes.
    async fn serve(&self, mut conn: Conn, peer: &str) -> Result<(), SessionError> {
        let result = self.session(&mut conn, peer).await;
        if let Err(SessionError::Conn(err @ (ConnError::Wire(_) | ConnError::Protocol(_)))) = &result {
            conn.refuse(&err.to_string()).await;
        }
        result
    }

    /// One receiver's session, after its `Hello`: rounds of hash list → plan and blocks →
    /// `Published`, each answered as soon as there is something the receiver lacks.
    async fn session(&self, conn: &mut Conn, peer: &str) -> Result<(), SessionError> {
        let block_size = self.config.block_size;
        conn.send(&Message::Welcome {
            version: VERSION,
            block_size,
        })
        .await?;
        (self.log)(format!("receiver {peer} connected"));
        let mut versions = self.current.subscribe();
        let keepalive = conn.timeout() / 3;
        // A receiver that just connected or whose copy did not verify is always answered.
        let mut must_answer = true;
        loop {
            let mut list = HashList::new(block_size, versions.borrow().blocks());
            loop {
                match conn.recv_skip_idle().await? {
                    Message::Hashes {
                        size,
                        first,
                        last,
                        hashes,
                    } => {
                        if list.add(size, first, last, &hashes)? {
                            break;
                        }
                    }
                    other => return Err(unexpected("Hashes", &other).into()),
                }
            }
            let (their_size, theirs) = list.finish();
            let (version, plan) = loop {
                let version = versions.borrow_and_update().clone();
                let plan = Plan::new(&version, &theirs);
                if must_answer || !plan.blocks.is_empty() || plan.size != their_size {
                    break (version, plan);
                }
                tokio::select! {
                    changed = versions.changed() => if changed.is_err() { return Ok(()) },
                    _ = tokio::time::sleep(keepalive) => conn.send(&Message::Idle).await?,
                }
            };
            let sent_before = self.counters.sent();
            self.send_plan(conn, &version, &plan).await?;
            match conn.recv_skip_idle().await? {
                Message::Published { digest } if digest == plan.digest => {
                    must_answer = false;
                    let blocks = plan.blocks.len() as u64;
                    if blocks > 0 || plan.size != their_size {
                        self.counters.versions.fetch_add(1, Ordering::Relaxed);
                    }
                    self.counters.blocks.fetch_add(blocks, Ordering::Relaxed);
                    (self.log)(format!(
                        "receiver {peer} published version {}: {} blocks sent ({} bytes sent by this advertiser meanwhile)",
                        hex8(&digest),
                        plan.blocks.len(),
                        self.counters.sent() - sent_before
                    ));
                }
                Message::Published { .. } => {
                    must_answer = true;
                    (self.log)(format!(
                        "receiver {peer} did not verify version {} (the file changed while it was sent); it asks again",
                        hex8(&plan.digest)
                    ));
                }
                other => return Err(unexpected("Published", &other).into()),
            }
        }
    }

    async fn send_plan(
        &self,
        conn: &mut Conn,
        version: &BlockHashes,
        plan: &Plan,
    ) -> Result<(), SessionError> {
        conn.queue(&plan.message());
        if !plan.blocks.is_empty() {
            // Blocks are read now: if the file changed since it was hashed, the digest check
            // at the receiver fails and the next round sends the new version.
            let file = File::open(&self.config.path)?;
            for &index in &plan.blocks {
                let (offset, len) = version.range(index);
                let mut data = BytesMut::zeroed(len);
                read_exact_at(&file, &mut data, offset)?;
                conn.queue(&Message::Block {
                    index,
                    data: data.freeze(),
                });
                if conn.queued() >= FLUSH_AT {
                    conn.flush().await?;
                }
            }
        }
        conn.flush().await?;
        Ok(())
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("cannot read the advertised file: {0}")]
    File(#[from] io::Error),
}

impl From<DeltaError> for SessionError {
    fn from(err: DeltaError) -> Self {
        SessionError::Conn(ConnError::Protocol(err))
    }
}

pub(crate) fn unexpected(expected: &'static str, got: &Message) -> ConnError {
    let got = format!("{got:?}");
    ConnError::Protocol(DeltaError::Unexpected {
        expected,
        got: got.chars().take(80).collect(),
    })
}

pub(crate) fn hello(role: Role, name: &str, ticket: u64) -> Message {
    Message::Hello {
        version: VERSION,
        role,
        name: name.to_string(),
        ticket,
    }
}

/// Checks a peer's `Hello`: protocol version, role and (if `name` is not empty) file name.
pub(crate) fn check_hello(hello: &Message, role: Role, name: &str) -> Result<(), String> {
    match hello {
        Message::Hello { version, .. } if *version != VERSION => Err(format!(
            "protocol version {version} is not supported (this peer speaks {VERSION}); use the same r3map version on both sides"
        )),
        Message::Hello { role: got, .. } if *got != role => Err(format!("expected a {role:?} here, not a {got:?}")),
        Message::Hello { name: got, .. } if !name.is_empty() && got != name => {
            Err(format!("this advertiser offers {name:?}, not {got:?}"))
        }
        Message::Hello { .. } => Ok(()),
        other => Err(format!("expected Hello, got {}", format!("{other:?}").chars().take(40).collect::<String>())),
    }
}

/// Why `identity` is refused, if `allowed` names identities and it is not one of them.
pub(crate) fn refuse_identity(identity: &Identity, allowed: &[String]) -> Option<String> {
    if allowed.is_empty()
        || allowed
            .iter()
            .any(|id| Some(id.as_str()) == identity.0.as_deref())
    {
        return None;
    }
    Some(format!(
        "unknown identity {identity}: its certificate's common name is not among the allowed sync ids"
    ))
}

/// A connection again, with the bytes already read past `Hello` put back in front.
fn restore(stream: crate::conn::Stream, leftover: BytesMut, timeout: Duration) -> Conn {
    let stream: crate::conn::Stream = Box::new(crate::hub::Prefixed::new(leftover.freeze(), stream));
    Conn::new(stream, timeout)
}

async fn hash_file(path: PathBuf, mut hashes: BlockHashes, threads: usize) -> io::Result<BlockHashes> {
    tokio::task::spawn_blocking(move || {
        let file = File::open(&path)
            .map_err(|err| io::Error::new(err.kind(), format!("cannot open {}: {err}", path.display())))?;
        hashes.refresh(&file, threads)?;
        Ok(hashes)
    })
    .await
    .map_err(io::Error::other)?
}

/// The first 8 bytes of a digest in hex, to name a version in messages.
pub fn hex8(digest: &[u8; 32]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}
