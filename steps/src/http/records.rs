//! JSON records into a typed Polars `DataFrame`, one page at a time.
//!
//! Why builders instead of "collect every record, then build": an extraction of 180 days of
//! tickets is hundreds of pages; keeping every page's `serde_json::Value` until the end costs
//! several times the data's size. [`Columns`] appends each page's records to typed column
//! vectors as the page lands, and the page's JSON is dropped right after.
//!
//! Types are inferred from the values, per column, widening as records disagree:
//!
//! * integers → `Int64`; integers and floats → `Float64`; booleans → `Boolean`;
//! * strings → `String`, except a column whose every non-null value is an RFC 3339 / ISO 8601
//!   timestamp **with an offset** (`2024-05-01T09:30:00-03:00`, `…Z`) →
//!   `Datetime(µs, "UTC")`, converted to UTC (timestamps without an offset, and dates, stay
//!   strings: guessing their zone would silently shift them);
//! * arrays → a `String` column holding each array as JSON text (lists of mixed or nested
//!   items are common in APIs and JSON text loads everywhere; a later transform can parse it);
//! * nested objects → with `flatten` (default) one column per leaf, named
//!   `parent<separator>child` (`status.name` → `status_name`), at any depth; without it a
//!   Polars `Struct` column (null where the object is null);
//! * nulls and missing keys → nulls, in any column; a column that is only ever null is a
//!   `String` column of nulls;
//! * anything else mixed (a number here, a string there) → `String`, each value as its text
//!   (strings as they are, other values as JSON).
//!
//! Columns keep the order in which their keys were first seen.

use indexmap::IndexMap;
use polars::prelude::*;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashSet;

/// How records become columns.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Nested objects become `parent<sep>child` columns (else structs).
    pub flatten: bool,
    /// The separator of flattened names.
    pub separator: String,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            flatten: true,
            separator: "_".into(),
        }
    }
}

/// The column builders of one table.
#[derive(Debug, Default)]
pub struct Columns {
    cols: IndexMap<String, Col>,
    rows: usize,
    /// Keys seen holding an object while flattening: a column of only nulls under such a
    /// name is dropped at the end (its children carry the nulls).
    flat_parents: HashSet<String>,
}

#[derive(Debug)]
enum Col {
    Null(usize),
    Bool(Vec<Option<bool>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Str(Strs),
    Struct(Box<Columns>, Vec<bool>),
}

/// A string column: its text in one buffer (no allocation per value: a table of tickets has
/// millions of strings), and its values as UTC microseconds for as long as every value is a
/// timestamp with an offset, parsed as each value arrives (on the builders' thread, while
/// later pages are in flight) rather than all at the end.
#[derive(Debug)]
struct Strs {
    text: String,
    /// Where each value ends in `text` (a null is empty there).
    ends: Vec<usize>,
    valid: Vec<bool>,
    stamps: Option<Vec<Option<i64>>>,
}

impl Strs {
    fn nulls(n: usize) -> Strs {
        Strs {
            text: String::new(),
            ends: vec![0; n],
            valid: vec![false; n],
            stamps: Some(vec![None; n]),
        }
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, i: usize) -> Option<&str> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.valid[i].then(|| &self.text[start..self.ends[i]])
    }

