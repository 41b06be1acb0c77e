//! One batch in one transaction: ids, duplicates, `INSERT` and `COMMIT`.

use std::collections::HashMap;

use futures_util::future::join;
use tokio_postgres::types::ToSql;

use super::connection::Connection;
use super::sql::begin_locked;
use crate::record::{Record, StoreOutcome, text};

/// Columns of a batch as parallel arrays, for [`INSERT`](super::sql::INSERT).
#[derive(Default)]
struct Columns<'a> {
    ids: Vec<i64>,
    received: Vec<i64>,
    peer: Vec<String>,
    local: Vec<String>,
    connection_id: Vec<i64>,
    sequence: Vec<i64>,
    app: Vec<Option<String>>,
    facility: Vec<Option<String>>,
    message_type: Vec<Option<String>>,
    control: Vec<Option<String>>,
    size: Vec<i64>,
    duplicate_of: Vec<Option<i64>>,
    payload: Vec<&'a [u8]>,
    client_cert: Vec<Option<String>>,
    patient: Vec<Option<String>>,
}

/// How a batch failed: whether its transaction may still be open, is over, or may have
/// committed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// Before the `INSERT`: the transaction is open (aborted) and needs a `ROLLBACK`.
    Open,
    /// The server rejected the `INSERT` (or the `COMMIT`): nothing committed.
    Ended,
    /// The connection failed after `INSERT` and `COMMIT` were sent: it may have committed,
    /// with these outcomes (the ids were allocated under the lock, so the batch's first id
    /// tells whether it did).
    Unknown(Vec<StoreOutcome>),
}

/// Stores `batch` in one transaction under the store's lock, in two round trips:
/// `BEGIN` + lock + ids and originals, then `INSERT` + `COMMIT` (each pair pipelined).
pub(super) fn insert_batch(
    conn: &mut Connection,
    batch: &[Record],
    window_us: i64,
) -> Result<Vec<StoreOutcome>, (tokio_postgres::Error, Failure)> {
    let mut cols = Columns::default();
    for record in batch {
        let header = record.header();
        cols.received.push(record.received_at_us());
        cols.peer.push(record.origin.peer.to_string());
        cols.local.push(record.origin.local.to_string());
        cols.connection_id.push(record.origin.connection_id as i64);
        cols.sequence.push(record.origin.sequence as i64);
        cols.app.push(column(header.sending_application));
        cols.facility.push(column(header.sending_facility));
        cols.message_type.push(column(header.message_type));
        cols.control.push(column(header.control_id));
        cols.size
            .push(i64::try_from(record.size()).unwrap_or(i64::MAX));
        cols.payload.push(&record.payload[..]);
        cols.client_cert.push(record.client_cert_text());
        cols.patient.push(column(header.patient_id));
    }
    // The records that can be resends, and the oldest original time each accepts.
    let keyed: Vec<usize> = (0..batch.len())
        .filter(|&i| cols.control[i].is_some())
        .collect();
    let since: Vec<i64> = keyed
        .iter()
        .map(|&i| cols.received[i].saturating_sub(window_us))
        .collect();

    let n = i64::try_from(batch.len()).unwrap_or(i64::MAX);
    fn pick<'a>(col: &'a [Option<String>], keyed: &[usize]) -> Vec<Option<&'a str>> {
        keyed.iter().map(|&i| col[i].as_deref()).collect()
    }
    let (control, app, facility) = (
        pick(&cols.control, &keyed),
        pick(&cols.app, &keyed),
        pick(&cols.facility, &keyed),
    );
    let client = &conn.client;
    let begin = begin_locked();
    // Sent together; the server runs the lookup after the lock is granted, with a snapshot
    // taken then, so it sees every batch committed before ours.
    let (locked, row) = conn.block_on(join(
        client.batch_execute(&begin),
        client.query_one(
            &conn.ids_and_originals,
            &[&control, &app, &facility, &since, &n],
        ),
    ));
    let open = |e| (e, Failure::Open);
    locked.map_err(open)?;
    let row = row.map_err(open)?;
    let last: i64 = row.try_get(0).map_err(open)?;
    let in_store: Vec<Option<i64>> = row.try_get(1).map_err(open)?;
    cols.ids = (last - n + 1..=last).collect();
    // Resolve duplicates in batch order: an original in the store comes first (lower id);
    // otherwise an earlier original of this batch within the window.
    cols.duplicate_of = vec![None; batch.len()];
    // (control id, sending application, sending facility) → this batch's originals with it.
    type Key<'k> = (&'k str, Option<&'k str>, Option<&'k str>);
    let mut batch_originals: HashMap<Key<'_>, Vec<usize>> = HashMap::new();
    for (k, &i) in keyed.iter().enumerate() {
        let key = (
            cols.control[i].as_deref().unwrap_or_default(),
            cols.app[i].as_deref(),
            cols.facility[i].as_deref(),
        );
        let earlier = batch_originals
            .get(&key)
            .and_then(|js| js.iter().find(|&&j| cols.received[j] >= since[k]))
            .map(|&j| cols.ids[j]);
        match in_store.get(k).copied().flatten().or(earlier) {
            Some(original) => cols.duplicate_of[i] = Some(original),
            None => batch_originals.entry(key).or_default().push(i),
        }
    }
    let params: [&(dyn ToSql + Sync); 15] = [
        &cols.ids,
        &cols.received,
        &cols.peer,
        &cols.local,
        &cols.connection_id,
        &cols.sequence,
        &cols.app,
        &cols.facility,
        &cols.message_type,
        &cols.control,
        &cols.size,
        &cols.duplicate_of,
        &cols.payload,
        &cols.client_cert,
        &cols.patient,
    ];
    let outcomes: Vec<StoreOutcome> = cols
        .ids
        .iter()
        .zip(&cols.duplicate_of)
        .map(|(&id, &dup)| StoreOutcome::new(id, dup))
        .collect();
    let (inserted, committed) = conn.block_on(join(
        client.execute(&conn.insert, &params),
        client.batch_execute("COMMIT"),
    ));
    match (inserted, committed) {
        (Ok(_), Ok(())) => Ok(outcomes),
        // The server answered: a COMMIT after a failed INSERT only ends the aborted
        // transaction, and a COMMIT that fails commits nothing.
        (Err(e), _) | (Ok(_), Err(e)) if e.as_db_error().is_some() => Err((e, Failure::Ended)),
        // No answer: the connection died with both sent, so the server may have run the
        // COMMIT (its reply was lost). Whether it did is looked up, never guessed: guessing
        // "no" and retrying would store the batch twice.
        (Err(e), _) | (Ok(_), Err(e)) => Err((e, Failure::Unknown(outcomes))),
    }
}

/// An MSH field as a text column value: lossy UTF-8 as in SQLite, NUL (which PostgreSQL text
/// cannot hold) replaced by U+FFFD.
fn column(field: Option<&[u8]>) -> Option<String> {
    text(field).map(|t| pg_text(&t))
}

pub(super) fn pg_text(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_never_reaches_a_text_column() {
        assert_eq!(column(Some(b"A\0B")).as_deref(), Some("A\u{FFFD}B"));
        assert_eq!(column(None), None);
    }
}
