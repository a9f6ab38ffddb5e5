//! pullgate: an edge registry cache and build-trigger gateway.
//!
//! One pure core ([`core`]) runs in three hosts: [`native`] (one binary, embedded storage; the
//! default), Cloudflare Workers (`worker` feature, issue #3) and Spin (`spin` feature,
//! issue #4). Hosts are thin adapters that build the ports from their bindings and call
//! [`core::app::App::handle`].

pub mod core;
/// Log lines for the hosts without `tracing-subscriber` (Workers, Spin).
pub mod logline;
/// Test doubles and store contracts: for this crate's unit tests, and for integration tests
/// through the `test-utils` feature (on in every `cargo test`, see Cargo.toml).
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

#[doc(hidden)]
pub mod fuzzing;

#[cfg(feature = "native")]
pub mod native;

#[cfg(feature = "worker")]
pub mod worker;

#[cfg(feature = "spin")]
pub mod spin;

pub mod stores;
