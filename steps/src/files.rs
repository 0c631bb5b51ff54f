//! `type: file.write` and `type: file.read` — tables to and from Parquet, CSV and NDJSON files.
//!
//! The scripts pipe replaces hand extracts to each other through files: a monthly extractor
//! drops a CSV that a loader later picks up, a connector writes one Parquet file per day into a
//! folder that a warehouse load globs. Two things go wrong with files, and these steps exist
//! to make them not go wrong:
//!
//! * **Half-written files.** A script that dies (or is killed by a timeout) mid-write leaves a
//!   truncated file at the path the next job reads, which then loads garbage or fails far
//!   from the cause. `file.write` never writes at the final path: it writes a hidden temporary
//!   file (`.NAME.tmp-RANDOM`) in the destination folder, flushes it to disk, and renames it
//!   into place — a rename within one folder is atomic, so readers see the old file or the
//!   new one, never a mix. A partitioned write builds the whole folder tree under a hidden
//!   temporary folder and swaps it into place only after every file is written (on Linux with
//!   an atomic exchange; elsewhere by moving the old folder aside for an instant). On any
//!   failure — a write error, a cancelled run — the temporary file or folder (and any parent
//!   folder the step created) is removed and the previous content stays untouched. A writer
//!   killed outright (`kill -9`) cannot clean up: its temporary names its pid, and the next
//!   write of the same path removes the temporaries whose writer is gone.
//! * **Gathering many files.** `file.read` takes a glob (`data/*.parquet`, `data/**/*.csv`),
//!   reads every match and concatenates them into one table, unifying schemas the way a
//!   warehouse would (a column missing from a file is null there; an integer column in one
//!   file and a float one in another becomes float) and naming the file when they cannot be
//!   unified. Hidden files and folders (such as another write's temporaries) never match
//!   unless the pattern spells the leading dot.
//!
//! Formats: `parquet` (typed; keeps time zones — the format to hand tables between
//! pipelines), `csv` (header row; datetimes written as RFC 3339, `2024-03-01T10:30:00+00:00`,
//! read back as datetimes), `ndjson` (one JSON object per line; tz-aware datetimes as RFC 3339
//! strings). The format defaults from the extension (`.parquet`/`.pq`, `.csv`,
//! `.ndjson`/`.jsonl`).
//!
//! Parquet is compressed with **zstd** by default: it is Polars' and Spark's modern default,
//! compresses markedly better than snappy at comparable speed, and every current reader
//! (BigQuery, DuckDB, pandas/pyarrow, Spark) reads it. `compression: snappy` is there for old
//! readers; `uncompressed` for debugging.

use async_trait::async_trait;
use engine::events::Level;
use engine::step::{StaticInfo, StepConfig, StepContext, StepError, StepOutput};
use indexmap::IndexMap;
use polars::prelude::*;
use schemars::JsonSchema;
use serde::Deserialize;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// A table file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// Apache Parquet: typed and compressed (extensions `.parquet`, `.pq`).
    Parquet,
    /// Comma-separated values with a header row (extension `.csv`).
    Csv,
    /// Newline-delimited JSON, one object per row (extensions `.ndjson`, `.jsonl`).
    #[serde(alias = "jsonl")]
    Ndjson,
}

impl FileFormat {
    /// The format a file name's extension implies.
    pub fn from_path(path: &Path) -> Option<FileFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "parquet" | "pq" => Some(FileFormat::Parquet),
            "csv" => Some(FileFormat::Csv),
            "ndjson" | "jsonl" => Some(FileFormat::Ndjson),
            _ => None,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            FileFormat::Parquet => "parquet",
            FileFormat::Csv => "csv",
            FileFormat::Ndjson => "ndjson",
        }
    }
}

/// Parquet compression codec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Zstandard (the default): the best ratio at a good speed; read by every current tool.
    #[default]
    Zstd,
    /// Snappy: faster and larger; for older readers.
    Snappy,
    /// No compression.
    Uncompressed,
}

impl From<Compression> for ParquetCompression {
    fn from(c: Compression) -> Self {
        match c {
            Compression::Zstd => ParquetCompression::Zstd(None),
            Compression::Snappy => ParquetCompression::Snappy,
            Compression::Uncompressed => ParquetCompression::Uncompressed,
        }
    }
}

/// Write the input table to a file (or a Hive-partitioned folder), atomically.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileWrite {
    /// Where to write, relative to the pipeline file's folder (templates allowed). With
    /// `partition_by` this is a folder. Parent folders are created. An existing file (or, when
    /// partitioned, folder) is replaced only once the new one is completely written.
    pub path: String,
    /// `parquet`, `csv` or `ndjson`. Default: from the extension of `path` (`.parquet`/`.pq`,
    /// `.csv`, `.ndjson`/`.jsonl`); a partitioned folder without one of those is `parquet`.
    #[serde(default)]
    pub format: Option<FileFormat>,
    /// Columns to partition by, Hive-style: one file per combination of values at
    /// `PATH/col=value/part-0.EXT` (values percent-encoded; null is
    /// `__HIVE_DEFAULT_PARTITION__`). The partition columns are not repeated inside the files.
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// Parquet compression: `zstd` (default), `snappy` or `uncompressed`. Parquet only.
    #[serde(default)]
    pub compression: Option<Compression>,
}

