//! `serve --store` and `export` in terms of the store crate: the decisions (what a store
//! string names, store before ACK, the reply to a failed commit) are
//! [`mllp_store::StoreSpec`] and [`mllp_store::StoreThenAck`]; this file only maps flags onto
//! them and logs each AR the same way in every mode ([`log_rejected`]). A failed commit is a
//! handler failure: the server answers it under its NAK policy and its observer logs it
//! (`message failed`, with the store's error).

use std::net::SocketAddr;
use std::sync::Arc;

use mllp_reactor::ack::AckCode;
use mllp_reactor::msh::Msh;
use mllp_reactor::{ConnectionId, Handler};
use mllp_store::{Health, OpenOptions, PostgresOptions, Store, StoreThenAck};

/// [`StoreThenAck`] over `store`, logging each AR (a stored message without a usable
/// MSH-10) as `--no-store` does.
pub fn store_handler(store: Arc<Store>) -> impl Handler {
    StoreThenAck::new(store).on_ack(|acked| {
        if !acked.code.is_accept() {
            log_rejected(
                acked.connection_id,
                acked.peer,
                acked.sequence,
                acked.code,
                acked.message,
            );
        }
    })
}

/// Logs a message answered with a reject (AR) because it has no usable MSH-10, at warn on
/// `mllp::msg`: connection, peer, sequence, code, why, size. The same line in every mode.
pub fn log_rejected(conn: ConnectionId, peer: SocketAddr, seq: u64, code: AckCode, message: &[u8]) {
    // Only on the reject path: a second parse costs nothing on the AA path.
    let reason = match Msh::parse(message) {
        Ok(_) => "no MSH-10",
        Err(_) => "no readable MSH",
    };
    tracing::warn!(
        target: "mllp::msg",
        conn = %conn,
        peer = %peer,
        seq,
        code = code.as_str(),
        control_id = "",
        reason,
        size = message.len(),
        "message rejected"
    );
}

/// Logs each change of `store`'s health: one line per change, not one per failed message
/// (each failed message is logged by the server as a failed message, with the store's
/// error).
pub fn log_health_changes(store: &Store) {
    store.on_health_change(|health, error| match (health, error) {
        (Health::Ok, _) => tracing::info!(target: "mllp::store", %health, "store commits again"),
        (Health::Broken, Some(error)) => tracing::error!(
            target: "mllp::store",
            %health,
            %error,
            "store cannot store until the server is restarted"
        ),
        (Health::Disconnected, error) => tracing::error!(
            target: "mllp::store",
            %health,
            error = error.map(ToString::to_string),
            "store's database is not connected; reconnecting"
        ),
        (_, error) => tracing::error!(
            target: "mllp::store",
            %health,
            error = error.map(ToString::to_string),
            "store commits are failing"
        ),
    });
}

/// Store options for the CLI: a PostgreSQL password comes from `PGPASSWORD` when the URL has
/// none, as with libpq's tools, so it need not appear in the process list.
pub fn open_options() -> OpenOptions {
    let mut options = OpenOptions::default();
    // Benchmarks only (BENCHMARKS.md, the search indexes' cost end to end): not a flag,
    // since no user should turn the index off.
    let without_patient_index = std::env::var_os("MLLP_BENCH_WITHOUT_PATIENT_INDEX").is_some();
    options.sqlite.bench_without_patient_index = without_patient_index;
    options.postgres = PostgresOptions::default().password(std::env::var("PGPASSWORD").ok());
    options.postgres.bench_without_patient_index = without_patient_index;
    options
}
