//! Deterministic simulations of tenantd on tokio's paused clock, each a
//! seeded schedule whose same seed gives the same end state:
//! - [`sim`]: the lease and writer protocol over the session leases.
//! - [`log_sim`]: the commit log (slots, fences, compaction) under faults.
//! - [`service_sim`]: whole machines (registry, actors, routing) over one
//!   in-memory store.
//!
//! Paused time needs tokio's `test-util` feature, which must not reach the
//! shipped binary: this crate is only ever a dev-dependency (of the root
//! package's tests), and the core never depends on it.

pub mod log_sim;
pub mod service_sim;
pub mod sim;