/// Read a file, or every file a glob matches, into one table.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRead {
    /// A file or a glob (`data/*.parquet`, `exports/**/*.csv`), relative to the pipeline
    /// file's folder (templates allowed). Matches are read in path order and concatenated;
    /// hidden files and folders match only if the pattern spells their leading dot. No match
    /// is an error.
    pub path: String,
    /// `parquet`, `csv` or `ndjson`. Default: from each file's extension (`.parquet`/`.pq`,
    /// `.csv`, `.ndjson`/`.jsonl`).
    #[serde(default)]
    pub format: Option<FileFormat>,
}

const WRITE_OUTPUTS: [&str; 4] = ["path", "rows", "bytes", "files"];
const READ_OUTPUTS: [&str; 2] = ["rows", "files"];

#[async_trait]
impl StepConfig for FileWrite {
    const TYPE: &'static str = "file.write";
    const SUMMARY: &'static str =
        "Write the input table to a Parquet, CSV or NDJSON file (optionally Hive-partitioned), atomically";

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: false,
            outputs: Some(WRITE_OUTPUTS.iter().map(|s| s.to_string()).collect()),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let df = match ctx.inputs.first() {
            Some((id, t)) => crate::table::frame(t)
                .ok_or_else(|| StepError::fatal(format!("input `{id}` is not a table")))?
                .clone(),
            None => {
                return Err(StepError::fatal(
                    "file.write needs a table: name the step that produces it as `input:`",
                ))
            }
        };
        let target = ctx.pipeline_dir.join(&self.path);
        let plan = self.plan(&target).map_err(StepError::fatal)?;
        let cancel = ctx.cancel.clone();
        let rows = df.height() as u64;
        let written = tokio::task::spawn_blocking(move || {
            write_table(&df, &target, &plan, &cancel, &mut |_| Ok(())).map(|w| (w, target))
        })
        .await
        .map_err(|e| StepError::fatal(format!("file.write panicked: {e}")))?;
        let (written, target) = written.map_err(|e| StepError::fatal(ctx.redactor.redact(&e)))?;
        let path = target.display().to_string();
        ctx.log(
            Level::Info,
            &format!(
                "wrote {rows} rows to {path} ({} bytes in {} file{})",
                written.bytes,
                written.files.len(),
                if written.files.len() == 1 { "" } else { "s" }
            ),
        );
        let files: Vec<String> = written
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        let result = serde_json::json!({
            "path": path,
            "rows": rows,
            "bytes": written.bytes,
            "files": files,
        });
        Ok(StepOutput {
            outputs: result.as_object().cloned().unwrap_or_default(),
            result,
            table: None,
            warnings: Vec::new(),
        })
    }
}

/// What a write does, decided before touching the disk.
#[derive(Debug, Clone)]
struct WritePlan {
    format: FileFormat,
    compression: Compression,
    partition_by: Vec<String>,
}

impl FileWrite {
    fn plan(&self, target: &Path) -> Result<WritePlan, String> {
        let format = match self.format.or_else(|| FileFormat::from_path(target)) {
            Some(f) => f,
            None if !self.partition_by.is_empty() => FileFormat::Parquet,
            None => {
                return Err(format!(
                    "cannot tell the format of {} from its extension: set `format:` \
                     (parquet, csv or ndjson)",
                    target.display()
                ))
            }
        };
        if self.compression.is_some() && format != FileFormat::Parquet {
            return Err(format!(
                "`compression` applies to parquet only, and {} is written as {}",
                target.display(),
                format.extension()
            ));
        }
        Ok(WritePlan {
            format,
            compression: self.compression.unwrap_or_default(),
            partition_by: self.partition_by.clone(),
        })
    }
}

/// The files a write produced (final paths) and their total size.
#[derive(Debug)]
struct Written {
    files: Vec<PathBuf>,
    bytes: u64,
}

/// Write `df` at `target` atomically. `after_file` runs after each file is complete (before
/// anything is moved into place); tests inject failures through it.
fn write_table(
    df: &DataFrame,
    target: &Path,
    plan: &WritePlan,
    cancel: &CancellationToken,
    after_file: &mut dyn FnMut(&Path) -> io::Result<()>,
) -> Result<Written, String> {
    let shown = target.display();
    let name = target
        .file_name()
        .ok_or_else(|| format!("{shown}: the path must name a file or folder"))?
        .to_string_lossy()
        .into_owned();
    let parent = target.parent().unwrap_or(Path::new("."));
    if plan.partition_by.is_empty() {
        if target.is_dir() {
            return Err(format!(
                "{shown} is a folder; name a file (or set `partition_by` to write a folder)"
            ));
        }
    } else {
        if target.exists() && !target.is_dir() {
            return Err(format!(
                "{shown} exists and is not a folder; a partitioned write replaces folders only"
            ));
        }
        check_partition_columns(df, &plan.partition_by)?;
    }

    let created =
        create_parents(parent).map_err(|e| format!("{shown}: cannot create its folder: {e}"))?;
    remove_stale_temporaries(parent, &name);
    let tmp = parent.join(format!(
        "{}{}-{}",
        temporary_prefix(&name),
        std::process::id(),
        random_suffix()
    ));
    let outcome = if plan.partition_by.is_empty() {
        write_single(df, &tmp, target, plan, cancel, after_file)
    } else {
        write_partitioned(df, &tmp, target, plan, cancel, after_file)
    };
    if outcome.is_err() {
        remove_quietly(&tmp);
        remove_created(&created);
    }
    outcome
}

