//! Fuzz target `helm_index`: see `pullgate::fuzzing::helm_index` for the input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pullgate::fuzzing::helm_index(data));
