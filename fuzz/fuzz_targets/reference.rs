//! Fuzz target `reference`: see `pullgate::fuzzing::reference` for the input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzzing::reference(data));
