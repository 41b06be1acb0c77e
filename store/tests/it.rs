//! Integration tests of the store: one binary (saves link time), one module per topic.
//! Every wait is bounded by `util::WAIT`; each test uses its own temporary directory.

#[path = "it/util.rs"]
mod util;

#[path = "it/checkpoint.rs"]
mod checkpoint;
#[path = "it/duplicates.rs"]
mod duplicates;
#[path = "it/export.rs"]
mod export;
#[path = "it/forward.rs"]
mod forward;
#[path = "it/fuzz_corpus.rs"]
mod fuzz_corpus;
#[path = "it/health.rs"]
mod health;
#[path = "it/integrity.rs"]
mod integrity;
#[path = "it/open.rs"]
mod open;
// Against a real PostgreSQL that each test starts for itself.
#[cfg(feature = "postgres")]
#[path = "it/pg.rs"]
mod pg;
#[path = "it/retention.rs"]
mod retention;
#[path = "it/search.rs"]
mod search;
#[path = "it/search_index.rs"]
mod search_index;
#[path = "it/then_ack.rs"]
mod then_ack;
#[path = "it/writer.rs"]
mod writer;
