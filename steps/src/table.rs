//! Tables between steps: a Polars `DataFrame` behind the engine's opaque [`Table`] handle.
//!
//! The engine never looks inside a table (it only asks the row count), so it builds without
//! Polars; steps put a `DataFrame` in with [`table`] and take it out with [`frame`].

use engine::step::{Table, TableData};
use polars::prelude::DataFrame;
use std::any::Any;
use std::sync::Arc;

/// A `DataFrame` as a table that flows between steps.
#[derive(Debug)]
pub struct Frame(pub DataFrame);

impl TableData for Frame {
    fn rows(&self) -> u64 {
        self.0.height() as u64
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Wrap a `DataFrame` for the executor.
pub fn table(df: DataFrame) -> Table {
    Arc::new(Frame(df))
}

/// The `DataFrame` inside a table (every table in pipe is one).
pub fn frame(t: &Table) -> Option<&DataFrame> {
    t.as_any().downcast_ref::<Frame>().map(|f| &f.0)
}
