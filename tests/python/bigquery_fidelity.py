"""Drive the sandbox's BigQuery fake with Google's own Python client (google-cloud-bigquery).

The client builds every request the way it does for bigquery.googleapis.com: datasets and
tables, load jobs by multipart and by resumable media upload (google-resumable-media, in
several 256 KiB chunks here), tabledata.list with `formatOptions.useInt64Timestamp`,
insertAll, query jobs polled through jobs.get / getQueryResults, and jobs.query. Nobody in
this project wrote it, so when it works against the fake, the fake speaks the real
protocol and does not merely agree with pipe's own client.

Run by tests/fidelity.rs against `pipe sandbox serve`. Environment:
  GOOGLE_APPLICATION_CREDENTIALS  the sandbox's service-account key file
  GOOGLE_URL                      the Google fake's base URL (http://127.0.0.1:PORT)
  BIGQUERY_PROJECT                the project the fake reports (the key's project_id)

Prints a JSON summary on stdout; exits 1 after listing every mismatch on stderr.
"""

import datetime
import importlib.metadata
import io
import json
import os
import sys
import traceback

import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions
from google.cloud import bigquery
from google.oauth2 import service_account


def env(name):
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"bigquery_fidelity.py: the environment variable {name} is not set")
    return value


KEY_FILE = env("GOOGLE_APPLICATION_CREDENTIALS")
GOOGLE_URL = env("GOOGLE_URL").rstrip("/")
PROJECT = env("BIGQUERY_PROJECT")
DATASET = f"{PROJECT}.fidelity"

passed = []
failures = []


class Mismatch(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Mismatch(what)


def expect_eq(actual, expected, what):
    if actual != expected:
        raise Mismatch(f"{what}: expected {expected!r}, got {actual!r}")


def check(fn):
    """Run one check; record it as passed or as a failure with its message."""
    name = fn.__name__
    try:
        fn()
        passed.append(name)
    except Mismatch as e:
        failures.append(f"{name}: {e}")
    except Exception as e:  # an exception the official client raised is a finding too
        failures.append(f"{name}: unexpected {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
    return fn


# Exactly what production code does: a key file, the library's default scopes
# (cloud-platform), and only the endpoint redirected.
client = bigquery.Client(
    project=PROJECT,
    credentials=service_account.Credentials.from_service_account_file(KEY_FILE),
    client_options={"api_endpoint": GOOGLE_URL},
)

SCHEMA = [
    bigquery.SchemaField("id", "INTEGER", mode="REQUIRED"),
    bigquery.SchemaField("name", "STRING"),
    bigquery.SchemaField("score", "FLOAT"),
    bigquery.SchemaField("active", "BOOLEAN"),
    bigquery.SchemaField("at", "TIMESTAMP"),
    bigquery.SchemaField("day", "DATE"),
]
ARROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("active", pa.bool_()),
        pa.field("at", pa.timestamp("us", tz="UTC")),
        pa.field("day", pa.date32()),
    ]
)
T0 = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)


def parquet(rows, schema=ARROW_SCHEMA):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    buf.seek(0)
    return buf


def rows(n, start=0, name=lambda i: f"n{i}"):
    return [
        {
            "id": i,
            "name": name(i),
            "score": i / 2,
            "active": i % 2 == 0,
            "at": T0 + datetime.timedelta(seconds=i),
            "day": datetime.date(2024, 1, 1) + datetime.timedelta(days=i % 300),
        }
        for i in range(start, start + n)
    ]


@check
def create_dataset_and_table():
    client.delete_dataset(DATASET, delete_contents=True, not_found_ok=True)
    ds = client.create_dataset(bigquery.Dataset(DATASET))
    expect_eq(ds.dataset_id, "fidelity", "dataset id")
    try:
        client.create_dataset(bigquery.Dataset(DATASET))
        raise Mismatch("creating the dataset twice did not raise Conflict")
    except exceptions.Conflict:
        pass
    t = client.create_table(bigquery.Table(f"{DATASET}.events", schema=SCHEMA))
    expect_eq([f.name for f in t.schema], [f.name for f in SCHEMA], "schema names")
    expect_eq(t.schema[0].mode, "REQUIRED", "mode")
    expect_eq(t.num_rows, 0, "num_rows of a new table")
    listed = [x.table_id for x in client.list_tables(DATASET)]
    expect_eq(listed, ["events"], "list_tables")


