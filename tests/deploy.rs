//! deploy/: the systemd units and Kubernetes manifests, checked against the real `pipe`.
//!
//! Every Kubernetes document is parsed into k8s-openapi's type for its kind and serialized
//! back; the two must be equal, so a misspelt or misplaced field (which the types would
//! silently drop) fails. KEDA's objects have no such types and are checked by shape. Every
//! `--flag` given to `pipe` (container args, `ExecStart=`) must be in `pipe serve --help` /
//! `pipe worker --help`, each drain must end before the stop timeout, and the units must
//! pass `systemd-analyze verify` (Debian's `systemd` package; scripts/test installs it).

use crate::util::{pipe_bin, repo_root, Env};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::{HorizontalPodAutoscaler, HorizontalPodAutoscalerBehavior};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PersistentVolumeClaim, PodSpec, Secret};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIN: &str = "/usr/local/bin/pipe";
const PLACEHOLDER: &str = "change-me";

fn deploy() -> PathBuf {
    repo_root().join("deploy")
}

/// Every file below `dir` whose name ends with one of `exts`, sorted.
fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if exts.iter().any(|x| path.to_string_lossy().ends_with(x)) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

// ---------------------------------------------------------------- Kubernetes documents

/// One YAML document of a manifest file, as JSON.
struct Doc {
    origin: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// The documents of a file (split on `---` lines; comment-only parts skipped), read with the
/// repo's own YAML reader, which reports duplicate keys too.
fn docs_of(path: &Path) -> Vec<Doc> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut parts: Vec<(usize, String)> = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" {
            parts.push((i + 2, String::new()));
        } else {
            let part = &mut parts.last_mut().unwrap().1;
            part.push_str(line);
            part.push('\n');
        }
    }
    let mut docs = Vec::new();
    for (first_line, part) in parts {
        let empty = part.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#')
        });
        if empty {
            continue;
        }
        let origin = format!("{}:{first_line}", rel(path));
        let mut diags = engine::diag::Diags::new(&origin);
        let node = engine::yaml::parse(&part, &mut diags);
        assert!(diags.items.is_empty(), "{origin}: {:#?}", diags.items);
        let value = node
            .unwrap_or_else(|| panic!("{origin}: no document"))
            .to_json();
        assert!(value.is_object(), "{origin}: a document must be a mapping");
        docs.push(Doc { origin, value });
    }
    docs
}

/// Every document under deploy/kubernetes.
fn kubernetes_docs() -> Vec<Doc> {
    let docs: Vec<Doc> = files(&deploy().join("kubernetes"), &[".yaml", ".yml"])
        .iter()
        .flat_map(|p| docs_of(p))
        .collect();
    assert!(!docs.is_empty(), "no manifests under deploy/kubernetes");
    docs
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} under deploy/kubernetes"))
}

/// JSON without null members (YAML's `~`, which the typed side drops).
fn normalise(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, x)| !x.is_null())
                .map(|(k, x)| (k.clone(), normalise(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
        other => other.clone(),
    }
}

/// Where `file` and `typed` first differ, for the failure message.
fn difference(file: &Value, typed: &Value, at: &str) -> Option<String> {
    match (file, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, x) in a {
                let here = format!("{at}.{k}");
                match b.get(k) {
                    None => {
                        return Some(format!(
                            "{here} is not a field of the type there (misspelt or misplaced?)"
                        ))
                    }
                    Some(y) => {
                        if let Some(d) = difference(x, y, &here) {
                            return Some(d);
                        }
                    }
                }
            }
            b.keys()
                .find(|k| !a.contains_key(*k))
                .map(|k| format!("{at}.{k} appeared in the round trip"))
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| difference(x, y, &format!("{at}[{i}]"))),
        _ if file == typed => None,
        _ => Some(format!(
            "{at}: {file} in the file, {typed} after the round trip"
        )),
    }
}

