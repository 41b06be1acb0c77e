//! mllp-reactor: a high-throughput MLLP (HL7 v2) receiver.
//!
//! (Crate documentation is filled in as the modules land.)
#![doc(test(attr(deny(warnings))))]
#![warn(missing_docs)]

pub mod ack;
pub mod codec;
pub mod msh;
pub mod timer;

#[doc(hidden)]
#[path = "fuzz.rs"]
pub mod __fuzz;
