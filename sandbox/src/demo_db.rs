//! The demo SQLite database: the "customer's database" that `--sandbox` uses in place of the
//! SQL Server or Oracle a real QOCKPIT or Carol installation reads.
//!
//! Why a generated file rather than a checked-in one: the rows derive from
//! [`Options::seed`](crate::Options) and end at [`Options::anchor`](crate::Options), like
//! the fakes' tickets, so a test can change either and still predict what a pipeline reads;
//! and a fresh file per sandbox means a pipeline that writes to it cannot disturb another run.
//!
//! Tables (dates and times as ISO 8601 text, so `dt >= :inicio AND dt < :fim` with ISO date
//! strings selects a month):
//! - `clientes(id, nome, cidade, uf)` — 300 customers;
//! - `vendas(id, dt, cliente_id, filial, valor)` — sales from January 2018 up to the anchor's
//!   day, 60 to 140 a month, `valor` in reais with two decimals;
//! - `atendimentos(id, aberto_em, fechado_em, canal, cliente_id, status)` — support tickets
//!   over the same months; the newest ones may still be open (`fechado_em` null);
//! - `emitente(cod_emitente, cgc, nome_emit, cidade, atualizado_em)` — 500 issuers (a TOTVS
//!   Datasul table) with valid CNPJs, the source of the Carol staging pipeline;
//! - `emitente_excluidos(cod_emitente, excluido_em)` — the ERP's deletion log: 12 issuers
//!   deleted one every 36 hours before the anchor.
//!
//! The file is written under a temporary name in one transaction with prepared statements
//! (tens of milliseconds) and renamed into place, so a reader never sees half of it.

use crate::hash;
use anyhow::Context;
use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};

/// The file's name in the sandbox's folder.
pub(crate) const FILE_NAME: &str = "demo.sqlite";
/// The first month with data.
const FIRST_YEAR: i32 = 2018;
/// Customers.
const CLIENTES: u64 = 300;
/// Issuers (Carol's `emitente`).
pub(crate) const EMITENTES: u64 = 500;
/// Issuers deleted before the anchor (`emitente_excluidos`: codes after the last issuer,
/// one every 36 hours going back).
pub(crate) const DELETED_EMITENTES: u64 = 12;

const FILIAIS: [&str; 4] = ["Campinas", "Curitiba", "Recife", "São Paulo"];
const CANAIS: [&str; 4] = ["telefone", "e-mail", "chat", "whatsapp"];
const CIDADES: [(&str, &str); 10] = [
    ("São Paulo", "SP"),
    ("Campinas", "SP"),
    ("Rio de Janeiro", "RJ"),
    ("Belo Horizonte", "MG"),
    ("Curitiba", "PR"),
    ("Porto Alegre", "RS"),
    ("Recife", "PE"),
    ("Salvador", "BA"),
    ("Fortaleza", "CE"),
    ("Goiânia", "GO"),
];
const PRIMEIRO: [&str; 12] = [
    "Alfa",
    "Bandeirantes",
    "Cerrado",
    "Delta",
    "Estrela",
    "Horizonte",
    "Ipê",
    "Jequitibá",
    "Litoral",
    "Mantiqueira",
    "Norte",
    "Paraná",
];
const RAMO: [&str; 10] = [
    "Alimentos",
    "Autopeças",
    "Comércio",
    "Distribuidora",
    "Embalagens",
    "Ferragens",
    "Logística",
    "Metalúrgica",
    "Plásticos",
    "Têxtil",
];
const SUFIXO: [&str; 3] = ["Ltda", "S.A.", "ME"];
const NOMES: [&str; 12] = [
    "Ana", "Bruno", "Carla", "Diego", "Eduarda", "Felipe", "Gabriela", "Heitor", "Isabela", "João",
    "Larissa", "Marcos",
];
const SOBRENOMES: [&str; 10] = [
    "Almeida", "Barbosa", "Costa", "Ferreira", "Gomes", "Lima", "Oliveira", "Pereira", "Santos",
    "Souza",
];

const SCHEMA: &str = "
CREATE TABLE clientes (
    id INTEGER PRIMARY KEY,
    nome TEXT NOT NULL,
    cidade TEXT NOT NULL,
    uf TEXT NOT NULL
);
CREATE TABLE vendas (
    id INTEGER PRIMARY KEY,
    dt TEXT NOT NULL,
    cliente_id INTEGER NOT NULL REFERENCES clientes(id),
    filial TEXT NOT NULL,
    valor NUMERIC NOT NULL
);
CREATE INDEX vendas_dt ON vendas(dt);
CREATE TABLE atendimentos (
    id INTEGER PRIMARY KEY,
    aberto_em TEXT NOT NULL,
    fechado_em TEXT,
    canal TEXT NOT NULL,
    cliente_id INTEGER NOT NULL REFERENCES clientes(id),
    status TEXT NOT NULL
);
CREATE INDEX atendimentos_aberto_em ON atendimentos(aberto_em);
CREATE TABLE emitente (
    cod_emitente INTEGER PRIMARY KEY,
    cgc TEXT NOT NULL,
    nome_emit TEXT NOT NULL,
    cidade TEXT NOT NULL,
    atualizado_em TEXT NOT NULL
);
CREATE TABLE emitente_excluidos (
    cod_emitente INTEGER PRIMARY KEY,
    excluido_em TEXT NOT NULL
);
";

