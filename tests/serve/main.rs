//! End-to-end tests of `tenantd serve`: real processes of the built binary,
//! real signals, real sockets on 127.0.0.1, the file store (and moto for
//! the S3 path).

mod cluster;
mod commit_log;
mod failover;
mod input;
mod lifecycle;
mod limits;
mod pipeline;
mod routing;
mod sandbox;
mod sql;
#[path = "../support/mod.rs"]
mod support;