fn write_single(
    df: &DataFrame,
    tmp: &Path,
    target: &Path,
    plan: &WritePlan,
    cancel: &CancellationToken,
    after_file: &mut dyn FnMut(&Path) -> io::Result<()>,
) -> Result<Written, String> {
    let shown = target.display();
    let bytes = write_file(df, tmp, plan).map_err(|e| format!("{shown}: {e}"))?;
    after_file(tmp).map_err(|e| format!("{shown}: {e}"))?;
    if cancel.is_cancelled() {
        return Err(format!(
            "{shown}: cancelled before the file was moved into place"
        ));
    }
    fs::rename(tmp, target)
        .map_err(|e| format!("{shown}: cannot move the new file into place: {e}"))?;
    Ok(Written {
        files: vec![target.to_path_buf()],
        bytes,
    })
}

fn write_partitioned(
    df: &DataFrame,
    tmp: &Path,
    target: &Path,
    plan: &WritePlan,
    cancel: &CancellationToken,
    after_file: &mut dyn FnMut(&Path) -> io::Result<()>,
) -> Result<Written, String> {
    let shown = target.display();
    fs::create_dir(tmp).map_err(|e| format!("{shown}: cannot create a temporary folder: {e}"))?;
    let parts = df
        .partition_by_stable(plan.partition_by.iter().map(String::as_str), true)
        .map_err(|e| format!("{shown}: cannot partition: {e}"))?;
    let file_name = format!("part-0.{}", plan.format.extension());
    let mut relative = Vec::with_capacity(parts.len());
    let mut bytes = 0;
    for part in parts {
        if cancel.is_cancelled() {
            return Err(format!("{shown}: cancelled; nothing was written"));
        }
        let mut dir = PathBuf::new();
        for col in &plan.partition_by {
            let value = partition_value(&part, col).map_err(|e| format!("{shown}: {e}"))?;
            dir.push(format!("{}={value}", encode_segment(col)));
        }
        let data = part.drop_many(plan.partition_by.iter().map(String::as_str));
        fs::create_dir_all(tmp.join(&dir)).map_err(|e| format!("{shown}: {e}"))?;
        let rel = dir.join(&file_name);
        let file = tmp.join(&rel);
        bytes += write_file(&data, &file, plan)
            .map_err(|e| format!("{}: {e}", target.join(&rel).display()))?;
        after_file(&file).map_err(|e| format!("{}: {e}", target.join(&rel).display()))?;
        relative.push(rel);
    }
    if cancel.is_cancelled() {
        return Err(format!(
            "{shown}: cancelled before the folder was moved into place"
        ));
    }
    replace_folder(tmp, target)
        .map_err(|e| format!("{shown}: cannot move the new folder into place: {e}"))?;
    Ok(Written {
        files: relative.iter().map(|r| target.join(r)).collect(),
        bytes,
    })
}

fn check_partition_columns(df: &DataFrame, cols: &[String]) -> Result<(), String> {
    for c in cols {
        if df.column(c).is_err() {
            let names: Vec<&str> = df.get_column_names().iter().map(|n| n.as_str()).collect();
            return Err(format!(
                "partition_by: the table has no column `{c}` (its columns: {})",
                names.join(", ")
            ));
        }
    }
    if df.width() <= cols.len() {
        return Err("partition_by names every column: the files would have none left".into());
    }
    Ok(())
}

/// The Hive folder value of `col` in a partition (every row has the same one).
fn partition_value(part: &DataFrame, col: &str) -> PolarsResult<String> {
    let value = part.column(col)?.head(Some(1)).cast(&DataType::String)?;
    Ok(match value.str()?.get(0) {
        Some(s) => encode_segment(s),
        None => "__HIVE_DEFAULT_PARTITION__".to_string(),
    })
}

/// Percent-encode everything but unreserved URL characters, so any value is one safe path
/// segment (`a/b` → `a%2Fb`), as Hive and the readers of Hive layouts expect.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        // An empty string and null must not share a folder, and a segment cannot be empty.
        out.push_str("%00");
    }
    out
}

/// Write one file at `path` (which must not exist), flushed to disk; returns its size.
fn write_file(df: &DataFrame, path: &Path, plan: &WritePlan) -> Result<u64, String> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let mut out = BufWriter::new(file);
    let mut df = df.clone();
    match plan.format {
        FileFormat::Parquet => ParquetWriter::new(&mut out)
            .with_compression(plan.compression.into())
            .finish(&mut df)
            .map(|_| ()),
        FileFormat::Csv => rfc3339_datetimes(&df).and_then(|mut df| {
            CsvWriter::new(&mut out)
                .include_header(true)
                .finish(&mut df)
        }),
        FileFormat::Ndjson => JsonWriter::new(&mut out)
            .with_json_format(JsonFormat::JsonLines)
            .finish(&mut df),
    }
    .map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    let file = out.into_inner().map_err(|e| e.error().to_string())?;
    file.sync_all().map_err(|e| e.to_string())?;
    Ok(file.metadata().map_err(|e| e.to_string())?.len())
}

/// Datetime columns as RFC 3339 text (`2024-03-01T10:30:00.5+00:00`; a datetime without a
/// time zone has no offset to print, so it gets none).
fn rfc3339_datetimes(df: &DataFrame) -> PolarsResult<DataFrame> {
    let columns = df
        .get_columns()
        .iter()
        .map(|c| match c.dtype() {
            DataType::Datetime(_, tz) => {
                let format = if tz.is_some() {
                    "%Y-%m-%dT%H:%M:%S%.f%:z"
                } else {
                    "%Y-%m-%dT%H:%M:%S%.f"
                };
                Ok(c.datetime()?.to_string(format)?.into_column())
            }
            _ => Ok(c.clone()),
        })
        .collect::<PolarsResult<Vec<_>>>()?;
    DataFrame::new(columns)
}

