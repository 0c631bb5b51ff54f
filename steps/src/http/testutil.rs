//! Test helpers: a fake-server launcher and a step context that records events.

use engine::events::{Level, Observer, RunEvent};
use engine::secrets::Redactor;
use engine::step::StepContext;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Collect(pub Mutex<Vec<RunEvent>>);

impl Observer for Collect {
    fn event(&self, event: &RunEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

impl std::fmt::Debug for Collect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Collect({} events)", self.0.lock().unwrap().len())
    }
}

impl Collect {
    /// Every log row, as (level, message).
    pub fn rows(&self) -> Vec<(Level, String)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                RunEvent::Log(r) => Some((r.level, r.message.clone())),
                _ => None,
            })
            .collect()
    }
}

/// A context for step `id`, with an optional connection.
pub fn ctx(obs: &Arc<Collect>, connection: Option<serde_json::Value>) -> StepContext {
    let mut c = StepContext::new(
        "http",
        1,
        obs.clone(),
        Redactor::new(),
        "/tmp".into(),
        "/tmp".into(),
    );
    c.connection = connection;
    c
}

/// Serve `app` on 127.0.0.1 (a free port); returns the base URL.
pub async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}")
}
