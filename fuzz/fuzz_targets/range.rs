//! Fuzz target `range`: see `pullgate::fuzzing::range` for the input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzzing::range(data));