    fn push(&mut self, s: Option<&str>) {
        if let Some(stamps) = &mut self.stamps {
            match s.map(parse_timestamp) {
                None => stamps.push(None),
                Some(Some(t)) => stamps.push(Some(t)),
                Some(None) => self.stamps = None,
            }
        }
        self.valid.push(s.is_some());
        self.text.push_str(s.unwrap_or_default());
        self.ends.push(self.text.len());
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Col {
    fn len(&self) -> usize {
        match self {
            Col::Null(n) => *n,
            Col::Bool(v) => v.len(),
            Col::Int(v) => v.len(),
            Col::Float(v) => v.len(),
            Col::Str(v) => v.len(),
            Col::Struct(_, valid) => valid.len(),
        }
    }

    fn push_null(&mut self) {
        match self {
            Col::Null(n) => *n += 1,
            Col::Bool(v) => v.push(None),
            Col::Int(v) => v.push(None),
            Col::Float(v) => v.push(None),
            Col::Str(v) => v.push(None),
            Col::Struct(c, valid) => {
                c.push_null_row();
                valid.push(false);
            }
        }
    }

    /// The value at row `i`, as JSON (used when a column widens to strings).
    fn value_at(&self, i: usize) -> Value {
        match self {
            Col::Null(_) => Value::Null,
            Col::Bool(v) => v[i].map(Value::Bool).unwrap_or(Value::Null),
            Col::Int(v) => v[i].map(Value::from).unwrap_or(Value::Null),
            Col::Float(v) => v[i].map(Value::from).unwrap_or(Value::Null),
            Col::Str(v) => v
                .get(i)
                .map(|s| Value::String(s.to_owned()))
                .unwrap_or(Value::Null),
            Col::Struct(c, valid) => {
                if !valid[i] {
                    return Value::Null;
                }
                Value::Object(
                    c.cols
                        .iter()
                        .map(|(k, col)| (k.clone(), col.value_at(i)))
                        .collect(),
                )
            }
        }
    }

    /// Widen to a string column.
    fn widen_to_strings(&mut self) {
        if matches!(self, Col::Str(_)) {
            return;
        }
        let n = self.len();
        let mut v = Strs::nulls(0);
        for i in 0..n {
            match self.value_at(i) {
                Value::Null => v.push(None),
                other => v.push(Some(&text(&other))),
            }
        }
        *self = Col::Str(v);
    }

    fn push(&mut self, v: &Value, shape: &Shape) {
        let n = self.len();
        match v {
            Value::Null => self.push_null(),
            Value::Bool(b) => match self {
                Col::Null(_) => {
                    let mut c = vec![None; n];
                    c.push(Some(*b));
                    *self = Col::Bool(c);
                }
                Col::Bool(c) => c.push(Some(*b)),
                _ => {
                    self.widen_to_strings();
                    self.push_text(text(v));
                }
            },
            Value::Number(num) => {
                let as_int = num.as_i64();
                let as_f = num.as_f64().unwrap_or(f64::NAN);
                match (&mut *self, as_int) {
                    (Col::Null(_), Some(i)) => {
                        let mut c = vec![None; n];
                        c.push(Some(i));
                        *self = Col::Int(c);
                    }
                    (Col::Null(_), None) => {
                        let mut c = vec![None; n];
                        c.push(Some(as_f));
                        *self = Col::Float(c);
                    }
                    (Col::Int(c), Some(i)) => c.push(Some(i)),
                    (Col::Int(c), None) => {
                        let mut f: Vec<Option<f64>> =
                            c.iter().map(|x| x.map(|i| i as f64)).collect();
                        f.push(Some(as_f));
                        *self = Col::Float(f);
                    }
                    (Col::Float(c), _) => c.push(Some(as_f)),
                    _ => {
                        self.widen_to_strings();
                        self.push_text(text(v));
                    }
                }
            }
            Value::String(s) => self.push_str(s),
            Value::Array(_) => {
                if let Col::Null(_) = self {
                    *self = Col::Str(Strs::nulls(n));
                }
                self.widen_to_strings();
                self.push_text(v.to_string());
            }
            Value::Object(o) => {
                self.struct_if_null();
                match self {
                    Col::Struct(c, valid) => {
                        c.push_record(o, shape);
                        valid.push(true);
                    }
                    _ => {
                        self.widen_to_strings();
                        self.push_text(v.to_string());
                    }
                }
            }
        }
    }

    fn push_str(&mut self, s: &str) {
        if let Col::Null(n) = *self {
            *self = Col::Str(Strs::nulls(n));
        }
        if !matches!(self, Col::Str(_)) {
            self.widen_to_strings();
        }
        if let Col::Str(v) = self {
            v.push(Some(s));
        }
    }

    /// A column of only nulls becomes a struct column (of null rows).
    fn struct_if_null(&mut self) {
        if let Col::Null(n) = *self {
            let mut c = Columns::default();
            for _ in 0..n {
                c.push_null_row();
            }
            *self = Col::Struct(Box::new(c), vec![false; n]);
        }
    }

    fn push_text(&mut self, s: String) {
        if let Col::Str(v) = self {
            v.push(Some(&s));
        }
    }

    fn into_series(self, name: &str, rows: usize) -> PolarsResult<Series> {
        let name: PlSmallStr = name.into();
        Ok(match self {
            Col::Null(_) => Series::full_null(name, rows, &DataType::String),
            Col::Bool(v) => Series::new(name, v),
            Col::Int(v) => Series::new(name, v),
            Col::Float(v) => Series::new(name, v),
            // Every non-null value a timestamp, and at least one: a datetime column.
            Col::Str(mut v) => match v.stamps.take().filter(|t| t.iter().any(Option::is_some)) {
                Some(micros) => Int64Chunked::new(name, micros)
                    .into_datetime(TimeUnit::Microseconds, Some(TimeZone::UTC))
                    .into_series(),
                None => StringChunked::from_iter_options(name, (0..v.len()).map(|i| v.get(i)))
                    .into_series(),
            },
            Col::Struct(c, valid) => {
                let fields = c.into_series()?;
                let ca = StructChunked::from_series(name, rows, fields.iter())?;
                let mask = BooleanChunked::new(PlSmallStr::EMPTY, valid);
                let mask = mask.rechunk();
                let bitmap = mask.downcast_iter().next().map(|a| a.values().clone());
                ca.rechunk()
                    .into_owned()
                    .with_outer_validity(bitmap)
                    .into_series()
            }
        })
    }
}

/// Parse one timestamp with an offset, to UTC microseconds.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || !b[0].is_ascii_digit() || b[4] != b'-' {
        return None;
    }
    if let Some(t) = fast_timestamp(b) {
        return Some(t);
    }
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%z"))
        .ok()?;
    Some(t.timestamp_micros())
}

