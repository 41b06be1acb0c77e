//! What only a connection with bytes in hand needs: its read buffer and frame decoder (64
//! bytes), behind one pointer (8 bytes) that an idle connection gives back to the thread's pool
//! (see `pool`). An idle connection between frames has an empty buffer and a decoder seeking
//! the next start byte: nothing worth keeping per connection.

use bytes::BytesMut;

use super::pool;
use crate::codec::FrameDecoder;

/// The read buffer and decoder of a connection, or nothing while it is idle.
#[derive(Debug, Default)]
pub(super) struct Busy(Option<Box<Parts>>);

#[derive(Debug)]
pub(super) struct Parts {
    /// Received bytes not yet handed out as frames (see `Connection`).
    pub(super) buf: BytesMut,
    pub(super) decoder: FrameDecoder,
}

impl Busy {
    /// The parts, taken from the thread's pool (a pooled read buffer, a fresh decoder) if the
    /// connection has none; the buffer too if it was given back alone.
    pub(super) fn parts(&mut self, max_payload: usize) -> &mut Parts {
        let parts = self.0.get_or_insert_with(|| {
            let mut parts = pool::take_parts().unwrap_or_else(|| {
                Box::new(Parts {
                    buf: BytesMut::new(),
                    decoder: FrameDecoder::new(max_payload),
                })
            });
            parts.decoder = FrameDecoder::new(max_payload);
            parts
        });
        if parts.buf.capacity() == 0 {
            parts.buf = pool::take_buffer();
        }
        parts
    }

    /// The parts, if the connection holds them.
    pub(super) fn get(&self) -> Option<&Parts> {
        self.0.as_deref()
    }

    /// The parts, if the connection holds them, without taking any from the pool.
    pub(super) fn get_mut(&mut self) -> Option<&mut Parts> {
        self.0.as_deref_mut()
    }

    /// Bytes in the read buffer.
    pub(super) fn len(&self) -> usize {
        self.get().map_or(0, |p| p.buf.len())
    }

    /// Whether the read buffer is empty (or absent).
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The read buffer's capacity (0 when absent).
    pub(super) fn capacity(&self) -> usize {
        self.get().map_or(0, |p| p.buf.capacity())
    }

    /// Whether a frame is under way (its start byte seen).
    pub(super) fn in_frame(&self) -> bool {
        self.get().is_some_and(|p| p.decoder.in_frame())
    }

    /// Gives the (empty) read buffer back to the pool (`large`: see [`pool::put_buffer`]),
    /// and the parts too unless a frame is under way (its start byte was taken from the
    /// buffer, so the decoder must remember it).
    pub(super) fn release(&mut self, large: usize) {
        let Some(parts) = self.0.as_mut() else {
            return;
        };
        pool::put_buffer(std::mem::take(&mut parts.buf), large);
        if !parts.decoder.in_frame()
            && let Some(parts) = self.0.take()
        {
            pool::put_parts(parts);
        }
    }

    /// Drops the buffer and the decoder's state (the connection is closing or stops
    /// dispatching): nothing goes back to the pool, the buffer may hold garbage.
    pub(super) fn discard(&mut self) {
        self.0 = None;
    }
}
