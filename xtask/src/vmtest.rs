//! `cargo xtask vm-test`: boots Debian's own kernels under QEMU (TCG) with a small initramfs
//! (busybox-static, the static `tanzhen` and `tanzhen-vm-scenario` of that architecture) whose
//! `/init` mounts what the agent needs, runs `tanzhen check`, then the scenario, prints one
//! `VMTEST: PASS|FAIL` line and powers off.
//!
//! Matrix: Debian bookworm (6.1) and bullseye (5.10) × x86_64 and aarch64. Kernel and busybox
//! packages come from Debian's archive with `apt-get download`, through an apt configuration of
//! our own (own sources lists, state and cache under the cache directory; the host's apt is not
//! touched), into `$TANZHEN_CACHE_DIR/vm` (default `~/.cache/tanzhen/vm`). The kernel ABI is
//! resolved through the `linux-image-<arch>` metapackage; once extracted, a kernel is reused
//! until the cache directory is deleted. Serial logs go to `target/vm-test/`.

use std::{
    collections::VecDeque,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{dist, run, setup, step, target_dir};

/// A Debian release whose kernel is booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Release {
    /// Debian 12, Linux 6.1.
    Bookworm,
    /// Debian 11, Linux 5.10.
    Bullseye,
}

impl Release {
    fn name(self) -> &'static str {
        match self {
            Self::Bookworm => "bookworm",
            Self::Bullseye => "bullseye",
        }
    }
}

/// A guest architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    Aarch64,
}

impl Arch {
    /// The name `cargo xtask dist`/`build --target` use.
    fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// Debian's architecture name.
    fn deb(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    /// The QEMU command line up to `-kernel` (TCG; see /work/shared/VM-NOTES.md §6-8: arm64
    /// `-cpu max` emulates QARMA pointer authentication 3× slower than `pauth-impdef=on`).
    fn qemu(self) -> Command {
        let mut c = match self {
            Self::X86_64 => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args(["-accel", "tcg", "-M", "pc", "-cpu", "max"]);
                c
            }
            Self::Aarch64 => {
                let mut c = Command::new("qemu-system-aarch64");
                c.args(["-M", "virt", "-cpu", "max,pauth-impdef=on"]);
                c
            }
        };
        c.args([
            "-smp",
            "2",
            "-m",
            "1G",
            "-nographic",
            "-no-reboot",
            "-nic",
            "none",
        ]);
        c
    }

    fn append(self) -> &'static str {
        match self {
            Self::X86_64 => "console=ttyS0 panic=-1 loglevel=4 edd=off",
            Self::Aarch64 => "console=ttyAMA0 panic=-1 loglevel=4",
        }
    }
}

/// How long one VM may run before it counts as hung (TCG on a busy 2-core machine).
const VM_TIMEOUT: Duration = Duration::from_secs(600);
/// VMs booted at once (each TCG guest keeps about one host core busy).
const PARALLEL: usize = 2;
/// The static scenario binary (tests/src/bin).
const SCENARIO_BIN: &str = "tanzhen-vm-scenario";

/// One kernel to boot.
struct Job {
    release: Release,
    arch: Arch,
    kernel: PathBuf,
    kernel_version: String,
    initramfs: PathBuf,
    log: PathBuf,
}

/// The outcome of one boot.
struct Outcome {
    passed: bool,
    summary: String,
    wall: Duration,
}

