//! Carol send benchmark (`cargo bench --bench carol`, or `just bench`).
//!
//! 1,000,000 ticket-like records (id, number, title, status, priority, requester, amount,
//! open flag, created and updated datetimes) sent by the `carol.send` step to the sandbox's
//! Carol fake, with the fake's sending limit at 4 MB so the send makes many requests. Both
//! run in this process (the fake gunzips, parses and upserts every record on the same
//! cores), so records/s is the step and the fake together.
//!
//! Figures: records/s; compressed bytes sent; requests against the minimum
//! ⌈compressed bytes ÷ limit⌉ (goal ≤ 1.05 ×); the largest request against the limit (must
//! be ≤). No harness, no criterion: a plain `main` that prints the machine and a table.

mod support;
use support::{machine, print_table, row, Row};

use engine::events::{Observer, RunEvent};
use engine::secrets::Redactor;
use engine::step::{StepConfig, StepContext};
use polars::prelude::*;
use std::sync::Arc;
use std::time::Instant;

const RECORDS: usize = 1_000_000;
const LIMIT: u64 = 4 * 1024 * 1024;

struct Quiet;
impl Observer for Quiet {
    fn event(&self, _: &RunEvent) {}
}

fn tickets(n: usize) -> DataFrame {
    const STATUS: [&str; 5] = ["open", "pending", "in progress", "solved", "closed"];
    const PRIORITY: [&str; 4] = ["low", "normal", "high", "urgent"];
    let h = |i: usize, k: u64| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k;
    let ids: Vec<i64> = (1..=n as i64).collect();
    let numbers: Vec<String> = (0..n).map(|i| format!("TK-{:07}", i + 1)).collect();
    let titles: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "Problem {} with invoice {} on unit {}",
                h(i, 1) % 97,
                h(i, 2) % 100_000,
                h(i, 3) % 40
            )
        })
        .collect();
    let status: Vec<&str> = (0..n).map(|i| STATUS[(h(i, 4) % 5) as usize]).collect();
    let priority: Vec<&str> = (0..n).map(|i| PRIORITY[(h(i, 5) % 4) as usize]).collect();
    let requester: Vec<String> = (0..n)
        .map(|i| format!("user{}@client{}.com.br", h(i, 6) % 5000, h(i, 7) % 300))
        .collect();
    let amount: Vec<f64> = (0..n)
        .map(|i| (h(i, 8) % 1_000_000) as f64 / 100.0)
        .collect();
    let open: Vec<bool> = (0..n).map(|i| h(i, 9) % 3 == 0).collect();
    let created: Vec<i64> = (0..n)
        .map(|i| 1_735_689_600_000 + (h(i, 10) % 31_536_000_000) as i64)
        .collect();
    let updated: Vec<i64> = created
        .iter()
        .enumerate()
        .map(|(i, c)| c + (h(i, 11) % 864_000_000) as i64)
        .collect();
    let dt = |name: &str, v: Vec<i64>| {
        Column::new(name.into(), v)
            .cast(&DataType::Datetime(
                TimeUnit::Milliseconds,
                Some(polars::prelude::TimeZone::UTC),
            ))
            .unwrap()
    };
    DataFrame::new(vec![
        Column::new("id".into(), ids),
        Column::new("number".into(), numbers),
        Column::new("title".into(), titles),
        Column::new("status".into(), status),
        Column::new("priority".into(), priority),
        Column::new("requester".into(), requester),
        Column::new("amount".into(), amount),
        Column::new("open".into(), open),
        dt("created_at", created),
        dt("updated_at", updated),
    ])
    .unwrap()
}

fn main() {
    println!("{}", machine());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sbx = rt
        .block_on(sandbox::Sandbox::start(sandbox::Options {
            tickets: 1,
            carol_sending_limit_bytes: LIMIT,
            ..Default::default()
        }))
        .unwrap();
    let v = sbx.values();
    let c = &v["carol"];
    let df = tickets(RECORDS);
    let ctx = || {
        let dir = std::env::temp_dir();
        let mut ctx = StepContext::new(
            "send",
            1,
            Arc::new(Quiet),
            Redactor::new(),
            dir.clone(),
            dir,
        );
        ctx.connection = Some(serde_json::json!({
            "type": "carol", "tenant": c["tenant"], "url": c["url"],
            "connector_id": c["connector_id"], "api_key": c["api_key"],
        }));
        ctx.inputs
            .insert("tickets".into(), steps::table::table(df.clone()));
        ctx
    };
    let schema: steps::carol::CarolSchema =
        serde_json::from_value(serde_json::json!({"table": "tickets", "crosswalk": ["id"]}))
            .unwrap();
    rt.block_on(schema.run(ctx())).unwrap();
    let send: steps::carol::CarolSend =
        serde_json::from_value(serde_json::json!({"table": "tickets"})).unwrap();
    let started = Instant::now();
    let out = rt.block_on(send.run(ctx())).unwrap();
    let secs = started.elapsed().as_secs_f64();
    let r = &out.result;
    let get = |k: &str| r[k].as_u64().unwrap();
    let (records, requests, sent, raw, largest) = (
        get("records"),
        get("requests"),
        get("bytes_sent"),
        get("bytes_raw"),
        get("largest_request_bytes"),
    );
    let stats = sbx.stats().carol;
    assert_eq!(records as usize, RECORDS);
    // (The fake also starts holding the demo ERP's `emitente`: count this table alone.)
    assert_eq!(sbx.carol_records("tickets").len(), RECORDS);
    assert_eq!(stats.bytes_received, sent);
    assert_eq!(stats.rejected_too_large, 0);
    let minimum = sent.div_ceil(LIMIT);
    let mut rows: Vec<Row> = Vec::new();
    row(
        &mut rows,
        "carol.send 1,000,000 records → fake (4 MB limit)",
        format!("{:.0} records/s ({secs:.2} s)", records as f64 / secs),
        "—",
        "—",
    );
    row(
        &mut rows,
        "compressed bytes sent (gzip 6)",
        format!(
            "{:.1} MB of {:.1} MB JSON",
            sent as f64 / 1e6,
            raw as f64 / 1e6
        ),
        "—",
        format!("{:.3}", sent as f64 / raw as f64),
    );
    row(
        &mut rows,
        "requests vs ⌈compressed ÷ limit⌉",
        format!("{requests} vs {minimum}"),
        "≤ 1.05 ×",
        format!("{:.3} ×", requests as f64 / minimum as f64),
    );
    row(
        &mut rows,
        "largest request vs limit",
        format!("{largest} vs {LIMIT} bytes"),
        "≤ 1",
        format!("{:.4}", largest as f64 / LIMIT as f64),
    );
    print_table(&rows);
    assert!(largest <= LIMIT, "a request above the limit");
    drop(sbx);
}
