//! Fuzz entry points, as in the core (`mllp_reactor::__fuzz`): each
//! `fuzz/fuzz_targets/store_*.rs` is one line calling a function here, so `cargo test -p
//! mllp-store` replays the corpus through exactly the code the fuzzer runs.

use mllp_reactor::msh::{Encoding, Msh};

use crate::record::{Header, text};

/// Fuzz target `store_header`: [`Header::parse`], the stored header columns, on any bytes.
///
/// Input: the payload. Checks: MSH-3, -4, -9 and -10 are the core's `Msh::parse` fields, empty
/// ones `None`; PID-3.1 equals a byte-at-a-time reference (split into segments at CR or LF,
/// the first `PID` segment, its fourth field, the first repetition, component and
/// subcomponent), `None` when empty; each column's TEXT equals the lossy UTF-8 decoding of
/// its bytes.
pub fn header(data: &[u8]) {
    let got = Header::parse(data);
    let want = match Msh::parse(data) {
        Ok(msh) => {
            let field = |n| msh.field(n).filter(|f| !f.is_empty());
            Header {
                sending_application: field(3),
                sending_facility: field(4),
                message_type: field(9),
                control_id: field(10),
                patient_id: reference_patient_id(data, msh.encoding()),
            }
        }
        Err(_) => Header::default(),
    };
    assert_eq!(got, want);
    for field in [
        got.sending_application,
        got.sending_facility,
        got.message_type,
        got.control_id,
        got.patient_id,
    ]
    .into_iter()
    .flatten()
    {
        assert_eq!(text(Some(field)).unwrap(), String::from_utf8_lossy(field));
    }
}

/// PID-3.1 the simplest way (the store's first version of it).
fn reference_patient_id(payload: &[u8], enc: Encoding) -> Option<&[u8]> {
    let segment = payload
        .split(|&b| b == b'\r' || b == b'\n')
        .find(|s| s.len() > 3 && s.starts_with(b"PID") && s[3] == enc.field)?;
    let pid3 = segment.split(|&b| b == enc.field).nth(3)?;
    let first = pid3.split(|&b| b == enc.repetition).next()?;
    let id = first.split(|&b| b == enc.component).next()?;
    let id = id.split(|&b| b == enc.subcomponent).next()?;
    (!id.is_empty()).then_some(id)
}
