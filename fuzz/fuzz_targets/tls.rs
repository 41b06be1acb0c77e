#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mllp_reactor::tls::__fuzz_server_bytes(data));
