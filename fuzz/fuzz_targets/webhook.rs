//! Fuzz target `webhook`: see `pullgate::fuzzing::webhook` for the input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzzing::webhook(data));
