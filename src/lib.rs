//! pullgate: an edge registry cache and build-trigger gateway.
//!
//! One pure core ([`core`]) runs in three hosts: [`native`] (one binary, embedded storage; the
//! default), Cloudflare Workers (`worker` feature, issue #3) and Spin (`spin` feature,
//! issue #4). Hosts are thin adapters that build the ports from their bindings and call
//! [`core::app::App::handle`].

pub mod core;
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
