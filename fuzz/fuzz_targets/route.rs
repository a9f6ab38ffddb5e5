//! Fuzz target `route`: see `pullgate::fuzzing::route` for the input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzzing::route(data));
