//! The JSON API under `/api/v1` (documented in `docs/openapi.yaml`):
//!
//! - `GET /api/v1/probes`: each probe's state and counts.
//! - `GET /api/v1/events?probe=tcp|exec|exit&limit=N[&follow=true]`: the last N events of a
//!   ring as one JSON object, or with `follow=true` a stream of JSON lines (NDJSON, one event
//!   per line, `application/x-ndjson`) of the events pushed after the request (preceded by the
//!   last N when `limit` is given). Blank lines are keep-alives, sent every 10 s of silence.
//! - `GET /api/v1/top?by=syscalls|connects|runqueue&limit=N[&follow=true]`: the top process
//!   names by rate over the last interval; with `follow=true`, one JSON line per interval.
//!
//! Bad parameters get 400 with `{"error": "...", "parameter": "..."}`.

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{Live, Stream, top::By};

/// Keep-alive period of the follow streams.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Largest `limit` accepted.
pub const MAX_LIMIT: usize = 100_000;

/// What the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub live: Arc<Live>,
    /// Turns true at shutdown: follow streams end then.
    pub stop: watch::Receiver<bool>,
}

/// A 400 (or other) answer naming the parameter at fault.
#[derive(Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    pub parameter: Option<String>,
}

impl ApiError {
    fn bad(parameter: &str, error: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            error,
            parameter: Some(parameter.to_owned()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "parameter": self.parameter});
        (self.status, json_body(&body)).into_response()
    }
}

fn json_body(v: &Value) -> ([(header::HeaderName, &'static str); 1], String) {
    let mut s = v.to_string();
    s.push('\n');
    ([(header::CONTENT_TYPE, "application/json")], s)
}

/// Decodes `%XX` and `+` in a query component.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a query string, rejecting parameters not in `allowed` and repeated ones.
pub fn parse_query(
    raw: Option<&str>,
    allowed: &[&'static str],
) -> Result<HashMap<&'static str, String>, ApiError> {
    let mut out = HashMap::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = unescape(k);
        let Some(&name) = allowed.iter().find(|a| **a == k) else {
            return Err(ApiError::bad(
                &k,
                format!(
                    "unknown parameter `{k}`; this endpoint takes {}",
                    allowed.join(", ")
                ),
            ));
        };
        if out.insert(name, unescape(v)).is_some() {
            return Err(ApiError::bad(name, format!("`{name}` is given twice")));
        }
    }
    Ok(out)
}

fn limit(q: &HashMap<&'static str, String>, default: usize) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad(
                    "limit",
                    format!("`{v}` is not a number between 1 and {MAX_LIMIT}"),
                )
            }),
    }
}

fn follow(q: &HashMap<&'static str, String>) -> Result<bool, ApiError> {
    match q.get("follow").map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1" | "") => Ok(true),
        Some(v) => Err(ApiError::bad(
            "follow",
            format!("`{v}` is not a boolean; use true or false"),
        )),
    }
}

/// `GET /api/v1/probes`.
pub async fn probes(State(s): State<ApiState>) -> Response {
    json_body(&s.live.probes_json()).into_response()
}

/// `GET /api/v1/events`.
pub async fn events(State(s): State<ApiState>, RawQuery(raw): RawQuery) -> Response {
    events_inner(s, raw.as_deref()).unwrap_or_else(IntoResponse::into_response)
}

fn names<T>(all: &[T], name: fn(&T) -> &'static str) -> String {
    all.iter().map(name).collect::<Vec<_>>().join(", ")
}

