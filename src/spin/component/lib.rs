//! The Spin component: links `pullgate` with its `spin` feature so that this cdylib exports the
//! `wasi:http/incoming-handler` defined in `pullgate::spin` (`src/spin/mod.rs`). Nothing else
//! lives here.

extern crate pullgate;
