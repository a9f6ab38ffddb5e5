//! Blob stores that need no particular host: they are built on the core's ports only
//! ([`Upstream`](crate::core::ports::Upstream) for their HTTP, [`Clock`](crate::core::ports::Clock)
//! for signing times), so any host with outbound HTTP can use them. Each is behind its own
//! cargo feature, which the hosts that use it turn on. Host-bound stores (files natively, R2
//! on Workers, the Spin key-value store) stay in their host's module.

#[cfg(feature = "s3")]
pub mod s3;
