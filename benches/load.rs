//! Transform, load and whole-pipeline benchmark (`cargo bench --bench load`, or `just bench`).
//!
//! Two figures, each next to its goal, both measured on the release `pipe` binary run as a
//! child process (what a user runs), peak RSS from `wait4`'s `ru_maxrss`:
//!
//! 1. `clean` + write of 1,000,000 tickets. The bench builds a 1,000,000-row table shaped
//!    like the one `http.extract` makes of the Tiflux fake's tickets (the flattened columns:
//!    `ticket_number`, `title`, `description`, `is_closed`, `created_at`/`updated_at`/
//!    `closed_at` as `Datetime(µs, "UTC")` with nulls, `status_*`, `stage_*`, `priority_*`,
//!    `desk_*`, `client_*`, nullable `responsible_*`, `requestor_*`, `services_catalog_*`,
//!    `sla_info_*`, `tags`/`followers` as JSON text, `worked_hours`, `reopen_count`: 37
//!    columns) and writes it to Parquet. `pipe run` then runs `file.read` of it → the
//!    `clean` step of `pipelines/tiflux.yaml` (copied from the file: rename, map
//!    `status_id` → `situacao`, `convert_timezone` of three columns) → `file.write` of
//!    Parquet. The figure is `clean`'s + the write's `duration_ms` from the JSON summary.
//!    Goals: ≥ 1,000,000 rows/s; peak RSS of the process ≤ 3 × the in-memory size
//!    (`estimated_size()`) of the written Parquet read back.
//! 2. The whole `pipelines/tiflux.yaml` under `--sandbox` with 100,000 tickets and 20 ms of
//!    latency per request (`every: 5s` of the OTP poll made 100 ms; concurrency 8): process
//!    wall time and each step's duration against the extraction floor (500 pages × 20 ms ÷
//!    8 = 1.25 s); and the bytes the BigQuery fake received (`sandbox.bytes_uploaded`)
//!    against the size of the loaded table's Parquet file (`pipe sandbox tables`).
//!    Goal: ≤ 1.1 × that size.
//!
//! No harness, no criterion: a plain `main` that prints the machine and a table.

mod support;
use support::{machine, print_table, row, wait4, Row};

use polars::prelude::*;
use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROWS: usize = 1_000_000;
const ROWS_GOAL_PER_S: f64 = 1_000_000.0;
const RSS_GOAL_FACTOR: f64 = 3.0;
const CLEAN_REPEATS: usize = 3;

const TICKETS: u64 = 100_000;
const PAGES: u64 = TICKETS / 200;
const LATENCY_MS: u64 = 20;
const CONCURRENCY: u64 = 8;
/// Covers the 365 days before the fake's anchor (the logical date under `--sandbox`).
const DAYS: u32 = 400;
const PIPELINE_REPEATS: usize = 3;
const UPLOAD_GOAL: f64 = 1.1;

// ---------------------------------------------------------------------------------------
// The table (as in benches/engine.rs).

fn met(ok: bool) -> &'static str {
    if ok {
        "(met)"
    } else {
        "(MISSED)"
    }
}

fn mb(bytes: f64) -> f64 {
    bytes / 1e6
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------------------
// One run of the real binary.

struct Run {
    summary: serde_json::Value,
    wall: Duration,
    /// Peak RSS of the `pipe` process, bytes.
    rss: u64,
}

/// `pipe --state-dir STATE ARGS…` with `PIPE_SANDBOX` set if given; the parsed JSON
/// stdout.
// The child is reaped by `wait4` (below), which also reports its peak RSS.
#[allow(clippy::zombie_processes)]
fn pipe(state: &Path, args: &[&str], sandbox: Option<&serde_json::Value>) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipe"));
    cmd.arg("--state-dir").arg(state).args(args);
    if let Some(options) = sandbox {
        cmd.env("PIPE_SANDBOX", options.to_string());
    }
    let clock = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pipe");
    let mut stderr = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    let (code, rss_kib) = wait4(child.id());
    let wall = clock.elapsed();
    let errors = errors.join().unwrap_or_default();
    assert_eq!(code, 0, "pipe {args:?} failed:\n{out}\n{errors}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("JSON on stdout");
    Run {
        summary,
        wall,
        rss: rss_kib.max(0) as u64 * 1024,
    }
}

/// A step of a run's JSON summary.
fn step<'a>(summary: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    summary["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step `{id}` in {summary}"))
}

