use super::*;

/// A database in a temp dir with dataset `p.ds`.
fn db() -> (tempfile::TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(dir.path().to_path_buf()).unwrap();
    db.datasets.insert(
        ("p".into(), "ds".into()),
        DatasetMeta {
            created: 0,
            location: "US".into(),
        },
    );
    (dir, db)
}

fn exec(db: &mut Db, sql: &str) -> Result<eval::Outcome, sql::QErr> {
    eval::execute(db, "p", None, sql)
}

/// A SELECT's rows as BigQuery cell strings.
fn rows(db: &mut Db, sql: &str) -> Vec<Vec<Value>> {
    let out = exec(db, sql).unwrap();
    let (schema, df) = out.result.expect("a SELECT");
    table::rows_json(&df, &schema, false)
        .unwrap()
        .into_iter()
        .map(|r| {
            r["f"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["v"].clone())
                .collect()
        })
        .collect()
}

fn strs(rows: &[&[&str]]) -> Vec<Vec<Value>> {
    rows.iter()
        .map(|r| r.iter().map(|v| json!(v)).collect())
        .collect()
}

const MERGE: &str = "MERGE INTO `p.ds.t` AS T USING ds.s AS S ON T.id = S.id \
    WHEN MATCHED THEN UPDATE SET name = S.name, n = S.n \
    WHEN NOT MATCHED THEN INSERT (id, name, n) VALUES (S.id, S.name, S.n)";

#[test]
fn merge_updates_matches_inserts_the_rest_and_is_idempotent() {
    let (_dir, mut db) = db();
    exec(
        &mut db,
        "CREATE TABLE ds.t (id INT64 NOT NULL, name STRING, n INT64)",
    )
    .unwrap();
    exec(
        &mut db,
        "CREATE TABLE ds.s (id INT64, name STRING, n INT64)",
    )
    .unwrap();
    let out = exec(
        &mut db,
        "INSERT INTO ds.t (id, name, n) VALUES (1, 'a', 10), (2, \"b\", 20)",
    )
    .unwrap();
    assert_eq!(out.affected, Some(2));
    exec(&mut db, "INSERT ds.s VALUES (2, 'B', 21), (3, 'c', 30)").unwrap();

    let out = exec(&mut db, MERGE).unwrap();
    assert_eq!((out.kind, out.affected), ("MERGE", Some(2)));
    let expected = strs(&[&["1", "a", "10"], &["2", "B", "21"], &["3", "c", "30"]]);
    assert_eq!(
        rows(&mut db, "SELECT id, name, n FROM p.ds.t ORDER BY id"),
        expected
    );

    // Again: every source row matches now, nothing new is inserted.
    let out = exec(&mut db, MERGE).unwrap();
    assert_eq!(out.affected, Some(2));
    assert_eq!(
        rows(&mut db, "SELECT id, name, n FROM ds.t ORDER BY id"),
        expected
    );
    assert_eq!(
        rows(&mut db, "SELECT COUNT(*) AS c FROM `p.ds.t`"),
        strs(&[&["3"]])
    );

    // Persisted: a fresh Db over the same directory sees the merged table.
    let mut again = Db::open(db.root.clone()).unwrap();
    assert_eq!(
        rows(&mut again, "SELECT id, name, n FROM ds.t ORDER BY id"),
        expected
    );
}

#[test]
fn merge_with_a_multi_column_key_conditions_and_delete() {
    let (_dir, mut db) = db();
    exec(&mut db, "CREATE TABLE ds.t (a INT64, b STRING, v FLOAT64)").unwrap();
    exec(
        &mut db,
        "INSERT ds.t (a, b, v) VALUES (1, 'x', 1.0), (1, 'y', 2.0), (2, 'x', 3.0)",
    )
    .unwrap();
    exec(&mut db, "CREATE TABLE ds.s (a INT64, b STRING, v FLOAT64)").unwrap();
    exec(
        &mut db,
        "INSERT ds.s (a, b, v) VALUES (1, 'y', 20.5), (2, 'y', 4.0), (1, 'x', 1.0)",
    )
    .unwrap();
    let out = exec(
        &mut db,
        "MERGE ds.t t USING (SELECT a, b, v FROM ds.s) s ON t.a = s.a AND t.b = s.b \
         WHEN MATCHED AND s.v > t.v THEN UPDATE SET v = s.v \
         WHEN NOT MATCHED BY TARGET THEN INSERT ROW \
         WHEN NOT MATCHED BY SOURCE THEN DELETE",
    )
    .unwrap();
    // (1,y) updated, (2,y) inserted, (2,x) deleted; (1,x) matched but not changed.
    assert_eq!(out.affected, Some(3));
    assert_eq!(
        rows(&mut db, "SELECT a, b, v FROM ds.t ORDER BY a, b"),
        strs(&[&["1", "x", "1"], &["1", "y", "20.5"], &["2", "y", "4"]])
    );
    // A target row matching two source rows is an error, as in BigQuery.
    exec(&mut db, "INSERT ds.s (a, b, v) VALUES (1, 'x', 9.0)").unwrap();
    let e = exec(
        &mut db,
        "MERGE ds.t T USING ds.s S ON T.a = S.a AND T.b = S.b WHEN MATCHED THEN UPDATE SET v = S.v",
    )
    .unwrap_err();
    assert_eq!(e.reason, "invalidQuery");
    assert!(e.message.contains("at most one source row"), "{e:?}");
}

