//! The orderflow binary's wiring: which roles run, on which broker and database, and how they
//! start and stop together. No role logic lives here.
//!
//! - [`pipeline`] starts any set of roles on a shared cancellation token and drains them.
//! - [`embedded`] is what `orderflow dev` adds: the in-process broker and the SQLite data
//!   directory kept consistent with it.
//! - [`admin`] holds the operator commands: inventory load, review, the stand-alone broker.
//! - [`loadgen`] posts realistic random orders to a running instance and reads back the result.

pub mod admin;
pub mod embedded;
pub mod loadgen;
pub mod pipeline;