/// Runs the matrix `releases` × `arches`; fails when any kernel does not pass.
pub fn vm_test(root: &Path, releases: &[Release], arches: &[Arch]) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::vm_tools()?;
    setup::musl_tools()?;
    let cache = setup::cache_dir().join("vm");
    let out = target_dir(root).join("vm-test");
    fs::create_dir_all(&out)?;
    fs::create_dir_all(&cache)?;

    let t = Instant::now();
    let mut kernels = Vec::new();
    for &release in releases {
        for &arch in arches {
            kernels.push((release, arch, kernel(&cache, release, arch)?));
        }
    }
    let mut busyboxes = Vec::new();
    for &arch in arches {
        busyboxes.push(busybox(&cache, arch)?);
    }
    let fetch = t.elapsed();

    let t = Instant::now();
    let mut initramfs = Vec::new();
    for (&arch, bb) in arches.iter().zip(&busyboxes) {
        let target = dist::musl_target(arch.name())?;
        let bins = dist::build_static(root, arch.name(), target, &[SCENARIO_BIN])?;
        let img = out.join(format!("initramfs-{}.cpio", arch.name()));
        write_initramfs(&img, bb, &bins.join("tanzhen"), &bins.join(SCENARIO_BIN))?;
        initramfs.push(img);
    }
    let build = t.elapsed();

    let jobs: Vec<Job> = kernels
        .into_iter()
        .map(|(release, arch, (kernel, kernel_version))| {
            let i = arches.iter().position(|a| *a == arch).unwrap_or(0);
            Job {
                release,
                arch,
                kernel,
                kernel_version,
                initramfs: initramfs[i].clone(),
                log: out.join(format!("{}-{}.log", release.name(), arch.name())),
            }
        })
        .collect();
    step(&format!(
        "booting {} kernel(s), {PARALLEL} at a time (TCG; serial logs in {})",
        jobs.len(),
        out.display()
    ));
    let t = Instant::now();
    let results = run_jobs(jobs);
    let boots = t.elapsed();

    let mut failed = 0;
    for (job, r) in &results {
        if !r.passed {
            failed += 1;
            let log = fs::read_to_string(&job.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "\n--- {} {} ({}): last 60 lines of {} ---",
                job.release.name(),
                job.arch.name(),
                job.kernel_version,
                job.log.display()
            );
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
    eprintln!();
    for (job, r) in &results {
        println!(
            "vm-test: {} {:<8} {:<7} {:<22} {:>5.1} s  {}",
            if r.passed { "PASS" } else { "FAIL" },
            job.release.name(),
            job.arch.name(),
            job.kernel_version,
            r.wall.as_secs_f64(),
            r.summary
        );
    }
    println!(
        "vm-test: {} passed, {failed} failed; packages {:.1} s, builds {:.1} s, boots {:.1} s, total {:.1} s",
        results.len() - failed,
        fetch.as_secs_f64(),
        build.as_secs_f64(),
        boots.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} of {} VM(s) failed", results.len());
    }
    Ok(())
}

