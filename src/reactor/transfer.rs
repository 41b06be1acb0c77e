//! Moving bytes for one connection: the reactor's reads and writes through its transport.

use std::io::{ErrorKind, IoSlice};
use std::time::Instant;

use super::{Entry, MAX_IOV};
use crate::connection::Event;
use crate::reason::CloseReason;
use crate::telemetry::Telemetry;

/// Slices tried before `MAX_IOV`: room for three replies of up to three slices each.
const FEW_IOV: usize = 12;

/// Writes as much of the connection's ready replies (and the transport's own bytes) as the
/// socket takes, many replies per `writev`. Returns whether any progress was made (bytes
/// written or the connection failed).
pub(super) fn write(
    entry: &mut Entry,
    telemetry: &Telemetry,
    now: Instant,
    events: &mut Vec<Event>,
) -> bool {
    let mut progress = false;
    loop {
        if entry.transport.wants_flush() {
            match entry.transport.flush() {
                Ok(n) => {
                    telemetry.metrics.bytes_sent.increment(n as u64);
                    progress |= n > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    entry.write_ready = false;
                    return progress;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    entry.conn.handle_io_error(e.kind(), events);
                    return true;
                }
            }
        }
        // Checked first, and a few slices tried before `MAX_IOV` of them: filling 126 empty
        // slices is 2 KiB of stores, about 400 instructions per message at one reply per
        // write (callgrind), when one reply needs at most 3. Settled, the connection's front
        // slot holds an unwritten reply exactly when `transmit` has bytes to offer.
        if !entry.conn.wants_write() {
            return progress;
        }
        let mut few = [IoSlice::new(&[]); FEW_IOV];
        let n = entry.conn.transmit(&mut few);
        if n == 0 {
            return progress;
        }
        telemetry.metrics.socket_writes.increment(1);
        // `transmit` stops when fewer than 3 slices are left: with more room left than that,
        // it offered everything ready.
        let result = if n + 3 <= FEW_IOV {
            entry.transport.write_vectored(&few[..n])
        } else {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = entry.conn.transmit(&mut slices);
            entry.transport.write_vectored(&slices[..n])
        };
        match result {
            Ok(0) => {
                entry.conn.handle_io_error(ErrorKind::WriteZero, events);
                return true;
            }
            Ok(written) => {
                if entry.transport.writes_through() {
                    // Plain TCP: these bytes reached the socket (a layer counts in flush).
                    telemetry.metrics.bytes_sent.increment(written as u64);
                }
                entry.conn.handle_written(written, now, events);
                progress = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                entry.write_ready = false;
                return progress;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                entry.conn.handle_io_error(e.kind(), events);
                return true;
            }
        }
    }
}

/// One read into the reactor's scratch buffer, handed to the connection. Returns whether any
/// progress was made.
pub(super) fn read(
    entry: &mut Entry,
    scratch: &mut [u8],
    telemetry: &Telemetry,
    now: Instant,
    events: &mut Vec<Event>,
) -> bool {
    match entry.transport.read(scratch) {
        Ok(0) if !entry.conn.is_started() => {
            // Gone before its TLS handshake completed.
            entry.read_ready = false;
            entry
                .conn
                .handle_start_failed(CloseReason::TlsHandshake, events);
            true
        }
        Ok(0) => {
            entry.read_ready = false;
            entry.conn.handle_eof(events);
            true
        }
        Ok(n) => {
            telemetry.metrics.bytes_received.increment(n as u64);
            entry.conn.handle_read(&scratch[..n], now, events);
            true
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            entry.read_ready = false;
            false
        }
        Err(e) if e.kind() == ErrorKind::Interrupted => true,
        Err(e) => {
            #[cfg(feature = "tls")]
            if let Some(failure) = crate::tls::TlsFailure::from_io(&e) {
                use crate::tls::TlsFailureKind as K;
                let reason = match failure.kind() {
                    K::Plaintext => CloseReason::TlsPlaintext,
                    K::NoClientCert => CloseReason::TlsNoClientCert,
                    K::BadClientCert => CloseReason::TlsBadClientCert,
                    _ if !entry.conn.is_started() => CloseReason::TlsHandshake,
                    _ => CloseReason::Io(e.kind()),
                };
                entry.conn.handle_start_failed(reason, events);
                return true;
            }
            entry.conn.handle_io_error(e.kind(), events);
            true
        }
    }
}
