//! `tanzhen top`: the agent's `/api/v1/top` as a full-screen view (ratatui + crossterm)
//! refreshed every interval. Keys: `s` syscalls, `c` connects, `r` runqueue, `q`/Esc/Ctrl-C
//! quit. When stdout is not a terminal it prints one snapshot as a table and exits.

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Paragraph, Row, Table},
};
use serde_json::Value;

use super::{
    client::{AgentUrl, ClientError},
    top::By,
    watch::human_rate,
};

/// Options of `tanzhen top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// URL of the running agent's HTTP endpoint.
    #[arg(long, env = "TANZHEN_AGENT", default_value = "http://127.0.0.1:9527")]
    pub agent: String,

    /// Ranking to start with (keys s, c and r switch it).
    #[arg(long, env = "TANZHEN_TOP_BY", value_enum, default_value = "syscalls")]
    pub by: By,

    /// Most rows to show.
    #[arg(long, env = "TANZHEN_TOP_LIMIT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    /// File holding the agent's bearer token (its --auth-token-file).
    #[arg(long, env = "TANZHEN_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,
}

/// The footer listing the keys.
pub const FOOTER: &str = "q quit   s syscalls   c connects   r runqueue";

/// Column titles of a ranking.
#[must_use]
pub fn columns(by: By) -> [&'static str; 4] {
    match by {
        By::Syscalls => ["COMM", "CALLS/s", "ERRORS/s", "TOP SYSCALL"],
        By::Connects => ["COMM", "CONNECTS/s", "ESTAB/s", "FAILED/s"],
        By::Runqueue => ["COMM", "WAIT s/s", "WAKEUPS/s", "AVG WAIT"],
    }
}

/// The cells of one `/api/v1/top` row.
#[must_use]
pub fn cells(by: By, r: &Value) -> [String; 4] {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    let comm = r["comm"].as_str().unwrap_or("-").to_owned();
    match by {
        By::Syscalls => [
            comm,
            human_rate(f("rate")),
            human_rate(f("errors_per_second")),
            r["top_syscall"].as_str().unwrap_or("-").to_owned(),
        ],
        By::Connects => [
            comm,
            human_rate(f("rate")),
            human_rate(f("established_per_second")),
            human_rate(f("failed_per_second")),
        ],
        By::Runqueue => [
            comm,
            format!("{:.3}", f("rate")),
            human_rate(f("wakeups_per_second")),
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "display"
            )]
            super::watch::human_ns(f("avg_latency_ns").max(0.0) as u64),
        ],
    }
}

/// One answer as a plain aligned table.
#[must_use]
pub fn plain_table(by: By, v: &Value) -> String {
    let c = columns(by);
    let mut s = format!(
        "top {} over {:.1}s at {}\n{:<16} {:>12} {:>12}  {}\n",
        v["unit"].as_str().unwrap_or(by.unit()),
        v["window_seconds"].as_f64().unwrap_or(0.0),
        v["window_end"].as_str().unwrap_or("-"),
        c[0],
        c[1],
        c[2],
        c[3]
    );
    for r in v["rows"].as_array().into_iter().flatten() {
        let [a, b, c, d] = cells(by, r);
        s.push_str(&format!("{a:<16} {b:>12} {c:>12}  {d}\n"));
    }
    s
}

/// Runs `tanzhen top`.
pub fn main(args: &TopArgs) -> ExitCode {
    let url = match AgentUrl::new(&args.agent, args.auth_token_file.as_deref()) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("tanzhen top: {e}");
            return ExitCode::from(2);
        }
    };
    let res = if std::io::stdout().is_terminal() {
        interactive(&url, args)
    } else {
        once(&url, args)
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tanzhen top: {e}");
            ExitCode::FAILURE
        }
    }
}

fn path(by: By, limit: u32) -> String {
    format!("/api/v1/top?by={}&limit={limit}", by.name())
}

/// Not a terminal: one table, after the agent's first full interval.
fn once(url: &AgentUrl, args: &TopArgs) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = url
            .get(&path(args.by, args.limit))
            .map_err(|e| e.to_string())?;
        if v["window_seconds"].as_f64().unwrap_or(0.0) > 0.0 || Instant::now() > deadline {
            print!("{}", plain_table(args.by, &v));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn interactive(url: &AgentUrl, args: &TopArgs) -> Result<(), String> {
    let mut terminal = ratatui::try_init().map_err(|e| format!("terminal: {e}"))?;
    let res = ui_loop(&mut terminal, url, args);
    ratatui::restore();
    res
}

fn ui_loop(
    terminal: &mut ratatui::DefaultTerminal,
    url: &AgentUrl,
    args: &TopArgs,
) -> Result<(), String> {
    let mut by = args.by;
    let mut data: Option<Value> = None;
    let mut status = String::from("connecting...");
    let mut next_fetch = Instant::now();
    let mut refresh = Duration::from_secs(1);
    loop {
        if Instant::now() >= next_fetch {
            match url.get(&path(by, args.limit)) {
                Ok(v) => {
                    if let Some(w) = v["window_seconds"].as_f64().filter(|w| *w > 0.0) {
                        refresh = Duration::from_secs_f64(w.clamp(0.5, 60.0));
                    }
                    status.clear();
                    data = Some(v);
                }
                Err(ClientError::Status(e)) => return Err(e),
                Err(ClientError::Connection(e)) => status = format!("{e}; retrying"),
            }
            next_fetch = Instant::now() + refresh;
        }
        terminal
            .draw(|f| draw(f, url, by, data.as_ref(), &status))
            .map_err(|e| format!("terminal: {e}"))?;
        let wait = next_fetch.saturating_duration_since(Instant::now());
        if event::poll(wait.min(Duration::from_millis(250))).map_err(|e| e.to_string())?
            && let Event::Key(k) = event::read().map_err(|e| e.to_string())?
            && k.kind == KeyEventKind::Press
        {
            let new = match k.code {
                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
                KeyCode::Char('s') => By::Syscalls,
                KeyCode::Char('c') => By::Connects,
                KeyCode::Char('r') => By::Runqueue,
                _ => by,
            };
            if new != by {
                by = new;
                data = None;
                next_fetch = Instant::now();
            }
        }
    }
}

fn draw(f: &mut ratatui::Frame<'_>, url: &AgentUrl, by: By, data: Option<&Value>, status: &str) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let window = data.map_or_else(String::new, |v| {
        format!(
            " over {:.1}s at {}",
            v["window_seconds"].as_f64().unwrap_or(0.0),
            v["window_end"]
                .as_str()
                .unwrap_or("-")
                .get(11..19)
                .unwrap_or("-")
        )
    });
    let title = format!(
        "tanzhen top  {}  by {} ({}){window}  {status}",
        url.shown,
        by.name(),
        by.unit()
    );
    f.render_widget(
        Paragraph::new(Line::from(title)).style(Style::new().add_modifier(Modifier::BOLD)),
        head,
    );
    let rows: Vec<Row> = data
        .and_then(|v| v["rows"].as_array())
        .into_iter()
        .flatten()
        .map(|r| Row::new(cells(by, r)))
        .collect();
    let table = Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(12),
            Constraint::Length(12),
            Constraint::Min(12),
        ],
    )
    .header(Row::new(columns(by)).style(Style::new().add_modifier(Modifier::REVERSED)));
    f.render_widget(table, body);
    f.render_widget(
        Paragraph::new(Line::from(format!("{FOOTER}   (sorted by {})", by.name())))
            .style(Style::new().add_modifier(Modifier::REVERSED)),
        foot,
    );
}
