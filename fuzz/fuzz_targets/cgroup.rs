//! libFuzzer target: `tanzhen_agent::fuzz::cgroup` (see agent/src/fuzz.rs) on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tanzhen_agent::fuzz::cgroup(data));
