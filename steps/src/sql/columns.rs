//! Result rows → typed Polars columns, one batch at a time.
//!
//! Every driver turns a row's values into [`Cell`]s and pushes them into a [`Batcher`]; the
//! batcher keeps one Polars builder per column, turns them into a `DataFrame` every
//! `batch_rows` rows and stacks the batches at the end, so a result is never held as a
//! vector of driver rows. Each backend maps its column types to a [`Kind`] once, from the
//! result's metadata (the types do not depend on the values).

use polars::prelude::*;

/// The Polars type a result column becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    I32,
    I64,
    F64,
    Text,
    Binary,
    /// Exact decimal: i128 mantissas with one scale per column.
    Decimal,
    Date,
    Time,
    /// Timestamp without time zone (naive).
    Datetime,
    /// Timestamp with time zone, stored as UTC.
    DatetimeUtc,
}

/// One value of a row, as a driver decoded it.
#[derive(Debug, Clone, Copy)]
pub enum Cell<'a> {
    Null,
    Bool(bool),
    I32(i32),
    I64(i64),
    F64(f64),
    Str(&'a str),
    Bytes(&'a [u8]),
    /// Mantissa and scale: 12.50 = (1250, 2).
    Dec(i128, u32),
    /// Days since 1970-01-01.
    Date(i32),
    /// Nanoseconds since midnight.
    Time(i64),
    /// Microseconds since 1970-01-01 (UTC for [`Kind::DatetimeUtc`]).
    Ts(i64),
}

enum Col {
    Bool(BooleanChunkedBuilder),
    I32(PrimitiveChunkedBuilder<Int32Type>),
    I64(PrimitiveChunkedBuilder<Int64Type>),
    F64(PrimitiveChunkedBuilder<Float64Type>),
    Text(StringChunkedBuilder),
    Binary(BinaryChunkedBuilder),
    Dec(Vec<Option<i128>>, u32),
}

/// Builds a `DataFrame` from rows pushed cell by cell, in batches.
pub struct Batcher {
    names: Vec<PlSmallStr>,
    kinds: Vec<Kind>,
    cols: Vec<Col>,
    batch_rows: usize,
    in_batch: usize,
    frames: Vec<DataFrame>,
    total: u64,
}

fn new_col(kind: Kind, name: &PlSmallStr, cap: usize) -> Col {
    let n = name.clone();
    match kind {
        Kind::Bool => Col::Bool(BooleanChunkedBuilder::new(n, cap)),
        Kind::I32 | Kind::Date => Col::I32(PrimitiveChunkedBuilder::new(n, cap)),
        Kind::I64 | Kind::Time | Kind::Datetime | Kind::DatetimeUtc => {
            Col::I64(PrimitiveChunkedBuilder::new(n, cap))
        }
        Kind::F64 => Col::F64(PrimitiveChunkedBuilder::new(n, cap)),
        Kind::Text => Col::Text(StringChunkedBuilder::new(n, cap)),
        Kind::Binary => Col::Binary(BinaryChunkedBuilder::new(n, cap)),
        Kind::Decimal => Col::Dec(Vec::with_capacity(cap), 0),
    }
}

fn pow10(n: u32) -> Option<i128> {
    10i128.checked_pow(n)
}

impl Batcher {
    pub fn new(columns: Vec<(String, Kind)>, batch_rows: usize) -> Batcher {
        let batch_rows = batch_rows.max(1);
        let names: Vec<PlSmallStr> = columns.iter().map(|(n, _)| n.as_str().into()).collect();
        let kinds: Vec<Kind> = columns.iter().map(|(_, k)| *k).collect();
        let cols = kinds
            .iter()
            .zip(&names)
            .map(|(k, n)| new_col(*k, n, batch_rows.min(4096)))
            .collect();
        Batcher {
            names,
            kinds,
            cols,
            batch_rows,
            in_batch: 0,
            frames: Vec::new(),
            total: 0,
        }
    }

    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }

    pub fn rows(&self) -> u64 {
        self.total
    }

    /// Push the value of column `i` of the current row.
    #[inline]
    pub fn push(&mut self, i: usize, cell: Cell<'_>) -> Result<(), String> {
        let kind = self.kinds[i];
        let ok = match (&mut self.cols[i], cell) {
            (Col::Bool(b), Cell::Null) => {
                b.append_null();
                true
            }
            (Col::I32(b), Cell::Null) => {
                b.append_null();
                true
            }
            (Col::I64(b), Cell::Null) => {
                b.append_null();
                true
            }
            (Col::F64(b), Cell::Null) => {
                b.append_null();
                true
            }
            (Col::Text(b), Cell::Null) => {
                b.append_null();
                true
            }
            (Col::Binary(b), Cell::Null) => {
                b.append_null();
                true
            }
            (Col::Dec(v, _), Cell::Null) => {
                v.push(None);
                true
            }
            (Col::Bool(b), Cell::Bool(x)) => {
                b.append_value(x);
                true
            }
            (Col::Bool(b), Cell::I64(x)) => {
                b.append_value(x != 0);
                true
            }
            (Col::I32(b), Cell::I32(x)) | (Col::I32(b), Cell::Date(x)) => {
                b.append_value(x);
                true
            }
            (Col::I64(b), Cell::I64(x))
            | (Col::I64(b), Cell::Ts(x))
            | (Col::I64(b), Cell::Time(x)) => {
                b.append_value(x);
                true
            }
            (Col::I64(b), Cell::I32(x)) if kind == Kind::I64 => {
                b.append_value(x as i64);
                true
            }
            (Col::I64(b), Cell::Bool(x)) if kind == Kind::I64 => {
                b.append_value(x as i64);
                true
            }
            (Col::F64(b), Cell::F64(x)) => {
                b.append_value(x);
                true
            }
            (Col::F64(b), Cell::I64(x)) => {
                b.append_value(x as f64);
                true
            }
            (Col::F64(b), Cell::I32(x)) => {
                b.append_value(x as f64);
                true
            }
            (Col::F64(b), Cell::Dec(m, s)) => {
                b.append_value(m as f64 / 10f64.powi(s as i32));
                true
            }
            (Col::Text(b), Cell::Str(s)) => {
                b.append_value(s);
                true
            }
            (Col::Text(b), Cell::Bytes(s)) => {
                b.append_value(String::from_utf8_lossy(s));
                true
            }
            (Col::Text(b), other) => {
                b.append_value(display(other));
                true
            }
            (Col::Binary(b), Cell::Bytes(s)) => {
                b.append_value(s);
                true
            }
            (Col::Binary(b), Cell::Str(s)) => {
                b.append_value(s.as_bytes());
                true
            }
            (Col::Dec(v, scale), Cell::Dec(m, s)) => {
                push_decimal(v, scale, m, s)?;
                true
            }
            (Col::Dec(v, scale), Cell::I64(m)) => {
                push_decimal(v, scale, m as i128, 0)?;
                true
            }
            (Col::Dec(v, scale), Cell::I32(m)) => {
                push_decimal(v, scale, m as i128, 0)?;
                true
            }
            (Col::Dec(v, scale), Cell::Str(s)) => {
                let (m, sc) = parse_decimal(s).ok_or_else(|| format!("`{s}` is not a number"))?;
                push_decimal(v, scale, m, sc)?;
                true
            }
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "column `{}`: a {} value in a {:?} column",
                self.names[i],
                cell_name(&cell),
                kind
            ))
        }
    }

    /// The current row is complete.
    #[inline]
    pub fn end_row(&mut self) -> Result<(), String> {
        self.in_batch += 1;
        self.total += 1;
        if self.in_batch >= self.batch_rows {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if self.in_batch == 0 && !self.frames.is_empty() {
            return Ok(());
        }
        let cap = self.batch_rows.min(1 << 16);
        let mut columns = Vec::with_capacity(self.cols.len());
        for i in 0..self.cols.len() {
            let fresh = new_col(self.kinds[i], &self.names[i], cap);
            let col = std::mem::replace(&mut self.cols[i], fresh);
            columns.push(finish(col, self.kinds[i], self.names[i].clone())?);
        }
        self.in_batch = 0;
        let df = DataFrame::new(columns).map_err(|e| e.to_string())?;
        self.frames.push(df);
        Ok(())
    }

    /// Every batch stacked into one frame (one chunk per column).
    pub fn finish(mut self) -> Result<DataFrame, String> {
        if self.in_batch > 0 || self.frames.is_empty() {
            self.flush()?;
        }
        let mut frames = std::mem::take(&mut self.frames);
        // Decimal scales may differ between batches: bring them all to the largest.
        for (i, kind) in self.kinds.iter().enumerate() {
            if *kind != Kind::Decimal || frames.len() < 2 {
                continue;
            }
            let max = frames
                .iter()
                .filter_map(|f| match f.get_columns()[i].dtype() {
                    DataType::Decimal(_, s) => *s,
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            for f in frames.iter_mut() {
                let c = f.get_columns()[i].clone();
                if c.dtype() != &DataType::Decimal(Some(38), Some(max)) {
                    let c = c
                        .cast(&DataType::Decimal(Some(38), Some(max)))
                        .map_err(|e| e.to_string())?;
                    f.replace_column(i, c).map_err(|e| e.to_string())?;
                }
            }
        }
        let mut it = frames.into_iter();
        let mut df = it.next().unwrap_or_default();
        for f in it {
            df.vstack_mut_owned(f).map_err(|e| e.to_string())?;
        }
        df.rechunk_mut();
        Ok(df)
    }
}

fn finish(col: Col, kind: Kind, name: PlSmallStr) -> Result<Column, String> {
    let s: Series = match col {
        Col::Bool(b) => b.finish().into_series(),
        Col::I32(b) => {
            let ca = b.finish();
            if kind == Kind::Date {
                ca.into_date().into_series()
            } else {
                ca.into_series()
            }
        }
        Col::I64(b) => {
            let ca = b.finish();
            match kind {
                Kind::Time => ca.into_time().into_series(),
                Kind::Datetime => ca.into_datetime(TimeUnit::Microseconds, None).into_series(),
                Kind::DatetimeUtc => ca
                    .into_datetime(TimeUnit::Microseconds, Some(TimeZone::UTC))
                    .into_series(),
                _ => ca.into_series(),
            }
        }
        Col::F64(b) => b.finish().into_series(),
        Col::Text(b) => b.finish().into_series(),
        Col::Binary(b) => b.finish().into_series(),
        Col::Dec(v, scale) => Int128Chunked::from_iter_options(name, v.into_iter())
            .into_decimal_unchecked(Some(38), scale as usize)
            .into_series(),
    };
    Ok(s.into_column())
}

fn push_decimal(v: &mut Vec<Option<i128>>, scale: &mut u32, m: i128, s: u32) -> Result<(), String> {
    let overflow = || "a decimal value does not fit 38 digits".to_string();
    if s > *scale {
        let f = pow10(s - *scale).ok_or_else(overflow)?;
        for x in v.iter_mut().flatten() {
            *x = x.checked_mul(f).ok_or_else(overflow)?;
        }
        *scale = s;
        v.push(Some(m));
    } else {
        let f = pow10(*scale - s).ok_or_else(overflow)?;
        v.push(Some(m.checked_mul(f).ok_or_else(overflow)?));
    }
    Ok(())
}

/// `-12.50` → (-1250, 2); also `1e3` is refused (decimal text only).
pub fn parse_decimal(s: &str) -> Option<(i128, u32)> {
    let s = s.trim();
    let (neg, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let mut m: i128 = 0;
    for c in int.bytes().chain(frac.bytes()) {
        if !c.is_ascii_digit() {
            return None;
        }
        m = m.checked_mul(10)?.checked_add((c - b'0') as i128)?;
    }
    Some((if neg { -m } else { m }, frac.len() as u32))
}

/// 1250, 2 → "12.50".
pub fn format_decimal(m: i128, scale: u32) -> String {
    let neg = m < 0;
    let digits = m.unsigned_abs().to_string();
    let scale = scale as usize;
    let body = if scale == 0 {
        digits
    } else if digits.len() > scale {
        format!(
            "{}.{}",
            &digits[..digits.len() - scale],
            &digits[digits.len() - scale..]
        )
    } else {
        format!("0.{}{}", "0".repeat(scale - digits.len()), digits)
    };
    if neg {
        format!("-{body}")
    } else {
        body
    }
}

fn cell_name(c: &Cell<'_>) -> &'static str {
    match c {
        Cell::Null => "null",
        Cell::Bool(_) => "boolean",
        Cell::I32(_) | Cell::I64(_) => "integer",
        Cell::F64(_) => "float",
        Cell::Str(_) => "text",
        Cell::Bytes(_) => "binary",
        Cell::Dec(..) => "decimal",
        Cell::Date(_) => "date",
        Cell::Time(_) => "time",
        Cell::Ts(_) => "timestamp",
    }
}

fn display(c: Cell<'_>) -> String {
    match c {
        Cell::Null => String::new(),
        Cell::Bool(b) => b.to_string(),
        Cell::I32(x) => x.to_string(),
        Cell::I64(x) => x.to_string(),
        Cell::F64(x) => x.to_string(),
        Cell::Str(s) => s.to_string(),
        Cell::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Cell::Dec(m, s) => format_decimal(m, s),
        Cell::Date(d) => (chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()
            + chrono::Duration::days(d as i64))
        .to_string(),
        Cell::Time(ns) => chrono::NaiveTime::from_num_seconds_from_midnight_opt(
            (ns / 1_000_000_000) as u32,
            (ns % 1_000_000_000) as u32,
        )
        .map(|t| t.to_string())
        .unwrap_or_default(),
        Cell::Ts(us) => chrono::DateTime::from_timestamp_micros(us)
            .map(|t| t.naive_utc().to_string())
            .unwrap_or_default(),
    }
}

/// Days since 1970-01-01 of a date.
pub fn days(d: chrono::NaiveDate) -> i32 {
    (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as i32
}

/// Nanoseconds since midnight of a time.
pub fn nanos(t: chrono::NaiveTime) -> i64 {
    use chrono::Timelike;
    t.num_seconds_from_midnight() as i64 * 1_000_000_000 + t.nanosecond() as i64
}

/// Parse the text forms of dates and timestamps that databases print.
pub fn parse_date(s: &str) -> Option<i32> {
    chrono::NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d")
        .ok()
        .map(days)
}

pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%dT%H:%M:%S%.f%#z",
    ] {
        if let Ok(t) = chrono::DateTime::parse_from_str(s, f) {
            return Some(t.timestamp_micros());
        }
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .map(|d| d.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp_micros())
}

pub fn parse_time(s: &str) -> Option<i64> {
    chrono::NaiveTime::parse_from_str(s.trim(), "%H:%M:%S%.f")
        .ok()
        .map(nanos)
}
