//! `pipe serve`: the integration service on one machine.
//!
//! The service loads every pipeline of a folder as an integration ([`catalog`]), keeps
//! watching the folder, plans each schedule's ticks and enqueues them in the store (the one
//! place that decides "this tick exists once"), and runs N workers in the same process that
//! claim queued runs from the store and start them through the runner. Every decision that
//! must survive a crash (ticks, queue, leases, enabled flags) lives in the store, never only
//! in this process's memory: a restart, a second server on the same PostgreSQL or a
//! `kill -9` changes nothing about which runs exist.

pub mod catalog;

pub use catalog::{Catalog, Change, Integration};
