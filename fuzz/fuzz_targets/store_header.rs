#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mllp_store::__fuzz::header(data));
