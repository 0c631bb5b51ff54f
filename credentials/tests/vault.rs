//! The vault over a real store (SQLite in a temp dir) and the real connection kinds.

use credentials::{types, CredentialError, MasterKey, Vault};
use serde_json::{json, Map, Value};
use std::sync::Arc;

fn map(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn store::RunStore>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = store::open(&store::StoreConfig::sqlite(dir.path().join("state"))).unwrap();
    Fixture { _dir: dir, store }
}

fn vault(f: &Fixture, key: Option<&MasterKey>) -> Vault {
    Vault::new(f.store.clone(), steps::registry().connections, key.cloned())
}

#[test]
fn every_connection_kind_is_a_credential_type_split_by_write_only() {
    let connections = steps::registry().connections;
    let all = types(&connections);
    assert_eq!(
        all.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        connections.names().collect::<Vec<_>>()
    );
    let carol = all.iter().find(|t| t.name == "carol").unwrap();
    assert_eq!(
        carol.public_fields(),
        [
            "tenant",
            "organization",
            "url",
            "connector_id",
            "username",
            "timeout",
            "sandbox"
        ]
    );
    assert_eq!(carol.private_fields(), ["password", "api_key"]);
    assert_eq!(
        carol.public_schema["required"],
        json!(["tenant", "connector_id"])
    );
    assert!(carol.private_schema.get("required").is_none());
    let private = |name: &str| {
        all.iter()
            .find(|t| t.name == name)
            .unwrap()
            .private_fields()
    };
    assert_eq!(private("http"), ["auth"]);
    assert_eq!(private("google_service_account"), ["key_json"]);
    assert_eq!(private("bigquery"), ["key_json"]);
    assert_eq!(private("smtp"), ["password"]);
    for sql in ["postgres", "mysql", "sqlite", "sqlserver", "odbc"] {
        assert_eq!(
            private(sql),
            ["url", "password", "connection_string"],
            "{sql}"
        );
    }
    for t in &all {
        // Every private property is write-only, no public one is, `type` is neither, and
        // the `$defs` a part refers to travel with it.
        for (k, p) in t.private_schema["properties"].as_object().unwrap() {
            assert_eq!(p["writeOnly"], json!(true), "{}.{k}", t.name);
        }
        for (k, p) in t.public_schema["properties"].as_object().unwrap() {
            assert!(p.get("writeOnly").is_none(), "{}.{k}", t.name);
        }
        assert!(t.public_schema["properties"].get("type").is_none());
        let text = t.private_schema.to_string() + &t.public_schema.to_string();
        for r in text.split("\"$ref\":\"#/$defs/").skip(1) {
            let name = r.split('"').next().unwrap();
            let in_part = t.private_schema["$defs"].get(name).is_some()
                || t.public_schema["$defs"].get(name).is_some();
            assert!(in_part, "{}: $defs/{name} is missing", t.name);
        }
    }
    let http = all.iter().find(|t| t.name == "http").unwrap();
    assert!(http.private_schema["$defs"]["Auth"].is_object());
}

