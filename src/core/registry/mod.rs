//! The registry pull protocol (the pull side of the OCI distribution spec): routes and names,
//! the upstream client with its token dance, and the three endpoints (manifests, blobs, tag
//! lists) with their cache records and per-repository links.
//!
//! Leaves other features may use: [`reference`], [`media`], [`range`], [`keys`], [`route`]
//! (resolving an upstream), [`upstream`] (the client). The endpoint modules are reached only
//! through `app`.

pub mod auth;
pub(crate) mod blobs;
pub mod config;
pub(crate) mod fill;
mod fill_log;
pub mod keys;
pub mod links;
pub mod manifests;
pub mod media;
pub mod range;
pub mod records;
pub mod reference;
pub mod route;
pub(crate) mod tag_flight;
pub(crate) mod tags;
mod transfer;
pub mod upstream;
pub(crate) mod warm_tags;
