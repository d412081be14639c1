//! Developer tasks: `cargo xtask setup | build | run | dashboards | test` (and more below).
//!
//! Every task that needs the eBPF toolchain runs `setup` first; `setup` is idempotent and fast
//! when everything is already in place.

mod bench;
mod dashboards;
mod dist;
mod fuzz;
mod gen_syscalls;
mod setup;
mod vmtest;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "tanzhen developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install everything the build and tests need: apt packages (promtool), Python packages
    /// (kubernetes-validate), rust-src for the nightly toolchain, and bpf-linker built against
    /// nightly's LLVM (cached).
    Setup {
        /// Only what building the agent needs (no test tools): for image and package builds.
        #[arg(long)]
        build_only: bool,
    },
    /// Set up, then build the agent (with its embedded eBPF object). With --target: a static
    /// (musl) release binary for that architecture, with an eBPF object built for it.
    Build {
        /// Build with the release profile (always, with --target).
        #[arg(long)]
        release: bool,
        /// Architecture of a static musl build: x86_64 or aarch64.
        #[arg(long)]
        target: Option<String>,
    },
    /// Set up, build the agent in release mode and run it (as root) with its default probes;
    /// arguments after `--` go to `tanzhen run`.
    Run {
        /// Extra arguments for `tanzhen run`, e.g. `-- --listen 127.0.0.1:9527`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, then build static release binaries and .deb/.rpm packages into target/dist/.
    Dist {
        /// Architectures to build for.
        #[arg(long, value_delimiter = ',', default_values = ["x86_64", "aarch64"])]
        arch: Vec<String>,
        /// Package formats to build.
        #[arg(long, value_delimiter = ',', value_enum, default_values = ["deb", "rpm"])]
        format: Vec<dist::Format>,
    },
    /// Benchmarks (root): probe overhead next to the Debian reference tools (perf bench,
    /// libbpf-tools), connect rate, and the agent's footprint; writes target/bench/report.json
    /// and report.md.
    Bench {
        /// Fewer rounds and shorter workloads (for a quick look, not for the record).
        #[arg(long)]
        quick: bool,
        /// Run only these parts (comma-separated); all when not given.
        #[arg(long, value_delimiter = ',', value_enum)]
        only: Vec<bench::Part>,
    },
    /// Regenerate deploy/grafana/dashboards-configmap.yaml from dashboards/*.json.
    Dashboards,
    /// Only the soak test (root; tests/src/soak.rs): all probes, 50,000 short-lived processes
    /// with random names and 100,000 connects to random local ports, as in the e2e suite (~1
    /// min); raise the numbers for a longer soak.
    Soak {
        /// Short-lived processes to churn.
        #[arg(long, default_value_t = 50_000)]
        processes: u32,
        /// Connects to random local ports.
        #[arg(long, default_value_t = 100_000)]
        connects: u32,
    },
    /// Fuzz the parsers of outside input (the libFuzzer targets of fuzz/) on the stable
    /// toolchain: build them coverage-instrumented into <target>/fuzz (the first build takes a
    /// few minutes), then run each for the given time, as many at once as there are cores.
    /// Corpora grow in fuzz/corpus/; a crash fails with its input's path under fuzz/artifacts/.
    /// `cargo xtask test` runs every target for 20 s.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u32,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Set up, then run every test: unit tests, each fuzz target for 20 s, then the privileged
    /// end-to-end tests against the real kernel (needs root).
    Test {
        /// Only run tests whose name contains this string (no fuzzing, no VM tests).
        filter: Option<String>,
        /// Skip the fuzz step (`cargo xtask fuzz --seconds 20`).
        #[arg(long)]
        no_fuzz: bool,
        /// Skip the VM tests (`cargo xtask vm-test`) that otherwise run after the host's.
        #[arg(long)]
        no_vm: bool,
    },
    /// Boot Debian's bookworm (6.1) and bullseye (5.10) kernels for x86_64 and aarch64 under
    /// QEMU with an initramfs holding the static tanzhen; in each: `tanzhen check` and an
    /// end-to-end scenario (TCP, syscalls, scheduler). Prints PASS/FAIL per kernel.
    VmTest {
        /// Kernels to boot (Debian releases).
        #[arg(long, value_delimiter = ',', value_enum, default_values = ["bookworm", "bullseye"])]
        kernel: Vec<vmtest::Release>,
        /// Guest architectures.
        #[arg(long, value_delimiter = ',', value_enum, default_values = ["x86_64", "aarch64"])]
        arch: Vec<vmtest::Arch>,
    },
    /// Regenerate agent/src/probe/syscall_names.rs (x86_64 and aarch64 syscall names, errno
    /// names) from Debian's linux-libc-dev at the pinned version (needs apt-get, dpkg-deb, cpp).
    GenSyscalls {
        /// Directory with (or to download) linux-libc-dev_<version>_{amd64,arm64}.deb.
        #[arg(long)]
        debs: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup { build_only } => {
            if build_only {
                setup::build_tools()
            } else {
                setup::all()
            }
        }
        Task::Build { release, target } => match target {
            Some(arch) => {
                setup::build_tools()?;
                setup::musl_tools()?;
                let target = dist::musl_target(&arch)?;
                let dir = dist::build_static(&root, &arch, target, &[])?;
                eprintln!("    {}", dir.join("tanzhen").display());
                Ok(())
            }
            None => {
                setup::all()?;
                build(&root, release)
            }
        },
        Task::Run { args } => {
            setup::all()?;
            build(&root, true)?;
            let bin = target_dir(&root).join("release/tanzhen");
            step(&format!("running {} run {}", bin.display(), args.join(" ")));
            let mut cmd = as_root(&bin);
            cmd.arg("run").args(&args);
            let status = cmd
                .status()
                .with_context(|| format!("starting {}", bin.display()))?;
            if !status.success() {
                bail!("tanzhen exited with {status}");
            }
            Ok(())
        }
        Task::Dist { arch, format } => {
            setup::build_tools()?;
            setup::musl_tools()?;
            dist::dist(&root, &arch, &format).map(|_| ())
        }
        Task::Bench { quick, only } => {
            setup::build_tools()?;
            bench::bench(&root, quick, &only)
        }
        Task::Dashboards => dashboards::generate(&root),
        Task::Fuzz { seconds, targets } => fuzz::fuzz(&root, seconds, &targets),
        Task::Soak {
            processes,
            connects,
        } => {
            setup::all()?;
            build(&root, false)?;
            step(&format!(
                "soak: {processes} processes, {connects} connects (tests/src/soak.rs)"
            ));
            let mut cmd = cargo(&root);
            cmd.args(["test", "--package", "tests", "--", "--test-threads=1"])
                .args(["soak::", "--nocapture"])
                .env("TANZHEN_BIN", target_dir(&root).join("debug/tanzhen"))
                .env("TANZHEN_SOAK_PROCESSES", processes.to_string())
                .env("TANZHEN_SOAK_CONNECTS", connects.to_string());
            run(&mut cmd)
        }
        Task::GenSyscalls { debs } => gen_syscalls::run(&root, debs),
        Task::Test {
            filter,
            no_fuzz,
            no_vm,
        } => {
            setup::all()?;
            test(&root, filter.as_deref(), !no_fuzz && filter.is_none())?;
            if no_vm || filter.is_some() {
                return Ok(());
            }
            step("VM tests: Debian kernels under QEMU (skip with --no-vm)");
            vmtest::vm_test(
                &root,
                &[vmtest::Release::Bookworm, vmtest::Release::Bullseye],
                &[vmtest::Arch::X86_64, vmtest::Arch::Aarch64],
            )
        }
        Task::VmTest { kernel, arch } => {
            setup::build_tools()?;
            vmtest::vm_test(&root, &kernel, &arch)
        }
    }
}

