//! `cargo xtask dist`: static (musl) release binaries for x86_64 and aarch64, packaged as .deb
//! (Debian, UOS) and .rpm (Kylin, openEuler) with cargo-deb and cargo-generate-rpm, into
//! `target/dist/`. `package_test` installs the host's .deb, runs it, scrapes it and removes it.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{cargo, run, setup, step, target_dir};

/// Packaging tools, pinned: (crate, version, cargo subcommand).
const TOOLS: &[(&str, &str, &str)] = &[
    ("cargo-deb", "3.8.0", "deb"),
    ("cargo-generate-rpm", "0.21.1", "generate-rpm"),
];

/// Architectures packages are built for: (rust arch, musl target).
pub const ARCHES: &[(&str, &str)] = &[
    ("x86_64", "x86_64-unknown-linux-musl"),
    ("aarch64", "aarch64-unknown-linux-musl"),
];

/// The musl target of `arch` (an ARCHES name), or an error listing the known ones.
pub fn musl_target(arch: &str) -> anyhow::Result<&'static str> {
    ARCHES
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|a| a.1)
        .with_context(|| {
            format!(
                "unknown arch `{arch}`; use one of: {}",
                ARCHES.iter().map(|a| a.0).collect::<Vec<_>>().join(", ")
            )
        })
}

/// The C compiler settings ring (the `tls` feature) builds its C and assembly with, per musl
/// target: (target, variable, value). x86_64 needs none: cc-rs finds Debian's musl-gcc wrapper
/// (musl-tools) by itself. aarch64 uses the aarch64 cross gcc (gcc-aarch64-linux-gnu) without
/// any libc headers: freestanding, with ring's own switch for headerless builds (its asserts
/// then need no assert.h); rust-lld links against the musl target's own crt objects.
/// `cargo xtask setup` installs both compilers.
const MUSL_C_ENV: &[(&str, &str, &str)] = &[
    (
        "aarch64-unknown-linux-musl",
        "CC_aarch64_unknown_linux_musl",
        "aarch64-linux-gnu-gcc",
    ),
    (
        "aarch64-unknown-linux-musl",
        "CFLAGS_aarch64_unknown_linux_musl",
        "-ffreestanding -DRING_CORE_NOSTDLIBINC",
    ),
];

/// Builds the static release binary of `arch` (musl `target`, with the default features, so TLS
/// included) plus `extra_bins` of the tests package (e.g. the VM scenario); returns the
/// directory holding them. The embedded eBPF object is built for the same architecture:
/// aya-build passes the target's `CARGO_CFG_TARGET_ARCH` as `bpf_target_arch`, which selects
/// the `pt_regs` layout kprobes read their arguments from.
pub fn build_static(
    root: &Path,
    arch: &str,
    target: &str,
    extra_bins: &[&str],
) -> anyhow::Result<PathBuf> {
    step(&format!(
        "building the static {arch} binary ({target}, release)"
    ));
    run(Command::new("rustup").args(["target", "add", target]))?;
    let mut build = cargo(root);
    build.args([
        "build",
        "--release",
        "--locked",
        "--package",
        "agent",
        "--bin",
        "tanzhen",
        "--target",
        target,
    ]);
    if !extra_bins.is_empty() {
        build.args(["--package", "tests"]);
        for b in extra_bins {
            build.args(["--bin", b]);
        }
    }
    for (t, var, value) in MUSL_C_ENV {
        if *t == target && std::env::var_os(var).is_none() {
            build.env(var, value);
        }
    }
    run(&mut build)?;
    Ok(target_dir(root).join(target).join("release"))
}

/// Package formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Deb,
    Rpm,
}

fn tools_dir() -> PathBuf {
    setup::cache_dir().join("tools")
}

/// Installs the packaging tools into the cache (once).
fn ensure_tools() -> anyhow::Result<()> {
    for (krate, version, _) in TOOLS {
        let bin = tools_dir().join("bin").join(krate);
        if bin.exists() {
            continue;
        }
        step(&format!(
            "installing {krate} {version} into {} (once, ~2 min)",
            tools_dir().display()
        ));
        run(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args(["install", "--locked", krate, "--version", version, "--root"])
                .arg(tools_dir())
                .env_remove("CARGO_TARGET_DIR"),
        )?;
    }
    Ok(())
}

/// `cargo` with the packaging tools on PATH.
fn cargo_with_tools(root: &Path) -> Command {
    let mut cmd = cargo(root);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools_dir().join("bin")];
    paths.extend(std::env::split_paths(&path));
    cmd.env(
        "PATH",
        std::env::join_paths(paths).expect("PATH entries are valid"),
    );
    cmd
}