#[test]
fn set_show_resolve_with_write_only_private_fields() {
    let f = fixture();
    let key = MasterKey::generate();
    let v = vault(&f, Some(&key));
    let public = map(json!({"tenant": "acme", "connector_id": "c1", "username": "bot"}));
    let saved = v
        .set(
            "carol-prod",
            "carol",
            public.clone(),
            map(json!({"password": "pw-1111"})),
            "alice",
        )
        .unwrap();
    assert!(saved.created);
    assert_eq!(
        saved.changed,
        ["tenant", "connector_id", "username", "password"]
    );

    let info = v.show("carol-prod").unwrap().unwrap();
    assert_eq!(info.kind, "carol");
    assert_eq!(info.public, public);
    assert_eq!(info.private_fields, ["password"]);
    assert_eq!(info.updated_by, "alice");
    assert_eq!(info.key_id, key.id());
    let shown = serde_json::to_string(&info).unwrap();
    assert!(!shown.contains("pw-1111"), "{shown}");
    assert!(shown.contains("\"type\":\"carol\""), "{shown}");

    // Saving the public part again keeps the stored password (write-only form semantics).
    let mut public2 = public.clone();
    public2.insert("organization".into(), json!("acme-org"));
    let saved = v
        .set("carol-prod", "carol", public2, Map::new(), "bob")
        .unwrap();
    assert!(!saved.created);
    assert_eq!(saved.changed, ["organization"]);
    let r = v.resolve("carol-prod").unwrap();
    assert_eq!(r.kind, "carol");
    assert_eq!(r.fields["password"], json!("pw-1111"));
    assert_eq!(r.fields["organization"], json!("acme-org"));
    assert_eq!(r.secrets, ["pw-1111"]);
    assert!(!format!("{r:?}").contains("pw-1111"));

    // From password to API key: `null` removes the password (else both would be set).
    let e = v
        .set(
            "carol-prod",
            "carol",
            public.clone(),
            map(json!({"api_key": "ak-2222"})),
            "bob",
        )
        .unwrap_err();
    assert!(
        matches!(&e, CredentialError::Invalid { field, .. } if field == "username"),
        "{e}"
    );
    let mut no_user = public.clone();
    no_user.remove("username");
    let saved = v
        .set(
            "carol-prod",
            "carol",
            no_user,
            map(json!({"api_key": "ak-2222", "password": null})),
            "bob",
        )
        .unwrap();
    assert_eq!(
        saved.changed,
        ["organization", "username", "password", "api_key"]
    );
    let info = v.show("carol-prod").unwrap().unwrap();
    assert_eq!(info.private_fields, ["api_key"]);
    assert!(
        !info.public.contains_key("organization"),
        "public is replaced whole"
    );

    // Nested secrets of an object-valued private field reach the redactor, not its tags.
    v.set(
        "api",
        "http",
        map(json!({"base_url": "http://127.0.0.1:9"})),
        map(json!({"auth": {"type": "bearer", "token": "tok-3333"}})),
        "alice",
    )
    .unwrap();
    let r = v.resolve("api").unwrap();
    assert_eq!(r.secrets, ["tok-3333"]);
    assert_eq!(r.fields["auth"]["type"], json!("bearer"));

    let names: Vec<String> = v.list().unwrap().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["api", "carol-prod"]);
    let audit = v.audit(Some("carol-prod"), 0).unwrap();
    assert_eq!(audit.len(), 3);
    assert_eq!(audit[0].actor, "bob");
    let text = serde_json::to_string(&audit).unwrap();
    for secret in ["pw-1111", "ak-2222"] {
        assert!(!text.contains(secret), "{text}");
    }
    assert!(v.delete("api", "alice").unwrap());
    assert!(!v.delete("api", "alice").unwrap());
    assert!(matches!(
        v.resolve("api"),
        Err(CredentialError::NotFound(_))
    ));
}

#[test]
fn saving_checks_the_whole_against_its_type_and_names_the_field() {
    let f = fixture();
    let key = MasterKey::generate();
    let v = vault(&f, Some(&key));
    let field_of = |e: CredentialError| match e {
        CredentialError::Invalid { field, message } => (field, message),
        other => panic!("not Invalid: {other}"),
    };
    let carol = map(json!({"tenant": "acme", "connector_id": "c1"}));
    // A private field given as public is refused, never stored in clear.
    let (field, msg) = field_of(
        v.set(
            "c",
            "carol",
            map(json!({"tenant": "a", "connector_id": "c", "api_key": "x-123"})),
            Map::new(),
            "a",
        )
        .unwrap_err(),
    );
    assert_eq!(field, "api_key");
    assert!(msg.contains("private"), "{msg}");
    let (field, _) = field_of(
        v.set(
            "c",
            "carol",
            carol.clone(),
            map(json!({"tenant": "a"})),
            "a",
        )
        .unwrap_err(),
    );
    assert_eq!(field, "tenant");
    let (field, msg) = field_of(
        v.set(
            "c",
            "carol",
            map(json!({"tenant": "a", "conector_id": "c"})),
            Map::new(),
            "a",
        )
        .unwrap_err(),
    );
    assert_eq!(field, "conector_id");
    assert!(msg.contains("did you mean `connector_id`"), "{msg}");
    // The kind's rule between keys, and a missing required key.
    let (field, msg) = field_of(
        v.set("c", "carol", carol.clone(), Map::new(), "a")
            .unwrap_err(),
    );
    assert!(
        !field.is_empty() && msg.contains("`username` and `password` or `api_key`"),
        "{msg}"
    );
    let (field, _) = field_of(
        v.set(
            "c",
            "carol",
            map(json!({"tenant": "a"})),
            map(json!({"api_key": "k-1234"})),
            "a",
        )
        .unwrap_err(),
    );
    assert_eq!(field, "connector_id");
    // A wrong value: the message names the field and never quotes a private value.
    let (field, msg) = field_of(
        v.set(
            "db",
            "postgres",
            map(json!({"host": "h"})),
            map(json!({"password": 987654321})),
            "a",
        )
        .unwrap_err(),
    );
    assert_eq!(field, "password");
    assert!(!msg.contains("987654321"), "{msg}");
    let e = v
        .set("db", "postgress", Map::new(), Map::new(), "a")
        .unwrap_err();
    assert!(matches!(&e, CredentialError::UnknownType { .. }), "{e}");
    assert!(e.to_string().contains("did you mean `postgres`"), "{e}");
    for bad in ["Carol", "-x", "a b", "a/b", ""] {
        assert!(matches!(
            v.set(
                bad,
                "carol",
                carol.clone(),
                map(json!({"api_key": "k-1234"})),
                "a"
            ),
            Err(CredentialError::InvalidName(_))
        ));
    }
    assert!(v.list().unwrap().is_empty(), "nothing was saved");
    assert!(
        f.store.credentials().list_audit("", 0).unwrap().is_empty(),
        "nor audited"
    );
}

