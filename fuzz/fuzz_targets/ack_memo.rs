#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mllp_reactor::__fuzz::ack_memo(data));
