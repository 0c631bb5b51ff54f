//! The web dashboard in a real browser: Debian's `chromium`, headless, driven through
//! `chromedriver` (WebDriver, the fantoccini crate) against a real `pipe serve --listen`.
//! `./scripts/test` installs both with apt when they are missing; a machine without them
//! fails this test and says so.
//!
//! Screenshots of every page go to `$CARGO_TARGET_TMPDIR/dashboard/` (the path is printed).
//!
//! The server runs with `--sandbox`: the headline `pipelines/tiflux.yaml` is triggered
//! from its form and watched live against the local fakes (slowed with `PIPE_SANDBOX` so
//! that its steps are seen changing), and `pipelines/hello.yaml` is followed to its log.

use crate::util::{repo_root, Daemon, Env};
use fantoccini::{Client, ClientBuilder, Locator};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(90);
const ADMIN_PASSWORD: &str = "admin-password-1";
const VIEWER_PASSWORD: &str = "viewer-password-1";
/// The private value saved from the credentials page: it must never come back.
const CANARY: &str = "canary-dashboard-7d1f3b";
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// Three steps in a chain, a second each: slow enough to watch them turn green.
const SLOW: &str = r#"
pipeline: slow
description: Three steps a second apart.
steps:
  first: { type: exec, with: { command: sh, args: ["-c", "sleep 1; echo first done"] } }
  second: { type: exec, needs: [first], with: { command: sh, args: ["-c", "sleep 1; echo second done"] } }
  third: { type: log, needs: [second], with: { message: "all done" } }
"#;

fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `chromedriver` on a free port, killed on drop.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let child = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect(
                "chromedriver is missing: `apt-get install -y chromium chromium-driver` (./scripts/test does it)",
            );
        let until = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 exchange (no redirects followed): status, headers (lowercase), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The `csrf` hidden field of a page.
fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[at..].split('"').next().unwrap().to_string()
}

/// No inline script, no inline style, no event-handler attribute: what the CSP would block.
fn assert_nothing_inline(path: &str, html: &str) {
    let lower = html.to_lowercase();
    for (i, _) in lower.match_indices("<script") {
        let tag = &lower[i..i + lower[i..].find('>').unwrap()];
        assert!(tag.contains(" src="), "{path}: an inline <script>: {tag}");
    }
    assert!(!lower.contains("<style"), "{path}: a <style> element");
    assert!(!lower.contains(" style="), "{path}: a style attribute");
    for handler in [
        " onclick=",
        " onload=",
        " onsubmit=",
        " onchange=",
        " onerror=",
        "javascript:",
    ] {
        assert!(!lower.contains(handler), "{path}: {handler}");
    }
}

async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + PATIENCE;
    while !f().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn login(c: &Client, base: &str, user: &str, password: &str) {
    c.goto(&format!("{base}/login")).await.unwrap();
    let form = c.form(Locator::Css("form[action='/login']")).await.unwrap();
    form.set_by_name("username", user).await.unwrap();
    form.set_by_name("password", password).await.unwrap();
    form.submit().await.unwrap();
    wait_until("the integrations page after logging in", || async {
        c.find(Locator::Css("#whoami")).await.is_ok()
    })
    .await;
}