fn step_ms(summary: &serde_json::Value, id: &str) -> u64 {
    step(summary, id)["duration_ms"]
        .as_u64()
        .expect("duration_ms")
}

fn tiflux_yaml() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/tiflux.yaml");
    std::fs::read_to_string(&path).expect("read pipelines/tiflux.yaml")
}

/// `text` with `from` (which must occur once) replaced by `to`.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "pipelines/tiflux.yaml should contain `{from}` once"
    );
    text.replace(from, to)
}

// ---------------------------------------------------------------------------------------
// 1. clean + write of 1,000,000 tickets.

/// 1,000,000 tickets with the columns `http.extract` gives the Tiflux fake's tickets.
fn tickets_frame(n: usize) -> DataFrame {
    const TITLES: [&str; 8] = [
        "Erro ao emitir nota fiscal",
        "Impressora não imprime",
        "Acesso ao sistema bloqueado",
        "Lentidão no ERP",
        "Solicitação de novo usuário",
        "Backup não concluído",
        "VPN desconecta",
        "Dúvida sobre relatório mensal",
    ];
    const STATUSES: [(i64, &str, bool); 4] = [
        (1, "Aberto", true),
        (2, "Em atendimento", false),
        (3, "Resolvido", false),
        (4, "Cancelado", false),
    ];
    const STAGES: [&str; 4] = [
        "Triagem",
        "Em atendimento",
        "Aguardando cliente",
        "Finalizado",
    ];
    const PRIORITIES: [(i64, &str, i64); 4] = [
        (1, "Baixa", 24),
        (2, "Média", 8),
        (3, "Alta", 4),
        (4, "Urgente", 1),
    ];
    const DESKS: [(i64, &str); 3] = [(1, "Suporte N1"), (2, "Suporte N2"), (3, "Infraestrutura")];
    const AGENTS: [(i64, &str, &str); 6] = [
        (101, "Ana Souza", "ana.souza"),
        (102, "Bruno Lima", "bruno.lima"),
        (103, "Carla Dias", "carla.dias"),
        (104, "Diego Alves", "diego.alves"),
        (105, "Eva Rocha", "eva.rocha"),
        (106, "Felipe Melo", "felipe.melo"),
    ];
    const FIRST: [&str; 6] = ["João", "Maria", "Pedro", "Luíza", "Rafael", "Beatriz"];
    const LAST: [&str; 6] = [
        "Silva", "Santos", "Oliveira", "Pereira", "Costa", "Ferreira",
    ];
    const SERVICES: [(i64, &str, i64, &str); 4] = [
        (11, "Fiscal", 1, "Sistemas"),
        (12, "Impressão", 2, "Hardware"),
        (13, "Acessos", 1, "Sistemas"),
        (14, "Rede", 3, "Infraestrutura"),
    ];
    const TAGS: [&str; 5] = ["urgente", "cliente-vip", "retorno", "nfe", "vpn"];
    // 2025-11-25T00:00:00Z in µs: the year before it.
    const ANCHOR_US: i64 = 1_764_028_800_000_000;
    const YEAR_US: i64 = 365 * 86_400 * 1_000_000;
    const HOUR_US: i64 = 3_600 * 1_000_000;

    let mut r = Rng(0x9E37_79B9_7F4A_7C15);
    let mut c = Cols::default();
    for i in 0..n {
        let number = 100_000 + i as i64;
        let title = TITLES[r.below(8) as usize];
        let (status_id, status_name, default_open) = STATUSES[match r.below(100) {
            0..=14 => 0,
            15..=34 => 1,
            35..=94 => 2,
            _ => 3,
        }];
        let closed = status_id >= 3;
        let stage_no = match status_id {
            1 => 1,
            2 if r.below(3) == 0 => 3,
            2 => 2,
            _ => 4,
        };
        let priority = PRIORITIES[r.below(4) as usize];
        let desk = DESKS[r.below(3) as usize];
        let client = r.below(300) as i64;
        let client_name = format!("Cliente {client:03} Ltda");
        let created = ANCHOR_US - (r.below(YEAR_US as u64) as i64);
        let closed_at = closed.then(|| created + r.below((ANCHOR_US - created) as u64) as i64);
        let updated =
            closed_at.unwrap_or_else(|| created + r.below((ANCHOR_US - created) as u64 + 1) as i64);
        let responsible = (status_id != 1 || r.below(2) == 0).then(|| AGENTS[r.below(6) as usize]);
        let (fi, li) = (r.below(6) as usize, r.below(6) as usize);
        let requestor = format!("{} {}", FIRST[fi], LAST[li]);
        let svc = SERVICES[r.below(4) as usize];
        let solve = created + priority.2 * 4 * HOUR_US;
        let tags: Vec<&str> = (0..r.below(3)).map(|_| TAGS[r.below(5) as usize]).collect();
        let followers: Vec<serde_json::Value> = (0..r.below(3))
            .map(|_| {
                let a = AGENTS[r.below(6) as usize];
                serde_json::json!({"id": a.0, "name": a.1, "email": format!("{}@helpdesk.example.com", a.2)})
            })
            .collect();

        c.ticket_number.push(number);
        c.title.push(title.to_string());
        c.description.push(format!(
            "{title}. Chamado aberto por {requestor} ({client_name})."
        ));
        c.is_closed.push(closed);
        c.created_at.push(created);
        c.updated_at.push(updated);
        c.closed_at.push(closed_at);
        c.status_id.push(status_id);
        c.status_name.push(status_name);
        c.status_default_open.push(default_open);
        c.stage_id.push(desk.0 * 10 + stage_no);
        c.stage_name.push(STAGES[stage_no as usize - 1]);
        c.stage_first_stage.push(stage_no == 1);
        c.stage_last_stage.push(stage_no == 4);
        c.priority_id.push(priority.0);
        c.priority_name.push(priority.1);
        c.desk_id.push(desk.0);
        c.desk_name.push(desk.1);
        c.client_id.push(client);
        c.client_name.push(client_name.clone());
        c.responsible_id.push(responsible.map(|a| a.0));
        c.responsible_name.push(responsible.map(|a| a.1));
        c.responsible_email
            .push(responsible.map(|a| format!("{}@helpdesk.example.com", a.2)));
        c.requestor_email.push(format!(
            "{}.{}@cliente{client:03}.com.br",
            FIRST[fi].to_lowercase(),
            LAST[li].to_lowercase()
        ));
        c.requestor_name.push(requestor);
        c.services_catalog_id.push(svc.0);
        c.services_catalog_name.push(svc.1);
        c.services_catalog_area_id.push(svc.2);
        c.services_catalog_area_name.push(svc.3);
        c.sla_attend.push(created + priority.2 * HOUR_US);
        c.sla_solve.push(solve);
        c.sla_solved_in_time.push(closed_at.map(|t| t <= solve));
        c.sla_stopped.push(stage_no == 3);
        c.tags
            .push(serde_json::to_string(&tags).expect("JSON text"));
        c.followers
            .push(serde_json::to_string(&followers).expect("JSON text"));
        c.worked_hours.push(r.below(160) as f64 / 4.0);
        c.reopen_count
            .push(if closed { (r.below(100) < 8) as i64 } else { 0 });
    }
    c.frame()
}

