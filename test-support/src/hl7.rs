//! Sample HL7 v2 messages.

/// A sample ADT^A01 message (unframed, segments ending in CR) whose MSH-10 is `control_id`.
pub fn adt_a01(control_id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|GHH LAB|GHH|20260101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r\
         EVN||20260101120000\r\
         PID|1||PATID1234^^^GOOD HEALTH HOSPITAL^MR||EVERYMAN^ADAM^A^III||19610615|M\r"
    )
    .into_bytes()
}
