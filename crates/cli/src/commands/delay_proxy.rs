//! `r3map delay-proxy`: WAN latency and bandwidth on loopback, without kernel netem.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use r3map_delay_proxy::{DelayConfig, DelayProxy};
use r3map_mount::{format_bytes, parse_duration, parse_size};

/// Forward TCP connections to an upstream, adding round-trip latency and an optional rate cap
///
/// Every byte is held for half the RTT in each direction, so a request/response exchange through
/// the proxy takes one RTT longer. Use it between `r3map serve` and a client to see how a mount
/// behaves over a WAN. Runs until interrupted.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1:10810")]
    listen: SocketAddr,
    /// Address to forward to (host:port)
    #[arg(long, default_value = "127.0.0.1:10809")]
    upstream: String,
    /// Round-trip time to add, e.g. 25ms
    #[arg(long, value_parser = parse_duration)]
    rtt: Duration,
    /// Maximum throughput per direction in bytes per second, e.g. 100MiB
    #[arg(long, value_parser = parse_size)]
    rate: Option<u64>,
}

pub async fn run(args: Args) -> Result<()> {
    let mut signals = crate::ShutdownSignals::catch()?;
    let config = DelayConfig {
        rtt: args.rtt,
        rate: args.rate,
    };
    let proxy = DelayProxy::start(args.listen, args.upstream.clone(), config)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let rate = args
        .rate
        .map_or("unlimited".to_string(), |r| format!("{}/s", format_bytes(r)));
    eprintln!(
        "delaying {} -> {} by {:?} round trip, rate {rate}; Ctrl-C stops",
        proxy.local_addr(),
        args.upstream,
        args.rtt
    );
    signals.recv().await;
    Ok(())
}