#[test]
fn ddl_drop_if_exists_and_dml() {
    let (_dir, mut db) = db();
    exec(&mut db, "DROP TABLE IF EXISTS ds.nope").unwrap();
    let e = exec(&mut db, "DROP TABLE ds.nope").unwrap_err();
    assert_eq!(e.reason, "notFound");
    exec(
        &mut db,
        "CREATE TABLE ds.t (id INT64, tags ARRAY<STRING>, at TIMESTAMP)",
    )
    .unwrap();
    let e = exec(&mut db, "CREATE TABLE ds.t (id INT64)").unwrap_err();
    assert_eq!(e.reason, "duplicate");
    exec(&mut db, "CREATE TABLE IF NOT EXISTS ds.t (id INT64)").unwrap();
    let path = db.path(&("p".into(), "ds".into(), "t".into()));
    assert!(path.exists());
    assert_eq!(
        db.tables[&("p".into(), "ds".into(), "t".into())].schema[1].mode,
        "REPEATED"
    );
    exec(&mut db, "DROP TABLE IF EXISTS `p.ds.t`").unwrap();
    assert!(!path.exists());
    assert!(db.tables.is_empty());

    exec(&mut db, "CREATE TABLE ds.u (id INT64, n INT64)").unwrap();
    exec(
        &mut db,
        "INSERT ds.u (id, n) VALUES (1, 1), (2, 2), (3, NULL)",
    )
    .unwrap();
    let out = exec(&mut db, "UPDATE ds.u SET n = n * 10 WHERE id >= 2").unwrap();
    assert_eq!(out.affected, Some(2));
    let out = exec(&mut db, "DELETE FROM ds.u WHERE n > 5").unwrap();
    assert_eq!(out.affected, Some(1));
    assert_eq!(
        rows(&mut db, "SELECT id, n FROM ds.u ORDER BY id"),
        vec![vec![json!("1"), json!("1")], vec![json!("3"), Value::Null]]
    );
    exec(
        &mut db,
        "CREATE TABLE ds.v AS SELECT id * 2 AS twice FROM ds.u",
    )
    .unwrap();
    assert_eq!(
        rows(&mut db, "SELECT SUM(twice) AS s FROM ds.v"),
        strs(&[&["8"]])
    );
}

#[test]
fn what_the_fake_cannot_run_is_invalid_query() {
    let (_dir, mut db) = db();
    for sql in [
        "GRANT `roles/bigquery.dataViewer` ON TABLE ds.t TO 'user:a@example.com'",
        "SELEC 1",
        "CREATE TABLE ds.t (id NOTATYPE)",
        "MERGE ds.t USING ds.s ON t.id = s.id",
        "SELECT 'unclosed",
    ] {
        let e = exec(&mut db, sql).unwrap_err();
        assert_eq!(e.reason, "invalidQuery", "{sql}: {e:?}");
    }
    let e = exec(&mut db, "SELECT * FROM ds.missing").unwrap_err();
    assert_eq!(e.reason, "notFound");
    let e = exec(&mut db, "SELECT * FROM other.missing").unwrap_err();
    assert_eq!(e.reason, "notFound");
}