@check
def load_parquet_multipart():
    buf = parquet(rows(3))
    size = len(buf.getvalue())
    config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET)
    # A size under the client's multipart threshold: one multipart/related request.
    job = client.load_table_from_file(buf, f"{DATASET}.events", job_config=config, size=size)
    job.result()
    expect_eq(job.state, "DONE", "job state")
    expect_eq(job.output_rows, 3, "load output_rows")
    expect_eq(job.input_file_bytes, size, "load input_file_bytes")
    expect_eq(client.get_table(f"{DATASET}.events").num_rows, 3, "num_rows after the load")


@check
def load_parquet_resumable_in_chunks():
    import google.cloud.bigquery.client as bq_client

    # The client uploads in 100 MB chunks; 256 KiB (the protocol's unit) makes this
    # upload take several PUTs with 308 "resume incomplete" answers in between.
    saved = bq_client._DEFAULT_CHUNKSIZE
    bq_client._DEFAULT_CHUNKSIZE = 256 * 1024
    try:
        # Incompressible names make the file larger than one chunk.
        data = rows(4000, start=100, name=lambda i: os.urandom(48).hex())
        buf = parquet(data)
        size = len(buf.getvalue())
        expect(size > 256 * 1024, f"the test file is too small for chunks ({size} bytes)")
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
        )
        # No size: the client takes the resumable path.
        job = client.load_table_from_file(buf, f"{DATASET}.events", job_config=config)
        job.result()
    finally:
        bq_client._DEFAULT_CHUNKSIZE = saved
    expect_eq(job.output_rows, 4000, "resumable load output_rows")
    expect_eq(client.get_table(f"{DATASET}.events").num_rows, 4003, "num_rows after both loads")


@check
def list_rows_values_and_types():
    table = client.get_table(f"{DATASET}.events")
    got = list(client.list_rows(table, max_results=3))
    expect_eq(len(got), 3, "rows")
    first = dict(got[0].items())
    expect_eq(first["id"], 0, "INTEGER")
    expect_eq(first["name"], "n0", "STRING")
    expect_eq(got[1]["score"], 0.5, "FLOAT")
    expect_eq(first["active"], True, "BOOLEAN")
    expect_eq(first["at"], T0, "TIMESTAMP (microseconds, UTC)")
    expect_eq(first["day"], datetime.date(2024, 1, 1), "DATE")
    # Paging: start_index and page_size walk the same rows.
    paged = [r["id"] for r in client.list_rows(table, start_index=1, max_results=5, page_size=2)]
    expect_eq(paged, [1, 2, 100, 101, 102], "paged ids")
    only = list(client.list_rows(table, selected_fields=[SCHEMA[1]], max_results=1))
    expect_eq(list(only[0].keys()), ["name"], "selected_fields")


@check
def insert_rows_json_reports_row_errors():
    table = f"{DATASET}.events"
    errors = client.insert_rows_json(
        table,
        [
            {"id": 9000, "name": "ok", "at": "2024-05-06 07:08:09.5 UTC"},
            {"id": "not a number", "name": "bad"},
            {"id": 9002, "unknown_field": 1},
        ],
    )
    by_index = {e["index"]: e["errors"] for e in errors}
    expect_eq(sorted(by_index), [0, 1, 2], "every row reported when one is invalid")
    expect_eq(by_index[0][0]["reason"], "stopped", "valid row of a refused request")
    expect_eq(by_index[1][0]["reason"], "invalid", "wrong type")
    expect_eq(by_index[2][0]["location"], "unknown_field", "unknown field's location")
    expect_eq(client.get_table(table).num_rows, 4003, "nothing inserted from a refused request")
    errors = client.insert_rows_json(table, [{"id": 9000, "name": "ok", "at": "2024-05-06T07:08:09Z"}])
    expect_eq(errors, [], "a valid row")
    expect_eq(client.get_table(table).num_rows, 4004, "the valid row inserted")


@check
def missing_table_is_not_found():
    try:
        client.get_table(f"{DATASET}.does_not_exist")
        raise Mismatch("get_table of a missing table did not raise")
    except exceptions.NotFound as e:
        expect("does_not_exist" in e.message, f"message names the table: {e.message}")
        expect_eq(e.errors[0]["reason"], "notFound", "reason")