/// Boots the jobs, `PARALLEL` at a time; returns them with their outcomes, in order.
fn run_jobs(jobs: Vec<Job>) -> Vec<(Job, Outcome)> {
    let n = jobs.len();
    let queue = Arc::new(Mutex::new(
        jobs.into_iter().enumerate().collect::<VecDeque<_>>(),
    ));
    let done = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..PARALLEL.min(n))
        .map(|_| {
            let (queue, done) = (queue.clone(), done.clone());
            thread::spawn(move || {
                while let Some((i, job)) = queue.lock().ok().and_then(|mut q| q.pop_front()) {
                    let outcome = boot(&job).unwrap_or_else(|e| Outcome {
                        passed: false,
                        summary: format!("error: {e:#}"),
                        wall: Duration::ZERO,
                    });
                    eprintln!(
                        "    {} {} {}: {} in {:.1} s",
                        if outcome.passed { "PASS" } else { "FAIL" },
                        job.release.name(),
                        job.arch.name(),
                        job.kernel_version,
                        outcome.wall.as_secs_f64()
                    );
                    if let Ok(mut d) = done.lock() {
                        d.push((i, job, outcome));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let mut done = Arc::try_unwrap(done)
        .ok()
        .and_then(|m| m.into_inner().ok())
        .unwrap_or_default();
    done.sort_by_key(|(i, _, _)| *i);
    done.into_iter().map(|(_, j, o)| (j, o)).collect()
}

/// Boots one kernel with its initramfs; the serial console goes to `job.log`.
fn boot(job: &Job) -> anyhow::Result<Outcome> {
    let log =
        fs::File::create(&job.log).with_context(|| format!("creating {}", job.log.display()))?;
    let mut cmd = job.arch.qemu();
    cmd.arg("-kernel")
        .arg(&job.kernel)
        .arg("-initrd")
        .arg(&job.initramfs)
        .args(["-append", job.arch.append()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if start.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let wall = start.elapsed();
    let text = fs::read_to_string(&job.log).unwrap_or_default();
    // QEMU exits 0 after `poweroff -f` whatever the result: the verdict is the guest's line.
    let verdict = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| l.starts_with("VMTEST: "));
    let (passed, summary) = match (status, verdict) {
        (None, _) => (false, format!("timed out after {} s", VM_TIMEOUT.as_secs())),
        (Some(_), Some(v)) => (
            v.starts_with("VMTEST: PASS"),
            v.trim_start_matches("VMTEST: ").to_owned(),
        ),
        (Some(s), None) => (false, format!("no VMTEST line; qemu exited with {s}")),
    };
    Ok(Outcome {
        passed,
        summary,
        wall,
    })
}

/// apt-get/apt-cache with the release's own configuration under `cache/apt/<release>`.
struct Apt {
    opts: Vec<String>,
}

impl Apt {
    /// Writes the configuration (sources for both architectures) and runs `apt-get update`.
    fn new(cache: &Path, release: Release) -> anyhow::Result<Self> {
        let dir = cache.join("apt").join(release.name());
        for d in [
            "state/lists/partial",
            "cache/archives/partial",
            "etc/sources.list.d",
            "etc/preferences.d",
        ] {
            fs::create_dir_all(dir.join(d))?;
        }
        let r = release.name();
        let key = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg";
        fs::write(
            dir.join("etc/sources.list"),
            format!(
                "deb [{key}] http://deb.debian.org/debian {r} main\n\
                 deb [{key}] http://deb.debian.org/debian {r}-updates main\n\
                 deb [{key}] http://deb.debian.org/debian-security {r}-security main\n"
            ),
        )?;
        fs::write(dir.join("status"), "")?;
        let p = |s: &str| dir.join(s).display().to_string();
        let opts = vec![
            format!("Dir::Etc::sourcelist={}", p("etc/sources.list")),
            format!("Dir::Etc::sourceparts={}", p("etc/sources.list.d")),
            format!("Dir::Etc::preferencesparts={}", p("etc/preferences.d")),
            format!("Dir::State={}", p("state")),
            format!("Dir::State::status={}", p("status")),
            format!("Dir::Cache={}", p("cache")),
            "APT::Architecture=amd64".into(),
            "APT::Architectures::=amd64".into(),
            "APT::Architectures::=arm64".into(),
            "Acquire::Languages=none".into(),
            // Package lists only (no AppStream metadata from the host's apt.conf.d).
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "Acquire::Retries=3".into(),
            // The cache belongs to the invoking user; apt's _apt sandbox user could not write it.
            "APT::Sandbox::User=root".into(),
        ];
        let apt = Self { opts };
        step(&format!(
            "apt-get update for {r} (own configuration in {})",
            dir.display()
        ));
        run(apt.cmd("apt-get").args(["update", "-q"]))
            .with_context(|| format!("apt-get update for {r} (is deb.debian.org reachable?)"))?;
        Ok(apt)
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        for o in &self.opts {
            c.arg("-o").arg(o);
        }
        if !setup::is_root() {
            // Sandbox::User=root only makes sense for root; others download as themselves.
            c.args(["-o", "APT::Sandbox::User="]);
        }
        c
    }

    /// The packages the versions of the metapackage `meta` (e.g. `linux-image-arm64:arm64`)
    /// depend on, newest first (the candidate, then older ones still in the archive).
    fn resolve(&self, meta: &str) -> anyhow::Result<Vec<String>> {
        let out = self.cmd("apt-cache").args(["show", meta]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut versions: Vec<(String, String)> = Vec::new();
        let mut version = String::new();
        for l in text.lines() {
            if let Some(v) = l.strip_prefix("Version: ") {
                v.trim().clone_into(&mut version);
            } else if let Some(d) = l.strip_prefix("Depends: ") {
                // `linux-image-6.1.0-56-arm64 (= 6.1.192-2)`: the first dependency's name.
                let name = d.split([' ', ',']).next().unwrap_or_default();
                if !name.is_empty() && !versions.iter().any(|(_, n)| n == name) {
                    versions.push((version.clone(), name.to_owned()));
                }
            }
        }
        versions.sort_by(|a, b| compare_versions(&b.0, &a.0));
        if versions.is_empty() {
            bail!("apt-cache show {meta} named no package: {}", text.trim());
        }
        Ok(versions.into_iter().map(|(_, n)| n).collect())
    }

    /// Downloads `pkg:arch` into `dir`; returns the .deb.
    fn download(&self, pkg: &str, arch: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(dir)?;
        let before: Vec<PathBuf> = debs_in(dir)?;
        run(self
            .cmd("apt-get")
            .args(["download", "-q", &format!("{pkg}:{arch}")])
            .current_dir(dir))?;
        let prefix = format!("{pkg}_");
        let mut found: Vec<PathBuf> = debs_in(dir)?
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(&format!("_{arch}.deb")))
            })
            .collect();
        found.sort_by_key(|p| !before.contains(p));
        found.pop().with_context(|| {
            format!(
                "apt-get download {pkg}:{arch} left no .deb in {}",
                dir.display()
            )
        })
    }
}

/// Orders Debian versions like `6.1.192-2` and `5.10.262-1` by their numeric fields (enough
/// for kernel metapackages; dpkg's full algorithm is not needed).
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let fields = |v: &str| -> Vec<u64> {
        v.split(|c: char| !c.is_ascii_digit())
            .filter(|f| !f.is_empty())
            .map(|f| f.parse().unwrap_or(0))
            .collect()
    };
    fields(a).cmp(&fields(b))
}

fn debs_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect())
}

/// Lazily created apt configurations, one per release.
static APTS: Mutex<Vec<(Release, Arc<Apt>)>> = Mutex::new(Vec::new());

fn apt_for(cache: &Path, release: Release) -> anyhow::Result<Arc<Apt>> {
    let mut apts = APTS
        .lock()
        .map_err(|_| anyhow::anyhow!("apt lock poisoned"))?;
    if let Some((_, a)) = apts.iter().find(|(r, _)| *r == release) {
        return Ok(a.clone());
    }
    let a = Arc::new(Apt::new(cache, release)?);
    apts.push((release, a.clone()));
    Ok(a)
}

/// The kernel image of `release`/`arch` and its version (e.g. `6.1.0-56-arm64`), downloaded and
/// extracted once into `cache/kernels/<release>-<arch>/`.
fn kernel(cache: &Path, release: Release, arch: Arch) -> anyhow::Result<(PathBuf, String)> {
    let dir = cache
        .join("kernels")
        .join(format!("{}-{}", release.name(), arch.deb()));
    let image = dir.join("vmlinuz");
    let version_file = dir.join("version");
    if image.exists()
        && let Ok(v) = fs::read_to_string(&version_file)
    {
        eprintln!(
            "==> kernel {} {}: cached ({})",
            release.name(),
            arch.deb(),
            v.trim()
        );
        return Ok((image, v.trim().to_owned()));
    }
    let apt = apt_for(cache, release)?;
    // Mirrors lag: when the newest kernel's .deb is not there (yet), take the previous one.
    let mut got = None;
    for pkg in apt.resolve(&format!("linux-image-{0}:{0}", arch.deb()))? {
        step(&format!(
            "downloading {pkg}:{} ({} kernel)",
            arch.deb(),
            release.name()
        ));
        match apt.download(&pkg, arch.deb(), &cache.join("debs")) {
            Ok(deb) => {
                got = Some((pkg, deb));
                break;
            }
            Err(e) => eprintln!("    {e:#}; trying an older kernel"),
        }
    }
    let Some((pkg, deb)) = got else {
        bail!(
            "no {} {} kernel package could be downloaded",
            release.name(),
            arch.deb()
        );
    };
    let version = pkg.trim_start_matches("linux-image-").to_owned();
    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    extract(
        &deb,
        &tmp,
        &[
            &format!("./boot/vmlinuz-{version}"),
            &format!("./boot/config-{version}"),
        ],
    )?;
    fs::rename(
        tmp.join(format!("boot/vmlinuz-{version}")),
        tmp.join("vmlinuz"),
    )?;
    fs::rename(
        tmp.join(format!("boot/config-{version}")),
        tmp.join("config"),
    )?;
    fs::write(tmp.join("version"), &version)?;
    let _ = fs::remove_dir_all(tmp.join("boot"));
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir)?;
    // The kernel is all we keep of the 60-70 MB package.
    let _ = fs::remove_file(&deb);
    Ok((image, version))
}

