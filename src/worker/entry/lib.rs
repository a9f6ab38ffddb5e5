//! The Workers bundle: links `pullgate` with its `worker` feature so that this cdylib exports
//! the `fetch` handler defined in `pullgate::worker` (`src/worker/mod.rs`). Nothing else lives
//! here.

extern crate pullgate;
