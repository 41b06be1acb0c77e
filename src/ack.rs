//! ack (to be written)