/// The common shape, `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, without chrono's general parser
/// (a column of timestamps is hundreds of thousands of them). `None` for anything else,
/// including what chrono would accept but this does not check (leap seconds, `t`, …): the
/// caller then asks chrono.
fn fast_timestamp(b: &[u8]) -> Option<i64> {
    fn num(b: &[u8]) -> Option<i64> {
        b.iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    }
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(&b[0..4])?, num(&b[5..7])?, num(&b[8..10])?);
    let (h, mi, sec) = (num(&b[11..13])?, num(&b[14..16])?, num(&b[17..19])?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days_in = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if d < 1 || d > days_in || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..9 {
            nanos *= 10;
        }
    }
    let offset = match &b[i..] {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), oh @ .., b':', m1, m2] if oh.len() == 2 => {
            let (oh, om) = (num(oh)?, num(&[*m1, *m2])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    // Days since 1970-01-01 of the civil date (H. Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some(secs * 1_000_000 + nanos / 1000)
}

impl Columns {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn push_null_row(&mut self) {
        self.rows += 1;
    }

    /// The column `name`, padded to the current row; `None` when the current row already has
    /// a value there (first value wins when two keys flatten to one name).
    fn slot(&mut self, name: &str) -> Option<&mut Col> {
        let row = self.rows;
        let col = match self.cols.get_index_of(name) {
            Some(k) => &mut self.cols[k],
            None => self.cols.entry(name.to_string()).or_insert(Col::Null(0)),
        };
        while col.len() < row {
            col.push_null();
        }
        (col.len() == row).then_some(col)
    }

    /// Set `name` in the current row (first value wins when two keys flatten to one name).
    fn set(&mut self, name: &str, v: &Value, shape: &Shape) {
        if let Some(col) = self.slot(name) {
            col.push(v, shape);
        }
    }

    /// [`Columns::set`] of a string value, without building a `Value`.
    fn set_str(&mut self, name: &str, s: &str) {
        if let Some(col) = self.slot(name) {
            col.push_str(s);
        }
    }

    fn set_flat(&mut self, prefix: &str, obj: &Map<String, Value>, shape: &Shape) {
        for (k, v) in obj {
            let name = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}{}{k}", shape.separator)
            };
            match v {
                Value::Object(inner) if shape.flatten => {
                    self.flat_parents.insert(name.clone());
                    self.set_flat(&name, inner, shape);
                }
                _ => self.set(&name, v, shape),
            }
        }
    }

    /// Append one record (an object; any other value becomes a one-column `value` row).
    pub fn push_record(&mut self, obj: &Map<String, Value>, shape: &Shape) {
        self.set_flat("", obj, shape);
        self.rows += 1;
    }

    /// Append one JSON value as a record.
    pub fn push_value(&mut self, v: &Value, shape: &Shape) {
        match v {
            Value::Object(o) => self.push_record(o, shape),
            other => {
                self.set("value", other, shape);
                self.rows += 1;
            }
        }
    }

    /// Column names so far, in order.
    pub fn names(&self) -> Vec<String> {
        self.cols.keys().cloned().collect()
    }

    fn into_series(self) -> PolarsResult<Vec<Series>> {
        let rows = self.rows;
        let mut out = Vec::with_capacity(self.cols.len());
        for (name, mut col) in self.cols {
            if matches!(col, Col::Null(_)) && self.flat_parents.contains(&name) {
                continue;
            }
            while col.len() < rows {
                col.push_null();
            }
            out.push(col.into_series(&name, rows)?);
        }
        Ok(out)
    }

    /// The finished table.
    pub fn finish(self) -> PolarsResult<DataFrame> {
        let rows = self.rows;
        let cols: Vec<Column> = self.into_series()?.into_iter().map(Column::from).collect();
        if cols.is_empty() {
            return Ok(DataFrame::empty_with_height(rows));
        }
        DataFrame::new(cols)
    }
}

