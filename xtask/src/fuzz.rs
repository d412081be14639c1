//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs each cargo-fuzz target of fuzz/ for N
//! seconds (libFuzzer `-max_total_time`) with the nightly toolchain. cargo-fuzz is installed
//! once into the tools cache, pinned, like the packaging tools (dist.rs). Corpora stay in
//! fuzz/corpus/TARGET (ignored by git), so later runs start from what earlier ones found.

use std::{path::Path, process::Command};

use anyhow::Context as _;

use crate::{run, setup, step};

/// cargo-fuzz, pinned.
const CARGO_FUZZ: (&str, &str) = ("cargo-fuzz", "0.13.1");

/// The targets of fuzz/Cargo.toml, one per parser of outside input.
pub const TARGETS: &[&str] = &[
    "tracefs_format",
    "proc_net_tcp",
    "cgroup",
    "config_toml",
    "otlp_headers",
    "tcp_event",
    "proc_event",
];

fn tools_bin() -> std::path::PathBuf {
    setup::cache_dir().join("tools").join("bin")
}

/// Installs cargo-fuzz into the tools cache (once).
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let (krate, version) = CARGO_FUZZ;
    if tools_bin().join(krate).exists() {
        return Ok(());
    }
    step(&format!("installing {krate} {version} (once, ~2 min)"));
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "--locked", krate, "--version", version, "--root"])
            .arg(setup::cache_dir().join("tools"))
            .env_remove("CARGO_TARGET_DIR"),
    )
}

/// `cargo +nightly fuzz ...` in fuzz/ with the cached cargo-fuzz on PATH (rustup's proxy picks
/// the toolchain; the workspace's CARGO variables are removed so the nightly cargo runs).
fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["+nightly", "fuzz"])
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools_bin()];
    paths.extend(std::env::split_paths(&path));
    cmd.env(
        "PATH",
        std::env::join_paths(paths).expect("PATH entries are valid"),
    );
    cmd
}

/// Builds every target, then runs each for `seconds`; fails on the first crash (libFuzzer
/// writes the input to fuzz/artifacts/TARGET/).
pub fn fuzz(root: &Path, seconds: u32, targets: &[String]) -> anyhow::Result<()> {
    ensure_cargo_fuzz()?;
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    step("building the fuzz targets (nightly, sanitizer coverage; the first build takes minutes)");
    run(cargo_fuzz(root).args(["build", "-O"]))?;
    for t in targets {
        step(&format!("fuzzing {t} for {seconds} s"));
        let started = std::time::Instant::now();
        run(cargo_fuzz(root)
            .args(["run", "-O", t, "--"])
            .arg(format!("-max_total_time={seconds}")))
        .with_context(|| format!("fuzz target {t} failed: see fuzz/artifacts/{t}/"))?;
        eprintln!("({t}: {:.0} s)", started.elapsed().as_secs_f64());
    }
    Ok(())
}