/// busybox-static's `/bin/busybox` for `arch` (from bookworm), cached as `cache/busybox-<deb>`.
fn busybox(cache: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let bin = cache.join(format!("busybox-{}", arch.deb()));
    if bin.exists() {
        eprintln!("==> busybox-static {}: cached", arch.deb());
        return Ok(bin);
    }
    let apt = apt_for(cache, Release::Bookworm)?;
    step(&format!("downloading busybox-static:{}", arch.deb()));
    let deb = apt.download("busybox-static", arch.deb(), &cache.join("debs"))?;
    let tmp = cache.join(format!("busybox-{}.tmp", arch.deb()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    extract(&deb, &tmp, &["./bin/busybox"])?;
    fs::rename(tmp.join("bin/busybox"), &bin)?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(bin)
}

/// Extracts `members` of a .deb's data archive into `dir` (dpkg-deb piped into tar).
fn extract(deb: &Path, dir: &Path, members: &[&str]) -> anyhow::Result<()> {
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting dpkg-deb")?;
    let stdout = dpkg.stdout.take().context("dpkg-deb stdout")?;
    let status = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dir)
        .args(members)
        .stdin(stdout)
        .status()
        .context("starting tar")?;
    let dstatus = dpkg.wait()?;
    if !status.success() || !dstatus.success() {
        bail!(
            "extracting {members:?} from {} failed (dpkg-deb {dstatus}, tar {status})",
            deb.display()
        );
    }
    Ok(())
}

/// The guest's `/init`: mounts, `tanzhen check`, the scenario, one verdict line, power off.
/// (`panic=-1` plus `-no-reboot` turn a crash of /init into an immediate QEMU exit.)
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin TANZHEN_BIN=/bin/tanzhen
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
id="kernel=$(uname -r) arch=$(uname -m)"
echo "init: $id uptime=$(cut -d' ' -f1 /proc/uptime)s"
# The tracepoint layouts tanzhen reads, for the format samples in agent/src/probe/testdata.
for f in sched/sched_switch sched/sched_wakeup sched/sched_wakeup_new sched/sched_process_exec sched/sched_process_exit sock/inet_sock_set_state; do
  echo "FORMAT-BEGIN $f"
  cat /sys/kernel/tracing/events/$f/format
  echo "FORMAT-END $f"
done
echo "init: --- tanzhen check ---"
tanzhen check
check=$?
echo "init: --- tanzhen-vm-scenario ---"
tanzhen-vm-scenario
scenario=$?
up=$(cut -d' ' -f1 /proc/uptime)
if [ "$check" = 0 ] && [ "$scenario" = 0 ]; then
  echo "VMTEST: PASS $id check=ok scenario=ok uptime=${up}s"
else
  echo "VMTEST: FAIL $id check_rc=$check scenario_rc=$scenario uptime=${up}s"
fi
sync
poweroff -f
"#;

/// Writes the initramfs: an uncompressed newc cpio archive (no root needed: ownership and the
/// device node are just header fields).
fn write_initramfs(
    path: &Path,
    busybox: &Path,
    tanzhen: &Path,
    scenario: &Path,
) -> anyhow::Result<()> {
    let mut cpio = Cpio::default();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc",
    ] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("init", INIT.as_bytes(), 0o755);
    for (name, src) in [
        ("bin/busybox", busybox),
        ("bin/tanzhen", tanzhen),
        (&format!("bin/{SCENARIO_BIN}"), scenario),
    ] {
        let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        cpio.file(name, &data, 0o755);
    }
    let bytes = cpio.finish();
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&bytes)?;
    Ok(())
}

/// A newc ("070701") cpio archive being built in memory.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, (0, 0), &[]);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, 1, (major, minor), &[]);
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100_000 | perm, 1, (0, 0), data);
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let size = u32::try_from(data.len()).expect("initramfs members are < 4 GiB");
        let namesize = u32::try_from(name.len() + 1).expect("short names");
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_newc_with_aligned_members_and_a_trailer() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", b"#!/bin/sh\n", 0o755);
        let b = c.finish();
        assert!(b.starts_with(b"070701"));
        assert_eq!(b.len() % 4, 0);
        // Header (110 bytes) + "bin\0" padded to 116, then the file's header at 116.
        assert_eq!(&b[116..122], b"070701");
        let mode = std::str::from_utf8(&b[116 + 14..116 + 22]).unwrap();
        assert_eq!(u32::from_str_radix(mode, 16).unwrap(), 0o100_755);
        let init = b.windows(10).position(|w| w == b"#!/bin/sh\n").unwrap();
        assert_eq!(init % 4, 0, "file data starts 4-byte aligned");
        assert!(b.windows(11).any(|w| w == b"TRAILER!!!\0"));
    }
}