/// Create `dir` and its missing ancestors; returns the ones created, outermost first.
fn create_parents(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.as_os_str().is_empty() && !d.exists() {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    missing.reverse();
    let mut created = Vec::new();
    for d in missing {
        match fs::create_dir(&d) {
            Ok(()) => created.push(d),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                remove_created(&created);
                return Err(e);
            }
        }
    }
    Ok(created)
}

/// Remove folders this write created, innermost first, if they are still empty.
fn remove_created(created: &[PathBuf]) {
    for d in created.iter().rev() {
        let _ = fs::remove_dir(d);
    }
}

fn remove_quietly(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Put the folder `new` at `target`, replacing any folder there only now that `new` is
/// complete. On Linux the two are exchanged atomically; elsewhere (or on a file system that
/// cannot exchange) the old folder is moved aside, the new one moved in (the old one is moved
/// back if that fails), and the old one deleted.
fn replace_folder(new: &Path, target: &Path) -> io::Result<()> {
    if fs::symlink_metadata(target).is_err() {
        return fs::rename(new, target);
    }
    #[cfg(target_os = "linux")]
    if exchange(new, target).is_ok() {
        // `new` now holds the previous folder.
        let _ = fs::remove_dir_all(new);
        return Ok(());
    }
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let aside = target.with_file_name(format!(".{name}.old-{}", random_suffix()));
    fs::rename(target, &aside)?;
    if let Err(e) = fs::rename(new, target) {
        let _ = fs::rename(&aside, target);
        return Err(e);
    }
    let _ = fs::remove_dir_all(&aside);
    Ok(())
}

/// Atomically swap two paths (`renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The start of the names of `name`'s temporaries: `.NAME.tmp-HOST-`, then the writing
/// process's pid and a random suffix. HOST stands for where the pid means something (the
/// boot and pid namespace, [`engine::host::host_identity`]), so a later write can tell a
/// temporary whose writer died (killed by `kill -9`, say, which runs no cleanup) from one
/// that a live process, here or in another container sharing the folder, is still writing.
fn temporary_prefix(name: &str) -> String {
    // FNV-1a: stable across processes and builds, unlike the std hasher's random keys.
    let host = engine::host::host_identity().unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in host.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    format!(".{name}.tmp-{:08x}-", h as u32)
}

/// Remove the temporaries of earlier writes of `name` in `dir` whose writer is dead. Those
/// of live processes, and of processes pipe cannot see (another host tag), stay.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = temporary_prefix(name);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .filter(|&p| p > 0)
        else {
            continue;
        };
        if pid == std::process::id() {
            continue; // another write of this run, maybe still under way
        }
        // A zombie counts as dead, as it does for the run history's owners.
        if !engine::host::pid_alive(pid) {
            remove_quietly(&entry.path());
        }
    }
}

/// 16 hex digits that differ between calls and processes (collisions are also ruled out by
/// creating temporaries with `create_new`).
fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    format!("{:016x}", h.finish())
}

#[async_trait]
impl StepConfig for FileRead {
    const TYPE: &'static str = "file.read";
    const SUMMARY: &'static str =
        "Read a Parquet, CSV or NDJSON file, or every file a glob matches, into one table";

    fn static_info(&self) -> StaticInfo {
        StaticInfo {
            produces_table: true,
            outputs: Some(READ_OUTPUTS.iter().map(|s| s.to_string()).collect()),
            ..StaticInfo::default()
        }
    }

    async fn run(self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let dir = ctx.pipeline_dir.clone();
        let cancel = ctx.cancel.clone();
        let reading = tokio::task::spawn_blocking(move || {
            let files = matching_files(&dir, &self.path)?;
            let mut frames = Vec::with_capacity(files.len());
            for f in &files {
                if cancel.is_cancelled() {
                    return Err("cancelled".to_string());
                }
                frames.push((f.clone(), read_file(f, self.format)?));
            }
            Ok((concat_frames(frames)?, files))
        });
        // A parse cannot be interrupted inside one file: on cancellation the step returns at
        // once and leaves the parse to end with the process (`pipe run` does not wait for it).
        let read = tokio::select! {
            r = reading => r,
            _ = ctx.cancel.cancelled() => return Err(StepError::fatal("cancelled")),
        };
        let (df, files) = read
            .map_err(|e| StepError::fatal(format!("file.read panicked: {e}")))?
            .map_err(|e| StepError::fatal(ctx.redactor.redact(&e)))?;
        let rows = df.height() as u64;
        let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        ctx.log(
            Level::Info,
            &format!(
                "read {rows} rows from {} file{}",
                files.len(),
                if files.len() == 1 { "" } else { "s" }
            ),
        );
        let result = serde_json::json!({ "rows": rows, "files": files });
        Ok(StepOutput {
            outputs: result.as_object().cloned().unwrap_or_default(),
            result,
            table: Some(crate::table::table(df)),
            warnings: Vec::new(),
        })
    }
}

