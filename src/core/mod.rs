//! The host-agnostic core: routing, validation, cache policy and the registry pull protocol,
//! over the ports in [`ports`]. No tokio, no filesystem, no wall-clock reads: it compiles for
//! `wasm32-unknown-unknown` and `wasm32-wasip2`, and every host calls [`app::App::handle`].
//!
//! The dependency direction is one rule (checked by `tests/layering.rs`; see
//! `docs/ARCHITECTURE.md`): leaves import only leaves; features (`registry`, `access`, `helm`,
//! `gateway`, `admin`) import leaves and [`context`], never [`app`] and never each other's
//! internals; only [`app`] dispatches to them.

pub mod access;
pub mod admin;
pub mod app;
pub mod body;
pub mod cidr;
pub mod config;
pub(crate) mod context;
pub mod ct;
pub mod digest_check;
pub mod error;
pub mod forwarded;
pub mod freshness;
pub mod gateway;
pub mod glob;
pub mod helm;
pub mod http;
pub mod metrics;
pub mod outbound;
pub mod ports;
pub mod registry;
pub mod time;