// ---------------------------------------------------------------------------------------
// Records read straight from JSON text into the builders.
//
// `push_json_array` is `serde_json::from_slice::<Value>` + `push_value` per record without the
// intermediate `Value` tree: keys are appended to one reusable name buffer (flattened names
// are never allocated once a column exists), scalars go straight into their columns. Only
// arrays (kept as JSON text) and values that must widen a column are built as `Value`s, so
// the result is the same table. One difference in a corner JSON leaves open: a key repeated
// in one object keeps its first value here (a `Value` map keeps the last).

impl Columns {
    /// Append the records of a JSON array (`[{…}, …]`) read from its text: the same rows as
    /// parsing it to a `Value` and [`Columns::push_value`] of each item, faster.
    ///
    /// On an error some records may already be appended; the caller fails the extraction.
    pub fn push_json_array(&mut self, json: &[u8], shape: &Shape) -> serde_json::Result<()> {
        let mut de = serde_json::Deserializer::from_slice(json);
        serde::de::DeserializeSeed::deserialize(ArraySeed { cols: self, shape }, &mut de)?;
        de.end()
    }

    /// The fields of one object into the current row, names prefixed with `prefix`.
    fn stream_fields<'de, A: MapAccess<'de>>(
        &mut self,
        map: &mut A,
        prefix: &mut String,
        shape: &Shape,
    ) -> Result<(), A::Error> {
        let base = prefix.len();
        let sep = if base == 0 {
            ""
        } else {
            shape.separator.as_str()
        };
        while map.next_key_seed(KeyInto { buf: prefix, sep })?.is_some() {
            map.next_value_seed(FieldSeed {
                cols: self,
                name: prefix,
                shape,
            })?;
            prefix.truncate(base);
        }
        Ok(())
    }
}

