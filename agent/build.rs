//! Builds the kernel object (agent-ebpf, with nightly and bpf-linker through aya-build) so that
//! `loader.rs` can embed it, and records the git revision for `--version`.
//!
//! A missing toolchain piece stops the build with one line that says to run `cargo xtask setup`.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow, bail};

/// The nightly toolchain that builds the kernel side; `cargo xtask setup` prepares it.
const EBPF_TOOLCHAIN: &str = "nightly";
/// Kernel objects the agent embeds (bins of agent-ebpf).
const OBJECTS: &[&str] = &["tanzhen-ebpf", "tanzhen-ebpf-perf"];

fn main() -> anyhow::Result<()> {
    git_revision();
    // agent/src/fuzz.rs is compiled only by the fuzz crate, under cargo-fuzz's `--cfg fuzzing`.
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");

    let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if !skip {
        check_toolchain()?;
    }
    let pkg = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found in the workspace"))?;
    let root = pkg
        .manifest_path
        .parent()
        .context("agent-ebpf manifest has no parent")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )?;
    // With AYA_BUILD_SKIP (lint-only builds) leave empty objects so the crate still compiles;
    // `Ebpf::load` then fails at runtime with a message that names the cause.
    for o in OBJECTS {
        let p = out.join(o);
        if !p.exists() {
            std::fs::write(&p, b"")?;
        }
    }
    Ok(())
}

/// Fails with a one-line fix when nightly, rust-src or bpf-linker is missing.
fn check_toolchain() -> anyhow::Result<()> {
    const FIX: &str =
        "run `cargo xtask setup` (or set AYA_BUILD_SKIP=1 to build without the eBPF object)";
    let sysroot = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .map_err(|e| anyhow!("tanzhen: rustup not found ({e}): the eBPF build needs rustup's {EBPF_TOOLCHAIN} toolchain; {FIX}"))?;
    if !sysroot.status.success() {
        bail!(
            "tanzhen: the eBPF build needs the `{EBPF_TOOLCHAIN}` toolchain, which rustup does not have; {FIX}"
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot
        .join("lib/rustlib/src/rust/library/Cargo.lock")
        .exists()
    {
        bail!("tanzhen: the eBPF build needs rust-src for the `{EBPF_TOOLCHAIN}` toolchain; {FIX}");
    }
    let cache = env::var_os("TANZHEN_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|c| c.join("tanzhen"))
        });
    let cached = cache
        .map(|c| c.join("bin/bpf-linker"))
        .filter(|p| p.exists());
    println!("cargo:rerun-if-env-changed=TANZHEN_CACHE_DIR");
    let on_path = env::var_os("PATH")
        .is_some_and(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").exists()));
    if cached.is_none() && !on_path {
        bail!("tanzhen: bpf-linker not found; {FIX}");
    }
    if let Some(p) = cached {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    Ok(())
}

/// Exposes `TANZHEN_GIT_REV` (short hash, `-dirty` when the tree has changes, or `unknown`).
fn git_revision() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let rev = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    println!(
        "cargo:rustc-env=TANZHEN_GIT_REV={rev}{}",
        if dirty { "-dirty" } else { "" }
    );
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_absolute() {
            dir
        } else {
            PathBuf::from("..").join(dir)
        };
        println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", dir.join("index").display());
    }
}
