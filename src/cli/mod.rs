//! The subcommands of `pipe`, one module each, plus what they share.

pub mod credentials;
pub mod graph;
pub mod integrations;
pub mod repair;
pub mod run;
pub mod runs;
pub mod sandbox;
pub mod schedule;
pub mod schema;
pub mod serve;
pub mod users;
pub mod validate;
pub mod worker;

/// Panics print a redacted message: a secret inside a panic payload never reaches stderr
/// (masked by the redactors of every live run, see `runner::redaction`).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let text = format!("pipe panicked{location}: {payload}");
        let text = runner::redaction::redact_live(&text);
        eprintln!("{text}\nThis is a bug in pipe; please report it.");
    }));
}

/// Ctrl-C and SIGTERM, caught from the moment this returns: a signal that arrives before
/// [`Signals::serve`] is polled is kept, not lost to the default action (which would end the
/// process with no clean stop). `None` only if the handlers cannot be installed.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Install the handlers; needs a Tokio runtime's context.
    pub fn install() -> Option<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Some(Signals {
            int: signal(SignalKind::interrupt()).ok()?,
            term: signal(SignalKind::terminate()).ok()?,
        })
    }

    /// The next SIGINT or SIGTERM (at once for one that arrived since the last call).
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }

    /// For a command that stops in two stages: `first` on the first signal, `again` on each
    /// later one. Never returns.
    pub async fn serve(mut self, first: impl FnOnce(), mut again: impl FnMut()) {
        self.recv().await;
        first();
        loop {
            self.recv().await;
            again();
        }
    }
}

/// [`Signals`] installed now and served: returns only if the handlers cannot be installed.
pub async fn on_signals(first: impl FnOnce(), again: impl FnMut()) {
    if let Some(signals) = Signals::install() {
        signals.serve(first, again).await
    }
}

/// Output formats shared by several subcommands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// The known step types.
pub fn registry() -> engine::step::Registry {
    steps::registry()
}

/// Render rows as an aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
