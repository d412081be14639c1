//! Kernel compatibility choices shared by `run` and `check`: the event transport (`--transport`)
//! and the BTF given to aya's loader (`--btf`, `--btf-path`).

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
        let parse = |p: &Path| {
            let fail = |e: &dyn std::fmt::Display| {
                format!(
                    "cannot read BTF from {}: {e} (give a vmlinux BTF file, or use --btf none)",
                    p.display()
                )
            };
            let data = std::fs::read(p).map_err(|e| fail(&e))?;
            aya::Btf::parse(&data, aya::Endianness::default()).map_err(|e| fail(&e))
        };
        match self {
            Self::None => Ok(None),
            Self::Kernel => parse(Path::new(KERNEL_BTF)).map(Some),
            Self::File(p) => parse(p).map(Some),
        }
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

    fn args(btf: BtfChoice, path: Option<&str>) -> CompatArgs {
        CompatArgs {
            transport: TransportChoice::Auto,
            btf,
            btf_path: path.map(PathBuf::from),
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
