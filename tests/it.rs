//! Integration tests: one binary (saves link time on 2-core CI), one module per concern, one
//! harness (`it/support`).
//!
//! Loopback and port 0 only; every blocking call has a timeout and every wait a deadline (the
//! named timeouts of `it/support/mod.rs`). A scenario is tested once: where it has replies,
//! observer events and metrics, the one test checks all three.

#[path = "it/support/mod.rs"]
mod support;

#[path = "it/budget.rs"]
mod budget;
#[path = "it/client.rs"]
mod client;
#[path = "it/framing.rs"]
mod framing;
#[path = "it/fuzz_corpus.rs"]
mod fuzz_corpus;
#[path = "it/layers.rs"]
mod layers;
#[path = "it/listener.rs"]
mod listener;
#[path = "it/load.rs"]
mod load;
#[path = "it/metrics.rs"]
mod metrics;
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
#[cfg(feature = "tls")]
#[path = "it/tls.rs"]
mod tls;