fn ndjson(rows: &[Value]) -> Vec<u8> {
    rows.iter()
        .map(|r| format!("{r}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn loads_append_truncate_and_refuse_new_columns() {
    let (_dir, mut db) = db();
    let cfg = |write: &str, extra: Value| {
        let mut c = json!({
            "destinationTable": {"projectId": "p", "datasetId": "ds", "tableId": "l"},
            "sourceFormat": "NEWLINE_DELIMITED_JSON",
            "writeDisposition": write,
            "schema": {"fields": [
                {"name": "id", "type": "INT64", "mode": "REQUIRED"},
                {"name": "at", "type": "TIMESTAMP"},
            ]},
        });
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        c
    };
    let two = ndjson(&[
        json!({"id": 1, "at": "2024-01-02T03:04:05.5Z"}),
        json!({"id": "2", "at": 1700000000}),
    ]);
    assert_eq!(
        load(&mut db, "p", &cfg("WRITE_APPEND", json!({})), &two).unwrap(),
        2
    );
    assert_eq!(
        load(&mut db, "p", &cfg("WRITE_APPEND", json!({})), &two).unwrap(),
        2
    );
    assert_eq!(
        rows(&mut db, "SELECT COUNT(*) AS c FROM ds.l"),
        strs(&[&["4"]])
    );
    let one = ndjson(&[json!({"id": 7})]);
    load(&mut db, "p", &cfg("WRITE_TRUNCATE", json!({})), &one).unwrap();
    assert_eq!(
        rows(&mut db, "SELECT id, at FROM ds.l"),
        vec![vec![json!("7"), Value::Null]]
    );
    let e = load(&mut db, "p", &cfg("WRITE_EMPTY", json!({})), &one).unwrap_err();
    assert_eq!(e.reason, "duplicate");

    // A column the table lacks: refused without ALLOW_FIELD_ADDITION, added with it.
    let wider = ndjson(&[json!({"id": 8, "extra": "x"})]);
    let no_schema = json!({"schema": null});
    let e = load(
        &mut db,
        "p",
        &cfg("WRITE_APPEND", no_schema.clone()),
        &wider,
    )
    .unwrap_err();
    assert_eq!(e.reason, "invalid");
    assert!(e.message.contains("no such field: extra"), "{e:?}");
    let mut with = no_schema;
    with["schemaUpdateOptions"] = json!(["ALLOW_FIELD_ADDITION"]);
    // NDJSON is read with the table's schema unless one is given; give the wider one.
    with["schema"] = json!({"fields": [
        {"name": "id", "type": "INTEGER", "mode": "REQUIRED"},
        {"name": "extra", "type": "STRING"},
    ]});
    load(&mut db, "p", &cfg("WRITE_APPEND", with), &wider).unwrap();
    assert_eq!(
        rows(&mut db, "SELECT id, extra FROM ds.l ORDER BY id"),
        vec![vec![json!("7"), Value::Null], vec![json!("8"), json!("x")]]
    );
    let t = &db.tables[&("p".into(), "ds".into(), "l".into())];
    assert_eq!(t.schema[2], Field::new("extra", "STRING", "NULLABLE"));
}

#[test]
fn parquet_types_map_to_bigquery_types() {
    let mut df = df!(
        "i" => [1i32, 2],
        "f" => [1.5f64, 2.0],
        "b" => [true, false],
        "s" => ["x", "y"],
    )
    .unwrap();
    let ts = Series::new("ts".into(), [1_700_000_000_000_000i64, 0])
        .cast(&DataType::Datetime(
            TimeUnit::Microseconds,
            Some(TimeZone::UTC),
        ))
        .unwrap();
    df.with_column(ts).unwrap();
    let d = Series::new("d".into(), [19_000i32, 0])
        .cast(&DataType::Date)
        .unwrap();
    df.with_column(d).unwrap();
    let schema = table::schema_of(&df);
    let types: Vec<&str> = schema.iter().map(|f| f.ty.as_str()).collect();
    assert_eq!(
        types,
        ["INTEGER", "FLOAT", "BOOLEAN", "STRING", "TIMESTAMP", "DATE"]
    );
    let json_rows = table::rows_json(&df, &schema, false).unwrap();
    assert_eq!(
        json_rows[0],
        json!({"f": [{"v": "1"}, {"v": "1.5"}, {"v": "true"}, {"v": "x"}, {"v": "1700000000"}, {"v": "2022-01-08"}]})
    );
    let micros = table::rows_json(&df, &schema, true).unwrap();
    assert_eq!(micros[0]["f"][4]["v"], json!("1700000000000000"));
}

async fn served() -> (crate::Sandbox, reqwest::Client, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let sbx = crate::Sandbox::start(crate::Options {
        state_dir: Some(dir.keep()),
        ..Default::default()
    })
    .await
    .unwrap();
    let token = sbx
        .shared
        .google
        .grant("https://www.googleapis.com/auth/bigquery");
    let client = reqwest::Client::new();
    let base = sbx.bigquery_url();
    let ds = client
        .post(format!("{base}/projects/p/datasets"))
        .bearer_auth(&token)
        .json(&json!({"datasetReference": {"projectId": "p", "datasetId": "ds"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(ds.status(), 200);
    (sbx, client, token, base)
}

#[tokio::test]
async fn resumable_upload_in_chunks() {
    let (sbx, client, token, _) = served().await;
    let data = ndjson(&(0..100).map(|i| json!({"id": i})).collect::<Vec<_>>());
    let total = data.len();
    let start = client
        .post(format!(
            "{}/projects/p/jobs?uploadType=resumable",
            sbx.upload_url()
        ))
        .bearer_auth(&token)
        .header("X-Upload-Content-Type", "application/octet-stream")
        .header("X-Upload-Content-Length", total.to_string())
        .json(&json!({"configuration": {"load": {
            "destinationTable": {"projectId": "p", "datasetId": "ds", "tableId": "up"},
            "sourceFormat": "NEWLINE_DELIMITED_JSON",
            "autodetect": true,
        }}}))
        .send()
        .await
        .unwrap();
    assert_eq!(start.status(), 200);
    let session = start.headers()["location"].to_str().unwrap().to_string();
    assert!(session.starts_with(&sbx.upload_url()), "{session}");

    // Nothing yet: a status query answers 308 without a Range.
    let r = client
        .put(&session)
        .header("Content-Range", format!("bytes */{total}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert!(r.headers().get("range").is_none());

    let mid = total / 2;
    let r = client
        .put(&session)
        .header("Content-Range", format!("bytes 0-{}/*", mid - 1))
        .body(data[..mid].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["range"],
        format!("bytes=0-{}", mid - 1).as_str()
    );

    // A chunk past what was received is refused.
    let r = client
        .put(&session)
        .header(
            "Content-Range",
            format!("bytes {}-{}/{total}", mid + 1, total - 1),
        )
        .body(data[mid + 1..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = client
        .put(&session)
        .header(
            "Content-Range",
            format!("bytes {mid}-{}/{total}", total - 1),
        )
        .body(data[mid..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["status"]["state"], "DONE", "{job}");
    assert!(job["status"].get("errorResult").is_none(), "{job}");
    assert_eq!(job["statistics"]["load"]["outputRows"], "100");
    assert_eq!(
        job["statistics"]["load"]["inputFileBytes"],
        total.to_string()
    );
    assert_eq!(sbx.stats().bytes_uploaded, total as u64);
    assert_eq!(sbx.stats().requests.get("bigquery_upload"), Some(&5));

    let t: Value = client
        .get(format!(
            "{}/projects/p/datasets/ds/tables/up",
            sbx.bigquery_url()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(t["numRows"], "100");
    assert_eq!(t["schema"]["fields"][0]["type"], "INTEGER");
    let listed = crate::list_tables(sbx.shared.opts.state_dir.as_ref().unwrap()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].rows, listed[0].columns), (100, 1));

    // A large body in one PUT (no Content-Range): past axum's default 2 MB limit.
    let big = ndjson(&(0..200_000).map(|i| json!({"id": i})).collect::<Vec<_>>());
    assert!(big.len() > 2 << 20);
    let start = client
        .post(format!(
            "{}/projects/p/jobs?uploadType=resumable",
            sbx.upload_url()
        ))
        .bearer_auth(&token)
        .json(&json!({"configuration": {"load": {
            "destinationTable": {"projectId": "p", "datasetId": "ds", "tableId": "up"},
            "sourceFormat": "NEWLINE_DELIMITED_JSON",
            "writeDisposition": "WRITE_TRUNCATE",
        }}}))
        .send()
        .await
        .unwrap();
    let session = start.headers()["location"].to_str().unwrap().to_string();
    let r = client.put(&session).body(big).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["statistics"]["load"]["outputRows"], "200000", "{job}");
}

#[tokio::test]
async fn errors_have_google_shape_and_polls_progress() {
    let dir = tempfile::tempdir().unwrap();
    let sbx = crate::Sandbox::start(crate::Options {
        state_dir: Some(dir.path().to_path_buf()),
        bigquery_job_polls: 2,
        faults: vec![crate::Fault {
            endpoint: "bigquery_jobs".into(),
            kind: crate::FaultKind::JobError {
                reason: "backendError".into(),
                message: "boom".into(),
            },
            rate: 1.0,
            page: None,
            times: Some(1),
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    let token = sbx
        .shared
        .google
        .grant("https://www.googleapis.com/auth/cloud-platform");
    let client = reqwest::Client::new();
    let base = sbx.bigquery_url();
    let r = client
        .get(format!("{base}/projects/p/datasets/nope/tables/t"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["errors"][0]["reason"], "notFound");
    assert_eq!(body["error"]["errors"][0]["domain"], "global");
    assert_eq!(body["error"]["status"], "NOT_FOUND");

    let job = |q: &str| {
        client
            .post(format!("{base}/projects/p/jobs"))
            .bearer_auth(&token)
            .json(&json!({"configuration": {"query": {"query": q, "useLegacySql": false}}}))
            .send()
    };
    // The injected failure hits the first job only.
    let first: Value = job("SELECT 1 AS x").await.unwrap().json().await.unwrap();
    let id = first["jobReference"]["jobId"].as_str().unwrap().to_string();
    let mut states = Vec::new();
    for _ in 0..3 {
        let j: Value = client
            .get(format!("{base}/projects/p/jobs/{id}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        states.push(j["status"]["state"].as_str().unwrap().to_string());
        if states.last().unwrap() == "DONE" {
            assert_eq!(j["status"]["errorResult"]["reason"], "backendError");
        }
    }
    assert_eq!(states, ["PENDING", "RUNNING", "DONE"]);
    let r = client
        .post(format!("{base}/projects/p/queries"))
        .bearer_auth(&token)
        .json(&json!({"query": "DELETE ds.t", "useLegacySql": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"]["errors"][0]["reason"], "invalidQuery",
        "{body}"
    );

    // No token: 401 in Google's shape.
    let r = client
        .get(format!("{base}/projects/p/datasets/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn insert_all_reports_row_errors_and_dedupes() {
    let (sbx, client, token, base) = served().await;
    let r = client
        .post(format!("{base}/projects/p/datasets/ds/tables"))
        .bearer_auth(&token)
        .json(&json!({"tableReference": {"projectId": "p", "datasetId": "ds", "tableId": "s"},
            "schema": {"fields": [{"name": "id", "type": "INTEGER", "mode": "REQUIRED"}, {"name": "name", "type": "STRING"}]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let url = format!("{base}/projects/p/datasets/ds/tables/s/insertAll");
    let body = json!({"rows": [
        {"insertId": "a", "json": {"id": 1, "name": "x"}},
        {"insertId": "b", "json": {"id": "nope"}},
        {"insertId": "c", "json": {"id": 3, "bogus": 1}},
    ]});
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(body.to_string().as_bytes()).unwrap();
        e.finish().unwrap()
    };
    let r: Value = client
        .post(&url)
        .bearer_auth(&token)
        .header("Content-Encoding", "gzip")
        .body(gz)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let errs = r["insertErrors"].as_array().unwrap();
    assert_eq!(errs.len(), 3, "{r}");
    assert_eq!(errs[0]["errors"][0]["reason"], "stopped");
    assert_eq!(errs[1]["errors"][0]["reason"], "invalid");
    assert_eq!(errs[2]["errors"][0]["location"], "bogus");
    let data = |client: reqwest::Client, token: String| {
        let url = format!("{base}/projects/p/datasets/ds/tables/s/data");
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(data(client.clone(), token.clone()).await["totalRows"], "0");
    let mut skip = body.clone();
    skip["skipInvalidRows"] = json!(true);
    for _ in 0..2 {
        let r: Value = client
            .post(&url)
            .bearer_auth(&token)
            .json(&skip)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["insertErrors"].as_array().unwrap().len(), 2);
    }
    let d = data(client.clone(), token.clone()).await;
    assert_eq!(
        d["totalRows"], "1",
        "inserted once (insertId a deduplicated): {d}"
    );
    assert_eq!(d["rows"][0]["f"][1]["v"], "x");
    drop(sbx);
}