/// The number of items of a JSON array, from a quick scan of its text (strings and nesting
/// are skipped, nothing is validated: a full parse follows). `None` if the text is not an
/// array or is cut short.
pub fn array_len(json: &[u8]) -> Option<usize> {
    let mut i = json.iter().position(|b| !b.is_ascii_whitespace())?;
    if json[i] != b'[' {
        return None;
    }
    i += 1;
    let (mut depth, mut commas, mut any) = (1usize, 0usize, false);
    while i < json.len() {
        match json[i] {
            b'"' => {
                any = true;
                i += 1;
                loop {
                    match *json.get(i)? {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
            }
            b'[' | b'{' => {
                any = true;
                depth += 1;
            }
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    if !json[i + 1..].iter().all(u8::is_ascii_whitespace) {
                        return None;
                    }
                    return Some(if any { commas + 1 } else { 0 });
                }
            }
            b',' if depth == 1 => commas += 1,
            b if b.is_ascii_whitespace() => {}
            _ => any = true,
        }
        i += 1;
    }
    None
}

/// The top-level array.
struct ArraySeed<'c> {
    cols: &'c mut Columns,
    shape: &'c Shape,
}

impl<'de> DeserializeSeed<'de> for ArraySeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ArraySeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of records")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut name = String::new();
        while seq
            .next_element_seed(RecordSeed {
                cols: &mut *self.cols,
                shape: self.shape,
                name: &mut name,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// One item of the array: an object is a record, anything else a one-column `value` row
/// (as [`Columns::push_value`]).
struct RecordSeed<'c> {
    cols: &'c mut Columns,
    shape: &'c Shape,
    name: &'c mut String,
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl RecordSeed<'_> {
    fn other(self, v: Value) {
        self.cols.push_value(&v, self.shape);
    }
}

/// The visitor methods of a value that is not an object, each handing a `Value` to
/// `self.other(…)`.
macro_rules! non_object_visits {
    () => {
        fn visit_bool<E>(self, v: bool) -> Result<(), E> {
            self.other(Value::Bool(v));
            Ok(())
        }
        fn visit_i64<E>(self, v: i64) -> Result<(), E> {
            self.other(Value::from(v));
            Ok(())
        }
        fn visit_u64<E>(self, v: u64) -> Result<(), E> {
            self.other(Value::from(v));
            Ok(())
        }
        fn visit_f64<E>(self, v: f64) -> Result<(), E> {
            self.other(Value::from(v));
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            self.other(Value::Null);
            Ok(())
        }
        fn visit_none<E>(self) -> Result<(), E> {
            self.other(Value::Null);
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
            let v = Value::deserialize(SeqAccessDeserializer::new(seq))?;
            self.other(v);
            Ok(())
        }
    };
}

impl<'de> Visitor<'de> for RecordSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a record")
    }
    non_object_visits!();
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.other(Value::String(v.to_owned()));
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.name.clear();
        self.cols.stream_fields(&mut map, self.name, self.shape)?;
        self.cols.rows += 1;
        Ok(())
    }
}

/// A key, appended (after the separator) to the name buffer.
struct KeyInto<'b> {
    buf: &'b mut String,
    sep: &'b str,
}

impl<'de> DeserializeSeed<'de> for KeyInto<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyInto<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.buf.push_str(self.sep);
        self.buf.push_str(v);
        Ok(())
    }
}