/// Trigger `name` from its card's form (params left to their defaults); the run's page.
async fn trigger_and_open_run(c: &Client, base: &str, name: &str) -> String {
    c.goto(&format!("{base}/")).await.unwrap();
    c.find(Locator::Css(&format!(
        "#integration-{name} details.trigger summary"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    c.find(Locator::Css(&format!(
        "#integration-{name} button.trigger-run"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    wait_until("the runs page after triggering", || async {
        c.find(Locator::Css("#queued")).await.is_ok()
    })
    .await;
    let until = Instant::now() + PATIENCE;
    let href = loop {
        c.goto(&format!("{base}/runs?integration={name}"))
            .await
            .unwrap();
        if let Ok(a) = c.find(Locator::Css("tr.run a")).await {
            break a.attr("href").await.unwrap().unwrap_or_default();
        }
        assert!(Instant::now() < until, "no run of {name} appeared");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    format!("{base}{href}")
}

/// Follow the run page's link to its whole log; the log table's text.
async fn open_logs(c: &Client) -> String {
    c.find(Locator::Css("#all-logs"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_until("the log page", || async {
        c.find(Locator::Css("table#log")).await.is_ok()
    })
    .await;
    text_of(c, "table#log").await
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// A form control's current value.
async fn value_of(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .prop("value")
        .await
        .unwrap()
}

async fn step_statuses(c: &Client) -> Vec<(String, String)> {
    let v = c
        .execute(
            "return Array.from(document.querySelectorAll('#dag g.node')).map(n => [n.dataset.step, n.dataset.status]);",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}

#[test]
fn the_dashboard_in_a_browser() {
    let env = Env::new();
    env.write(
        "p/hello.yaml",
        &std::fs::read_to_string(repo_root().join("pipelines/hello.yaml")).unwrap(),
    );
    env.write(
        "p/tiflux.yaml",
        &std::fs::read_to_string(repo_root().join("pipelines/tiflux.yaml")).unwrap(),
    );
    env.write("p/slow.yaml", SLOW);
    let key = env.run(&["credentials", "new-key"]);
    key.expect_code(0);
    let master_key = key.stdout().trim().to_string();
    let mut server = Daemon::spawn(
        &env,
        "serve",
        &[
            "serve",
            "p",
            "--listen",
            "127.0.0.1:0",
            "--init-admin",
            "admin",
            "--sandbox",
        ],
        &[
            ("PIPE_INIT_ADMIN_PASSWORD", ADMIN_PASSWORD),
            ("PIPE_MASTER_KEY", &master_key),
            // Slow enough fakes that the page shows the steps before they are done.
            (
                "PIPE_SANDBOX",
                r#"{"otp_delay_ms": 1500, "latency_ms": 150}"#,
            ),
        ],
    );
    let until = Instant::now() + PATIENCE;
    let addr = loop {
        let log = server.output();
        if let Some(at) = log.find("API on http://") {
            let rest = &log[at + 14..];
            break rest[..rest.find('/').unwrap()].to_string();
        }
        assert!(Instant::now() < until, "no API address in:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let base = format!("http://{addr}");
    let mut add = env
        .cmd()
        .args(["users", "add", "viewer", "--role", "viewer"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(format!("{VIEWER_PASSWORD}\n").as_bytes())
        .unwrap();
    assert!(add.wait().unwrap().success(), "pipe users add viewer");

    let dir = out_dir();
    println!("dashboard screenshots: {}", dir.display());
    let driver = Driver::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (admin, viewer) = rt.block_on(async {
        let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]
            }
        }))
        .unwrap();
        let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .expect("a chromedriver session");

        // Logged out, every page goes to the login page.
        c.goto(&format!("{base}/runs")).await.unwrap();
        assert!(c.current_url().await.unwrap().path() == "/login");
        shot(&c, &dir, "login").await;

        // A wrong password is refused on the page.
        login_fails(&c, &base).await;

        login(&c, &base, "admin", ADMIN_PASSWORD).await;
        c.find(Locator::Css("#integration-hello")).await.unwrap();
        c.find(Locator::Css("#integration-slow")).await.unwrap();
        c.find(Locator::Css("#integration-tiflux-tickets")).await.unwrap();
        c.find(Locator::Css("#sandbox-mode")).await.expect("the sandbox badge");
        shot(&c, &dir, "integrations").await;

        // hello from its form: its run succeeds, every step green; its log.
        let hello = trigger_and_open_run(&c, &base, "hello").await;
        shot(&c, &dir, "runs").await;
        c.goto(&hello).await.unwrap();
        wait_until("hello's run to succeed", || async {
            c.find(Locator::Css("#live[data-status='succeeded']")).await.is_ok()
        })
        .await;
        let steps = step_statuses(&c).await;
        assert_eq!(steps.len(), 4, "{steps:?}");
        assert!(steps.iter().all(|(_, s)| s == "succeeded"), "{steps:?}");
        shot(&c, &dir, "run-hello").await;
        let log = open_logs(&c).await;
        assert!(log.contains("hello, world"), "{log}");
        assert!(log.contains("goodbye, world"), "{log}");
        shot(&c, &dir, "logs").await;

        // tiflux (against the fakes), watched live: the page is not reloaded (same URL,
        // the marker set at load is still there) while its steps turn green one after the
        // other.
        let tiflux = trigger_and_open_run(&c, &base, "tiflux-tickets").await;
        c.goto(&tiflux).await.unwrap();
        c.execute(
            "window.__violations = []; document.addEventListener('securitypolicyviolation', e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI)); const m = document.createElement('i'); m.id = 'loaded-marker'; document.body.appendChild(m);",
            vec![],
        )
        .await
        .unwrap();
        let url = c.current_url().await.unwrap();
        let at_load = step_statuses(&c).await;
        assert_eq!(at_load.len(), 7, "{at_load:?}");
        let mut seen = vec![at_load.clone()];
        let until = Instant::now() + PATIENCE;
        loop {
            let now = step_statuses(&c).await;
            if seen.last() != Some(&now) {
                seen.push(now);
            }
            if c.find(Locator::Css("#live[data-status='succeeded']")).await.is_ok() {
                break;
            }
            if let Ok(e) = c.find(Locator::Css("#live[data-status='failed']")).await {
                panic!("tiflux's run failed on the page: {}", e.html(false).await.unwrap_or_default());
            }
            assert!(Instant::now() < until, "tiflux's run did not succeed on the page: {seen:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let last = step_statuses(&c).await;
        assert!(last.iter().all(|(_, s)| s == "succeeded"), "{last:?}");
        assert!(
            at_load.iter().any(|(_, s)| s != "succeeded"),
            "the run had finished before its page loaded: {at_load:?}"
        );
        assert!(seen.len() >= 2, "the step colours never changed on the page: {seen:?}");
        assert_eq!(c.current_url().await.unwrap(), url, "the page was navigated");
        c.find(Locator::Css("#loaded-marker"))
            .await
            .expect("the marker set at load is gone: the page was reloaded");
        let fill = c
            .execute(
                "return getComputedStyle(document.querySelector(\"#dag g.node[data-step='load'] rect\")).fill;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(fill, "rgb(223, 243, 231)", "a succeeded step is drawn green");
        let violations = c.execute("return window.__violations;", vec![]).await.unwrap();
        assert_eq!(violations, serde_json::json!([]), "CSP violations");
        println!("tiflux's steps on the page, as they changed: {seen:?}");
        shot(&c, &dir, "run-tiflux").await;
        // Its log, from the run page.
        let log = open_logs(&c).await;
        assert!(log.contains("tickets"), "{log}");
        shot(&c, &dir, "logs-tiflux").await;
        let slow = tiflux.clone();

        // The other pages; on a phone-sized window too.
        for (path, name) in [("/schedules", "schedules"), ("/workers", "workers"), ("/credentials", "credentials")] {
            c.goto(&format!("{base}{path}")).await.unwrap();
            assert_eq!(c.find(Locator::Css("h1")).await.unwrap().text().await.unwrap(), name[..1].to_uppercase() + &name[1..]);
            shot(&c, &dir, name).await;
        }
        c.find(Locator::Css("#credential-type-carol")).await.unwrap();

        // A credential from its type's form. A refused save names the field and keeps the
        // public values typed (not the private one); a saved credential lists its private
        // field by name only, and the value is on no page.
        let carol = "#credential-type-carol form";
        let form = c.form(Locator::Css(carol)).await.unwrap();
        form.set_by_name("name", "carol-dash").await.unwrap();
        form.set_by_name("public.connector_id", "conn-dash").await.unwrap();
        form.set_by_name("private.api_key", CANARY).await.unwrap();
        form.submit().await.unwrap();
        let e = c.wait().for_element(Locator::Css("#credential-error")).await.unwrap();
        let refused = e.text().await.unwrap();
        assert!(refused.contains("carol-dash") && refused.contains("tenant"), "{refused}");
        let kept = value_of(&c, &format!("{carol} input[name='public.connector_id']")).await;
        assert_eq!(kept.as_deref(), Some("conn-dash"));
        let private = value_of(&c, &format!("{carol} input[name='private.api_key']")).await;
        assert_eq!(private.as_deref(), Some(""), "a private value came back in the form");
        assert!(!c.source().await.unwrap().contains(CANARY));
        shot(&c, &dir, "credentials-refused").await;
        let form = c.form(Locator::Css(carol)).await.unwrap();
        form.set_by_name("public.tenant", "acme").await.unwrap();
        form.set_by_name("private.api_key", CANARY).await.unwrap();
        form.submit().await.unwrap();
        c.wait().for_element(Locator::Css("#credential-saved")).await.unwrap();
        let row = text_of(&c, "#credential-carol-dash").await;
        assert!(row.contains("carol") && row.contains("acme") && row.contains("conn-dash"), "{row}");
        let set = text_of(&c, "#credential-carol-dash td.private").await;
        assert!(set.contains("api_key"), "{set}");
        assert!(!c.source().await.unwrap().contains(CANARY), "the private value came back");
        shot(&c, &dir, "credentials-saved").await;
        // Replaced with the private field left empty: the stored value is kept.
        let form = c.form(Locator::Css(carol)).await.unwrap();
        form.set_by_name("name", "carol-dash").await.unwrap();
        form.set_by_name("public.tenant", "acme-2").await.unwrap();
        form.set_by_name("public.connector_id", "conn-dash").await.unwrap();
        form.submit().await.unwrap();
        c.wait().for_element(Locator::Css("#credential-saved")).await.unwrap();
        let set = text_of(&c, "#credential-carol-dash td.private").await;
        assert!(set.contains("api_key"), "an empty private field removed the stored value: {set}");
        // One more, deleted from its row.
        let form = c.form(Locator::Css(carol)).await.unwrap();
        form.set_by_name("name", "carol-gone").await.unwrap();
        form.set_by_name("public.tenant", "acme").await.unwrap();
        form.set_by_name("public.connector_id", "conn-gone").await.unwrap();
        form.set_by_name("private.api_key", "gone-key").await.unwrap();
        form.submit().await.unwrap();
        c.wait().for_element(Locator::Css("#credential-carol-gone")).await.unwrap();
        c.find(Locator::Css("#credential-carol-gone button.delete")).await.unwrap().click().await.unwrap();
        c.wait().for_element(Locator::Css("#credential-deleted")).await.unwrap();
        assert!(c.find(Locator::Css("#credential-carol-gone")).await.is_err());
        c.find(Locator::Css("#credential-carol-dash")).await.unwrap();
        c.set_window_size(390, 844).await.unwrap();
        c.goto(&slow).await.unwrap();
        shot(&c, &dir, "run-slow-phone").await;
        c.goto(&format!("{base}/")).await.unwrap();
        shot(&c, &dir, "integrations-phone").await;
        c.set_window_size(1280, 900).await.unwrap();

        // Disable hello from its card.
        c.goto(&format!("{base}/")).await.unwrap();
        c.find(Locator::Css("#integration-hello button.toggle")).await.unwrap().click().await.unwrap();
        wait_until("hello to show disabled", || async {
            match c.find(Locator::Css("#integration-hello")).await {
                Ok(e) => e.attr("data-enabled").await.ok().flatten().as_deref() == Some("false"),
                Err(_) => false,
            }
        })
        .await;
        assert!(c.find(Locator::Css("#integration-hello button.trigger-run")).await.is_err());
        shot(&c, &dir, "integration-disabled").await;

        // The session cookie, for plain HTTP requests.
        let admin_cookie = session_cookie(&c).await;

        // A viewer: no buttons; a forged POST is refused by role.
        c.delete_all_cookies().await.unwrap();
        login(&c, &base, "viewer", VIEWER_PASSWORD).await;
        c.find(Locator::Css("#integration-slow")).await.unwrap();
        assert!(c.find(Locator::Css("button.trigger-run")).await.is_err(), "a viewer sees a trigger button");
        assert!(c.find(Locator::Css("button.toggle")).await.is_err(), "a viewer sees a toggle");
        c.goto(&slow).await.unwrap();
        assert!(c.find(Locator::Css("#repair, #cancel")).await.is_err());
        c.goto(&format!("{base}/credentials")).await.unwrap();
        c.find(Locator::Css("#credentials-note")).await.unwrap();
        assert!(c.find(Locator::Css("button.save, #credentials")).await.is_err(), "a viewer sees stored credentials or a save button");
        assert!(!c.source().await.unwrap().contains("carol-dash"));
        shot(&c, &dir, "credentials-viewer").await;
        shot(&c, &dir, "integrations-viewer").await;
        let viewer_cookie = session_cookie(&c).await;
        c.close().await.unwrap();
        (admin_cookie, viewer_cookie)
    });
    drop(driver);

    // Every page has the CSP and nothing inline that it would block.
    let cookie = |c: &str| format!("pipe_refresh={c}");
    let admin = cookie(&admin);
    let viewer = cookie(&viewer);
    for path in [
        "/",
        "/runs",
        "/runs/1",
        "/runs/1/logs",
        "/runs/1/live",
        "/schedules",
        "/workers",
        "/credentials",
    ] {
        let r = http(&addr, "GET", path, &[("Cookie", &admin)], "");
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.header("content-security-policy"), Some(CSP), "{path}");
        assert_nothing_inline(path, &r.body);
    }
    let r = http(&addr, "GET", "/login", &[], "");
    assert_eq!(r.header("content-security-policy"), Some(CSP), "/login");
    assert_nothing_inline("/login", &r.body);

    // CSRF: a POST without the session's token is refused (and changes nothing); with it,
    // it works. A POST from another origin is refused too.
    let page = http(&addr, "GET", "/", &[("Cookie", &admin)], "").body;
    let token = csrf_of(&page);
    let r = http(
        &addr,
        "POST",
        "/integrations/slow/disable",
        &[("Cookie", &admin)],
        "",
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http(
        &addr,
        "POST",
        "/integrations/slow/disable",
        &[("Cookie", &admin)],
        "csrf=not-the-token",
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http(
        &addr,
        "POST",
        "/integrations/slow/disable",
        &[("Cookie", &admin), ("Origin", "http://evil.example")],
        &format!("csrf={token}"),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let page = http(&addr, "GET", "/", &[("Cookie", &admin)], "").body;
    assert!(
        page.contains("id=\"integration-slow\" data-enabled=\"true\""),
        "slow was disabled without a token"
    );
    let r = http(
        &addr,
        "POST",
        "/integrations/slow/disable",
        &[("Cookie", &admin)],
        &format!("csrf={token}"),
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let r = http(
        &addr,
        "POST",
        "/integrations/slow/enable",
        &[("Cookie", &admin), ("X-CSRF-Token", &token)],
        "",
    );
    assert_eq!(r.status, 303, "{}", r.body);

    // A viewer's forged POSTs, with its own valid token, are refused by role.
    let page = http(&addr, "GET", "/runs/1", &[("Cookie", &viewer)], "").body;
    assert!(
        !page.contains("<form method=\"post\" action=\"/runs/1/"),
        "a viewer sees run buttons"
    );
    let token = csrf_of(&page);
    for path in [
        "/integrations/slow/trigger",
        "/integrations/slow/disable",
        "/runs/1/repair",
        "/credentials",
        "/credentials/carol-dash/delete",
    ] {
        let r = http(
            &addr,
            "POST",
            path,
            &[("Cookie", &viewer)],
            &format!("csrf={token}"),
        );
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        assert!(r.body.contains("viewer"), "{path}: {}", r.body);
    }
    // Logging out ends the session in the store: the same refresh cookie, sent again, is
    // refused (a copied cookie is no good after a logout); another user's session stays.
    let page = http(&addr, "GET", "/", &[("Cookie", &viewer)], "").body;
    let token = csrf_of(&page);
    let r = http(
        &addr,
        "POST",
        "/logout",
        &[("Cookie", &viewer)],
        &format!("csrf={token}"),
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let r = http(&addr, "GET", "/", &[("Cookie", &viewer)], "");
    assert_eq!(r.status, 303, "the viewer's session outlived its logout");
    assert_eq!(r.header("location"), Some("/login"));
    assert_eq!(
        http(&addr, "GET", "/", &[("Cookie", &admin)], "").status,
        200
    );

    // The private value saved from the page is on no page and in no log line.
    let page = http(&addr, "GET", "/credentials", &[("Cookie", &admin)], "").body;
    assert!(page.contains("carol-dash"), "{page}");
    assert!(!page.contains(CANARY));
    let output = server.output();
    assert!(
        !output.contains(CANARY),
        "the server logged a private value"
    );
    server.stop();
}

async fn login_fails(c: &Client, base: &str) {
    c.goto(&format!("{base}/login")).await.unwrap();
    let form = c.form(Locator::Css("form[action='/login']")).await.unwrap();
    form.set_by_name("username", "admin").await.unwrap();
    form.set_by_name("password", "wrong-password")
        .await
        .unwrap();
    form.submit().await.unwrap();
    let e = c
        .wait()
        .for_element(Locator::Css("#login-error"))
        .await
        .unwrap();
    assert!(e
        .text()
        .await
        .unwrap()
        .contains("wrong user name or password"));
}

/// The session's refresh cookie (HttpOnly: WebDriver still sees it).
async fn session_cookie(c: &Client) -> String {
    c.get_named_cookie("pipe_refresh")
        .await
        .expect("the session cookie")
        .value()
        .to_string()
}
