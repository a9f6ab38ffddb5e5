//! Fuzz target `config`: see `pullgate::fuzzing::config` for the input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzzing::config(data));