/// The value of field `name` in the current row (as [`Columns::set_flat`]).
struct FieldSeed<'c> {
    cols: &'c mut Columns,
    name: &'c mut String,
    shape: &'c Shape,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl FieldSeed<'_> {
    fn other(self, v: Value) {
        self.cols.set(self.name, &v, self.shape);
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a value")
    }
    non_object_visits!();
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.cols.set_str(self.name, v);
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (cols, name, shape) = (self.cols, self.name, self.shape);
        if shape.flatten {
            if !cols.flat_parents.contains(name.as_str()) {
                cols.flat_parents.insert(name.clone());
            }
            return cols.stream_fields(&mut map, name, shape);
        }
        let Some(col) = cols.slot(name) else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        col.struct_if_null();
        match col {
            Col::Struct(c, valid) => {
                let mut inner = String::new();
                c.stream_fields(&mut map, &mut inner, shape)?;
                c.rows += 1;
                valid.push(true);
            }
            _ => {
                let v = Value::deserialize(MapAccessDeserializer::new(map))?;
                col.push(&v, shape);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frame(records: Value, shape: &Shape) -> DataFrame {
        let mut c = Columns::new();
        for r in records.as_array().unwrap() {
            c.push_value(r, shape);
        }
        c.finish().unwrap()
    }

    #[test]
    fn infers_types_and_widens() {
        let df = frame(
            json!([
                {"i": 1, "f": 1, "b": true, "s": "x", "mix": 1, "arr": [1, 2], "n": null},
                {"i": 2, "f": 2.5, "b": null, "s": null, "mix": "two", "arr": ["a", {"k": 1}]},
                {"i": null, "f": 3, "b": false, "s": "z", "mix": true, "extra": 7}
            ]),
            &Shape::default(),
        );
        assert_eq!(
            df.get_column_names_str(),
            ["i", "f", "b", "s", "mix", "arr", "n", "extra"]
        );
        let dt = |n: &str| df.column(n).unwrap().dtype().clone();
        assert_eq!(dt("i"), DataType::Int64);
        assert_eq!(dt("f"), DataType::Float64);
        assert_eq!(dt("b"), DataType::Boolean);
        assert_eq!(dt("s"), DataType::String);
        assert_eq!(dt("mix"), DataType::String);
        assert_eq!(dt("arr"), DataType::String);
        assert_eq!(dt("n"), DataType::String);
        assert_eq!(dt("extra"), DataType::Int64);
        let f = df.column("f").unwrap().f64().unwrap();
        assert_eq!(f.get(0), Some(1.0));
        assert_eq!(f.get(1), Some(2.5));
        let mix = df.column("mix").unwrap().str().unwrap();
        assert_eq!(mix.get(0), Some("1"));
        assert_eq!(mix.get(1), Some("two"));
        assert_eq!(mix.get(2), Some("true"));
        let arr = df.column("arr").unwrap().str().unwrap();
        assert_eq!(arr.get(0), Some("[1,2]"));
        let extra = df.column("extra").unwrap().i64().unwrap();
        assert_eq!(extra.get(0), None);
        assert_eq!(extra.get(2), Some(7));
        assert_eq!(df.height(), 3);
    }

    #[test]
    fn timestamps_with_offsets_become_utc() {
        let df = frame(
            json!([
                {"t": "2024-05-01T09:30:00-03:00", "naive": "2024-05-01T09:30:00", "bad": "2024-05-01T09:30:00Z"},
                {"t": null, "naive": "2024-05-01T10:00:00", "bad": "soon"},
                {"t": "2024-05-01T12:30:00.250Z"}
            ]),
            &Shape::default(),
        );
        assert_eq!(
            df.column("t").unwrap().dtype(),
            &DataType::Datetime(TimeUnit::Microseconds, Some(TimeZone::UTC))
        );
        let t = df.column("t").unwrap().datetime().unwrap();
        let want = chrono::DateTime::parse_from_rfc3339("2024-05-01T12:30:00Z")
            .unwrap()
            .timestamp_micros();
        assert_eq!(t.phys.get(0), Some(want));
        assert_eq!(t.phys.get(1), None);
        assert_eq!(t.phys.get(2), Some(want + 250_000));
        assert_eq!(df.column("naive").unwrap().dtype(), &DataType::String);
        assert_eq!(df.column("bad").unwrap().dtype(), &DataType::String);
    }

    #[test]
    fn flattens_nested_objects() {
        let df = frame(
            json!([
                {"id": 1, "responsible": null, "status": {"id": 2, "name": "Open", "meta": {"x": true}}},
                {"id": 2, "responsible": {"id": 9, "name": "Ana"}, "status": {"id": 3, "name": "Done"}}
            ]),
            &Shape::default(),
        );
        assert_eq!(
            df.get_column_names_str(),
            [
                "id",
                "status_id",
                "status_name",
                "status_meta_x",
                "responsible_id",
                "responsible_name"
            ]
        );
        let n = df.column("responsible_name").unwrap().str().unwrap();
        assert_eq!(n.get(0), None);
        assert_eq!(n.get(1), Some("Ana"));
        let dotted = frame(
            json!([{"status": {"name": "Open"}}]),
            &Shape {
                flatten: true,
                separator: ".".into(),
            },
        );
        assert_eq!(dotted.get_column_names_str(), ["status.name"]);
    }

    #[test]
    fn structs_when_not_flattening() {
        let df = frame(
            json!([
                {"id": 1, "status": {"id": 2, "name": "Open"}},
                {"id": 2, "status": null},
                {"id": 3, "status": {"id": 4, "name": "Done", "extra": 1.5}}
            ]),
            &Shape {
                flatten: false,
                separator: "_".into(),
            },
        );
        assert_eq!(df.get_column_names_str(), ["id", "status"]);
        let s = df
            .column("status")
            .unwrap()
            .as_materialized_series()
            .clone();
        let DataType::Struct(fields) = s.dtype() else {
            panic!("{:?}", s.dtype())
        };
        let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["id", "name", "extra"]);
        assert_eq!(s.null_count(), 1);
        let ca = s.struct_().unwrap();
        let name = ca.field_by_name("name").unwrap();
        assert_eq!(name.str().unwrap().get(2), Some("Done"));
    }

    #[test]
    fn streaming_matches_values() {
        let text = r#"[
            {"i": 1, "f": 1, "b": true, "s": "x", "mix": 1, "arr": [1, 2], "n": null,
             "o": {"a": 1, "b": {"c": "2024-05-01T09:30:00-03:00"}}, "o_a": 9, "big": 18446744073709551615},
            {"i": 2, "f": 2.5, "b": null, "s": null, "mix": 2.5, "arr": ["a", {"k": 1}], "o": null,
             "big": -3, "esc": "a\"b\u00e9"},
            {"i": null, "f": 3, "b": false, "s": "z", "mix": "x", "o": {"a": "t", "b": 5}},
            7, null, "str", [1], {},
            {"o": 3, "e": {}, "mix": {"deep": [true]}}
        ]"#;
        for flatten in [true, false] {
            let shape = Shape {
                flatten,
                separator: "_".into(),
            };
            let v: Value = serde_json::from_str(text).unwrap();
            let expected = frame(v, &shape);
            let mut c = Columns::new();
            c.push_json_array(text.as_bytes(), &shape).unwrap();
            let got = c.finish().unwrap();
            assert_eq!(got.get_column_names(), expected.get_column_names());
            assert!(got.equals_missing(&expected), "{got}\n{expected}");
        }
        assert!(Columns::new()
            .push_json_array(b"[{\"a\": 1}, {", &Shape::default())
            .is_err());
    }

    #[test]
    fn array_len_counts_items() {
        assert_eq!(array_len(b" [ ] "), Some(0));
        assert_eq!(array_len(b"[1]"), Some(1));
        assert_eq!(
            array_len(br#"[{"a": [1, 2], "b": "x,]\"}"}, null, "y"]"#),
            Some(3)
        );
        assert_eq!(array_len(b"{}"), None);
        assert_eq!(array_len(b"[1, 2"), None);
        assert_eq!(array_len(b"[1] x"), None);
        assert_eq!(array_len(b""), None);
    }
}
