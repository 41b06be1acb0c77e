//! Integration tests: one binary (saves link time on 2-core CI), one module per concern.
//!
//! Loopback and port 0 only; every blocking call has a timeout and every wait a deadline (see
//! `it/util.rs` and `it/obs_util.rs`).

#[path = "it/util.rs"]
mod util;

#[path = "it/client.rs"]
mod client;
#[path = "it/framing.rs"]
mod framing;
#[path = "it/fuzz_corpus.rs"]
mod fuzz_corpus;
#[path = "it/listener.rs"]
mod listener;
#[path = "it/load.rs"]
mod load;
#[path = "it/metrics.rs"]
mod metrics;
#[path = "it/net.rs"]
mod net;
#[path = "it/obs_util.rs"]
mod obs_util;
#[path = "it/observer.rs"]
mod observer;
#[path = "it/outcomes.rs"]
mod outcomes;
#[path = "it/peers.rs"]
mod peers;
#[path = "it/proxy.rs"]
mod proxy;
#[path = "it/reply_path.rs"]
mod reply_path;
#[path = "it/timeouts.rs"]
mod timeouts;