/// The files `pattern` names (relative to `base`), in path order; an error when there are none.
fn matching_files(base: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    let is_glob = pattern.contains(['*', '?', '[']);
    if !is_glob {
        let path = base.join(pattern);
        return if path.is_file() {
            Ok(vec![path])
        } else if path.is_dir() {
            Err(format!(
                "{} is a folder: use a glob such as `{}/**/*.parquet`",
                path.display(),
                pattern.trim_end_matches('/')
            ))
        } else {
            Err(format!(
                "no file matches `{pattern}` ({} does not exist)",
                path.display()
            ))
        };
    }
    let full = if Path::new(pattern).is_absolute() || base.as_os_str().is_empty() {
        pattern.to_string()
    } else {
        // The base folder is literal text, not part of the pattern.
        let base = glob::Pattern::escape(&base.to_string_lossy());
        format!("{}/{pattern}", base.trim_end_matches('/'))
    };
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let paths =
        glob::glob_with(&full, options).map_err(|e| format!("invalid glob `{pattern}`: {e}"))?;
    let mut files = Vec::new();
    for entry in paths {
        let path = entry.map_err(|e| {
            format!(
                "`{pattern}`: cannot read {}: {}",
                e.path().display(),
                e.error()
            )
        })?;
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(format!(
            "no file matches `{pattern}` (looked in {})",
            base.display()
        ));
    }
    Ok(files)
}

fn read_file(path: &Path, format: Option<FileFormat>) -> Result<DataFrame, String> {
    let shown = path.display();
    let format = format.or_else(|| FileFormat::from_path(path)).ok_or_else(|| {
        format!("cannot tell the format of {shown} from its extension: set `format:` (parquet, csv or ndjson)")
    })?;
    let result = match format {
        FileFormat::Parquet => File::open(path)
            .map_err(PolarsError::from)
            .and_then(|f| ParquetReader::new(f).finish()),
        FileFormat::Csv => CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(None)
            .map_parse_options(|o| o.with_try_parse_dates(true))
            .try_into_reader_with_file_path(Some(path.to_path_buf()))
            .and_then(|r| r.finish()),
        FileFormat::Ndjson => File::open(path)
            .map_err(PolarsError::from)
            .and_then(|f| JsonLineReader::new(f).infer_schema_len(None).finish()),
    };
    result.map_err(|e| format!("{shown}: cannot read as {}: {e}", format.extension()))
}

/// The type both `a` and `b` convert to without loss (Polars' rules), if any. (Polars keeps
/// its `get_supertype` out of the public API; a frame's supertype of its columns is the same.)
fn supertype(a: &DataType, b: &DataType) -> Option<DataType> {
    // Polars would also wrap a scalar into a struct or list; for files that disagree on a
    // column's shape that hides a real mismatch.
    if a.is_nested() || b.is_nested() {
        return None;
    }
    DataFrame::new(vec![
        Column::full_null("a".into(), 0, a),
        Column::full_null("b".into(), 0, b),
    ])
    .ok()?
    .get_supertype()?
    .ok()
}

