//! Tables between steps: a Polars `DataFrame` behind the engine's opaque [`Table`] handle.
//!
//! The engine never looks inside a table (it only asks the row count), so it builds without
//! Polars; steps put a `DataFrame` in with [`table`] and take it out with [`frame`].

use engine::step::{Table, TableData};
use polars::prelude::*;
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

/// `foreach` over Polars tables: combine the items' tables, split an input by item.
#[derive(Debug, Default)]
pub struct FrameOps;

/// The name of the column a `foreach` step adds to its combined table.
pub const ITEM_COLUMN: &str = "item";

fn key_series(key: &serde_json::Value, len: usize, as_text: bool) -> Column {
    match key {
        serde_json::Value::Number(n) if !as_text && n.is_i64() => {
            Column::new_scalar(ITEM_COLUMN.into(), Scalar::from(n.as_i64().unwrap()), len)
        }
        other => {
            let text = match other {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            Column::new_scalar(
                ITEM_COLUMN.into(),
                Scalar::from(PlSmallStr::from(text)),
                len,
            )
        }
    }
}

impl engine::step::TableOps for FrameOps {
    fn combine(&self, parts: Vec<(serde_json::Value, Table)>) -> Result<Table, String> {
        // The `item` column is an integer when every key is one, else text.
        let as_text = !parts.iter().all(|(k, _)| k.as_i64().is_some());
        // Columns unioned in first-seen order; each column's type is its first one's.
        let mut schema: Vec<(PlSmallStr, DataType)> = Vec::new();
        for (_, t) in &parts {
            let df = frame(t).ok_or("not a table")?;
            for c in df.get_columns() {
                if c.name().as_str() != ITEM_COLUMN && !schema.iter().any(|(n, _)| n == c.name()) {
                    schema.push((c.name().clone(), c.dtype().clone()));
                }
            }
        }
        let mut out: Option<DataFrame> = None;
        for (key, t) in &parts {
            let df = frame(t).ok_or("not a table")?;
            let h = df.height();
            let mut cols = vec![key_series(key, h, as_text)];
            for (name, dtype) in &schema {
                cols.push(match df.column(name) {
                    Ok(c) if c.dtype() == dtype => c.clone(),
                    Ok(c) => c.strict_cast(dtype).map_err(|e| {
                        format!(
                            "column `{name}` is {} in item {key} but {dtype} before: {e}",
                            c.dtype()
                        )
                    })?,
                    Err(_) => Column::full_null(name.clone(), h, dtype),
                });
            }
            let part = DataFrame::new(cols).map_err(|e| e.to_string())?;
            match &mut out {
                None => out = Some(part),
                Some(acc) => {
                    acc.vstack_mut_owned(part).map_err(|e| e.to_string())?;
                }
            }
        }
        let mut df = out.ok_or("no tables to combine")?;
        df.rechunk_mut();
        Ok(table(df))
    }

    fn rows_of_item(&self, t: &Table, key: &serde_json::Value) -> Result<Option<Table>, String> {
        let df = frame(t).ok_or("not a table")?;
        let Ok(col) = df.column(ITEM_COLUMN) else {
            return Ok(None);
        };
        let wanted = match key {
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let text = col.cast(&DataType::String).map_err(|e| e.to_string())?;
        let mask = text
            .str()
            .map_err(|e| e.to_string())?
            .equal(wanted.as_str());
        let own = df
            .filter(&mask)
            .and_then(|d| d.drop(ITEM_COLUMN))
            .map_err(|e| e.to_string())?;
        Ok(Some(table(own)))
    }

    fn save(&self, t: &Table, path: &std::path::Path) -> Result<(), String> {
        let mut df = frame(t).ok_or("not a table")?.clone();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        // Written beside and renamed, so a reader never sees half a file.
        let partial = path.with_extension("parquet.partial");
        let file =
            std::fs::File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        ParquetWriter::new(file)
            .finish(&mut df)
            .map_err(|e| format!("{}: {e}", partial.display()))?;
        // (the size written is not needed)
        std::fs::rename(&partial, path).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn load(&self, path: &std::path::Path) -> Result<Table, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        ParquetReader::new(file)
            .finish()
            .map(table)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::step::TableOps;
    use serde_json::json;

    fn t(df: DataFrame) -> Table {
        table(df)
    }

    #[test]
    fn combine_unions_columns_and_splits_back_by_key() {
        let a = t(df!("id" => [1i64, 2], "amount" => [10i64, 20]).unwrap());
        let b = t(df!("id" => [3i64], "region" => ["S"]).unwrap());
        let all = FrameOps
            .combine(vec![(json!(7), a), (json!(8), b)])
            .unwrap();
        let df = frame(&all).unwrap();
        assert_eq!(
            df.get_column_names_str(),
            ["item", "id", "amount", "region"]
        );
        assert_eq!(df.column("item").unwrap().dtype(), &DataType::Int64);
        assert_eq!(df.column("amount").unwrap().null_count(), 1);
        let eight = FrameOps.rows_of_item(&all, &json!(8)).unwrap().unwrap();
        let eight = frame(&eight).unwrap();
        assert_eq!(eight.height(), 1);
        assert_eq!(eight.get_column_names_str(), ["id", "amount", "region"]);
        // Text keys too; a table without an item column is not split.
        let x = t(df!("v" => [1i64]).unwrap());
        assert!(FrameOps.rows_of_item(&x, &json!("a")).unwrap().is_none());
    }

    #[test]
    fn a_column_that_cannot_take_the_first_items_type_fails_naming_the_item() {
        let a = t(df!("amount" => [10i64]).unwrap());
        let b = t(df!("amount" => ["ten"]).unwrap());
        let err = FrameOps
            .combine(vec![(json!("north"), a), (json!("south"), b)])
            .unwrap_err();
        assert!(
            err.contains("column `amount`") && err.contains("south"),
            "{err}"
        );
    }
}
