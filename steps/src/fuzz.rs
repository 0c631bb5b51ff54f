//! A mutation fuzzer over the YAML parser and `pipe validate` (in process, with every step
//! and connection type registered): no input may panic, abort or blow up.
//!
//! cargo-fuzz needs a nightly toolchain, so this is a plain test with a seeded mutator. It
//! first replays every file of `tests/corpus` and `tests/fuzz_corpus`, then mutates them
//! (byte flips, deletions, splices between files, YAML and template tokens, deep nesting,
//! alias chains, huge numbers) for `PIPE_FUZZ_SECONDS` (default 3; `scripts/test` gives it
//! more). `PIPE_FUZZ_SEED` replays a run. An input that panics is written to the temp folder
//! and named in the failure: commit it to `tests/fuzz_corpus/` with the fix.
//!
//! It lives in the `steps` crate's unit tests because that test binary already links every
//! step type: a separate binary would link Polars once more.

use engine::diag::{github_data, github_property};
use engine::step::Registry;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Tokens the mutator inserts: YAML structure, templates, hostile scalars.
const TOKENS: &[&str] = &[
    "{{ ",
    " }}",
    "{% if x %}",
    "{% endif %}",
    "{{ params.x | urlencode }}",
    "{{ x | no_such_filter }}",
    "{{ steps.a.b }}",
    "{{ secret('X') }}",
    "&a ",
    "*a",
    "<<: *a\n",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ": ",
    ", ",
    "\n",
    "\n  ",
    "\t",
    "'",
    "\"",
    "\\",
    "? ",
    "| ",
    "> ",
    "---\n",
    "...\n",
    "!!binary ",
    "!tag ",
    "%YAML 1.2\n",
    "#",
    "\u{feff}",
    "\r\n",
    "\u{0}",
    "9223372036854775807d",
    "18446744073709551615s",
    "1e308",
    "-1",
    "0x7fffffffffffffff",
    ".nan",
    "~",
    "type: ",
    "type: http\n",
    "type: bigquery\n",
    "type: postgres\n",
    "connection: ",
    "needs: [",
    "input: ",
    "foreach: ",
    "timeout: ",
    "retry: { attempts: ",
    "with: ",
    "steps:\n",
    "connections:\n",
    "params:\n",
    "::error::",
    "%0A",
];

/// A small, fast, seeded generator (xorshift64*): runs are reproducible from their seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The largest input the mutator builds (bigger ones only make iterations slow).
const MAX_INPUT: usize = 256 * 1024;

fn mutate(input: &[u8], corpus: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(9) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            2 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                let to = (from + rng.below(256)).min(other.len());
                out.splice(at..at, other[from..to].iter().copied());
            }
            3 if !out.is_empty() => {
                let from = rng.below(out.len());
                let to = (from + rng.below(64)).min(out.len());
                let copy = out[from..to].to_vec();
                out.splice(at..at, copy);
            }
            4 => {
                let depth = 1 + rng.below(300);
                let open = ["[", "{a: ", "- ", "\n  k:"][rng.below(4)];
                out.splice(at..at, open.repeat(depth).into_bytes());
            }
            5 => {
                // An alias chain: each anchor's list holds several aliases to the last one.
                let mut chain = String::from("\nz0: &z0 [x, x, x, x, x, x, x, x]\n");
                for i in 1..2 + rng.below(10) {
                    let list = vec![format!("*z{}", i - 1); 2 + rng.below(9)].join(", ");
                    chain.push_str(&format!("z{i}: &z{i} [{list}]\n"));
                }
                out.splice(at..at, chain.into_bytes());
            }
            _ => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.bytes());
            }
        }
    }
    out.truncate(MAX_INPUT);
    out
}

/// Parse and validate one input, and print its diagnostics as every format would.
fn check(input: &[u8], registry: &Registry) {
    let text = String::from_utf8_lossy(input);
    let outcome =
        engine::validate::validate_text(&text, Path::new("fuzz.yaml"), "fuzz.yaml", registry);
    for d in &outcome.diagnostics {
        let _ = d.to_string();
        let _ = github_data(&d.message);
        let _ = github_property(&d.file);
    }
    drop(outcome);
}

fn corpus() -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["tests/corpus", "tests/fuzz_corpus", "pipelines"] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        for p in paths {
            let bytes = std::fs::read(&p).unwrap();
            files.push((p, bytes));
        }
    }
    files
}

/// Run `check`, turning a panic into the input that caused it (saved for the corpus).
fn survives(input: &[u8], registry: &Registry, origin: &str) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| check(input, registry))) {
        Ok(()) => Ok(()),
        Err(_) => {
            let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            let saved = std::env::temp_dir().join(format!("pipe-fuzz-crash-{hash:016x}.yaml"));
            let _ = std::fs::write(&saved, input);
            Err(format!(
                "{origin} panicked; the input is {} (add it to tests/fuzz_corpus/)",
                saved.display()
            ))
        }
    }
}

#[test]
fn parser_and_validate_survive_the_corpus_and_its_mutations() {
    let registry = crate::registry();
    let files = corpus();
    assert!(files.len() > 20, "the corpus is missing files");
    let mut failures = Vec::new();
    for (path, bytes) in &files {
        if let Err(e) = survives(bytes, &registry, &path.display().to_string()) {
            failures.push(e);
        }
    }
    let seconds: u64 = std::env::var("PIPE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("PIPE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        | 1;
    eprintln!(
        "fuzz: {} corpus files, {seconds}s, PIPE_FUZZ_SEED={seed}",
        files.len()
    );
    let inputs: Vec<Vec<u8>> = files.into_iter().map(|(_, b)| b).collect();
    let mut rng = Rng(seed);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut runs = 0u64;
    while Instant::now() < until && failures.len() < 5 {
        let mut input = inputs[rng.below(inputs.len())].clone();
        // A few generations deep, so mutations build on each other.
        for _ in 0..1 + rng.below(4) {
            input = mutate(&input, &inputs, &mut rng);
            if let Err(e) = survives(&input, &registry, &format!("mutation {runs}")) {
                failures.push(e);
                break;
            }
            runs += 1;
        }
    }
    eprintln!("fuzz: {runs} mutations");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
