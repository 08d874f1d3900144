//! The receiver: connects to an advertiser (directly or through a hub), asks with the hashes of
//! its copy, writes the blocks it is sent into the staging copy and publishes each version
//! whose blake3 digest checks out. A lost connection is retried; the staging copy keeps what
//! already arrived, so the transfer resumes instead of starting over.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use r3map_tls::ClientTls;

use crate::conn::{Conn, ConnError, Counters};
use crate::delta::{apply_size, hash_messages, ApplyError, Incoming};
use crate::replica::{Replica, ReplicaStats};
use crate::source::{hello, hex8, unexpected, SessionError};
use crate::transport;
use crate::wire::{Message, Role, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::Log;

/// What a receiver needs to know.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// The advertiser's or the hub's address.
    pub addr: String,
    pub name: String,
    pub tls: Option<ClientTls>,
    pub timeout: Duration,
    /// Largest file accepted (a bigger plan is refused before anything is written).
    pub max_size: u64,
    /// Stop after the first published version.
    pub once: bool,
    /// Give up after this many failed connections in a row (0: never).
    pub attempts: u32,
}

/// One published version.
#[derive(Debug, Clone)]
pub struct Published {
    pub size: u64,
    pub blocks: u64,
    pub block_bytes: u64,
    /// Socket bytes received during this round.
    pub wire_bytes: u64,
    pub digest: [u8; 32],
}

/// Why receiving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("cannot write the replica: {0}")]
    Replica(#[from] std::io::Error),
    #[error("gave up after {attempts} failed attempts; last: {last}")]
    GaveUp { attempts: u32, last: String },
}