fn events_inner(s: ApiState, raw: Option<&str>) -> Result<Response, ApiError> {
    let q = parse_query(raw, &["probe", "limit", "follow"])?;
    let streams = names(&Stream::ALL, |k| k.name());
    let stream = match q.get("probe") {
        None => {
            return Err(ApiError::bad(
                "probe",
                format!("`probe` is required; one of {streams}"),
            ));
        }
        Some(p) => Stream::parse(p).ok_or_else(|| {
            ApiError::bad(
                "probe",
                format!("unknown event stream `{p}`; one of {streams}"),
            )
        })?,
    };
    let follow = follow(&q)?;
    let live = s.live.clone();
    if !follow {
        let n = limit(&q, 100)?;
        let body = json!({
            "probe": stream.name(),
            "buffer_size": live.buffer_size(),
            "total": live.pushed(stream),
            "events": live.recent(stream, n),
        });
        return Ok(json_body(&body).into_response());
    }
    // tail -n LIMIT -f: the backlog (only when asked for), then what comes.
    let n = if q.contains_key("limit") {
        limit(&q, 0)?
    } else {
        0
    };
    let start = live.next_seq(stream);
    let backlog: Vec<Value> = live
        .recent(stream, n)
        .into_iter()
        .filter(|e| e["seq"].as_u64().is_some_and(|q| q < start))
        .collect();
    let mut pending: Vec<Bytes> = backlog.iter().map(line).collect();
    pending.reverse();
    let state = (live, start, s.stop, pending);
    let body = futures_util::stream::unfold(
        state,
        move |(live, mut seq, mut stop, mut pending)| async move {
            loop {
                if let Some(b) = pending.pop() {
                    return Some((Ok::<_, Infallible>(b), (live, seq, stop, pending)));
                }
                if *stop.borrow() {
                    return None;
                }
                let (evs, next) = tokio::select! {
                    r = live.follow(stream, seq, KEEPALIVE) => r,
                    _ = stop.wait_for(|s| *s) => return None,
                };
                if evs.is_empty() {
                    return Some((Ok(Bytes::from_static(b"\n")), (live, seq, stop, pending)));
                }
                seq = next;
                pending = evs.iter().rev().map(line).collect();
            }
        },
    );
    Ok(ndjson(Body::from_stream(body)))
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn ndjson(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /api/v1/top`.
pub async fn top(State(s): State<ApiState>, RawQuery(raw): RawQuery) -> Response {
    top_inner(s, raw.as_deref()).unwrap_or_else(IntoResponse::into_response)
}

fn top_inner(s: ApiState, raw: Option<&str>) -> Result<Response, ApiError> {
    let q = parse_query(raw, &["by", "limit", "follow"])?;
    let by = match q.get("by") {
        None => By::Syscalls,
        Some(b) => By::parse(b).ok_or_else(|| {
            ApiError::bad(
                "by",
                format!(
                    "unknown ranking `{b}`; one of {}",
                    names(&By::ALL, |b| b.name())
                ),
            )
        })?,
    };
    let n = limit(&q, 20)?;
    let live = s.live.clone();
    if !follow(&q)? {
        return Ok(json_body(&live.top.latest().json(by, n)).into_response());
    }
    let rx = live.top.subscribe();
    let state = (rx, s.stop, true);
    let body = futures_util::stream::unfold(state, move |(mut rx, mut stop, first)| async move {
        if !first {
            tokio::select! {
                r = rx.changed() => r.ok()?,
                _ = stop.wait_for(|s| *s) => return None,
            }
        }
        let w = rx.borrow_and_update().clone();
        Some((Ok::<_, Infallible>(line(&w.json(by, n))), (rx, stop, false)))
    });
    Ok(ndjson(Body::from_stream(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_names_the_parameter() {
        let q = parse_query(
            Some("probe=tcp&limit=5&follow=%74rue"),
            &["probe", "limit", "follow"],
        )
        .unwrap();
        assert_eq!(q["probe"], "tcp");
        assert_eq!(limit(&q, 100), Ok(5));
        assert_eq!(follow(&q), Ok(true));
        let e = parse_query(Some("probe=tcp&bogus=1"), &["probe"]).unwrap_err();
        assert_eq!(e.parameter.as_deref(), Some("bogus"));
        let e = parse_query(Some("probe=tcp&probe=exec"), &["probe"]).unwrap_err();
        assert_eq!(e.parameter.as_deref(), Some("probe"));
        let q = parse_query(Some("limit=0"), &["limit"]).unwrap();
        assert_eq!(
            limit(&q, 1).unwrap_err().parameter.as_deref(),
            Some("limit")
        );
        let q = parse_query(Some("limit=abc"), &["limit"]).unwrap();
        assert_eq!(
            limit(&q, 1).unwrap_err().parameter.as_deref(),
            Some("limit")
        );
        let q = parse_query(Some("follow=maybe"), &["follow"]).unwrap();
        assert_eq!(follow(&q).unwrap_err().parameter.as_deref(), Some("follow"));
        assert_eq!(unescape("a%2Cb+c%zz%"), "a,b c%zz%");
        assert!(parse_query(None, &["x"]).unwrap().is_empty());
    }
}