@check
def query_count():
    job = client.query(f"SELECT COUNT(*) AS n, MAX(id) AS top FROM `{DATASET}.events`")
    result = list(job.result())
    expect_eq(result[0]["n"], 4004, "COUNT(*)")
    expect_eq(result[0]["top"], 9000, "MAX(id)")
    expect_eq(job.statement_type, "SELECT", "statement_type")
    timestamps = list(client.query_and_wait(f"SELECT at FROM {DATASET}.events WHERE id = 0"))
    expect_eq(timestamps[0]["at"], T0, "TIMESTAMP through jobs.query")


@check
def merge_updates_and_inserts():
    client.query_and_wait(
        f"CREATE TABLE `{DATASET}.updates` (id INT64 NOT NULL, name STRING)"
    )
    client.query_and_wait(
        f"INSERT INTO `{DATASET}.updates` (id, name) VALUES (0, 'zero'), (1, 'one'), (5000, 'new')"
    )
    merge = (
        f"MERGE `{DATASET}.events` T USING `{DATASET}.updates` S ON T.id = S.id "
        "WHEN MATCHED THEN UPDATE SET name = S.name "
        "WHEN NOT MATCHED THEN INSERT (id, name) VALUES (S.id, S.name)"
    )
    job = client.query(merge)
    job.result()
    expect_eq(job.num_dml_affected_rows, 3, "MERGE affected rows (2 updated, 1 inserted)")
    got = {
        r["id"]: r["name"]
        for r in client.query_and_wait(
            f"SELECT id, name FROM `{DATASET}.events` WHERE id IN (0, 1, 2, 5000) ORDER BY id"
        )
    }
    expect_eq(got, {0: "zero", 1: "one", 2: "n2", 5000: "new"}, "rows after MERGE")
    again = client.query_and_wait(merge)
    expect_eq(again.num_dml_affected_rows, 3, "MERGE run twice: all three now match")
    expect_eq(client.get_table(f"{DATASET}.events").num_rows, 4005, "no duplicate inserted")


@check
def invalid_query_is_bad_request():
    try:
        client.query_and_wait("GRANT SELECT ON nothing TO nobody")
        raise Mismatch("an unsupported statement did not raise")
    except exceptions.BadRequest as e:
        expect_eq(e.errors[0]["reason"], "invalidQuery", "reason")


@check
def load_with_a_new_column_fails_without_field_addition():
    extra = ARROW_SCHEMA.append(pa.field("extra", pa.string()))
    data = [dict(r, extra="x") for r in rows(2, start=7000)]
    config = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET)
    job = client.load_table_from_file(parquet(data, extra), f"{DATASET}.events", job_config=config)
    try:
        job.result()
        raise Mismatch("a load with an unknown column succeeded without ALLOW_FIELD_ADDITION")
    except exceptions.BadRequest as e:
        expect("extra" in str(e), f"the error names the column: {e}")
    expect_eq(job.error_result["reason"], "invalid", "errorResult.reason")
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET,
        schema_update_options=[bigquery.SchemaUpdateOption.ALLOW_FIELD_ADDITION],
    )
    job = client.load_table_from_file(parquet(data, extra), f"{DATASET}.events", job_config=config)
    job.result()
    table = client.get_table(f"{DATASET}.events")
    expect_eq(table.schema[-1].name, "extra", "the added column")
    expect_eq(table.schema[-1].mode, "NULLABLE", "the added column's mode")


@check
def write_truncate_replaces_and_drop_table():
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET,
        write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
    )
    client.load_table_from_file(parquet(rows(2)), f"{DATASET}.copy", job_config=config).result()
    client.load_table_from_file(parquet(rows(5)), f"{DATASET}.copy", job_config=config).result()
    expect_eq(client.get_table(f"{DATASET}.copy").num_rows, 5, "WRITE_TRUNCATE")
    client.query_and_wait(f"DROP TABLE `{DATASET}.copy`")
    client.query_and_wait(f"DROP TABLE IF EXISTS `{DATASET}.copy`")
    try:
        client.get_table(f"{DATASET}.copy")
        raise Mismatch("the dropped table is still there")
    except exceptions.NotFound:
        pass


summary = {
    "client": {
        name: importlib.metadata.version(name)
        for name in ("google-cloud-bigquery", "google-resumable-media", "google-auth", "pyarrow")
    },
    "passed": passed,
    "failed": failures,
}
print(json.dumps(summary, indent=2))
if failures:
    print(f"bigquery_fidelity.py: {len(failures)} mismatch(es) with the official client:", file=sys.stderr)
    for f in failures:
        print(f"  - {f}", file=sys.stderr)
    sys.exit(1)
