//! Stages: each wraps a backend and adds one behaviour, and is itself a [`crate::Backend`]
//! (except the puller, which drives a stage rather than wrapping one).
//!
//! A managed mount composes them as
//! `Arbitrary(Pusher(Synced(local cache, remote)))` with a `Puller` filling the cache.

pub mod arbitrary;
pub mod chunked;
pub mod gate;
pub mod puller;
pub mod pusher;
pub mod reconnect;
pub mod sparse;
pub mod synced;
pub mod tracker;

pub use arbitrary::Arbitrary;
pub use chunked::Chunked;
pub use gate::Gate;
pub use puller::{Priority, PullProgress, PullTarget, Puller, PullerOptions};
pub use pusher::{PushState, Pusher, PusherOptions};
pub use reconnect::{Connector, ReconnectOptions, Reconnecting};
pub use sparse::SkipHoles;
pub use synced::Synced;
pub use tracker::Tracker;
