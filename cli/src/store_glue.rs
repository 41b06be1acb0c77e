//! `serve --store` and `export --store` in terms of the store crate: the decisions (what a
//! store string names, store before ACK, the reply to a failed commit) are
//! [`mllp_store::StoreSpec`] and [`mllp_store::StoreThenAck`]; this file only maps flags onto
//! them and logs the AR of a stored message without MSH-10.
//!
//! This file is also compiled into `tests/store.rs` (`#[path]`), so it depends only on the
//! library crates.

use std::sync::Arc;

use mllp_reactor::Handler;
use mllp_reactor::ack::AckCode;
use mllp_store::{
    Health, OpenOptions, PostgresOptions, Store, StoreConfig, StoreSpec, StoreThenAck, WriteGate,
};

/// [`StoreThenAck`] over `store`, logging each AR (a stored message without a usable
/// MSH-10) as `--no-store` does. A failed commit is a handler failure: the server answers
/// it under its NAK policy and logs it as a failed message.
pub fn store_handler(store: Arc<Store>) -> impl Handler {
    StoreThenAck::new(store).on_ack(|acked| {
        if acked.code != AckCode::AA {
            tracing::warn!(
                target: "mllp::msg",
                conn = %acked.connection_id,
                peer = %acked.peer,
                seq = acked.sequence,
                code = %acked.code,
                control_id = "",
                reason = "no MSH-10",
                id = acked.outcome.id,
                size = acked.message.len(),
                "message rejected"
            );
        }
    })
}

/// Opens the store `serve --store` names with `config`'s caps. Returns it, the line `serve`
/// prints ("storing to …") and, for SQLite, the writer's gate (for the retention pruner).
pub fn open_store(
    spec: &str,
    allow_async_commit: bool,
    config: StoreConfig,
) -> Result<(Store, String, Option<WriteGate>), String> {
    let spec = StoreSpec::parse(spec).map_err(|e| format!("--store: {e}"))?;
    if allow_async_commit && !spec.is_postgres() {
        return Err(
            "--allow-async-commit applies only to a PostgreSQL store (--store postgres://…)"
                .to_owned(),
        );
    }
    let mut options = open_options();
    options.postgres = options.postgres.allow_async_commit(allow_async_commit);
    let store = Store::open(&spec, &options, config).map_err(|e| e.to_string())?;
    let shown = format!("storing to {}", store.summary());
    // One line per change of the store's health, not one per failed message (each failed
    // message is logged by the server as a failed message, with the store's error).
    store.on_health_change(|health, error| match (health, error) {
        (Health::Ok, _) => tracing::info!(target: "mllp::store", %health, "store commits again"),
        (Health::Broken, Some(error)) => tracing::error!(
            target: "mllp::store",
            %health,
            %error,
            "store cannot store until the server is restarted"
        ),
        (_, error) => tracing::error!(
            target: "mllp::store",
            %health,
            error = error.map(ToString::to_string),
            "store commits are failing"
        ),
    });
    let gate = store.write_gate().cloned();
    Ok((store, shown, gate))
}

/// Store options for the CLI: a PostgreSQL password comes from `PGPASSWORD` when the URL has
/// none, as with libpq's tools, so it need not appear in the process list.
pub fn open_options() -> OpenOptions {
    let mut options = OpenOptions::default();
    options.postgres = PostgresOptions::default().password(std::env::var("PGPASSWORD").ok());
    options
}
