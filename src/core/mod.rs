//! The host-agnostic core: routing, validation, cache policy and the registry pull protocol,
//! over the ports in [`ports`]. No tokio, no filesystem, no wall-clock reads: it compiles for
//! `wasm32-unknown-unknown` and `wasm32-wasip2`, and every host calls [`app::App::handle`].

pub mod access;
pub mod admin;
pub mod app;
pub mod auth;
pub(crate) mod blobs;
pub mod body;
pub mod config;
pub mod digest_check;
pub mod error;
pub mod gateway;
pub mod helm;
pub mod links;
pub mod manifests;
pub mod media;
pub mod metrics;
pub mod outbound;
pub mod ports;
pub mod range;
pub mod reference;
pub mod route;
pub mod store_keys;
pub(crate) mod tags;
pub mod upstream;
