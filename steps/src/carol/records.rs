//! A dataframe as Carol records, and the gzip chunker of `carol.send`.
//!
//! Records are JSON objects keyed by the column names as given. Polars' own JSON writer
//! encodes them (JSON lines, a few hundred rows at a time), after dates become
//! `2026-01-31` and datetimes RFC 3339 in UTC (`2026-01-31T12:00:00.000Z`; a datetime
//! without a time zone is taken as UTC).
//!
//! The chunker streams records into a gzip encoder and cuts a request before its
//! compressed body would pass the limit. It cannot see the compressed size of what the
//! encoder still holds, so it estimates it from the ratio so far; near the limit it
//! sync-flushes (a few bytes each) to measure exactly, and decides before adding each
//! record whether it still fits. Should the finished body still come out above the limit
//! (data that suddenly compresses worse), the chunk is encoded again with fewer records: no
//! request ever exceeds the limit.

use flate2::write::GzEncoder;
use flate2::Compression;
use polars::prelude::*;
use std::collections::VecDeque;
use std::io::Write;

/// Rows encoded to JSON at a time.
const BATCH_ROWS: usize = 512;
/// gzip trailer (CRC32 + size) plus the final deflate block's end, with room to spare.
const TRAILER: usize = 64;

/// Dates and datetimes as ISO 8601 text, the rest as is.
pub fn prepare(df: &DataFrame) -> Result<DataFrame, String> {
    let columns = df
        .get_columns()
        .iter()
        .map(|c| match c.dtype() {
            DataType::Date => Ok(c.date()?.to_string("%Y-%m-%d")?.into_column()),
            DataType::Datetime(tu, Some(_)) => {
                let naive = c.cast(&DataType::Datetime(*tu, None))?;
                Ok(naive
                    .datetime()?
                    .to_string("%Y-%m-%dT%H:%M:%S%.3fZ")?
                    .into_column())
            }
            DataType::Datetime(_, None) => Ok(c
                .datetime()?
                .to_string("%Y-%m-%dT%H:%M:%S%.3fZ")?
                .into_column()),
            _ => Ok(c.clone()),
        })
        .collect::<PolarsResult<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    DataFrame::new(columns).map_err(|e| e.to_string())
}

