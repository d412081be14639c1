//! `cargo xtask setup`: everything a fresh Debian 12 machine needs to build and test tanzhen.
//!
//! 1. Debian packages (promtool from `prometheus`, tmux, g++, libbpf-tools), installed with
//!    apt-get when missing.
//! 2. The nightly toolchain's rust-src (the eBPF object is built with `-Z build-std=core`).
//! 3. bpf-linker 0.13 linked against nightly's own libLLVM, built once per nightly into
//!    `$TANZHEN_CACHE_DIR` (default `~/.cache/tanzhen`) and exposed as `<cache>/bin/bpf-linker`,
//!    where `tools/bpf-linker-cpu` finds it.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{run, step};

/// Toolchain that builds the eBPF object (agent/build.rs uses the same name).
const EBPF_TOOLCHAIN: &str = "nightly";
/// bpf-linker release line tanzhen is built and tested with.
const BPF_LINKER_VERSION: &str = "0.13";
/// Debian packages: (package, a file it installs that proves it is there).
/// tmux runs `tanzhen watch` and `tanzhen top` under a pseudo-terminal in the e2e tests; g++
/// compiles libFuzzer for the fuzz step (libfuzzer-sys); libbpf-tools' `runqlat` is the
/// reference the sched e2e test cross-checks against (and, with its siblings, the peer
/// `cargo xtask bench` measures).
const APT_PACKAGES: &[(&str, &str)] = &[
    ("prometheus", "/usr/bin/promtool"),
    ("tmux", "/usr/bin/tmux"),
    ("g++", "/usr/bin/g++"),
    ("libbpf-tools", "/usr/sbin/runqlat"),
];

/// Static (musl) builds with the `tls` feature: C compilers for ring (see dist.rs `MUSL_CC`).
const MUSL_APT_PACKAGES: &[(&str, &str)] = &[
    ("musl-tools", "/usr/bin/musl-gcc"),
    ("gcc-aarch64-linux-gnu", "/usr/bin/aarch64-linux-gnu-gcc"),
];
/// `cargo xtask vm-test`: the emulators (the initramfs is written by xtask itself, no cpio).
const VM_APT_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("qemu-system-arm", "/usr/bin/qemu-system-aarch64"),
];

/// Runs every setup step.
pub fn all() -> anyhow::Result<()> {
    apt_packages()?;
    musl_tools()?;
    vm_tools()?;
    python_packages()?;
    build_tools()
}

/// Only the pieces the eBPF build needs: rust-src and bpf-linker.
pub fn build_tools() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    eprintln!("==> setup complete");
    Ok(())
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

fn apt_packages() -> anyhow::Result<()> {
    apt(APT_PACKAGES)
}

/// The C compilers of the static musl builds (`cargo xtask build --target`, `dist`, `vm-test`).
pub fn musl_tools() -> anyhow::Result<()> {
    apt(MUSL_APT_PACKAGES)
}

/// QEMU for `cargo xtask vm-test`.
pub fn vm_tools() -> anyhow::Result<()> {
    apt(VM_APT_PACKAGES)
}

/// Installs the Debian packages of `packages` (name, a file proving it is installed) that are
/// missing.
pub fn apt(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        eprintln!(
            "==> apt packages: present ({})",
            packages.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
        );
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}: run `sudo apt-get install -y {}`",
            missing.join(" ")
        );
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(apt(&["update", "-q"]).arg("-o").arg("Acquire::Retries=3"))
        .context("apt-get update failed (is the Debian mirror reachable?)")?;
    run(apt(&["install", "-y", "-q", "--no-install-recommends"]).args(&missing))
        .context("apt-get install failed")?;
    Ok(())
}

/// Python packages the manifest test uses: (pip requirement, module to import).
const PYTHON_PACKAGES: &[(&str, &str)] = &[("kubernetes-validate==1.37.0", "kubernetes_validate")];

fn python_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .filter(|(_, module)| {
            !Command::new("python3")
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(req, _)| *req)
        .collect();
    if missing.is_empty() {
        eprintln!("==> python packages: present");
        return Ok(());
    }
    step(&format!(
        "installing Python packages: {}",
        missing.join(" ")
    ));
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&missing))
    .context("pip install failed (is PyPI reachable?)")
}

fn rustup(args: &[&str]) -> Command {
    let mut c = Command::new("rustup");
    c.args(args);
    c
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    output(&mut rustup(&[
        "run",
        EBPF_TOOLCHAIN,
        "rustc",
        "--print",
        "sysroot",
    ]))
    .map(PathBuf::from)
}

