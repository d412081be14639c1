//! Kernel compatibility choices shared by `run` and `check`: the event transport (`--transport`),
//! the BTF given to aya's loader (`--btf`, `--btf-path`) and the TCP probe's attach method
//! (`--tcp-attach`).

use std::path::{Path, PathBuf};

use crate::transport::TransportChoice;

/// `--btf`: whether the kernel's own BTF is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BtfChoice {
    /// /sys/kernel/btf/vmlinux when the kernel has it (or the --btf-path file).
    Auto,
    /// Act as if the kernel had no BTF (what 4.19 kernels built without it look like).
    None,
}

/// `--tcp-attach`: how the TCP probe attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcpAttachChoice {
    /// The raw tracepoint where BTF gives struct sock's offsets, else the tracepoint where the
    /// kernel has it (4.16+), else kprobes.
    Auto,
    /// `inet_sock_set_state` as a raw tracepoint (needs BTF).
    RawTracepoint,
    /// The `sock:inet_sock_set_state` tracepoint.
    Tracepoint,
    /// kprobes on tcp_set_state and inet_csk_accept.
    Kprobe,
}

/// The TCP probe's resolved attach method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpAttach {
    RawTracepoint,
    Tracepoint,
    Kprobe,
}

impl TcpAttachChoice {
    /// `auto` picks kprobes only when tracefs has no `sock:inet_sock_set_state`, and the raw
    /// form of the tracepoint when `raw_ok` (BTF has the offsets it reads).
    #[must_use]
    pub fn resolve(self, tracefs: Option<&Path>, raw_ok: bool) -> TcpAttach {
        match self {
            Self::RawTracepoint => TcpAttach::RawTracepoint,
            Self::Tracepoint => TcpAttach::Tracepoint,
            Self::Kprobe => TcpAttach::Kprobe,
            Self::Auto => {
                let present = tracefs
                    .is_none_or(|t| t.join("events/sock/inet_sock_set_state/format").exists());
                match (present, raw_ok) {
                    (true, true) => TcpAttach::RawTracepoint,
                    (true, false) => TcpAttach::Tracepoint,
                    (false, _) => TcpAttach::Kprobe,
                }
            }
        }
    }
}

/// Flags about kernel compatibility, for `run` and `check`.
#[derive(Clone, Debug, clap::Args)]
pub struct CompatArgs {
    /// How kernel programs hand events (TCP connects, process exec/exit) to userspace: `auto`
    /// uses the BPF ring buffer where the kernel can create one (Linux 5.8+) and per-CPU perf
    /// buffers elsewhere; `ringbuf` or `perf` force one.
    #[arg(long, env = "TANZHEN_TRANSPORT", default_value = "auto", value_enum)]
    pub transport: TransportChoice,

    /// Kernel BTF: `auto` uses /sys/kernel/btf/vmlinux when present (or the --btf-path file);
    /// `none` acts as if the kernel had none. Every default probe works without BTF.
    #[arg(long, env = "TANZHEN_BTF", default_value = "auto", value_enum)]
    pub btf: BtfChoice,

    /// BTF file to use instead of /sys/kernel/btf/vmlinux (e.g. from BTFHub, for kernels built
    /// without BTF).
    #[arg(long, env = "TANZHEN_BTF_PATH", value_name = "FILE")]
    pub btf_path: Option<PathBuf>,

    /// How the TCP probe attaches: `auto` uses the inet_sock_set_state tracepoint, in its raw
    /// form (cheaper per state change) where BTF gives struct sock's offsets, and falls back to
    /// kprobes (tcp_set_state, inet_csk_accept) only where the
    /// tracepoint is missing; `raw-tracepoint`, `tracepoint` or `kprobe` force one.
    #[arg(long, env = "TANZHEN_TCP_ATTACH", default_value = "auto", value_enum)]
    pub tcp_attach: TcpAttachChoice,
}

/// Where the BTF given to the loader comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BtfSource {
    /// The kernel's /sys/kernel/btf/vmlinux.
    Kernel,
    /// A file named by --btf-path.
    File(PathBuf),
    /// No BTF (`--btf none`, or the kernel has none).
    None,
}

/// The kernel's BTF file.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