/// The records of rows `start..start + len` as JSON lines (each `{…}` then `\n`).
pub fn json_lines(df: &DataFrame, start: usize, len: usize) -> Result<Vec<u8>, String> {
    let mut part = df.slice(start as i64, len);
    let mut out = Vec::with_capacity(len * 128);
    JsonWriter::new(&mut out)
        .with_json_format(JsonFormat::JsonLines)
        .finish(&mut part)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Streams a frame's records, one JSON object at a time.
pub struct RecordStream {
    df: DataFrame,
    next_row: usize,
    buf: Vec<u8>,
    /// (start, end) of each pending record in `buf`.
    spans: VecDeque<(usize, usize)>,
}

impl RecordStream {
    /// `df` already [`prepare`]d.
    pub fn new(df: DataFrame, from_row: usize) -> Self {
        RecordStream {
            df,
            next_row: from_row,
            buf: Vec::new(),
            spans: VecDeque::new(),
        }
    }

    /// The next record's JSON, or `None` at the end.
    pub fn peek(&mut self) -> Result<Option<&[u8]>, String> {
        if self.spans.is_empty() {
            let height = self.df.height();
            if self.next_row >= height {
                return Ok(None);
            }
            let len = BATCH_ROWS.min(height - self.next_row);
            self.buf = json_lines(&self.df, self.next_row, len)?;
            self.next_row += len;
            let mut start = 0;
            for (i, b) in self.buf.iter().enumerate() {
                if *b == b'\n' {
                    self.spans.push_back((start, i));
                    start = i + 1;
                }
            }
            if start < self.buf.len() {
                self.spans.push_back((start, self.buf.len()));
            }
            if self.spans.len() != len {
                return Err(format!(
                    "encoding rows as JSON gave {} records for {len} rows",
                    self.spans.len()
                ));
            }
        }
        Ok(self.spans.front().map(|&(s, e)| &self.buf[s..e]))
    }

    /// Drop the record [`peek`](Self::peek) returned.
    pub fn advance(&mut self) {
        self.spans.pop_front();
    }
}

/// One request body.
#[derive(Debug)]
pub struct Chunk {
    /// The gzip JSON array.
    pub body: Vec<u8>,
    /// Rows `first_row..first_row + records`.
    pub first_row: usize,
    pub records: usize,
    /// The JSON array's size before compression.
    pub raw_bytes: usize,
}

/// Cuts a frame's records into gzip bodies of at most `limit` bytes.
pub struct Chunker {
    df: DataFrame,
    stream: RecordStream,
    row: usize,
    limit: usize,
    max_records: usize,
    level: u32,
    /// Compressed ÷ raw so far (starts pessimistic).
    ratio: f64,
}

impl Chunker {
    /// `df` already [`prepare`]d; `max_records` 0 for no cap.
    pub fn new(df: DataFrame, limit: usize, max_records: usize, level: u32) -> Self {
        Chunker {
            stream: RecordStream::new(df.clone(), 0),
            df,
            row: 0,
            limit: limit.max(256),
            max_records: if max_records == 0 {
                usize::MAX
            } else {
                max_records
            },
            level: level.min(9),
            ratio: 1.0,
        }
    }

    /// The next request body, or `None` when every record went out.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>, String> {
        let mut cap = self.max_records;
        loop {
            let first_row = self.row;
            let (chunk, stopped_early) = self.encode(cap)?;
            let Some(chunk) = chunk else { return Ok(None) };
            if chunk.body.len() <= self.limit {
                self.row += chunk.records;
                return Ok(Some(chunk));
            }
            // Came out above the limit: encode again, with fewer records.
            if chunk.records <= 1 {
                return Err(format!(
                    "record {} alone compresses to {} bytes, above the sending limit of {} bytes",
                    first_row + 1,
                    chunk.body.len(),
                    self.limit
                ));
            }
            let _ = stopped_early;
            let scaled = (chunk.records as f64 * self.limit as f64 / chunk.body.len() as f64 * 0.99)
                as usize;
            cap = scaled.clamp(1, chunk.records - 1);
            self.stream = RecordStream::new(self.df.clone(), first_row);
        }
    }

    /// Encode records from the current row, at most `cap` of them.
    fn encode(&mut self, cap: usize) -> Result<(Option<Chunk>, bool), String> {
        let first_row = self.row;
        let limit = self.limit;
        let mut enc = GzEncoder::new(
            Vec::with_capacity(limit.min(8 << 20)),
            Compression::new(self.level),
        );
        let io = |e: std::io::Error| e.to_string();
        enc.write_all(b"[").map_err(io)?;
        let mut raw = 1usize;
        let mut records = 0usize;
        // Compressed bytes known exactly, and the raw bytes they cover.
        let mut out = enc.get_ref().len();
        let mut raw_at_out = 0usize;
        // Sync-flush once the estimate gets this close to the limit.
        let near = limit.saturating_sub((limit / 16).max(4096));
        // …and again whenever this much (estimated compressed) is pending.
        let step = (limit / 256).max(1024);
        let mut stopped_early = false;
        while records < cap {
            let Some(rec) = self.stream.peek()? else {
                break;
            };
            let add = rec.len() + 1;
            let pending = (raw - raw_at_out + add) as f64 * self.ratio;
            let estimate = out + pending.ceil() as usize + TRAILER;
            if records > 0 && estimate > limit {
                stopped_early = true;
                break;
            }
            if records > 0 {
                enc.write_all(b",").map_err(io)?;
            }
            enc.write_all(rec).map_err(io)?;
            self.stream.advance();
            records += 1;
            raw += add;
            let now_out = enc.get_ref().len();
            if now_out > out {
                out = now_out;
                raw_at_out = raw;
            }
            let pending = (raw - raw_at_out) as f64 * self.ratio;
            if out + pending as usize > near && pending as usize > step.min(limit / 64) {
                enc.flush().map_err(io)?;
                out = enc.get_ref().len();
                raw_at_out = raw;
            }
            if out > 4096 && raw_at_out > 0 {
                // Learn the ratio (never below 1 %, a guard against runs of zeros).
                self.ratio = (out as f64 / raw_at_out as f64).max(0.01);
            }
        }
        if records == 0 {
            return Ok((None, false));
        }
        enc.write_all(b"]").map_err(io)?;
        raw += 1;
        let body = enc.finish().map_err(io)?;
        if raw > 0 && body.len() > 4096 {
            self.ratio = (body.len() as f64 / raw as f64).max(0.01);
        }
        Ok((
            Some(Chunk {
                body,
                first_row,
                records,
                raw_bytes: raw,
            }),
            stopped_early,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn frame(n: usize) -> DataFrame {
        let ids: Vec<i64> = (0..n as i64).collect();
        let titles: Vec<String> = (0..n)
            .map(|i| format!("ticket {i} about {}", (i * 7919) % 1013))
            .collect();
        let days: Vec<i32> = (0..n as i32).map(|i| 20000 + i % 300).collect();
        DataFrame::new(vec![
            Column::new("id".into(), ids),
            Column::new("title".into(), titles),
            Column::new("day".into(), days)
                .cast(&DataType::Date)
                .unwrap(),
        ])
        .unwrap()
    }

    fn gunzip(b: &[u8]) -> serde_json::Value {
        let mut s = String::new();
        flate2::read::GzDecoder::new(b)
            .read_to_string(&mut s)
            .unwrap();
        serde_json::from_str(&s).unwrap()
    }

    #[test]
    fn dates_become_iso_text() {
        let df = prepare(&frame(2)).unwrap();
        let lines = json_lines(&df, 0, 2).unwrap();
        let first: serde_json::Value =
            serde_json::from_slice(lines.split(|b| *b == b'\n').next().unwrap()).unwrap();
        assert_eq!(
            first,
            serde_json::json!({"id": 0, "title": "ticket 0 about 0", "day": "2024-10-04"})
        );
    }

    #[test]
    fn chunks_stay_under_the_limit_and_fill_it() {
        let df = prepare(&frame(60_000)).unwrap();
        let limit = 64 * 1024;
        let mut c = Chunker::new(df, limit, 0, 6);
        let (mut total, mut records, mut n, mut next_row) = (0usize, 0usize, 0usize, 0usize);
        while let Some(chunk) = c.next_chunk().unwrap() {
            assert!(chunk.body.len() <= limit, "{} > {limit}", chunk.body.len());
            assert_eq!(chunk.first_row, next_row);
            let v = gunzip(&chunk.body);
            assert_eq!(v.as_array().unwrap().len(), chunk.records);
            assert_eq!(v[0]["id"], serde_json::json!(chunk.first_row));
            next_row += chunk.records;
            total += chunk.body.len();
            records += chunk.records;
            n += 1;
        }
        assert_eq!(records, 60_000);
        let minimum = total.div_ceil(limit);
        assert!(
            n as f64 <= 1.05 * minimum as f64,
            "{n} requests for a minimum of {minimum}"
        );
    }

    #[test]
    fn record_cap_and_tiny_limits() {
        let df = prepare(&frame(1000)).unwrap();
        let mut c = Chunker::new(df.clone(), 1 << 20, 300, 6);
        let sizes: Vec<usize> = std::iter::from_fn(|| c.next_chunk().unwrap())
            .map(|c| c.records)
            .collect();
        assert_eq!(sizes, vec![300, 300, 300, 100]);
        // A limit a few records wide still works, every body under it.
        let mut c = Chunker::new(df, 300, 0, 6);
        let mut records = 0;
        while let Some(chunk) = c.next_chunk().unwrap() {
            assert!(chunk.body.len() <= 300);
            records += chunk.records;
        }
        assert_eq!(records, 1000);
    }
}
