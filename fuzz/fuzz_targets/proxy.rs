#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mllp_reactor::proxy::__fuzz_decode(data));