#[test]
fn keys_no_key_a_wrong_key_and_rotation() {
    let f = fixture();
    let (k1, k2) = (MasterKey::generate(), MasterKey::generate());
    let v1 = vault(&f, Some(&k1));
    for name in ["a", "b"] {
        v1.set(
            name,
            "smtp",
            map(json!({"host": "mail", "username": "ops"})),
            map(json!({"password": "smtp-pw"})),
            "ops",
        )
        .unwrap();
    }
    let none = vault(&f, None);
    assert_eq!(none.list().unwrap().len(), 2, "listing needs no key");
    assert!(matches!(
        none.resolve("a"),
        Err(CredentialError::NoMasterKey)
    ));
    let e = none
        .set("c", "smtp", map(json!({"host": "m"})), Map::new(), "ops")
        .unwrap_err();
    assert!(e.to_string().contains("PIPE_MASTER_KEY"), "{e}");

    let wrong = vault(&f, Some(&k2)).resolve("a").unwrap_err();
    let text = wrong.to_string();
    assert!(
        text.contains(&format!("credential a was sealed with key {}", k1.id()))
            && text.contains(&format!("PIPE_MASTER_KEY is {}", k2.id())),
        "{text}"
    );

    assert_eq!(v1.rotate_key(&k2, "ops").unwrap(), 2);
    let v2 = vault(&f, Some(&k2));
    assert_eq!(
        v2.resolve("b").unwrap().fields["password"],
        json!("smtp-pw")
    );
    assert!(matches!(
        v1.resolve("b"),
        Err(CredentialError::WrongKey { .. })
    ));
    // Again with the new key: nothing to do.
    assert_eq!(v2.rotate_key(&k2, "ops").unwrap(), 0);
    let audit = v2.audit(None, 0).unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.action == "credential.rotate")
            .count(),
        2
    );

    // A sealed value moved into another row does not open there.
    let a = f.store.credentials().get_credential("a").unwrap().unwrap();
    let b = f.store.credentials().get_credential("b").unwrap().unwrap();
    f.store
        .credentials()
        .put_credential(
            &store::CredentialWrite {
                name: "b",
                kind: "smtp",
                public: &b.public,
                sealed: &a.sealed,
                key_id: &a.key_id,
                previous: Some(&b.sealed),
                actor: "mallory",
                changed: &[],
            },
            chrono::Utc::now(),
        )
        .unwrap();
    assert!(matches!(
        v2.resolve("b"),
        Err(CredentialError::Unreadable(_))
    ));
}

#[test]
fn the_vault_can_be_shared_by_async_handlers() {
    fn shared<T: Send + Sync + Clone + 'static>() {}
    shared::<Vault>();
    shared::<MasterKey>();
}