fn build(root: &Path, release: bool) -> anyhow::Result<()> {
    step(&format!(
        "building the agent ({} profile; the first build compiles the eBPF object too, ~1-2 min)",
        if release { "release" } else { "dev" }
    ));
    let mut cmd = cargo(root);
    cmd.args(["build", "--package", "agent"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// Flags of the second end-to-end pass: what a 4.19 kernel without BTF forces.
const COMPAT_ARGS: &str = "--transport perf --btf none";
/// The end-to-end tests that read the probes' events, run again with [`COMPAT_ARGS`]: the
/// probe files, the OTLP tests whose spans come from TCP events, and the runtime detach test
/// (perf buffers closed with their probe).
const COMPAT_TESTS: &[&str] = &[
    "tcp::",
    "sched::",
    "syscalls::",
    "bench::bench_probe_",
    "otlp::grpc_spans_and_metrics",
    "otlp::spans_carry_the_container_id",
    "config::sighup_attaches_and_detaches_probes_keeping_counters",
];

fn test(root: &Path, filter: Option<&str>, fuzz: bool) -> anyhow::Result<()> {
    build(root, false)?;
    step("unit tests (agent, agent-common, xtask)");
    let mut cmd = cargo(root);
    cmd.args([
        "test",
        "--package",
        "agent",
        "--package",
        "agent-common",
        "--package",
        "xtask",
    ]);
    if let Some(f) = filter {
        cmd.args(["--", f]);
    }
    run(&mut cmd)?;

    if fuzz {
        fuzz::fuzz(root, fuzz::SMOKE_SECONDS, &[])?;
    }

    if !setup::is_root() {
        bail!(
            "the end-to-end tests load eBPF programs into the kernel and need root: \
             rerun as root (e.g. `sudo -E cargo xtask test`)"
        );
    }
    step("end-to-end tests: the real tanzhen binary against this kernel (one at a time)");
    let mut cmd = cargo(root);
    cmd.args(["test", "--package", "tests", "--", "--test-threads=1"]);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    cmd.env("TANZHEN_BIN", target_dir(root).join("debug/tanzhen"));
    run(&mut cmd)?;

    step(&format!(
        "end-to-end tests again, for old kernels: the probe tests with `{COMPAT_ARGS}` \
         (perf event arrays instead of the ring buffer, no kernel BTF) and tracepoint record \
         fields read through tracefs offsets"
    ));
    let started = std::time::Instant::now();
    let mut cmd = cargo(root);
    cmd.args(["test", "--package", "tests", "--", "--test-threads=1"]);
    match filter {
        Some(f) => {
            cmd.arg(f);
        }
        None => {
            cmd.args(COMPAT_TESTS);
        }
    }
    cmd.env("TANZHEN_BIN", target_dir(root).join("debug/tanzhen"));
    cmd.env("TANZHEN_E2E_EXTRA_ARGS", COMPAT_ARGS);
    // Older kernels lay some tracepoint records out differently: take the offsets path.
    cmd.env("TANZHEN_TEST_READ_BY_OFFSET", "1");
    run(&mut cmd)?;
    eprintln!(
        "(compatibility pass took {:.0} s)",
        started.elapsed().as_secs_f64()
    );

    if filter.is_some() {
        eprintln!(
            "==> a test filter was given: skipping the manifests, packages and vm-test steps \
             (run `cargo xtask test` without one for the whole suite)"
        );
        return Ok(());
    }

    step("deployment manifests: Kubernetes schemas and the DaemonSet's flags");
    run(Command::new("python3")
        .arg(root.join("deploy/test_manifests.py"))
        .arg(target_dir(root).join("debug/tanzhen")))?;

    step("packages: build the host's .deb and .rpm, install the .deb, run it, remove it");
    dist::package_test(root)
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the root) or `<root>/target`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d))
}

/// The workspace root (xtask lives one level below it). `cargo run` sets `CARGO_MANIFEST_DIR`
/// for the process too: that one wins, because a binary reused from a shared target directory
/// (another worktree's build) carries the other tree's compile-time path.
fn workspace_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .parent()
        .expect("xtask has a parent")
        .to_owned()
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// `cmd` as is when we are root, under `sudo -E` otherwise.
fn as_root(bin: &Path) -> Command {
    if setup::is_root() {
        Command::new(bin)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E").arg(bin);
        c
    }
}

/// Prints a progress headline.
pub fn step(msg: &str) {
    eprintln!("\n==> {msg}");
}

/// Runs `cmd` with inherited output; fails with the command line on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
