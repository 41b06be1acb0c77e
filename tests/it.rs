//! Integration tests: one binary (saves link time on 2-core CI), one module per concern.

#[path = "it/client.rs"]
mod client;
#[path = "it/fuzz_corpus.rs"]
mod fuzz_corpus;
#[path = "it/metrics.rs"]
mod metrics;
#[path = "it/obs_util.rs"]
mod obs_util;
#[path = "it/observer.rs"]
mod observer;
#[path = "it/server.rs"]
mod server;
