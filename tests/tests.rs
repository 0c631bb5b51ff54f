//! The one integration-test binary: every test drives the real `pipe` binary.
//! (One binary links once: with Polars in the tree, twenty would cost minutes.)

mod util;

mod api;
mod carol;
mod cli;
mod cluster;
mod credentials;
mod dashboard;
mod deploy;
mod exec;
mod executor;
mod extract;
mod fidelity;
mod foreach;
mod fresh_machine;
mod history;
mod notify;
mod qockpit;
mod redaction;
mod repair;
mod sandbox;
mod schedule;
mod schema;
mod serve;
mod sql;
mod store;
mod validate;