/// `value` as `T` and back: equal, or the first difference.
fn round_trip<T>(origin: &str, value: &Value) -> T
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{origin}: not a valid {}: {e}", std::any::type_name::<T>()));
    let back = serde_json::to_value(&typed).unwrap();
    let (file, back) = (normalise(value), normalise(&back));
    if let Some(d) = difference(&file, &back, "") {
        panic!("{origin}: {d}");
    }
    assert_eq!(file, back, "{origin}");
    typed
}

/// A mapping's keys must be among `known` (the KEDA objects' stand-in for a typed parse).
fn keys_within(origin: &str, what: &str, v: &Value, known: &[&str]) {
    let map = v
        .as_object()
        .unwrap_or_else(|| panic!("{origin}: {what} must be a mapping"));
    for k in map.keys() {
        assert!(
            known.contains(&k.as_str()),
            "{origin}: `{k}` is not a field of {what} (known: {known:?})"
        );
    }
}

#[test]
fn kubernetes_manifests_are_the_api_types_exactly() {
    for doc in kubernetes_docs() {
        let (o, v) = (doc.origin.as_str(), &doc.value);
        match (v["apiVersion"].as_str().unwrap_or(""), doc.kind()) {
            (_, "Deployment") => {
                round_trip::<Deployment>(o, v);
            }
            (_, "Secret") => {
                round_trip::<Secret>(o, v);
            }
            (_, "ConfigMap") => {
                round_trip::<ConfigMap>(o, v);
            }
            (_, "PersistentVolumeClaim") => {
                round_trip::<PersistentVolumeClaim>(o, v);
            }
            (_, "HorizontalPodAutoscaler") => {
                round_trip::<HorizontalPodAutoscaler>(o, v);
            }
            ("keda.sh/v1alpha1", "ScaledObject" | "TriggerAuthentication") => {} // keda_* below
            ("kustomize.config.k8s.io/v1beta1", "Kustomization")
            | ("kustomize.config.k8s.io/v1alpha1", "Component") => {} // kustomizations_* below
            (api, kind) => panic!("{o}: no check for {api} {kind}: add its type here"),
        }
        if !["Kustomization", "Component"].contains(&doc.kind()) {
            assert!(!doc.name().is_empty(), "{o}: metadata.name missing");
            assert!(
                v["metadata"].get("namespace").is_none(),
                "{o}: the manifests are namespace-agnostic (kubectl -n / kustomize sets it)"
            );
        }
    }
}

/// The one `pipe` container of a Deployment, with its pod.
fn pipe_container(docs: &[Doc], name: &str) -> (String, PodSpec, Container) {
    let doc = find(docs, "Deployment", name);
    let d: Deployment = round_trip(&doc.origin, &doc.value);
    let pod = d.spec.template.spec.unwrap();
    assert_eq!(pod.containers.len(), 1, "{}: one container", doc.origin);
    let c = pod.containers[0].clone();
    (doc.origin.clone(), pod, c)
}

/// A container's `pipe` invocation: the words after the binary.
fn container_argv(origin: &str, c: &Container) -> Vec<String> {
    let command = c.command.clone().unwrap_or_default();
    assert_eq!(command, [BIN], "{origin}: command must be [{BIN}]");
    c.args.clone().unwrap_or_default()
}

// ---------------------------------------------------------------- pipe invocations

/// `--flag value` and `--flag=value` pairs of an argv (every flag used here takes a value).
fn flags(argv: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut words = argv.iter().peekable();
    while let Some(w) = words.next() {
        if let Some(flag) = w.strip_prefix("--") {
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (flag.to_string(), words.next().cloned().unwrap_or_default()),
            };
            out.push((name, value));
        }
    }
    out
}

fn flag<'a>(origin: &str, pairs: &'a [(String, String)], name: &str) -> &'a str {
    let found: Vec<_> = pairs.iter().filter(|(n, _)| n == name).collect();
    assert_eq!(found.len(), 1, "{origin}: exactly one --{name}");
    &found[0].1
}