/// Concatenate tables read from several files into one: columns in order of first appearance,
/// a column missing from a file is null there, differing types become their common supertype
/// (integer and float → float); types with none are an error naming the file.
fn concat_frames(frames: Vec<(PathBuf, DataFrame)>) -> Result<DataFrame, String> {
    if frames.len() == 1 {
        return Ok(frames
            .into_iter()
            .next()
            .map(|(_, df)| df)
            .unwrap_or_default());
    }
    let mut schema: IndexMap<PlSmallStr, (DataType, &Path)> = IndexMap::new();
    for (path, df) in &frames {
        for c in df.get_columns() {
            match schema.get_mut(c.name()) {
                None => {
                    schema.insert(c.name().clone(), (c.dtype().clone(), path));
                }
                Some((t, _)) if t == c.dtype() => {}
                Some((t, first)) => match supertype(t, c.dtype()) {
                    Some(s) => *t = s,
                    None => {
                        return Err(format!(
                            "{}: column `{}` is {}, which cannot be combined with {} in {}",
                            path.display(),
                            c.name(),
                            c.dtype(),
                            t,
                            first.display()
                        ))
                    }
                },
            }
        }
    }
    let mut out: Option<DataFrame> = None;
    for (path, df) in &frames {
        let columns = schema
            .iter()
            .map(|(name, (dtype, _))| match df.column(name) {
                Ok(c) if c.dtype() == dtype => Ok(c.clone()),
                Ok(c) => c.strict_cast(dtype).map_err(|e| {
                    format!(
                        "{}: column `{name}` cannot be read as {dtype}: {e}",
                        path.display()
                    )
                }),
                Err(_) => Ok(Column::full_null(name.clone(), df.height(), dtype)),
            })
            .collect::<Result<Vec<_>, String>>()?;
        let df = DataFrame::new(columns).map_err(|e| format!("{}: {e}", path.display()))?;
        match &mut out {
            None => out = Some(df),
            Some(acc) => {
                acc.vstack_mut(&df)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
    }
    let mut df = out.unwrap_or_default();
    df.rechunk_mut();
    Ok(df)
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::events::{Observer, RunEvent};
    use engine::secrets::Redactor;
    use std::sync::Arc;

    struct Quiet;
    impl Observer for Quiet {
        fn event(&self, _: &RunEvent) {}
    }

    fn ctx(dir: &Path, input: Option<DataFrame>) -> StepContext {
        let mut c = StepContext::new(
            "files",
            1,
            Arc::new(Quiet),
            Redactor::new(),
            dir.join("run"),
            dir.to_path_buf(),
        );
        if let Some(df) = input {
            c.inputs.insert("src".into(), crate::table::table(df));
        }
        c
    }

    /// Ints, floats, strings and booleans with nulls, and a UTC datetime column.
    fn sample() -> DataFrame {
        let at = Column::new(
            "at".into(),
            [
                Some(1_709_289_000_000i64), // 2024-03-01T10:30:00Z
                Some(1_709_289_000_500),
                None,
                Some(1_709_375_400_000),
            ],
        )
        .cast(&DataType::Datetime(
            TimeUnit::Milliseconds,
            Some(TimeZone::UTC),
        ))
        .unwrap();
        DataFrame::new(vec![
            Column::new("id".into(), [1i64, 2, 3, 4]),
            Column::new(
                "region".into(),
                [Some("north"), Some("south/east"), Some("north"), None],
            ),
            Column::new(
                "amount".into(),
                [Some(1.5f64), None, Some(-2.25), Some(0.0)],
            ),
            Column::new("ok".into(), [true, false, true, true]),
            at,
        ])
        .unwrap()
    }

    fn write(path: &str) -> FileWrite {
        FileWrite {
            path: path.into(),
            format: None,
            partition_by: Vec::new(),
            compression: None,
        }
    }

    fn read(path: &str) -> FileRead {
        FileRead {
            path: path.into(),
            format: None,
        }
    }

    async fn read_table(dir: &Path, path: &str) -> (DataFrame, StepOutput) {
        let out = read(path).run(ctx(dir, None)).await.unwrap();
        let df = crate::table::frame(out.table.as_ref().unwrap())
            .unwrap()
            .clone();
        (df, out)
    }

    /// Every entry under `dir`, relative, sorted.
    fn tree(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if p.is_dir() {
                    walk(base, &p, out);
                }
            }
        }
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    fn no_temporaries(dir: &Path) {
        let left: Vec<String> = tree(dir)
            .into_iter()
            .filter(|p| p.contains(".tmp-") || p.contains(".old-"))
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[tokio::test]
    async fn parquet_round_trip_keeps_rows_and_types() {
        let dir = tempfile::tempdir().unwrap();
        let df = sample();
        let out = write("out/data.parquet")
            .run(ctx(dir.path(), Some(df.clone())))
            .await
            .unwrap();
        let target = dir.path().join("out/data.parquet");
        assert_eq!(out.outputs["path"], target.display().to_string());
        assert_eq!(out.outputs["rows"], 4);
        assert_eq!(out.outputs["bytes"], fs::metadata(&target).unwrap().len());
        assert_eq!(
            out.outputs["files"],
            serde_json::json!([target.display().to_string()])
        );
        let (back, rout) = read_table(dir.path(), "out/data.parquet").await;
        assert_eq!(back.schema(), df.schema());
        assert_eq!(
            back.column("at").unwrap().dtype(),
            &DataType::Datetime(TimeUnit::Milliseconds, Some(TimeZone::UTC))
        );
        assert!(back.equals_missing(&df));
        assert_eq!(rout.outputs["rows"], 4);
        no_temporaries(dir.path());
    }

    #[tokio::test]
    async fn compression_codecs_all_read_back() {
        let dir = tempfile::tempdir().unwrap();
        for (name, c) in [
            ("z", Compression::Zstd),
            ("s", Compression::Snappy),
            ("u", Compression::Uncompressed),
        ] {
            let mut w = write(&format!("{name}.parquet"));
            w.compression = Some(c);
            w.run(ctx(dir.path(), Some(sample()))).await.unwrap();
            let (back, _) = read_table(dir.path(), &format!("{name}.parquet")).await;
            assert!(back.equals_missing(&sample()), "{name}");
        }
    }

    #[tokio::test]
    async fn csv_round_trip_with_rfc3339_datetimes() {
        let dir = tempfile::tempdir().unwrap();
        write("data.csv")
            .run(ctx(dir.path(), Some(sample())))
            .await
            .unwrap();
        let text = fs::read_to_string(dir.path().join("data.csv")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "id,region,amount,ok,at");
        assert_eq!(lines[1], "1,north,1.5,true,2024-03-01T10:30:00+00:00");
        assert_eq!(
            lines[2],
            "2,south/east,,false,2024-03-01T10:30:00.500+00:00"
        );
        assert_eq!(lines.len(), 5);

        let (back, out) = read_table(dir.path(), "data.csv").await;
        assert_eq!(out.outputs["rows"], 4);
        let df = sample();
        for c in ["id", "region", "amount", "ok"] {
            assert!(
                back.column(c)
                    .unwrap()
                    .equals_missing(df.column(c).unwrap()),
                "{c}"
            );
        }
        // The datetimes come back as instants in UTC.
        let at = back
            .column("at")
            .unwrap()
            .cast(&DataType::Datetime(
                TimeUnit::Milliseconds,
                Some(TimeZone::UTC),
            ))
            .unwrap();
        assert!(at.equals_missing(df.column("at").unwrap()));
    }

    #[tokio::test]
    async fn ndjson_round_trip_keeps_rows() {
        let dir = tempfile::tempdir().unwrap();
        write("data.jsonl")
            .run(ctx(dir.path(), Some(sample())))
            .await
            .unwrap();
        let text = fs::read_to_string(dir.path().join("data.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text.contains("\"2024-03-01T10:30:00+00:00\""), "{text}");
        let (back, out) = read_table(dir.path(), "data.jsonl").await;
        assert_eq!(out.outputs["rows"], 4);
        let df = sample();
        for c in ["id", "region", "amount", "ok"] {
            assert!(
                back.column(c)
                    .unwrap()
                    .equals_missing(df.column(c).unwrap()),
                "{c}"
            );
        }
    }

    #[tokio::test]
    async fn partitioned_write_makes_a_hive_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = write("sales");
        w.partition_by = vec!["region".into()];
        let out = w.run(ctx(dir.path(), Some(sample()))).await.unwrap();
        assert_eq!(
            tree(&dir.path().join("sales")),
            [
                "region=__HIVE_DEFAULT_PARTITION__",
                "region=__HIVE_DEFAULT_PARTITION__/part-0.parquet",
                "region=north",
                "region=north/part-0.parquet",
                "region=south%2Feast",
                "region=south%2Feast/part-0.parquet",
            ]
        );
        let files = out.outputs["files"].as_array().unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(out.outputs["rows"], 4);
        let total: u64 = files
            .iter()
            .map(|f| fs::metadata(f.as_str().unwrap()).unwrap().len())
            .sum();
        assert_eq!(out.outputs["bytes"], total);

        let (north, _) = read_table(dir.path(), "sales/region=north/part-0.parquet").await;
        assert_eq!(
            north.get_column_names_str(),
            ["id", "amount", "ok", "at"],
            "the partition column is in the folder name only"
        );
        assert_eq!(
            north.column("id").unwrap().i64().unwrap().to_vec(),
            [Some(1), Some(3)]
        );
        let (all, _) = read_table(dir.path(), "sales/**/*.parquet").await;
        assert_eq!(all.height(), 4);
        no_temporaries(dir.path());
    }

    #[tokio::test]
    async fn partitioned_write_replaces_the_whole_folder() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = write("sales.csv");
        w.partition_by = vec!["region".into(), "ok".into()];
        w.clone()
            .run(ctx(dir.path(), Some(sample())))
            .await
            .unwrap();
        assert!(dir
            .path()
            .join("sales.csv/region=north/ok=true/part-0.csv")
            .is_file());
        let smaller = sample().slice(1, 1);
        w.run(ctx(dir.path(), Some(smaller))).await.unwrap();
        assert_eq!(
            tree(&dir.path().join("sales.csv")),
            [
                "region=south%2Feast",
                "region=south%2Feast/ok=false",
                "region=south%2Feast/ok=false/part-0.csv",
            ]
        );
        no_temporaries(dir.path());
    }

    #[tokio::test]
    async fn glob_reads_and_concatenates_several_files() {
        let dir = tempfile::tempdir().unwrap();
        let df = sample();
        for (i, path) in ["data/a.parquet", "data/b.parquet", "data/sub/c.parquet"]
            .iter()
            .enumerate()
        {
            write(path)
                .run(ctx(dir.path(), Some(df.slice(i as i64, 1))))
                .await
                .unwrap();
        }
        fs::write(dir.path().join("data/notes.txt"), "not a table").unwrap();
        fs::write(dir.path().join("data/.hidden.parquet"), "junk").unwrap();

        let (top, out) = read_table(dir.path(), "data/*.parquet").await;
        assert_eq!(top.height(), 2);
        let d = dir.path().join("data");
        assert_eq!(
            out.outputs["files"],
            serde_json::json!([
                d.join("a.parquet").display().to_string(),
                d.join("b.parquet").display().to_string(),
            ])
        );
        let (all, out) = read_table(dir.path(), "data/**/*.parquet").await;
        assert_eq!(out.outputs["rows"], 3);
        assert!(all.equals_missing(&df.slice(0, 3)));
        assert_eq!(
            all.column("at").unwrap().dtype(),
            &DataType::Datetime(TimeUnit::Milliseconds, Some(TimeZone::UTC))
        );
    }

    #[tokio::test]
    async fn glob_unifies_schemas_or_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("in")).unwrap();
        fs::write(d.join("in/1.csv"), "id,v\n1,2\n").unwrap();
        fs::write(d.join("in/2.csv"), "id,v,extra\n2,2.5,x\n").unwrap();
        let (df, _) = read_table(d, "in/*.csv").await;
        assert_eq!(df.get_column_names_str(), ["id", "v", "extra"]);
        assert_eq!(df.column("v").unwrap().dtype(), &DataType::Float64);
        assert_eq!(
            df.column("extra").unwrap().str().unwrap().get(0),
            None,
            "missing in the first file: null"
        );

        // A struct column and an integer one cannot be combined.
        let nested = DataFrame::new(vec![Column::new("id".into(), [1i64])])
            .unwrap()
            .into_struct("id".into())
            .into_series()
            .into_frame();
        write("mixed/b.parquet")
            .run(ctx(d, Some(nested)))
            .await
            .unwrap();
        write("mixed/a.parquet")
            .run(ctx(d, Some(sample())))
            .await
            .unwrap();
        let err = read("mixed/*.parquet").run(ctx(d, None)).await.unwrap_err();
        assert!(
            err.message
                .contains(&d.join("mixed/b.parquet").display().to_string())
                && err.message.contains("`id`"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn no_match_is_an_error_with_the_pattern() {
        let dir = tempfile::tempdir().unwrap();
        let err = read("nowhere/*.parquet")
            .run(ctx(dir.path(), None))
            .await
            .unwrap_err();
        assert!(
            err.message.contains("no file matches `nowhere/*.parquet`"),
            "{}",
            err.message
        );
        let err = read("missing.csv")
            .run(ctx(dir.path(), None))
            .await
            .unwrap_err();
        assert!(err.message.contains("`missing.csv`"), "{}", err.message);
        fs::write(dir.path().join("bad.parquet"), "not parquet").unwrap();
        let err = read("bad.parquet")
            .run(ctx(dir.path(), None))
            .await
            .unwrap_err();
        assert!(
            err.message
                .contains(&dir.path().join("bad.parquet").display().to_string()),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn failed_write_keeps_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        write("out.csv")
            .run(ctx(dir.path(), Some(sample())))
            .await
            .unwrap();
        let before = fs::read(dir.path().join("out.csv")).unwrap();
        // CSV cannot hold a list column: the writer fails after the file was opened.
        let lists = DataFrame::new(vec![Column::new(
            "l".into(),
            [Series::new("".into(), [1i64, 2])],
        )])
        .unwrap();
        let err = write("out.csv")
            .run(ctx(dir.path(), Some(lists)))
            .await
            .unwrap_err();
        assert!(
            err.message
                .contains(&dir.path().join("out.csv").display().to_string()),
            "{}",
            err.message
        );
        assert_eq!(fs::read(dir.path().join("out.csv")).unwrap(), before);
        no_temporaries(dir.path());
    }

    #[tokio::test]
    async fn injected_failure_mid_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let single = WritePlan {
            format: FileFormat::Parquet,
            compression: Compression::Zstd,
            partition_by: Vec::new(),
        };
        let part = WritePlan {
            partition_by: vec!["region".into()],
            ..single.clone()
        };
        let fail = |_: &Path| Err(io::Error::other("disk full (injected)"));

        // A single file, in a folder the write creates: both are gone after the failure.
        let target = dir.path().join("new/deeper/x.parquet");
        let err = write_table(&sample(), &target, &single, &cancel, &mut { fail }).unwrap_err();
        assert!(
            err.contains("disk full") && err.contains("x.parquet"),
            "{err}"
        );
        assert!(!dir.path().join("new").exists());

        // A partitioned folder: the second partition fails; the previous folder stays.
        let target = dir.path().join("sales");
        write_table(&sample(), &target, &part, &cancel, &mut |_| Ok(())).unwrap();
        let before = tree(&target);
        let mut n = 0;
        let mut second_fails = |_: &Path| {
            n += 1;
            if n == 2 {
                Err(io::Error::other("disk full (injected)"))
            } else {
                Ok(())
            }
        };
        let other = sample().slice(0, 2);
        let err = write_table(&other, &target, &part, &cancel, &mut second_fails).unwrap_err();
        assert!(err.contains("disk full"), "{err}");
        assert_eq!(tree(&target), before);
        let (north, _) = read_table(dir.path(), "sales/region=north/part-0.parquet").await;
        assert_eq!(north.height(), 2);

        // Cancelled before the commit: nothing moves.
        cancel.cancel();
        let err = write_table(&other, &target, &part, &cancel, &mut |_| Ok(())).unwrap_err();
        assert!(err.contains("cancelled"), "{err}");
        assert_eq!(tree(&target), before);
        no_temporaries(dir.path());
    }

    #[tokio::test]
    async fn configuration_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let err = write("out.txt")
            .run(ctx(d, Some(sample())))
            .await
            .unwrap_err();
        assert!(
            err.message.contains("out.txt") && err.message.contains("`format:`"),
            "{}",
            err.message
        );
        let mut w = write("out.csv");
        w.compression = Some(Compression::Snappy);
        let err = w.run(ctx(d, Some(sample()))).await.unwrap_err();
        assert!(err.message.contains("parquet only"), "{}", err.message);

        let mut w = write("p");
        w.partition_by = vec!["nope".into()];
        let err = w.run(ctx(d, Some(sample()))).await.unwrap_err();
        assert!(err.message.contains("`nope`"), "{}", err.message);

        let err = write("x.parquet").run(ctx(d, None)).await.unwrap_err();
        assert!(err.message.contains("input"), "{}", err.message);

        // The destination's folder cannot be created (its parent is a file).
        fs::write(d.join("blocker"), "").unwrap();
        let err = write("blocker/x.parquet")
            .run(ctx(d, Some(sample())))
            .await
            .unwrap_err();
        assert!(
            err.message
                .contains(&d.join("blocker/x.parquet").display().to_string()),
            "{}",
            err.message
        );
        assert_eq!(fs::read(d.join("blocker")).unwrap(), b"");
        no_temporaries(d);
    }

    #[test]
    fn static_info_and_schema() {
        let w = write("x.parquet").static_info();
        assert!(!w.produces_table);
        assert_eq!(
            w.outputs,
            Some(vec![
                "path".into(),
                "rows".into(),
                "bytes".into(),
                "files".into()
            ])
        );
        let r = read("x.parquet").static_info();
        assert!(r.produces_table);
        assert_eq!(r.outputs, Some(vec!["rows".into(), "files".into()]));

        let mut g = schemars::SchemaGenerator::default();
        g.subschema_for::<FileWrite>();
        g.subschema_for::<FileRead>();
        let defs = serde_json::to_value(g.definitions()).unwrap();
        for def in ["FileWrite", "FileRead"] {
            assert_eq!(defs[def]["additionalProperties"], false);
            assert_eq!(defs[def]["required"], serde_json::json!(["path"]));
            for (name, prop) in defs[def]["properties"].as_object().unwrap() {
                assert!(prop["description"].is_string(), "{def}.{name}");
            }
        }
    }
}