/// The column vectors of [`tickets_frame`].
#[derive(Default)]
struct Cols {
    ticket_number: Vec<i64>,
    title: Vec<String>,
    description: Vec<String>,
    is_closed: Vec<bool>,
    created_at: Vec<i64>,
    updated_at: Vec<i64>,
    closed_at: Vec<Option<i64>>,
    status_id: Vec<i64>,
    status_name: Vec<&'static str>,
    status_default_open: Vec<bool>,
    stage_id: Vec<i64>,
    stage_name: Vec<&'static str>,
    stage_first_stage: Vec<bool>,
    stage_last_stage: Vec<bool>,
    priority_id: Vec<i64>,
    priority_name: Vec<&'static str>,
    desk_id: Vec<i64>,
    desk_name: Vec<&'static str>,
    client_id: Vec<i64>,
    client_name: Vec<String>,
    responsible_id: Vec<Option<i64>>,
    responsible_name: Vec<Option<&'static str>>,
    responsible_email: Vec<Option<String>>,
    requestor_name: Vec<String>,
    requestor_email: Vec<String>,
    services_catalog_id: Vec<i64>,
    services_catalog_name: Vec<&'static str>,
    services_catalog_area_id: Vec<i64>,
    services_catalog_area_name: Vec<&'static str>,
    sla_attend: Vec<i64>,
    sla_solve: Vec<i64>,
    sla_solved_in_time: Vec<Option<bool>>,
    sla_stopped: Vec<bool>,
    tags: Vec<String>,
    followers: Vec<String>,
    worked_hours: Vec<f64>,
    reopen_count: Vec<i64>,
}

