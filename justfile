# The recipes a person uses. `just` lists them.

default:
    @just --list

# Build the pipe binary (release).
build:
    cargo build --release

# Run every test: unit tests of each crate and the integration tests driving the real binary.
test:
    ./scripts/test

# The demonstration pipeline.
demo:
    cargo run -q -- run pipelines/tiflux.yaml --sandbox

# Validate every pipeline in pipelines/.
validate:
    cargo run -q -- validate --deny-warnings pipelines

# Benchmarks (figures and ratios; results go to BENCHMARKS.md by hand).
bench:
    cargo bench --bench engine
    cargo bench --bench extract
    cargo bench --bench load
    cargo bench --bench sql
    cargo bench --bench carol
    cargo bench --bench serve
    cargo bench --bench cluster
    cargo bench --bench api

# Regenerate schemas/pipeline.schema.json from the structs.
schema:
    cargo run -q -- schema > schemas/pipeline.schema.json

# Regenerate README's step reference from the structs.
docs:
    #!/usr/bin/env bash
    set -euo pipefail
    md=$(cargo run -q -- schema --steps-markdown)
    python3 - "$md" <<'PY'
    import sys
    md = sys.argv[1] + "\n"
    s = open("README.md").read()
    a = s.index("\n", s.index("<!-- steps:begin")) + 1
    b = s.index("<!-- steps:end -->")
    open("README.md", "w").write(s[:a] + md + s[b:])
    PY

# Formatting and lints as CI wants them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