/// Builds the packages; returns their paths.
pub fn dist(root: &Path, arches: &[String], formats: &[Format]) -> anyhow::Result<Vec<PathBuf>> {
    ensure_tools()?;
    let start = std::time::SystemTime::now();
    let out = target_dir(root).join("dist");
    std::fs::create_dir_all(&out)?;
    for arch in arches {
        let target = musl_target(arch)?;
        build_static(root, arch, target, &[])?;
        for format in formats {
            let mut cmd = cargo_with_tools(root);
            match format {
                Format::Deb => {
                    step(&format!("packaging {arch} .deb"));
                    cmd.args([
                        "deb",
                        "--package",
                        "agent",
                        "--no-build",
                        "--no-strip",
                        "--target",
                        target,
                        "--output",
                    ]);
                }
                Format::Rpm => {
                    step(&format!("packaging {arch} .rpm"));
                    cmd.args([
                        "generate-rpm",
                        "--package",
                        "agent",
                        "--target",
                        target,
                        "--output",
                    ]);
                }
            }
            cmd.arg(&out);
            run(&mut cmd)?;
        }
    }
    let mut built: Vec<PathBuf> = packages_in(&out)?
        .into_iter()
        .filter(|p| {
            p.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= start)
        })
        .collect();
    built.sort();
    for p in &built {
        eprintln!("    {}", p.display());
    }
    Ok(built)
}

fn packages_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb" || e == "rpm"))
        .collect())
}

/// The host's architecture name as ARCHES spells it.
pub fn host_arch() -> &'static str {
    std::env::consts::ARCH
}

/// Installs the host's .deb, runs the unit's command line (on a free loopback port: this
/// machine has no running systemd), scrapes it, stops it and removes the package. Prints
/// `package: N passed, M failed`.
pub fn package_test(root: &Path) -> anyhow::Result<()> {
    let pkgs = dist(root, &[host_arch().to_owned()], &[Format::Deb, Format::Rpm])?;
    let deb = pkgs
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("no .deb was built")?
        .clone();
    step(&format!(
        "package test: install {}, run, scrape, stop, remove",
        deb.display()
    ));
    let mut checks: Vec<(&str, anyhow::Result<()>)> = Vec::new();
    run(Command::new("dpkg").arg("-i").arg(&deb)).context("dpkg -i")?;
    let installed = Removal;
    checks.push(("installed files", installed_files()));
    checks.push((
        "service command runs and serves metrics",
        run_installed_unit(),
    ));
    drop(installed);
    checks.push((
        "removal leaves no binary",
        if Path::new("/usr/bin/tanzhen").exists() {
            Err(anyhow::anyhow!("/usr/bin/tanzhen still there"))
        } else {
            Ok(())
        },
    ));
    let failed = checks.iter().filter(|(_, r)| r.is_err()).count();
    for (name, r) in &checks {
        match r {
            Ok(()) => eprintln!("ok    {name}"),
            Err(e) => eprintln!("FAIL  {name}: {e:#}"),
        }
    }
    println!("package: {} passed, {failed} failed", checks.len() - failed);
    if failed > 0 {
        bail!("{failed} package check(s) failed");
    }
    Ok(())
}

/// Removes the package when dropped, whatever happened.
struct Removal;

impl Drop for Removal {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["-r", "tanzhen"])
            .stdout(Stdio::null())
            .status();
    }
}

fn installed_files() -> anyhow::Result<()> {
    for f in [
        "/usr/bin/tanzhen",
        "/lib/systemd/system/tanzhen.service",
        "/usr/share/doc/tanzhen/README.md",
    ] {
        if !Path::new(f).exists() {
            bail!("{f} is missing after dpkg -i");
        }
    }
    let v = Command::new("/usr/bin/tanzhen").arg("--version").output()?;
    if !v.status.success() || !String::from_utf8_lossy(&v.stdout).starts_with("tanzhen ") {
        bail!("/usr/bin/tanzhen --version failed");
    }
    Ok(())
}

fn run_installed_unit() -> anyhow::Result<()> {
    let unit = std::fs::read_to_string("/lib/systemd/system/tanzhen.service")?;
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("no ExecStart= in the installed unit")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let argv: Vec<String> = exec
        .split_whitespace()
        .map(|a| {
            if a == "0.0.0.0:9527" {
                listen.clone()
            } else {
                a.to_owned()
            }
        })
        .collect();
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stderr(Stdio::piped())
        .spawn()?;
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(body) = get(&listen, "/metrics")
                && body.contains("tanzhen_build_info")
                && body.contains("tanzhen_probe_up{probe=\"tcp\"} 1")
            {
                return Ok(());
            }
            if let Some(s) = child.try_wait()? {
                bail!("the installed tanzhen exited with {s}");
            }
            if Instant::now() > deadline {
                bail!("the installed tanzhen served no metrics within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })();
    terminate(child.id());
    let status = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    result.with_context(|| format!("agent log:\n{err}"))?;
    if !status.success() {
        bail!("SIGTERM exit status {status}, log:\n{err}");
    }
    Ok(())
}

/// SIGTERM, as systemd's `systemctl stop` sends.
fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

fn get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}