/// Create (or replace) the demo database in `dir`; returns its path.
pub(crate) fn create(dir: &Path, seed: u64, anchor: DateTime<Utc>) -> anyhow::Result<PathBuf> {
    let path = dir.join(FILE_NAME);
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut conn = Connection::open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    fill(&mut conn, seed, anchor).context("writing the demo database")?;
    conn.close().map_err(|(_, e)| e)?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("moving the demo database to {}", path.display()))?;
    Ok(path)
}

/// `n`-th pick from `items` for the hash words `parts`.
fn pick<'a, T>(seed: u64, parts: &[u64], items: &'a [T]) -> &'a T {
    &items[(hash(seed, parts) % items.len() as u64) as usize]
}

/// A whole number in `lo..hi` for the hash words `parts`.
fn between(seed: u64, parts: &[u64], lo: u64, hi: u64) -> u64 {
    lo + hash(seed, parts) % (hi - lo)
}

fn fill(conn: &mut Connection, seed: u64, anchor: DateTime<Utc>) -> rusqlite::Result<()> {
    conn.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")?;
    let tx = conn.transaction()?;
    tx.execute_batch(SCHEMA)?;
    {
        let mut ins = tx.prepare("INSERT INTO clientes VALUES (?1, ?2, ?3, ?4)")?;
        for id in 1..=CLIENTES {
            let (cidade, uf) = pick(seed, &[1, id, 1], &CIDADES);
            let nome = format!(
                "{} {}",
                pick(seed, &[1, id, 2], &NOMES),
                pick(seed, &[1, id, 3], &SOBRENOMES)
            );
            ins.execute(params![id, nome, cidade, uf])?;
        }

        let first = NaiveDate::from_ymd_opt(FIRST_YEAR, 1, 1).expect("a date");
        let end = anchor.date_naive();
        let mut venda = tx.prepare("INSERT INTO vendas VALUES (?1, ?2, ?3, ?4, ?5)")?;
        let mut atendimento =
            tx.prepare("INSERT INTO atendimentos VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        let (mut venda_id, mut atendimento_id) = (0u64, 0u64);
        let mut month = first;
        while month < end {
            let next = month
                .checked_add_months(chrono::Months::new(1))
                .expect("a month");
            let days = (next.min(end) - month).num_days().max(1) as u64;
            let key = (month.year() as u64) * 100 + month.month() as u64;
            // Sales grow slowly over the years, with a December peak.
            let growth = (month.year() - FIRST_YEAR) as u64 * 6;
            let peak = if month.month() == 12 { 30 } else { 0 };
            let sales = between(seed, &[2, key], 60, 110) + growth + peak;
            for n in 0..sales {
                venda_id += 1;
                let day = between(seed, &[3, key, n], 0, days);
                let dt = month + Duration::days(day as i64);
                let cents = between(seed, &[4, key, n], 4_990, 1_250_000);
                let valor = cents as f64 / 100.0;
                venda.execute(params![
                    venda_id,
                    dt.format("%Y-%m-%d").to_string(),
                    between(seed, &[5, key, n], 1, CLIENTES + 1),
                    pick(seed, &[6, key, n], &FILIAIS),
                    valor
                ])?;
            }
            let tickets = between(seed, &[7, key], 40, 90);
            for n in 0..tickets {
                atendimento_id += 1;
                let day = between(seed, &[8, key, n], 0, days);
                let secs = between(seed, &[9, key, n], 8 * 3600, 18 * 3600);
                let aberto = month.and_hms_opt(0, 0, 0).expect("midnight")
                    + Duration::days(day as i64)
                    + Duration::seconds(secs as i64);
                // Handling times from 10 minutes to 3 days, mostly short.
                let minutes =
                    between(seed, &[10, key, n], 10, 600) * between(seed, &[11, key, n], 1, 8);
                let fechado = aberto + Duration::minutes(minutes as i64);
                let open = fechado.and_utc() > anchor;
                atendimento.execute(params![
                    atendimento_id,
                    aberto.format("%Y-%m-%dT%H:%M:%S").to_string(),
                    (!open).then(|| fechado.format("%Y-%m-%dT%H:%M:%S").to_string()),
                    pick(seed, &[12, key, n], &CANAIS),
                    between(seed, &[13, key, n], 1, CLIENTES + 1),
                    if open { "aberto" } else { "fechado" },
                ])?;
            }
            month = next;
        }

        let mut emit = tx.prepare("INSERT INTO emitente VALUES (?1, ?2, ?3, ?4, ?5)")?;
        for cod in 1..=EMITENTES {
            let nome = format!(
                "{} {} {}",
                pick(seed, &[20, cod, 1], &PRIMEIRO),
                pick(seed, &[20, cod, 2], &RAMO),
                pick(seed, &[20, cod, 3], &SUFIXO)
            );
            let (cidade, _) = pick(seed, &[20, cod, 4], &CIDADES);
            let back = between(seed, &[20, cod, 5], 0, 365 * 24 * 3600);
            let updated = anchor - Duration::seconds(back as i64);
            emit.execute(params![
                cod,
                cnpj(hash(seed, &[20, cod, 6])),
                nome,
                cidade,
                updated.format("%Y-%m-%dT%H:%M:%S").to_string()
            ])?;
        }
    }
    // The ERP's deletion log (a trigger keeps it): issuers deleted every day and a half
    // before the anchor, the newest first.
    {
        let mut gone = tx.prepare("INSERT INTO emitente_excluidos VALUES (?1, ?2)")?;
        for k in 1..=DELETED_EMITENTES {
            let at = anchor - Duration::hours(36 * k as i64);
            gone.execute(params![
                EMITENTES + k,
                at.format("%Y-%m-%dT%H:%M:%S").to_string()
            ])?;
        }
    }
    tx.commit()
}

/// How long before the anchor the Carol fake's previous sync of `emitente` happened: the
/// issuers deleted since then (4 of the deletion log) are still in Carol.
const LAST_CAROL_SYNC_HOURS: i64 = 156;

/// The records Carol holds from the previous sync of `emitente` (with the field names of
/// `pipelines/carol-staging.yaml`): every issuer, plus those the ERP deleted since.
pub(crate) fn previous_carol_sync(
    path: &Path,
    anchor: DateTime<Utc>,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    let since = (anchor - Duration::hours(LAST_CAROL_SYNC_HOURS))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    let mut stmt = conn.prepare(
        "SELECT cod_emitente, cgc, nome_emit, cidade, atualizado_em FROM emitente
         UNION ALL
         SELECT cod_emitente, '00000000000000', 'EMITENTE EXCLUIDO ' || cod_emitente, '', excluido_em
         FROM emitente_excluidos WHERE excluido_em >= ?1
         ORDER BY 1",
    )?;
    let rows = stmt.query_map([since], |r| {
        Ok(serde_json::json!({
            "cod-emitente": r.get::<_, i64>(0)?,
            "cgc": r.get::<_, String>(1)?,
            "nome-emit": r.get::<_, String>(2)?,
            "cidade": r.get::<_, String>(3)?,
            "atualizado-em": r.get::<_, String>(4)?,
        }))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A valid CNPJ (14 digits, no punctuation) from 12 base digits taken from `h`.
pub(crate) fn cnpj(h: u64) -> String {
    let mut d: Vec<u32> = format!("{:08}0001", h % 100_000_000)
        .bytes()
        .map(|b| (b - b'0') as u32)
        .collect();
    for weights in [
        &[5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2][..],
        &[6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2][..],
    ] {
        let sum: u32 = d.iter().zip(weights).map(|(a, w)| a * w).sum();
        let r = sum % 11;
        d.push(if r < 2 { 0 } else { 11 - r });
    }
    d.iter().map(|n| char::from(b'0' + *n as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn anchor() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
    }

    #[test]
    fn demo_db_is_deterministic_fast_and_covers_the_months() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        let pa = create(a.path(), 7, anchor()).unwrap();
        let took = t.elapsed();
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        let pb = create(b.path(), 7, anchor()).unwrap();
        let dump = |p: &Path| {
            let c = Connection::open(p).unwrap();
            let q = |sql: &str| -> String { c.query_row(sql, [], |r| r.get(0)).unwrap() };
            [
                q("SELECT group_concat(id || dt || cliente_id || filial || valor, ';') FROM vendas"),
                q("SELECT group_concat(id || aberto_em || coalesce(fechado_em, '-'), ';') FROM atendimentos"),
                q("SELECT group_concat(cod_emitente || cgc || nome_emit || atualizado_em, ';') FROM emitente"),
            ]
        };
        assert_eq!(dump(&pa), dump(&pb));

        let c = Connection::open(&pa).unwrap();
        let count = |sql: &str| -> i64 { c.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(count("SELECT count(*) FROM emitente"), 500);
        assert_eq!(count("SELECT count(*) FROM clientes"), 300);
        assert!(
            count("SELECT count(*) FROM vendas WHERE dt >= '2019-01-01' AND dt < '2019-02-01'")
                > 50
        );
        assert!(
            count("SELECT count(*) FROM vendas WHERE dt >= '2025-12-01' AND dt < '2026-01-01'")
                > 50
        );
        assert_eq!(
            count("SELECT count(*) FROM vendas WHERE dt >= '2026-01-01'"),
            0
        );
        assert!(
            count("SELECT count(*) FROM atendimentos WHERE aberto_em >= '2019-01-01' AND aberto_em < '2019-02-01' AND fechado_em IS NOT NULL") > 30
        );
        let distinct_cgc = count("SELECT count(DISTINCT cgc) FROM emitente");
        assert!(distinct_cgc > 490, "{distinct_cgc}");
    }

    #[test]
    fn cnpj_check_digits() {
        // 11.222.333/0001-81 is the textbook example.
        assert_eq!(cnpj(11_222_333), "11222333000181");
        assert_eq!(cnpj(0).len(), 14);
    }
}
