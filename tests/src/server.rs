//! The HTTP endpoint's security: bearer-token auth on /metrics (not /healthz) and HTTPS with a
//! certificate made by `openssl`, fetched with `curl` (both real clients and servers).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Agent, free_port, require_root, tanzhen_bin};

const TOKEN: &str = "tz-e2e-0123456789abcdef";

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tanzhen-{}-{name}", std::process::id()))
}

/// `curl` status code and body of `url` with extra curl `args`.
fn curl(url: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn bearer_token_guards_metrics_but_not_healthz() {
    let token_file = temp("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let agent = Agent::start(&[
        "--probes",
        "tcp",
        "--auth-token-file",
        token_file.to_str().unwrap(),
    ]);
    let base = format!("http://{}", agent.addr);
    let (code, _) = curl(&format!("{base}/metrics"), &[]);
    assert_eq!(code, 401);
    let (code, _) = curl(
        &format!("{base}/metrics"),
        &["-H", "Authorization: Bearer wrong"],
    );
    assert_eq!(code, 401);
    let (code, body) = curl(&format!("{base}/healthz"), &[]);
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let auth = format!("Authorization: Bearer {TOKEN}");
    let (code, body) = curl(&format!("{base}/metrics"), &["-H", &auth]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("tanzhen_probe_up{probe=\"tcp\"} 1"), "{body}");
    assert!(!body.contains(TOKEN));
    let log = agent.log_text();
    assert!(log.contains("(bearer token required)"), "{log}");
    assert!(!log.contains(TOKEN), "{log}");
    drop(agent);
    let _ = std::fs::remove_file(&token_file);
}

#[test]
fn https_with_a_certificate_and_a_token() {
    require_root();
    let (cert, key) = (temp("cert.pem"), temp("key.pem"));
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(st.success());
    let token_file = temp("tls-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let port = free_port();
    let mut child = Command::new(tanzhen_bin())
        .args([
            "run",
            "--probes",
            "tcp",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--auth-token-file")
        .arg(&token_file)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tanzhen");
    let cacert = cert.to_str().unwrap();
    let url = |p: &str| format!("https://127.0.0.1:{port}{p}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while curl(&url("/healthz"), &["--cacert", cacert]).0 != 200 {
        assert!(child.try_wait().unwrap().is_none(), "tanzhen exited");
        assert!(Instant::now() < deadline, "no HTTPS /healthz within 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let auth = format!("Authorization: Bearer {TOKEN}");
    let (code, body) = curl(&url("/metrics"), &["--cacert", cacert, "-H", &auth]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("tanzhen_probe_up{probe=\"tcp\"} 1"), "{body}");
    assert_eq!(curl(&url("/metrics"), &["--cacert", cacert]).0, 401);
    // Plain HTTP to the TLS port gets no HTTP answer.
    assert_eq!(curl(&format!("http://127.0.0.1:{port}/healthz"), &[]).0, 0);
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!(
            "metrics at https://127.0.0.1:{port}/metrics (bearer token required)"
        )),
        "{log}"
    );
    for f in [cert, key, token_file] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn bad_security_flags_exit_2() {
    let (code, err) = {
        let out = Command::new(tanzhen_bin())
            .args(["run", "--tls-cert", "/etc/hostname"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(
        (code, err.as_str()),
        (Some(2), "tanzhen: error: --tls-cert needs --tls-key\n")
    );
    let out = Command::new(tanzhen_bin())
        .args(["run", "--auth-token-file", "/nonexistent/token"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "tanzhen: error: --auth-token-file /nonexistent/token: No such file or directory (os error 2)\n"
    );
}