impl Cols {
    fn frame(self) -> DataFrame {
        let utc = DataType::Datetime(TimeUnit::Microseconds, Some(TimeZone::UTC));
        let dt = |name: &str, v: Series| -> Column {
            v.with_name(name.into())
                .cast(&utc)
                .expect("µs → Datetime")
                .into_column()
        };
        let s = |name: &str, v: Series| -> Column { v.with_name(name.into()).into_column() };
        let columns = vec![
            s(
                "ticket_number",
                Series::from_vec("".into(), self.ticket_number),
            ),
            s("title", Series::new("".into(), self.title)),
            s("description", Series::new("".into(), self.description)),
            s("is_closed", Series::new("".into(), self.is_closed)),
            dt("created_at", Series::from_vec("".into(), self.created_at)),
            dt("updated_at", Series::from_vec("".into(), self.updated_at)),
            dt("closed_at", Series::new("".into(), self.closed_at)),
            s("status_id", Series::from_vec("".into(), self.status_id)),
            s("status_name", Series::new("".into(), self.status_name)),
            s(
                "status_default_open",
                Series::new("".into(), self.status_default_open),
            ),
            s("stage_id", Series::from_vec("".into(), self.stage_id)),
            s("stage_name", Series::new("".into(), self.stage_name)),
            s(
                "stage_first_stage",
                Series::new("".into(), self.stage_first_stage),
            ),
            s(
                "stage_last_stage",
                Series::new("".into(), self.stage_last_stage),
            ),
            s("priority_id", Series::from_vec("".into(), self.priority_id)),
            s("priority_name", Series::new("".into(), self.priority_name)),
            s("desk_id", Series::from_vec("".into(), self.desk_id)),
            s("desk_name", Series::new("".into(), self.desk_name)),
            s("client_id", Series::from_vec("".into(), self.client_id)),
            s("client_name", Series::new("".into(), self.client_name)),
            s(
                "responsible_id",
                Series::new("".into(), self.responsible_id),
            ),
            s(
                "responsible_name",
                Series::new("".into(), self.responsible_name),
            ),
            s(
                "responsible_email",
                Series::new("".into(), self.responsible_email),
            ),
            s(
                "requestor_name",
                Series::new("".into(), self.requestor_name),
            ),
            s(
                "requestor_email",
                Series::new("".into(), self.requestor_email),
            ),
            s(
                "services_catalog_id",
                Series::from_vec("".into(), self.services_catalog_id),
            ),
            s(
                "services_catalog_name",
                Series::new("".into(), self.services_catalog_name),
            ),
            s(
                "services_catalog_area_id",
                Series::from_vec("".into(), self.services_catalog_area_id),
            ),
            s(
                "services_catalog_area_name",
                Series::new("".into(), self.services_catalog_area_name),
            ),
            dt(
                "sla_info_attend_expiration",
                Series::from_vec("".into(), self.sla_attend),
            ),
            dt(
                "sla_info_solve_expiration",
                Series::from_vec("".into(), self.sla_solve),
            ),
            s(
                "sla_info_solved_in_time",
                Series::new("".into(), self.sla_solved_in_time),
            ),
            s("sla_info_stopped", Series::new("".into(), self.sla_stopped)),
            s("tags", Series::new("".into(), self.tags)),
            s("followers", Series::new("".into(), self.followers)),
            s(
                "worked_hours",
                Series::from_vec("".into(), self.worked_hours),
            ),
            s(
                "reopen_count",
                Series::from_vec("".into(), self.reopen_count),
            ),
        ];
        DataFrame::new(columns).expect("a frame")
    }
}

