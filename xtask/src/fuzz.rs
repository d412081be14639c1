//! `cargo xtask fuzz [--seconds N] [TARGET...]` and the fuzz step of `cargo xtask test`: the
//! libFuzzer targets of fuzz/ (one per parser of outside input; entry points in
//! agent/src/fuzz.rs) built and run on the stable toolchain, without cargo-fuzz:
//! - the fuzz crate (libfuzzer-sys, and the agent's sources without the `tls` and `k8s`
//!   features) builds with its dev profile into `<target>/fuzz`, with the RUSTFLAGS cargo-fuzz
//!   passes ([`SANCOV_FLAGS`]: libFuzzer's coverage instrumentation of every crate, and
//!   `cfg(fuzzing)`) but no AddressSanitizer, which needs nightly (`cargo +nightly fuzz run
//!   TARGET` in fuzz/ still works for that). `--target` is the host's, as with cargo-fuzz, so the
//!   flags skip build scripts and proc-macros;
//! - each target runs N seconds (libFuzzer `-max_total_time`), as many at once as there are
//!   cores, its output in `<target>/fuzz/log/TARGET.log`; one summary line per target;
//! - corpora persist in fuzz/corpus/TARGET (ignored by git), seeded from the testdata; a crash
//!   (panic, or an input running 10 s) fails the run and names the input libFuzzer wrote to
//!   fuzz/artifacts/TARGET/ and the command that replays it.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{run, step, target_dir};

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

/// Seconds per target in `cargo xtask test`.
pub const SMOKE_SECONDS: u32 = 20;

/// Directories of real inputs a target's corpus starts from (read, never written).
const SEEDS: &[(&str, &str)] = &[
    ("tracefs_format", "agent/src/probe/testdata"),
    ("cgroup", "agent/src/metadata/testdata"),
];

/// What cargo-fuzz 0.13 puts in RUSTFLAGS on Linux, less `-Zsanitizer=address` (and
/// `-Cdebug-assertions`, which the dev profile has).
const SANCOV_FLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "--cfg",
    "fuzzing",
];

/// Builds the targets; returns the directory holding the binaries.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = target_dir(root).join("fuzz");
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let mut flags = SANCOV_FLAGS.join(" ");
    if let Ok(extra) = std::env::var("RUSTFLAGS") {
        flags = format!("{flags} {extra}");
    }
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root)
        .args(["build", "--manifest-path", "fuzz/Cargo.toml", "--bins"])
        .args(["--target", &triple])
        .env("CARGO_TARGET_DIR", &dir)
        .env("RUSTFLAGS", flags);
    let started = Instant::now();
    run(&mut cmd)?;
    eprintln!(
        "(fuzz targets built in {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(dir.join(triple).join("debug"))
}

/// Builds, then runs `targets` (all when empty) for `seconds` each; fails if any crashed.
pub fn fuzz(root: &Path, seconds: u32, targets: &[String]) -> anyhow::Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    if let Some(t) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!(
            "no fuzz target `{t}`; the targets are {}",
            TARGETS.join(", ")
        );
    }
    step(&format!(
        "building the fuzz targets (stable, coverage-instrumented) into {}; the first build \
         takes a few minutes",
        target_dir(root).join("fuzz").display()
    ));
    let bins = build(root)?;
    let parallel = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(targets.len());
    let rounds = targets.len().div_ceil(parallel);
    step(&format!(
        "fuzzing {} target(s) for {seconds} s each, {parallel} at a time (~{} s); \
         logs in {}",
        targets.len(),
        rounds * seconds as usize,
        log_dir(&bins).display()
    ));
    let queue = Mutex::new(targets.iter().copied().collect::<VecDeque<_>>());
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| {
                loop {
                    let Some(t) = queue.lock().expect("queue lock").pop_front() else {
                        break;
                    };
                    match run_target(root, &bins, t, seconds) {
                        Ok(summary) => eprintln!("    {t}: {summary}"),
                        Err(e) => {
                            eprintln!("    {t}: FAILED\n{e:#}");
                            failures.lock().expect("failures lock").push(t);
                        }
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().expect("failures lock");
    if !failures.is_empty() {
        bail!("fuzz targets failed: {} (see above)", failures.join(", "));
    }
    Ok(())
}

/// Runs one target for `seconds`; on success a one-line summary from libFuzzer's final stats.
fn run_target(root: &Path, bins: &Path, name: &str, seconds: u32) -> anyhow::Result<String> {
    let fuzz = root.join("fuzz");
    let corpus = fuzz.join("corpus").join(name);
    let artifacts = fuzz.join("artifacts").join(name);
    let logs = log_dir(bins);
    for d in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log_path = logs.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let bin = bins.join(name);
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .args(
            SEEDS
                .iter()
                .filter(|(t, _)| *t == name)
                .map(|(_, d)| root.join(d)),
        )
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        // The panic message and libFuzzer's verdict, without the backtrace's frames.
        let frame = |l: &str| {
            let l = l.trim_start();
            l.starts_with("at ")
                || l.split_once(": ")
                    .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
        };
        let tail: Vec<&str> = text.lines().rev().filter(|l| !frame(l)).take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let input = text
            .lines()
            .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()));
        bail!(
            "{}\n{name} exited with {status} after {:.0} s; {}; log: {}",
            tail.join("\n"),
            started.elapsed().as_secs_f64(),
            match input {
                Some(input) => format!(
                    "crashing input: {input} (replay: {} {input})",
                    bin.display()
                ),
                None => "no input written".to_owned(),
            },
            log_path.display()
        );
    }
    let stat = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{key}:")))
            .map_or("?", str::trim)
            .to_owned()
    };
    let cov = text
        .lines()
        .rev()
        .find_map(|l| l.split_once(" cov: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?");
    Ok(format!(
        "{} runs in {:.0} s ({} exec/s), coverage {cov}, {} new inputs, peak RSS {} MB",
        stat("number_of_executed_units"),
        started.elapsed().as_secs_f64(),
        stat("average_exec_per_sec"),
        stat("new_units_added"),
        stat("peak_rss_mb"),
    ))
}

/// `<target>/fuzz/log`, from `<target>/fuzz/TRIPLE/debug`.
fn log_dir(bins: &Path) -> PathBuf {
    bins.ancestors().nth(2).unwrap_or(bins).join("log")
}
