//! The `pipe` language and runtime.
//!
//! Data flows one way: YAML text → spanned [`yaml::Node`] tree → typed [`model::Pipeline`]
//! → validated [`plan::Plan`] (a petgraph DAG) → [`executor`] → step runners → observers
//! (the `store` crate records them; engine knows only [`events::Observer`] and
//! [`step::HistoryView`]).
//! This crate never names a concrete step type: steps arrive through a [`step::Registry`]
//! built by the `steps` crate, and tables travel as opaque [`step::Table`] handles, so
//! `engine` (and `pipe validate`) builds without Polars or any network client.

pub mod connection;
pub mod de;
pub mod diag;
pub mod duration;
pub mod events;
pub mod executor;
pub mod host;
pub mod model;
pub mod params;
pub mod plan;
pub mod repair;
pub mod schedule_check;
pub mod schema;
pub mod secrets;
pub mod status;
pub mod step;
pub mod template;
pub mod validate;
pub mod yaml;
