//! Fuzz target `challenge`: see `pullgate::fuzzing::challenge` for the input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzzing::challenge(data));