impl CompatArgs {
    /// The BTF source these flags select on a kernel where `kernel_btf` exists or not. `Err`
    /// is the one line to print (a usage error).
    pub fn btf_source(&self, kernel_btf: bool) -> Result<BtfSource, String> {
        match (self.btf, &self.btf_path) {
            (BtfChoice::None, Some(p)) => Err(format!(
                "--btf none and --btf-path {} contradict each other; drop one of them",
                p.display()
            )),
            (BtfChoice::None, None) => Ok(BtfSource::None),
            (BtfChoice::Auto, Some(p)) => Ok(BtfSource::File(p.clone())),
            (BtfChoice::Auto, None) if kernel_btf => Ok(BtfSource::Kernel),
            (BtfChoice::Auto, None) => Ok(BtfSource::None),
        }
    }
}

impl BtfSource {
    /// Reads and parses the BTF (`None` for [`BtfSource::None`]). `Err` is one line.
    pub fn load(&self) -> Result<Option<aya::Btf>, String> {
        Ok(self.load_inspecting(|_| ())?.0)
    }

    /// [`Self::load`], handing the raw bytes to `inspect` first (for what aya does not expose,
    /// e.g. struct offsets): the file is read once. `inspect` gets `None` without BTF.
    pub fn load_inspecting<T>(
        &self,
        inspect: impl FnOnce(Option<&[u8]>) -> T,
    ) -> Result<(Option<aya::Btf>, T), String> {
        let path = match self {
            Self::None => return Ok((None, inspect(None))),
            Self::Kernel => Path::new(KERNEL_BTF),
            Self::File(p) => p.as_path(),
        };
        let fail = |e: &dyn std::fmt::Display| {
            format!(
                "cannot read BTF from {}: {e} (give a vmlinux BTF file, or use --btf none)",
                path.display()
            )
        };
        let data = std::fs::read(path).map_err(|e| fail(&e))?;
        let seen = inspect(Some(&data));
        let btf = aya::Btf::parse(&data, aya::Endianness::default()).map_err(|e| fail(&e))?;
        Ok((Some(btf), seen))
    }

    /// How `check` and the logs describe it.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Kernel => format!("kernel ({KERNEL_BTF})"),
            Self::File(p) => format!("file {}", p.display()),
            Self::None => "none".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_attach_auto_follows_the_tracepoint() {
        let dir = std::env::temp_dir().join(format!("tanzhen-tcp-attach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for raw_ok in [false, true] {
            assert_eq!(
                TcpAttachChoice::Auto.resolve(Some(&dir), raw_ok),
                TcpAttach::Kprobe
            );
        }
        let tp = dir.join("events/sock/inet_sock_set_state");
        std::fs::create_dir_all(&tp).unwrap();
        std::fs::write(tp.join("format"), "").unwrap();
        assert_eq!(
            TcpAttachChoice::Auto.resolve(Some(&dir), false),
            TcpAttach::Tracepoint
        );
        assert_eq!(
            TcpAttachChoice::Auto.resolve(Some(&dir), true),
            TcpAttach::RawTracepoint
        );
        assert_eq!(
            TcpAttachChoice::Tracepoint.resolve(Some(&dir), true),
            TcpAttach::Tracepoint
        );
        assert_eq!(
            TcpAttachChoice::Kprobe.resolve(Some(&dir), true),
            TcpAttach::Kprobe
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn args(btf: BtfChoice, path: Option<&str>) -> CompatArgs {
        CompatArgs {
            transport: TransportChoice::Auto,
            btf,
            btf_path: path.map(PathBuf::from),
            tcp_attach: TcpAttachChoice::Auto,
        }
    }

    #[test]
    fn btf_sources() {
        assert_eq!(
            args(BtfChoice::Auto, None).btf_source(true),
            Ok(BtfSource::Kernel)
        );
        assert_eq!(
            args(BtfChoice::Auto, None).btf_source(false),
            Ok(BtfSource::None)
        );
        assert_eq!(
            args(BtfChoice::None, None).btf_source(true),
            Ok(BtfSource::None)
        );
        assert_eq!(
            args(BtfChoice::Auto, Some("/x")).btf_source(false),
            Ok(BtfSource::File("/x".into()))
        );
        assert!(
            args(BtfChoice::None, Some("/x"))
                .btf_source(true)
                .unwrap_err()
                .contains("contradict")
        );
        let e = BtfSource::File("/nonexistent.btf".into())
            .load()
            .unwrap_err();
        assert!(
            e.starts_with("cannot read BTF from /nonexistent.btf"),
            "{e}"
        );
    }
}