/// Receives into `replica` until `config.once` is satisfied or the attempts run out; counts
/// socket bytes into `counters`.
pub async fn receive(
    config: &ReceiverConfig,
    replica: &mut Replica,
    counters: Arc<Counters>,
    log: &Log,
) -> Result<(), ReceiveError> {
    let mut failures = 0u32;
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(config, replica, counters.clone(), log).await {
            Ok(()) => return Ok(()),
            Err(SessionOutcome::Fatal(err)) => return Err(err),
            Err(SessionOutcome::Retry(err)) => {
                failures += 1;
                if config.attempts != 0 && failures >= config.attempts {
                    return Err(ReceiveError::GaveUp {
                        attempts: failures,
                        last: err.to_string(),
                    });
                }
                log(format!(
                    "connection to {} lost: {err}; retrying in {backoff:?} (what arrived is kept)",
                    config.addr
                ));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

enum SessionOutcome {
    /// Worth another connection (network trouble).
    Retry(SessionError),
    /// The peer refused us or broke the protocol, or the disk failed: stop.
    Fatal(ReceiveError),
}

impl From<ConnError> for SessionOutcome {
    fn from(err: ConnError) -> Self {
        // With TLS 1.3 a server's refusal of our certificate arrives as an alert on the first
        // read: that is final, not network trouble.
        if let ConnError::Io(io) = &err {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<r3map_tls::rustls::Error>())
            {
                return SessionOutcome::Fatal(
                    SessionError::Refused(format!(
                        "the peer refused our TLS handshake: {}",
                        r3map_tls::describe_handshake_error(io)
                    ))
                    .into(),
                );
            }
        }
        match err {
            ConnError::Io(_) | ConnError::Timeout(_) | ConnError::Closed => SessionOutcome::Retry(err.into()),
            other => SessionOutcome::Fatal(SessionError::Conn(other).into()),
        }
    }
}

impl From<std::io::Error> for SessionOutcome {
    fn from(err: std::io::Error) -> Self {
        SessionOutcome::Fatal(ReceiveError::Replica(err))
    }
}

async fn session(
    config: &ReceiverConfig,
    replica: &mut Replica,
    counters: Arc<Counters>,
    log: &Log,
) -> Result<(), SessionOutcome> {
    let stream = transport::connect(
        &config.addr,
        config.tls.as_ref(),
        config.timeout,
        counters.clone(),
    )
    .await
    .map_err(|err| match err {
        transport::TransportError::Handshake { .. } | transport::TransportError::Tls(_) => {
            SessionOutcome::Fatal(SessionError::Transport(err).into())
        }
        other => SessionOutcome::Retry(other.into()),
    })?;
    let mut conn = Conn::new(stream, config.timeout);
    conn.send(&hello(Role::Receiver, &config.name, 0)).await?;
    let block_size = match conn.recv_skip_idle().await? {
        Message::Welcome { block_size, .. } if (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) => {
            block_size
        }
        Message::Welcome { block_size, .. } => {
            return Err(ConnError::Protocol(crate::DeltaError::Unexpected {
                expected: "a block size between 512 bytes and 16 MiB",
                got: block_size.to_string(),
            })
            .into())
        }
        other => return Err(unexpected("Welcome", &other).into()),
    };
    if replica.hashes().block_size() != block_size {
        let replica_path = replica.path().to_path_buf();
        log(format!(
            "rehashing {} with the source's {block_size}-byte blocks",
            replica_path.display()
        ));
        replica.rehash(block_size)?;
    }
    log(format!("connected to {} for {:?}", config.addr, config.name));
    let mut mismatches = 0;
    loop {
        let round_start = counters.received();
        let before = replica.stats();
        for message in hash_messages(replica.hashes()) {
            conn.queue(&message);
        }
        conn.flush().await?;
        let Message::Plan { size, blocks, digest } = conn.recv_skip_idle().await? else {
            return Err(ConnError::Closed.into());
        };
        let mut incoming = Incoming::new(size, blocks, digest, block_size, config.max_size)
            .map_err(|err| refused(replica, ConnError::Protocol(err)))?;
        let mut block_bytes = 0u64;
        if blocks > 0 || replica.hashes().size() != size || replica.resuming() {
            match receive_blocks(&mut conn, replica, &mut incoming, size).await {
                Ok(bytes) => block_bytes = bytes,
                // Network trouble: what arrived stays staged for the next connection.
                Err(BlocksError::Conn(
                    err @ (ConnError::Io(_) | ConnError::Timeout(_) | ConnError::Closed),
                )) => return Err(err.into()),
                Err(BlocksError::Conn(err)) => return Err(refused(replica, err)),
                Err(BlocksError::Disk(err)) => return Err(err.into()),
            }
        }
        let ours = replica.hashes().digest();
        if ours != incoming.digest() {
            mismatches += 1;
            log(format!(
                "version {} did not verify (the source changed while sending{}); asking again",
                hex8(&incoming.digest()),
                if mismatches > 1 {
                    ", or a hash collided: asking for every block"
                } else {
                    ""
                }
            ));
            if mismatches > 1 {
                replica.start_over()?;
            }
            conn.send(&Message::Published { digest: ours }).await?;
            continue;
        }
        mismatches = 0;
        let changed = replica.resuming();
        let staged = replica.stats();
        replica.publish()?;
        counters.blocks.fetch_add(blocks, Ordering::Relaxed);
        if changed {
            counters.versions.fetch_add(1, Ordering::Relaxed);
        }
        conn.send(&Message::Published { digest: ours }).await?;
        let round = Published {
            size,
            blocks,
            block_bytes,
            wire_bytes: counters.received() - round_start,
            digest: ours,
        };
        log(format!(
            "{} {}: version {} ({} bytes), {} blocks ({} bytes) received, {} bytes on the wire{}",
            if changed { "published" } else { "up to date" },
            replica.path().display(),
            hex8(&round.digest),
            round.size,
            round.blocks,
            round.block_bytes,
            round.wire_bytes,
            staged_from(&staged, &before)
        ));
        if config.once {
            return Ok(());
        }
    }
}

enum BlocksError {
    Conn(ConnError),
    Disk(std::io::Error),
}

/// Receives a plan's blocks into the staging copy, checking each before it is written.
async fn receive_blocks(
    conn: &mut Conn,
    replica: &mut Replica,
    incoming: &mut Incoming,
    size: u64,
) -> Result<u64, BlocksError> {
    let (mut staging, hashes) = replica.stage().map_err(BlocksError::Disk)?;
    apply_size(&mut staging, hashes, size).map_err(BlocksError::Disk)?;
    let mut bytes = 0;
    while incoming.remaining() > 0 {
        let message = conn.recv_skip_idle().await.map_err(BlocksError::Conn)?;
        let Message::Block { index, data } = message else {
            return Err(BlocksError::Conn(unexpected("Block", &message)));
        };
        match incoming.accept(&mut staging, hashes, index, &data) {
            Ok(()) => bytes += data.len() as u64,
            Err(ApplyError::Refused(err)) => return Err(BlocksError::Conn(ConnError::Protocol(err))),
            Err(ApplyError::Target(err)) => return Err(BlocksError::Disk(err)),
        }
    }
    Ok(bytes)
}

/// How this round's staging file was made, for the log line.
fn staged_from(now: &ReplicaStats, before: &ReplicaStats) -> String {
    if now.spares_reused > before.spares_reused {
        format!(
            "; staged in the previous version's inode ({} blocks copied locally)",
            now.blocks_copied - before.blocks_copied
        )
    } else if now.full_copies > before.full_copies {
        "; staged in a full copy".to_string()
    } else {
        String::new()
    }
}

/// A refused transfer: the staging copy is thrown away, so nothing of it is ever published.
fn refused(replica: &mut Replica, err: ConnError) -> SessionOutcome {
    if let Err(io) = replica.discard() {
        return SessionOutcome::Fatal(ReceiveError::Replica(io));
    }
    SessionOutcome::Fatal(SessionError::Conn(err).into())
}
