//! libFuzzer target: `tanzhen_agent::fuzz::tcp_event` (see agent/src/fuzz.rs) on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tanzhen_agent::fuzz::tcp_event(data));