/// `pipelines/tiflux.yaml`'s `clean` step, as written there (indented block).
fn clean_step(tiflux: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in tiflux.lines() {
        let top = line.starts_with("  ") && !line.starts_with("   ") && line.ends_with(':');
        if top {
            inside = line == "  clean:";
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(
        out.contains("rename:") && out.contains("map:") && out.contains("convert_timezone:"),
        "the clean step of pipelines/tiflux.yaml:\n{out}"
    );
    out
}

/// The bench's own process must stay small: a child started with `vfork` + `exec` (as
/// `Command::spawn` does) inherits the parent's peak RSS in its `ru_maxrss`. So the large
/// frames are built and read back in a helper process: this bench re-run with
/// `PIPE_BENCH_LOAD_HELPER=generate:PATH` (build the tickets, write PATH, print the frame's
/// estimated size) or `=measure:PATH` (read PATH back, print its estimated size).
const HELPER_ENV: &str = "PIPE_BENCH_LOAD_HELPER";

fn helper(task: &str) {
    let (what, path) = task.split_once(':').expect("TASK:PATH");
    match what {
        "generate" => {
            let mut df = tickets_frame(ROWS);
            let f = std::fs::File::create(path).expect("create the Parquet file");
            ParquetWriter::new(f)
                .finish(&mut df)
                .expect("write the Parquet file");
            println!("{}", df.estimated_size());
        }
        "measure" => {
            let df = ParquetReader::new(std::fs::File::open(path).expect("open the Parquet"))
                .finish()
                .expect("read the Parquet back");
            assert_eq!(df.height(), ROWS);
            assert!(df.column("situacao").is_ok() && df.column("numero").is_ok());
            // The floor of a Parquet write: Polars encoding the same frame into memory (no
            // file, no fsync), best of 2, per codec.
            let mut line = df.estimated_size().to_string();
            for codec in [
                ParquetCompression::Zstd(None),
                ParquetCompression::Snappy,
                ParquetCompression::Uncompressed,
            ] {
                let best = (0..2)
                    .map(|_| {
                        let mut buf = Vec::with_capacity(64 << 20);
                        let mut frame = df.clone();
                        let clock = Instant::now();
                        ParquetWriter::new(&mut buf)
                            .with_compression(codec)
                            .finish(&mut frame)
                            .expect("encode Parquet");
                        (clock.elapsed().as_millis() as u64, buf.len())
                    })
                    .min()
                    .expect("runs");
                let _ = write!(line, " {} {}", best.0, best.1);
            }
            println!("{line}");
        }
        other => panic!("unknown helper task {other}"),
    }
}

/// Run [`helper`] in a child process; the numbers it printed.
fn run_helper(task: &str, path: &Path) -> Vec<u64> {
    let out = Command::new(std::env::current_exe().expect("the bench's path"))
        .env(HELPER_ENV, format!("{task}:{}", path.display()))
        .stderr(Stdio::inherit())
        .output()
        .expect("run the helper");
    assert!(out.status.success(), "helper {task} failed");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect()
}

/// This process's resident set, bytes (what a spawned child's `ru_maxrss` may include).
fn own_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn bench_clean(dir: &Path, rows: &mut Vec<Row>) {
    let input = dir.join("tickets.parquet");
    let clock = Instant::now();
    let input_mem = run_helper("generate", &input)[0];
    let input_bytes = std::fs::metadata(&input).expect("input").len();
    println!(
        "input: {ROWS} rows, 37 columns, {:.0} MB in memory, {:.0} MB Parquet (built in {:.1} s)",
        mb(input_mem as f64),
        mb(input_bytes as f64),
        clock.elapsed().as_secs_f64()
    );

    let file = dir.join("clean.yaml");
    let pipeline = format!(
        "pipeline: bench-clean\nsteps:\n  tickets:\n    type: file.read\n    with: {{ path: tickets.parquet }}\n\n{}\n  save:\n    type: file.write\n    input: clean\n    with: {{ path: clean.parquet }}\n",
        clean_step(&tiflux_yaml())
    );
    std::fs::write(&file, pipeline).expect("write clean.yaml");
    let file = file.to_str().expect("UTF-8 path").to_string();

    struct Timing {
        read: u64,
        clean: u64,
        save: u64,
        wall: Duration,
        rss: u64,
    }
    let mut runs = Vec::new();
    for k in 0..CLEAN_REPEATS {
        let state = dir.join(format!("state-clean-{k}"));
        let r = pipe(&state, &["run", &file, "--format", "json", "--quiet"], None);
        assert_eq!(r.summary["status"], "succeeded", "{}", r.summary);
        assert_eq!(step(&r.summary, "save")["rows"].as_u64(), Some(ROWS as u64));
        let t = Timing {
            read: step_ms(&r.summary, "tickets"),
            clean: step_ms(&r.summary, "clean"),
            save: step_ms(&r.summary, "save"),
            wall: r.wall,
            rss: r.rss,
        };
        println!(
            "clean run {}: file.read {} ms, clean {} ms, file.write {} ms, process {:.0} ms, \
             peak RSS {:.0} MB",
            k + 1,
            t.read,
            t.clean,
            t.save,
            t.wall.as_secs_f64() * 1e3,
            mb(t.rss as f64)
        );
        runs.push(t);
    }

    let output = dir.join("clean.parquet");
    let out_bytes = std::fs::metadata(&output).expect("clean.parquet").len();
    let measured = run_helper("measure", &output);
    let out_mem = measured[0] as f64;

    let best = runs.iter().min_by_key(|t| t.clean + t.save).expect("runs");
    let mut totals: Vec<u64> = runs.iter().map(|t| t.clean + t.save).collect();
    totals.sort();
    let med = totals[totals.len() / 2];
    let rate = |ms: u64| ROWS as f64 / (ms.max(1) as f64 / 1e3);
    let best_rate = rate(best.clean + best.save);
    row(
        rows,
        "clean + write 1,000,000 tickets: best",
        format!(
            "{:.0} rows/s ({} ms: clean {} + write {})",
            best_rate,
            best.clean + best.save,
            best.clean,
            best.save
        ),
        format!("≥ {ROWS_GOAL_PER_S:.0} rows/s"),
        format!(
            "{:.2}× goal {}",
            best_rate / ROWS_GOAL_PER_S,
            met(best_rate >= ROWS_GOAL_PER_S)
        ),
    );
    row(
        rows,
        "clean + write: median",
        format!("{:.0} rows/s ({med} ms)", rate(med)),
        format!("≥ {ROWS_GOAL_PER_S:.0} rows/s"),
        format!("{:.2}× goal", rate(med) / ROWS_GOAL_PER_S),
    );
    row(
        rows,
        "  clean alone (best run)",
        format!("{:.0} rows/s ({} ms)", rate(best.clean), best.clean),
        "-",
        "-",
    );
    row(
        rows,
        "  file.write alone (best run)",
        format!(
            "{:.0} rows/s ({} ms, {:.0} MB zstd Parquet)",
            rate(best.save),
            best.save,
            mb(out_bytes as f64)
        ),
        "-",
        "-",
    );
    for (k, codec) in ["zstd", "snappy", "uncompressed"].iter().enumerate() {
        let (ms, bytes) = (measured[1 + 2 * k], measured[2 + 2 * k]);
        row(
            rows,
            format!("  floor: Polars encodes it in memory, {codec}"),
            format!("{ms} ms ({:.0} MB)", mb(bytes as f64)),
            "floor",
            if k == 0 {
                format!("write = {:.2}× floor", best.save as f64 / ms.max(1) as f64)
            } else {
                "-".to_string()
            },
        );
    }
    row(
        rows,
        "  file.read of the input (not counted)",
        format!(
            "{} ms ({:.0} MB Parquet)",
            best.read,
            mb(input_bytes as f64)
        ),
        "-",
        "-",
    );
    let rss = runs.iter().map(|t| t.rss).max().unwrap_or(0) as f64;
    let rss_goal = RSS_GOAL_FACTOR * out_mem;
    row(
        rows,
        "peak RSS of pipe (read + clean + write)",
        format!(
            "{:.0} MB (= {:.2}× the output's in-memory {:.0} MB)",
            mb(rss),
            rss / out_mem,
            mb(out_mem)
        ),
        format!("≤ {RSS_GOAL_FACTOR}× = {:.0} MB", mb(rss_goal)),
        format!("{:.2}× goal {}", rss / rss_goal, met(rss <= rss_goal)),
    );
}

// ---------------------------------------------------------------------------------------
// 2. The whole tiflux pipeline on the sandbox.

fn bench_pipeline(dir: &Path, rows: &mut Vec<Row>) {
    let text = edit(&tiflux_yaml(), "every: 5s", "every: 100ms");
    let text = edit(
        &text,
        "concurrency: 8",
        &format!("concurrency: {CONCURRENCY}"),
    );
    let file = dir.join("tiflux.yaml");
    std::fs::write(&file, text).expect("write tiflux.yaml");
    let file = file.to_str().expect("UTF-8 path").to_string();
    let options = serde_json::json!({
        "tickets": TICKETS, "latency_ms": LATENCY_MS, "otp_delay_ms": 0,
    });
    let floor = Duration::from_millis(PAGES * LATENCY_MS / CONCURRENCY);

    struct Result {
        wall: Duration,
        steps: Vec<(String, u64)>,
        uploaded: u64,
        table_bytes: u64,
        rss: u64,
    }
    let mut results = Vec::new();
    for k in 0..PIPELINE_REPEATS {
        let state = dir.join(format!("state-tiflux-{k}"));
        let days = format!("days={DAYS}");
        let r = pipe(
            &state,
            &[
                "run",
                &file,
                "--sandbox",
                "--format",
                "json",
                "--quiet",
                "--param",
                &days,
            ],
            Some(&options),
        );
        let v = &r.summary;
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(step(v, "tickets")["rows"].as_u64(), Some(TICKETS), "{v}");
        let steps: Vec<(String, u64)> = v["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap_or("?").to_string(),
                    s["duration_ms"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let uploaded = v["sandbox"]["bytes_uploaded"]
            .as_u64()
            .expect("sandbox.bytes_uploaded");
        let tables = pipe(&state, &["sandbox", "tables", "--format", "json"], None).summary;
        let table = tables
            .as_array()
            .expect("a list of tables")
            .iter()
            .find(|t| t["dataset"] == "helpdesk" && t["table"] == "tickets")
            .unwrap_or_else(|| panic!("no helpdesk.tickets in {tables}"));
        assert_eq!(table["rows"].as_u64(), Some(TICKETS), "{table}");
        let path = table["path"].as_str().expect("path");
        let table_bytes = std::fs::metadata(path).expect("the table's file").len();
        println!(
            "pipeline run {}: process {:.0} ms, {}; uploaded {} B, table file {} B, \
             peak RSS {:.0} MB",
            k + 1,
            r.wall.as_secs_f64() * 1e3,
            steps
                .iter()
                .map(|(id, ms)| format!("{id} {ms} ms"))
                .collect::<Vec<_>>()
                .join(", "),
            uploaded,
            table_bytes,
            mb(r.rss as f64)
        );
        results.push(Result {
            wall: r.wall,
            steps,
            uploaded,
            table_bytes,
            rss: r.rss,
        });
    }

    let best = results.iter().min_by_key(|r| r.wall).expect("runs");
    let mut walls: Vec<Duration> = results.iter().map(|r| r.wall).collect();
    walls.sort();
    let med = walls[walls.len() / 2];
    row(
        rows,
        "tiflux pipeline, 100,000 tickets: best",
        format!("{:.2} s wall (process)", best.wall.as_secs_f64()),
        format!("floor {:.2} s", floor.as_secs_f64()),
        format!(
            "{:.2}× floor",
            best.wall.as_secs_f64() / floor.as_secs_f64()
        ),
    );
    row(
        rows,
        "tiflux pipeline: median",
        format!("{:.2} s wall", med.as_secs_f64()),
        format!("floor {:.2} s", floor.as_secs_f64()),
        format!("{:.2}× floor", med.as_secs_f64() / floor.as_secs_f64()),
    );
    for (id, ms) in &best.steps {
        row(
            rows,
            format!("  step {id} (best run)"),
            format!("{ms} ms"),
            if id == "tickets" {
                format!("floor {:.2} s", floor.as_secs_f64())
            } else {
                "-".to_string()
            },
            if id == "tickets" {
                format!("{:.2}× floor", *ms as f64 / floor.as_secs_f64() / 1e3)
            } else {
                "-".to_string()
            },
        );
    }
    let step_sum: u64 = best.steps.iter().map(|(_, ms)| ms).sum();
    row(
        rows,
        "  outside the steps (start, fakes, exit)",
        format!(
            "{:.0} ms",
            (best.wall.as_secs_f64() * 1e3 - step_sum as f64).max(0.0)
        ),
        "-",
        "-",
    );
    row(
        rows,
        "  peak RSS of pipe (all runs)",
        format!(
            "{:.0} MB",
            mb(results.iter().map(|r| r.rss).max().unwrap_or(0) as f64)
        ),
        "-",
        "-",
    );
    let ratio = best.uploaded as f64 / best.table_bytes as f64;
    row(
        rows,
        "bytes uploaded to BigQuery",
        format!(
            "{} B ({:.2} MB) vs table Parquet {} B ({:.2} MB)",
            best.uploaded,
            mb(best.uploaded as f64),
            best.table_bytes,
            mb(best.table_bytes as f64)
        ),
        format!("≤ {UPLOAD_GOAL}× the Parquet"),
        format!("{ratio:.3}× {}", met(ratio <= UPLOAD_GOAL)),
    );
}

fn main() {
    if let Ok(task) = std::env::var(HELPER_ENV) {
        helper(&task);
        return;
    }
    // `cargo bench` passes `--bench`; any other argument is a filter: `clean`, `pipeline`.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| filters.is_empty() || filters.iter().any(|f| f == name);
    println!("{}", machine());
    println!("pipe: {}", env!("CARGO_BIN_EXE_pipe"));
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rows = Vec::new();
    if want("clean") {
        bench_clean(dir.path(), &mut rows);
    }
    if want("pipeline") {
        bench_pipeline(dir.path(), &mut rows);
    }
    println!(
        "(the bench process's own peak RSS, an upper bound on what a child's ru_maxrss may \
         inherit from it: {:.0} MB)",
        mb(own_rss() as f64)
    );
    println!();
    print_table(&rows);
}
