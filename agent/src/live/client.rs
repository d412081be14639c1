//! A small blocking HTTP/1.0 client for `tanzhen watch` and `tanzhen top`: plain GETs and
//! line streams (`follow=true`), with the bearer token of `--auth-token-file`. HTTP/1.0 makes
//! the agent close the connection at the end of a body, so streams need no chunk decoding.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    path::Path,
    time::Duration,
};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent is unreachable or the connection broke: worth retrying.
    #[error("{0}")]
    Connection(String),
    /// The agent answered with an error status: retrying will not help.
    #[error("{0}")]
    Status(String),
}

/// A running agent's address and credentials.
#[derive(Clone, Debug)]
pub struct AgentUrl {
    /// `host:port`.
    authority: String,
    /// Path prefix (without a trailing `/`).
    prefix: String,
    token: Option<String>,
    /// The URL as given, for messages.
    pub shown: String,
}

impl AgentUrl {
    /// Parses `http://host:port[/prefix]` and reads the token file; errors are one line.
    pub fn new(url: &str, token_file: Option<&Path>) -> Result<Self, String> {
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.starts_with("https://") {
            return Err(format!(
                "--agent {url}: https is not supported by watch/top yet; reach the agent over \
                 plain http (e.g. through `ssh -L 9527:127.0.0.1:9527 node`)"
            ));
        } else {
            return Err(format!(
                "--agent {url}: not an http:// URL; use e.g. http://127.0.0.1:9527"
            ));
        };
        let (authority, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return Err(format!(
                "--agent {url}: no host; use e.g. http://127.0.0.1:9527"
            ));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !authority.ends_with(']')
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let token = match token_file {
            None => None,
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| format!("--auth-token-file {}: {e}", p.display()))?;
                let t = t.trim().to_owned();
                if t.is_empty() {
                    return Err(format!(
                        "--auth-token-file {} is empty; write the token into it",
                        p.display()
                    ));
                }
                Some(t)
            }
        };
        Ok(Self {
            authority,
            prefix: prefix.trim_end_matches('/').to_owned(),
            token,
            shown: url.trim_end_matches('/').to_owned(),
        })
    }

    fn connect(&self, path: &str) -> Result<BufReader<TcpStream>, ClientError> {
        let conn = |e: std::io::Error| {
            ClientError::Connection(format!("cannot reach the agent at {}: {e}", self.shown))
        };
        let addr = self
            .authority
            .to_socket_addrs()
            .map_err(conn)?
            .next()
            .ok_or_else(|| ClientError::Connection(format!("{}: no address", self.authority)))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(conn)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(conn)?;
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("/{}", self.prefix)
        };
        write!(
            s,
            "GET {prefix}{path} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\n{auth}\r\n",
            self.authority
        )
        .map_err(conn)?;
        let mut r = BufReader::new(s);
        let mut status_line = String::new();
        r.read_line(&mut status_line).map_err(conn)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| {
                ClientError::Connection(format!(
                    "{} did not answer HTTP (is it a tanzhen agent?)",
                    self.shown
                ))
            })?;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).map_err(conn)? == 0 || h.trim().is_empty() {
                break;
            }
        }
        if status != 200 {
            let mut body = String::new();
            let _ = r.read_to_string(&mut body);
            let why = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| body.trim().to_owned());
            let hint = match status {
                401 => " (pass the agent's token with --auth-token-file)",
                404 => " (is the agent older than this tanzhen?)",
                _ => "",
            };
            let msg = format!("{} answered {status} to {path}: {why}{hint}", self.shown);
            return Err(if status >= 500 {
                ClientError::Connection(msg)
            } else {
                ClientError::Status(msg)
            });
        }
        Ok(r)
    }

    /// `GET path` (with its query); the body of a 200 answer as JSON.
    pub fn get(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        let mut r = self.connect(path)?;
        let mut body = String::new();
        r.read_to_string(&mut body)
            .map_err(|e| ClientError::Connection(format!("reading from {}: {e}", self.shown)))?;
        serde_json::from_str(&body).map_err(|e| {
            ClientError::Status(format!("{} sent invalid JSON for {path}: {e}", self.shown))
        })
    }

    /// `GET path` answered with a stream of JSON lines.
    pub fn stream(&self, path: &str) -> Result<LineStream, ClientError> {
        Ok(LineStream {
            r: self.connect(path)?,
            shown: self.shown.clone(),
        })
    }
}

/// The JSON lines of a `follow=true` answer.
pub struct LineStream {
    r: BufReader<TcpStream>,
    shown: String,
}

impl LineStream {
    /// Gives up when nothing (not even a keep-alive) arrives for `t`.
    pub fn set_timeout(&self, t: Duration) {
        let _ = self.r.get_ref().set_read_timeout(Some(t));
    }

    /// The next JSON object, skipping keep-alive blank lines; `Err` when the stream ends.
    pub fn next_value(&mut self) -> Result<serde_json::Value, ClientError> {
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) => {
                    return Err(ClientError::Connection(format!(
                        "{} closed the stream",
                        self.shown
                    )));
                }
                Ok(_) if line.trim().is_empty() => {}
                Ok(_) => {
                    return serde_json::from_str(&line).map_err(|e| {
                        ClientError::Connection(format!("{} sent a bad line: {e}", self.shown))
                    });
                }
                Err(e) => {
                    return Err(ClientError::Connection(format!(
                        "lost the connection to {}: {e}",
                        self.shown
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let a = AgentUrl::new("http://127.0.0.1:9527", None).unwrap();
        assert_eq!(
            (a.authority.as_str(), a.prefix.as_str()),
            ("127.0.0.1:9527", "")
        );
        let a = AgentUrl::new("http://node-1/tanzhen/", None).unwrap();
        assert_eq!(
            (a.authority.as_str(), a.prefix.as_str()),
            ("node-1:80", "tanzhen")
        );
        let a = AgentUrl::new("http://[::1]:9527", None).unwrap();
        assert_eq!(a.authority, "[::1]:9527");
        assert!(
            AgentUrl::new("https://x:1", None)
                .unwrap_err()
                .contains("https is not supported")
        );
        assert!(
            AgentUrl::new("127.0.0.1:9527", None)
                .unwrap_err()
                .contains("not an http:// URL")
        );
        assert!(
            AgentUrl::new("http://", None)
                .unwrap_err()
                .contains("no host")
        );
    }
}