fn rust_src() -> anyhow::Result<()> {
    if Command::new("rustup").arg("--version").output().is_err() {
        bail!(
            "rustup not found: tanzhen's eBPF build needs rustup (https://rustup.rs) with a nightly toolchain"
        );
    }
    if nightly_sysroot().is_err() {
        step(&format!(
            "installing the {EBPF_TOOLCHAIN} toolchain (minimal profile)"
        ));
        run(&mut rustup(&[
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
        ]))
        .context("rustup could not install the nightly toolchain")?;
    }
    let sysroot = nightly_sysroot()?;
    if sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .exists()
    {
        eprintln!("==> rust-src for {EBPF_TOOLCHAIN}: present");
        return Ok(());
    }
    step(&format!(
        "adding rust-src to the {EBPF_TOOLCHAIN} toolchain"
    ));
    run(&mut rustup(&[
        "component",
        "add",
        "rust-src",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
}

/// The cache directory (`$TANZHEN_CACHE_DIR`, else `$XDG_CACHE_HOME/tanzhen`, else `~/.cache/tanzhen`).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = env::var_os("TANZHEN_CACHE_DIR") {
        return d.into();
    }
    env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("tanzhen")
}

/// What identifies the nightly's LLVM: release, commit and LLVM major version.
struct Nightly {
    release: String,
    commit: String,
    llvm_major: String,
}

fn nightly_identity() -> anyhow::Result<Nightly> {
    let vv = output(&mut rustup(&["run", EBPF_TOOLCHAIN, "rustc", "-vV"]))?;
    let field = |k: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_owned())
    };
    let release = field("release:").context("rustc -vV printed no release")?;
    let commit = field("commit-hash:").unwrap_or_else(|| "unknown".into());
    let llvm = field("LLVM version:").context("rustc -vV printed no LLVM version")?;
    let llvm_major = llvm.split('.').next().unwrap_or_default().to_owned();
    Ok(Nightly {
        release,
        commit: commit.chars().take(9).collect(),
        llvm_major,
    })
}

fn linker_works(bin: &Path) -> bool {
    // rustup's proxy puts the nightly's lib dir on LD_LIBRARY_PATH, as it does when rustc
    // invokes the linker during the real build.
    rustup(&["run", EBPF_TOOLCHAIN])
        .arg(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn bpf_linker() -> anyhow::Result<()> {
    let n = nightly_identity()?;
    let cache = cache_dir();
    let dir = cache.join(format!(
        "bpf-linker-{BPF_LINKER_VERSION}-{}-{}",
        n.release, n.commit
    ));
    let bin = dir.join("bin/bpf-linker");
    let link = cache.join("bin/bpf-linker");
    if !(bin.exists() && linker_works(&bin)) {
        build_bpf_linker(&n, &dir)?;
    } else {
        eprintln!(
            "==> bpf-linker {BPF_LINKER_VERSION} for rustc {} ({}): cached in {}",
            n.release,
            n.commit,
            dir.display()
        );
    }
    fs::create_dir_all(cache.join("bin"))?;
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(&bin, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    if !linker_works(&link) {
        bail!(
            "{} does not run; delete {} and rerun `cargo xtask setup`",
            link.display(),
            dir.display()
        );
    }
    Ok(())
}

fn build_bpf_linker(n: &Nightly, dir: &Path) -> anyhow::Result<()> {
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against rustc {}'s LLVM {} into {} (~1-3 min)",
        n.release,
        n.llvm_major,
        dir.display()
    ));
    // bpf-linker links libLLVM.so from $LLVM_PREFIX/lib: point that at the toolchain's own
    // libLLVM so the linker and rustc agree on the bitcode format.
    let libdir = nightly_sysroot()?.join("lib");
    let llvm_lib = dir.join("llvm/lib");
    fs::create_dir_all(&llvm_lib)?;
    let mut found = false;
    for e in fs::read_dir(&libdir).with_context(|| format!("reading {}", libdir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        let target = libdir.join(&name);
        let links: Vec<String> =
            if name.starts_with(&format!("libLLVM-{}", n.llvm_major)) && name.ends_with(".so") {
                found = true;
                vec!["libLLVM.so".into(), name.clone()]
            } else if name.starts_with("libLLVM.so.") {
                vec![name.clone()]
            } else {
                continue;
            };
        for l in links {
            let p = llvm_lib.join(l);
            let _ = fs::remove_file(&p);
            std::os::unix::fs::symlink(&target, &p)?;
        }
    }
    if !found {
        bail!(
            "no libLLVM-{}*.so in {}: add the llvm-tools or rustc component of the {EBPF_TOOLCHAIN} toolchain",
            n.llvm_major,
            libdir.display()
        );
    }
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["install", "bpf-linker", "--locked", "--no-default-features"])
        .args(["--version", &format!("~{BPF_LINKER_VERSION}")])
        .args(["--features", &format!("llvm-{}", n.llvm_major)])
        .arg("--root")
        .arg(dir)
        .arg("--target-dir")
        .arg(dir.parent().unwrap_or(dir).join("bpf-linker-target"))
        .env("LLVM_PREFIX", dir.join("llvm"))
        // The outer cargo's settings (xtask's target dir, rustflags) must not leak in.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut cmd).context(
        "building bpf-linker failed: crates.io must be reachable, and bpf-linker must support this LLVM version",
    )
}