fn duration(origin: &str, text: &str) -> Duration {
    engine::duration::parse(text).unwrap_or_else(|e| panic!("{origin}: `{text}`: {e}"))
}

/// `pipe SUBCOMMAND --help`, with no PIPE_* variable set (clap would show their values).
fn help(subcommand: &str) -> String {
    let env = Env::new();
    let mut cmd = env.cmd();
    for (k, _) in std::env::vars() {
        if k.starts_with("PIPE_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.args([subcommand, "--help"]).output().expect("run pipe");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`pipe {subcommand} --help` failed ({}): this binary has no `pipe {subcommand}` \
         command, which deploy/ uses\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Does the help text list `--name` (as a whole flag, not a prefix of a longer one)?
fn help_has_flag(help: &str, name: &str) -> bool {
    let needle = format!("--{name}");
    help.match_indices(&needle).any(|(i, _)| {
        let next = help[i + needle.len()..].chars().next();
        !matches!(next, Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// Every `pipe SUBCOMMAND` invocation under deploy/ (Kubernetes args, systemd `ExecStart=`).
fn invocations(subcommand: &str) -> Vec<(String, Vec<String>)> {
    let docs = kubernetes_docs();
    let mut out = Vec::new();
    for doc in docs.iter().filter(|d| d.kind() == "Deployment") {
        let (origin, _, c) = pipe_container(&docs, doc.name());
        let argv = container_argv(&origin, &c);
        if argv.first().map(String::as_str) == Some(subcommand) {
            out.push((origin, argv));
        }
    }
    for unit in units() {
        let argv = unit.exec_start();
        if argv.first().map(String::as_str) == Some(subcommand) {
            out.push((unit.origin.clone(), argv));
        }
    }
    out
}

/// Each flag of each invocation of SUBCOMMAND is one `pipe SUBCOMMAND --help` lists.
fn flags_exist(subcommand: &str, expected_invocations: usize) {
    let help = help(subcommand);
    let all = invocations(subcommand);
    assert_eq!(
        all.len(),
        expected_invocations,
        "`pipe {subcommand}` is started by one manifest and one unit: {all:?}"
    );
    for (origin, argv) in &all {
        let pairs = flags(argv);
        assert!(!pairs.is_empty(), "{origin}: no flags?");
        for (name, _) in &pairs {
            assert!(
                help_has_flag(&help, name),
                "{origin}: `pipe {subcommand}` has no --{name} (not in `pipe {subcommand} --help`)"
            );
        }
        duration(origin, flag(origin, &pairs, "drain-timeout"));
        assert_eq!(
            argv.get(1).map(String::as_str),
            Some("/etc/pipe/pipelines"),
            "{origin}: DIR"
        );
    }
}

#[test]
fn serve_flags_are_pipe_serve_flags() {
    flags_exist("serve", 2);
    let help = help("serve");
    for (origin, argv) in invocations("serve") {
        // Scheduling only: the workers run everything.
        assert_eq!(flag(&origin, &flags(&argv), "workers"), "0", "{origin}");
    }
    // The broker comes from PIPE_BROKER (the Secret / EnvironmentFile): serve must read it.
    for name in ["PIPE_DB", "PIPE_HOME", "PIPE_BROKER"] {
        assert!(
            help.contains(&format!("[env: {name}")),
            "`pipe serve --help` does not read {name}"
        );
    }
}

/// Needs `pipe worker` (being written on main): fails until it is merged.
#[test]
fn worker_flags_are_pipe_worker_flags() {
    flags_exist("worker", 2);
    let help = help("worker");
    for name in ["PIPE_DB", "PIPE_HOME", "PIPE_BROKER"] {
        assert!(
            help.contains(&format!("[env: {name}")),
            "`pipe worker --help` does not read {name}"
        );
    }
    for (origin, argv) in invocations("worker") {
        let pairs = flags(&argv);
        let slots: u32 = flag(&origin, &pairs, "slots").parse().unwrap();
        assert!(slots > 0, "{origin}: --slots");
    }
}

// ---------------------------------------------------------------- consistency

#[test]
fn serve_and_worker_pods_share_pipelines_and_secret_and_drain_in_time() {
    let docs = kubernetes_docs();
    let mut shared = BTreeSet::new();
    for name in ["pipe-serve", "pipe-worker"] {
        let (origin, pod, c) = pipe_container(&docs, name);
        let argv = container_argv(&origin, &c);
        let drain = duration(&origin, flag(&origin, &flags(&argv), "drain-timeout"));
        let grace = pod.termination_grace_period_seconds.unwrap_or(30);
        assert!(
            Duration::from_secs(grace as u64) > drain,
            "{origin}: terminationGracePeriodSeconds {grace} must exceed --drain-timeout {drain:?}"
        );

        // The pipelines folder is the ConfigMap, mounted whole (subPath never updates).
        let dir = argv.get(1).cloned().unwrap_or_default();
        let mounts = c.volume_mounts.clone().unwrap_or_default();
        let mount = mounts
            .iter()
            .find(|m| m.mount_path == dir)
            .unwrap_or_else(|| panic!("{origin}: nothing mounted at {dir}"));
        assert!(
            mount.sub_path.is_none(),
            "{origin}: {dir} must not be a subPath mount"
        );
        let volumes = pod.volumes.clone().unwrap_or_default();
        let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
        let config_map = volume
            .config_map
            .as_ref()
            .unwrap_or_else(|| panic!("{origin}: {dir} must be a ConfigMap"));

        // The environment: envFrom one Secret; PIPE_HOME a mounted, writable volume.
        let env_from = c.env_from.clone().unwrap_or_default();
        assert_eq!(env_from.len(), 1, "{origin}: envFrom one Secret");
        let secret = env_from[0].secret_ref.as_ref().unwrap().name.clone();
        let env = c.env.clone().unwrap_or_default();
        let home = env
            .iter()
            .find(|e| e.name == "PIPE_HOME")
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("{origin}: env PIPE_HOME"));
        let home_mount = mounts.iter().find(|m| m.mount_path == home);
        assert!(
            home_mount.is_some_and(|m| m.read_only != Some(true)),
            "{origin}: PIPE_HOME {home} must be a writable mount"
        );
        for e in &env {
            assert!(
                e.value.is_none() || !secret_like(&e.name),
                "{origin}: {} is a literal value: take it from the Secret",
                e.name
            );
        }
        shared.insert((dir, config_map.name.clone(), secret, c.image.clone()));
    }
    assert_eq!(
        shared.len(),
        1,
        "serve and worker must use the same pipelines mount, ConfigMap, Secret and image: {shared:?}"
    );
    let (_, config_map, secret, _) = shared.into_iter().next().unwrap();
    find(&docs, "ConfigMap", &config_map);
    let secret = find(&docs, "Secret", &secret);
    let data = &secret.value["stringData"];
    assert!(
        secret.value.get("data").is_none(),
        "{}: use stringData",
        secret.origin
    );
    assert!(data["PIPE_DB"]
        .as_str()
        .is_some_and(|u| u.starts_with("postgres://")));
    assert!(data["PIPE_BROKER"]
        .as_str()
        .is_some_and(|u| u.starts_with("amqp://")));
}

#[test]
fn keda_scales_the_worker_deployment_on_its_queues() {
    let docs = kubernetes_docs();
    let (origin, _, c) = pipe_container(&docs, "pipe-worker");
    let argv = container_argv(&origin, &c);
    let queues: BTreeSet<String> = flag(&origin, &flags(&argv), "queues")
        .split(',')
        .map(|q| format!("pipe.{}", q.trim()))
        .collect();
    let secret = c.env_from.clone().unwrap()[0]
        .secret_ref
        .clone()
        .unwrap()
        .name;

    let scaled: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "ScaledObject").collect();
    assert_eq!(scaled.len(), 1, "one ScaledObject");
    let so = scaled[0];
    let (o, v) = (so.origin.as_str(), &so.value);
    assert_eq!(v["apiVersion"], "keda.sh/v1alpha1", "{o}");
    keys_within(
        o,
        "a ScaledObject",
        v,
        &["apiVersion", "kind", "metadata", "spec"],
    );
    let spec = &v["spec"];
    keys_within(
        o,
        "ScaledObject.spec",
        spec,
        &[
            "scaleTargetRef",
            "pollingInterval",
            "cooldownPeriod",
            "initialCooldownPeriod",
            "idleReplicaCount",
            "minReplicaCount",
            "maxReplicaCount",
            "fallback",
            "advanced",
            "triggers",
        ],
    );
    keys_within(
        o,
        "scaleTargetRef",
        &spec["scaleTargetRef"],
        &["apiVersion", "kind", "name", "envSourceContainerName"],
    );
    assert_eq!(
        spec["scaleTargetRef"]["name"], "pipe-worker",
        "{o}: scaleTargetRef.name"
    );
    let (min, max) = (
        spec["minReplicaCount"].as_u64().unwrap_or(0),
        spec["maxReplicaCount"].as_u64().unwrap_or(100),
    );
    assert!(min <= max, "{o}: minReplicaCount > maxReplicaCount");
    if let Some(advanced) = spec.get("advanced") {
        keys_within(
            o,
            "advanced",
            advanced,
            &[
                "horizontalPodAutoscalerConfig",
                "restoreToOriginalReplicaCount",
                "scalingModifiers",
            ],
        );
        if let Some(hpa) = advanced.get("horizontalPodAutoscalerConfig") {
            keys_within(
                o,
                "horizontalPodAutoscalerConfig",
                hpa,
                &["name", "behavior"],
            );
            if let Some(b) = hpa.get("behavior") {
                round_trip::<HorizontalPodAutoscalerBehavior>(&format!("{o} (behavior)"), b);
            }
        }
    }

    let triggers = spec["triggers"].as_array().expect("triggers");
    let mut seen = BTreeSet::new();
    for t in triggers {
        keys_within(
            o,
            "a trigger",
            t,
            &[
                "type",
                "name",
                "metadata",
                "authenticationRef",
                "metricType",
                "useCachedMetrics",
            ],
        );
        assert_eq!(t["type"], "rabbitmq", "{o}");
        let m = &t["metadata"];
        keys_within(
            o,
            "rabbitmq metadata",
            m,
            &[
                "host",
                "hostFromEnv",
                "protocol",
                "queueName",
                "mode",
                "value",
                "activationValue",
                "vhostName",
                "useRegex",
                "excludeUnacknowledged",
                "pageSize",
                "operation",
                "timeout",
                "unsafeSsl",
            ],
        );
        let queue = m["queueName"].as_str().unwrap_or("");
        assert!(
            queue.starts_with("pipe."),
            "{o}: queue {queue} is not a pipe queue (pipe.NAME)"
        );
        seen.insert(queue.to_string());
        assert_eq!(m["mode"], "QueueLength", "{o}: {queue}");
        assert_eq!(
            m["protocol"], "amqp",
            "{o}: {queue}: PIPE_BROKER is an amqp:// URL"
        );
        let value = m["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{o}: value must be a string"));
        assert!(
            value.parse::<u32>().is_ok_and(|n| n > 0),
            "{o}: value {value}"
        );
        assert!(
            m.get("host").is_none(),
            "{o}: the broker URL comes from the TriggerAuthentication"
        );
        let auth = t["authenticationRef"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{o}: {queue}: authenticationRef.name"));
        let ta = find(&docs, "TriggerAuthentication", auth);
        assert_eq!(ta.value["apiVersion"], "keda.sh/v1alpha1", "{}", ta.origin);
        keys_within(
            &ta.origin,
            "a TriggerAuthentication",
            &ta.value,
            &["apiVersion", "kind", "metadata", "spec"],
        );
        keys_within(
            &ta.origin,
            "TriggerAuthentication.spec",
            &ta.value["spec"],
            &["secretTargetRef"],
        );
        let refs = ta.value["spec"]["secretTargetRef"]
            .as_array()
            .expect("secretTargetRef");
        for r in refs {
            keys_within(
                &ta.origin,
                "a secretTargetRef",
                r,
                &["parameter", "name", "key"],
            );
        }
        let host = refs.iter().find(|r| r["parameter"] == "host");
        assert!(
            host.is_some_and(|r| r["name"] == secret.as_str() && r["key"] == "PIPE_BROKER"),
            "{}: host must be PIPE_BROKER of the workers' Secret {secret}",
            ta.origin
        );
    }
    assert_eq!(
        seen, queues,
        "{o}: one trigger per queue of the workers' --queues"
    );
}

#[test]
fn kustomizations_list_what_exists() {
    for path in files(&deploy().join("kubernetes"), &["kustomization.yaml"]) {
        let doc = docs_of(&path).remove(0);
        let o = doc.origin.as_str();
        let api = match doc.kind() {
            "Kustomization" => "kustomize.config.k8s.io/v1beta1",
            "Component" => "kustomize.config.k8s.io/v1alpha1",
            other => panic!("{o}: kind {other}"),
        };
        assert_eq!(doc.value["apiVersion"], api, "{o}");
        keys_within(
            o,
            "a Kustomization",
            &doc.value,
            &[
                "apiVersion",
                "kind",
                "resources",
                "components",
                "images",
                "patches",
            ],
        );
        let dir = path.parent().unwrap();
        for r in doc.value["resources"].as_array().expect("resources") {
            assert!(
                dir.join(r.as_str().unwrap()).is_file(),
                "{o}: resource {r} does not exist"
            );
        }
        for p in doc.value["patches"].as_array().into_iter().flatten() {
            keys_within(o, "a patch", p, &["target", "patch", "path", "options"]);
            let name = p["target"]["name"].as_str().unwrap_or("");
            find(
                &kubernetes_docs(),
                p["target"]["kind"].as_str().unwrap_or(""),
                name,
            );
        }
    }
    // The KEDA component (commented out in the core: it needs KEDA in the cluster).
    let keda = docs_of(&deploy().join("kubernetes/keda/kustomization.yaml")).remove(0);
    assert_eq!(keda.kind(), "Component");
    let core_text =
        std::fs::read_to_string(deploy().join("kubernetes/kustomization.yaml")).unwrap();
    assert!(
        core_text.contains("#   - keda"),
        "kustomization.yaml: the keda component line"
    );
    // The core lists the Deployments, not the examples (every cluster has its own).
    let core = docs_of(&deploy().join("kubernetes/kustomization.yaml")).remove(0);
    let listed: Vec<&str> = core.value["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(listed, ["serve.yaml", "worker.yaml"]);
    let docs = kubernetes_docs();
    for name in ["pipe-serve", "pipe-worker"] {
        let (origin, _, c) = pipe_container(&docs, name);
        let image = c.image.unwrap_or_default();
        assert!(
            core.value["images"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["name"] == image.as_str()),
            "{origin}: image {image} is not set by kustomization.yaml's images"
        );
    }
}

#[test]
fn example_pipelines_validate() {
    let docs = kubernetes_docs();
    let env = Env::new();
    let mut n = 0;
    for doc in docs.iter().filter(|d| d.kind() == "ConfigMap") {
        for (name, text) in doc.value["data"].as_object().expect("data") {
            env.write(&format!("pipelines/{name}"), text.as_str().unwrap());
            n += 1;
        }
    }
    assert!(n > 0, "the example ConfigMap holds no pipeline");
    let out = env.run(&["validate", "pipelines"]);
    assert_eq!(out.code(), 0, "{}{}", out.stdout(), out.stderr());
}

// ---------------------------------------------------------------- secrets

/// A variable name that holds a secret.
fn secret_like(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    ["PASS", "PWD", "TOKEN", "SECRET", "KEY", "CREDENTIAL"]
        .iter()
        .any(|w| n.contains(w))
}

#[test]
fn no_literal_secrets_under_deploy() {
    // Passwords in URLs (`scheme://user:password@host`), in every file.
    for path in files(&deploy(), &[""]) {
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, _) in text.match_indices("://") {
            let url: String = text[i + 3..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !"\"'`<>)".contains(*c))
                .collect();
            let Some((userinfo, _)) = url.split_once('@') else {
                continue;
            };
            if let Some((_, password)) = userinfo.split_once(':') {
                assert_eq!(
                    password,
                    PLACEHOLDER,
                    "{}: a password in a URL: use {PLACEHOLDER}",
                    rel(&path)
                );
            }
        }
    }
    // Secret-looking variables of the env file and the example Secret.
    let mut env_file = BTreeMap::new();
    let path = deploy().join("systemd/pipe.env.example");
    for line in std::fs::read_to_string(&path).unwrap().lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}: `{line}` is not KEY=value", rel(&path)));
        env_file.insert(k.to_string(), v.to_string());
    }
    let docs = kubernetes_docs();
    let secret = find(&docs, "Secret", "pipe-env");
    let stringdata: BTreeMap<String, String> =
        serde_json::from_value(secret.value["stringData"].clone()).unwrap();
    for (origin, vars) in [
        (rel(&path), &env_file),
        (secret.origin.clone(), &stringdata),
    ] {
        for (k, v) in vars {
            if secret_like(k) {
                assert_eq!(v, PLACEHOLDER, "{origin}: {k} must be the placeholder");
            }
        }
    }
    // The same variables both ways, but PIPE_HOME (a Deployment's env there).
    let mut file_keys: BTreeSet<&String> = env_file.keys().collect();
    assert!(
        file_keys.remove(&"PIPE_HOME".to_string()),
        "pipe.env.example: PIPE_HOME"
    );
    assert_eq!(
        file_keys,
        stringdata.keys().collect(),
        "pipe.env.example and secret.example.yaml name different variables"
    );
    assert!(env_file["PIPE_DB"].starts_with("postgres://"));
    assert!(env_file["PIPE_BROKER"].starts_with("amqp://"));
}

// ---------------------------------------------------------------- systemd

struct Unit {
    file: String,
    origin: String,
    path: PathBuf,
    /// (section, key, value), in order.
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn parse(path: &Path) -> Unit {
        let origin = rel(path);
        let text = std::fs::read_to_string(path).unwrap();
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if pending.is_empty()
                && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
            {
                continue;
            }
            if let Some(cont) = line.strip_suffix('\\') {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            let line = std::mem::take(&mut pending) + line;
            if line.starts_with('[') {
                section = line.trim_matches(['[', ']']).to_string();
                assert!(
                    ["Unit", "Service", "Install"].contains(&section.as_str()),
                    "{origin}:{}: section [{section}]",
                    i + 1
                );
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{origin}:{}: not Key=value", i + 1));
            assert!(!section.is_empty(), "{origin}:{}: outside a section", i + 1);
            entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
        Unit {
            file: path.file_name().unwrap().to_string_lossy().into_owned(),
            origin,
            path: path.to_path_buf(),
            entries,
        }
    }
    fn one(&self, section: &str, key: &str) -> &str {
        let found: Vec<&str> = self
            .entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect();
        assert_eq!(found.len(), 1, "{}: one [{section}] {key}=", self.origin);
        found[0]
    }
    /// `ExecStart=` after the binary, split on whitespace (the units use no quoting).
    fn exec_start(&self) -> Vec<String> {
        let line = self.one("Service", "ExecStart");
        let mut words = line.split_whitespace().map(String::from);
        assert_eq!(
            words.next().as_deref(),
            Some(BIN),
            "{}: ExecStart",
            self.origin
        );
        words.collect()
    }
}

fn units() -> Vec<Unit> {
    let units: Vec<Unit> = files(&deploy().join("systemd"), &[".service"])
        .iter()
        .map(|p| Unit::parse(p))
        .collect();
    let names: Vec<&str> = units.iter().map(|u| u.file.as_str()).collect();
    assert_eq!(names, ["pipe-serve.service", "pipe-worker@.service"]);
    units
}

#[test]
fn systemd_units_drain_before_the_stop_timeout() {
    let env_file = std::fs::read_to_string(deploy().join("systemd/pipe.env.example")).unwrap();
    let home = env_file
        .lines()
        .find_map(|l| l.strip_prefix("PIPE_HOME="))
        .expect("pipe.env.example: PIPE_HOME");
    for unit in units() {
        let o = &unit.origin;
        let pairs = flags(&unit.exec_start());
        let drain = duration(o, flag(o, &pairs, "drain-timeout"));
        let stop = duration(o, unit.one("Service", "TimeoutStopSec"));
        assert!(
            stop > drain,
            "{o}: TimeoutStopSec {stop:?} must exceed --drain-timeout {drain:?}"
        );
        assert_eq!(unit.one("Service", "KillSignal"), "SIGTERM", "{o}");
        // control-group would SIGTERM the running steps' processes too, ending the drain.
        assert_eq!(unit.one("Service", "KillMode"), "mixed", "{o}");
        assert_eq!(unit.one("Service", "Restart"), "on-failure", "{o}");
        assert_eq!(unit.one("Service", "User"), "pipe", "{o}");
        assert_eq!(
            unit.one("Service", "EnvironmentFile"),
            "/etc/pipe/pipe.env",
            "{o}"
        );
        assert_eq!(unit.one("Service", "NoNewPrivileges"), "yes", "{o}");
        assert_eq!(unit.one("Service", "PrivateTmp"), "yes", "{o}");
        assert_eq!(unit.one("Service", "ProtectSystem"), "strict", "{o}");
        // Under ProtectSystem=strict the state dir must be writable.
        assert_eq!(
            unit.one("Service", "ReadWritePaths"),
            home,
            "{o}: PIPE_HOME"
        );
        assert_eq!(
            format!("/var/lib/{}", unit.one("Service", "StateDirectory")),
            home,
            "{o}"
        );
        assert!(
            unit.entries.iter().all(|(_, k, _)| k != "Environment"),
            "{o}: the environment belongs in the EnvironmentFile"
        );
    }
    let worker = units().remove(1);
    let argv = worker.exec_start();
    // %I: the instance unescaped (a unit name writes the comma as \x2c).
    assert_eq!(flag(&worker.origin, &flags(&argv), "queues"), "%I");
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let Some(found) = which("systemd-analyze") else {
        panic!(
            "systemd-analyze is not installed, so the units under deploy/systemd cannot be \
             verified: install Debian's systemd package (apt-get install -y systemd; \
             scripts/test does this when it is missing)"
        );
    };
    // The units name /usr/local/bin/pipe, which verify requires to exist: use this build.
    let bin = pipe_bin();
    let bin = bin.to_str().unwrap();
    assert!(
        !bin.contains(char::is_whitespace),
        "{bin}: a path without spaces"
    );
    let dir = tempfile::tempdir().unwrap();
    for unit in units() {
        let text = std::fs::read_to_string(&unit.path).unwrap();
        std::fs::write(dir.path().join(&unit.file), text.replace(BIN, bin)).unwrap();
    }
    // The template is verified through an instance: the queues high,default, escaped.
    let out = Command::new(found)
        .args(["verify", "--man=no", "--recursive-errors=no"])
        .arg(dir.path().join("pipe-serve.service"))
        .arg(dir.path().join(r"pipe-worker@high\x2cdefault.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings (exit 0): any output fails too.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
