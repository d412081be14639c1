//! The probe catalogue: what each probe measures, the kernel hooks it needs, and whether this
//! build ships it. `tanzhen probes`, `tanzhen check` and `--probes` all read it.

pub mod bench;
pub mod listeners;
pub mod sched;
pub mod syscall_names;
pub mod syscalls;
pub mod tcp;

use std::fmt;

use crate::kernel::KernelError;

/// Testing only: set, the tracepoint programs (tcp, sched) read record fields through the tracefs
/// offsets even on kernels with the known layout, as they do on kernels with another one (the
/// e2e suite's old-kernel pass sets it).
const READ_BY_OFFSET_ENV: &str = "TANZHEN_TEST_READ_BY_OFFSET";

/// Whether [`READ_BY_OFFSET_ENV`] asks the tracepoint programs to take the offsets path.
#[must_use]
pub fn read_by_offset_forced() -> bool {
    std::env::var_os(READ_BY_OFFSET_ENV).is_some()
}

/// Why a probe could not attach or run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probe `{probe}` cannot run on this kernel: {reason}")]
    Unsupported { probe: &'static str, reason: String },
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("program `{0}` is missing from the embedded eBPF object (a build problem)")]
    MissingProgram(&'static str),
    #[error("map `{0}` is missing from the embedded eBPF object (a build problem)")]
    MissingMap(&'static str),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A probe the agent knows about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeKind {
    Tcp,
    Syscalls,
    Sched,
    /// Hidden: `cargo xtask bench`'s event source ([`BENCH`]), never in [`PROBES`].
    Bench,
}

/// Program `name` of the object as a `P` (`TracePoint`, `RawTracePoint`, `KProbe`, ...), to
/// load and attach.
pub fn program<'a, P>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut P, ProbeError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .ok_or(ProbeError::MissingProgram(name))?
        .try_into()?)
}

/// Takes the map `name` out of the object as a typed map (the probe's drain task owns it).
pub fn take<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    Ok(T::try_from(
        ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))?,
    )?)
}

/// A kernel attach point.
#[derive(Clone, Copy, Debug)]
pub enum Hook {
    /// A tracepoint `category:name` (tracefs `events/<category>/<name>`).
    Tracepoint {
        category: &'static str,
        name: &'static str,
    },
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tracepoint { category, name } => write!(f, "tracepoint {category}:{name}"),
        }
    }
}

/// Static description of a probe.
#[derive(Debug)]
pub struct ProbeInfo {
    pub kind: ProbeKind,
    pub name: &'static str,
    pub summary: &'static str,
    pub metrics: &'static [&'static str],
    pub hooks: &'static [Hook],
    /// Oldest kernel the probe supports, as (major, minor).
    pub min_kernel: (u32, u32),
    /// Whether this build of tanzhen ships the probe.
    pub built: bool,
}

/// Every probe, in display order.
pub const PROBES: &[ProbeInfo] = &[
    ProbeInfo {
        kind: ProbeKind::Tcp,
        name: "tcp",
        summary: "TCP connect attempts (outcome, latency SYN_SENT->ESTABLISHED) and accepted connections; kprobes on tcp_set_state/inet_csk_accept where the tracepoint is missing (--tcp-attach)",
        metrics: &[
            "tanzhen_tcp_connects_total{comm,outcome}",
            "tanzhen_tcp_connect_duration_seconds",
            "tanzhen_tcp_accepts_total{comm}",
        ],
        hooks: &[Hook::Tracepoint {
            category: "sock",
            name: "inet_sock_set_state",
        }],
        min_kernel: (4, 16),
        built: true,
    },
    ProbeInfo {
        kind: ProbeKind::Syscalls,
        name: "syscalls",
        summary: "system call rates, errors and latency per process, aggregated in the kernel (attached as raw tracepoints)",
        metrics: &[
            "tanzhen_syscalls_total{comm,syscall}",
            "tanzhen_syscall_errors_total{comm,syscall}",
            "tanzhen_syscall_duration_seconds{syscall}",
            "tanzhen_file_opens_total{comm,result}",
        ],
        hooks: &[
            Hook::Tracepoint {
                category: "raw_syscalls",
                name: "sys_enter",
            },
            Hook::Tracepoint {
                category: "raw_syscalls",
                name: "sys_exit",
            },
        ],
        min_kernel: (4, 19),
        built: true,
    },
    ProbeInfo {
        kind: ProbeKind::Sched,
        name: "sched",
        summary: "run-queue latency, context switches and process lifecycle",
        metrics: &[
            "tanzhen_sched_runqueue_latency_seconds{comm,namespace,pod,container,workload}",
            "tanzhen_sched_context_switches_total{comm,kind}",
            "tanzhen_process_execs_total{comm}",
            "tanzhen_process_exits_total{comm}",
        ],
        hooks: &[
            Hook::Tracepoint {
                category: "sched",
                name: "sched_wakeup",
            },
            Hook::Tracepoint {
                category: "sched",
                name: "sched_wakeup_new",
            },
            Hook::Tracepoint {
                category: "sched",
                name: "sched_switch",
            },
            Hook::Tracepoint {
                category: "sched",
                name: "sched_process_exec",
            },
            Hook::Tracepoint {
                category: "sched",
                name: "sched_process_exit",
            },
        ],
        min_kernel: (4, 19),
        built: true,
    },
];

/// The bench probe (`cargo xtask bench`'s event throughput item): outside [`PROBES`], so
/// `tanzhen probes`, `tanzhen check`, the help and `all` leave it out; `--probes bench` names it.
pub const BENCH: ProbeInfo = ProbeInfo {
    kind: ProbeKind::Bench,
    name: "bench",
    summary: "benchmark event source: one event per getppid call of the --pid process (raw tracepoint sys_enter), counted after the event transport",
    metrics: &["tanzhen_bench_events_total"],
    hooks: &[Hook::Tracepoint {
        category: "raw_syscalls",
        name: "sys_enter",
    }],
    min_kernel: (4, 19),
    built: true,
};

impl ProbeInfo {
    /// The hooks as one comma-separated line.
    #[must_use]
    pub fn hook_list(&self) -> String {
        self.hooks
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl ProbeKind {
    /// The catalogue entry of this probe.
    #[must_use]
    pub fn info(self) -> &'static ProbeInfo {
        if self == Self::Bench {
            return &BENCH;
        }
        PROBES
            .iter()
            .find(|p| p.kind == self)
            .expect("every ProbeKind is in PROBES")
    }

    /// The probe's name as the CLI spells it.
    #[must_use]
    pub fn name(self) -> &'static str {
        self.info().name
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Probes of `catalogue` this build ships, comma-separated (for messages).
fn available_in(catalogue: &[ProbeInfo]) -> String {
    catalogue
        .iter()
        .filter(|p| p.built)
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A parsed `--probes` value: distinct probes in catalogue order, and whether `all` was
/// asked for (then a probe this kernel cannot run is skipped with an error log instead of
/// stopping the agent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeList(pub Vec<ProbeKind>, bool);

impl ProbeList {
    /// True when the list came from `all`: probes that cannot attach are skipped.
    #[must_use]
    pub fn lenient(&self) -> bool {
        self.1
    }
}

impl std::ops::Deref for ProbeList {
    type Target = [ProbeKind];
    fn deref(&self) -> &[ProbeKind] {
        &self.0
    }
}

/// Parses a `--probes` list: names separated by commas, or `all` for every built probe.
/// Duplicates are ignored; order follows [`PROBES`].
pub fn parse_list(s: &str) -> Result<ProbeList, String> {
    parse_in(PROBES, s)
}

/// [`parse_list`] against a given catalogue (tests use one with a probe that is not built).
fn parse_in(catalogue: &[ProbeInfo], s: &str) -> Result<ProbeList, String> {
    let available_names = || available_in(catalogue);
    let mut out = Vec::new();
    let mut all = false;
    for name in s.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(format!(
                "empty probe name in `{s}`; available probes: {}",
                available_names()
            ));
        }
        if name == "all" {
            out.extend(catalogue.iter().filter(|p| p.built).map(|p| p.kind));
            all = true;
            continue;
        }
        if name == BENCH.name {
            out.push(ProbeKind::Bench);
            continue;
        }
        match catalogue.iter().find(|p| p.name == name) {
            Some(p) if p.built => out.push(p.kind),
            Some(p) => {
                return Err(format!(
                    "probe `{}` is not built into this version of tanzhen yet; available probes: {}",
                    p.name,
                    available_names()
                ));
            }
            None => {
                return Err(format!(
                    "unknown probe `{name}`; available probes: {}",
                    available_names()
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(ProbeList(out, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_all() {
        assert_eq!(parse_list("tcp").unwrap().0, vec![ProbeKind::Tcp]);
        assert_eq!(parse_list("tcp, tcp").unwrap().0, vec![ProbeKind::Tcp]);
        assert_eq!(
            parse_list("all").unwrap().0,
            vec![ProbeKind::Tcp, ProbeKind::Syscalls, ProbeKind::Sched]
        );
        assert_eq!(
            parse_list("bench").unwrap().0,
            vec![ProbeKind::Bench],
            "hidden, but parsed by name"
        );
        assert_eq!(
            parse_list("sched,tcp").unwrap().0,
            vec![ProbeKind::Tcp, ProbeKind::Sched]
        );
    }

    #[test]
    fn rejects_unknown_and_unbuilt_with_the_available_list() {
        let e = parse_list("tcp,bogus").unwrap_err();
        assert!(
            e.contains("unknown probe `bogus`")
                && e.contains("available probes: tcp, syscalls, sched"),
            "{e}"
        );
        // Every probe ships today: check the "not built" path on a catalogue with one that
        // does not.
        let catalogue = [
            ProbeInfo {
                built: true,
                ..*ProbeKind::Tcp.info()
            },
            ProbeInfo {
                built: false,
                ..*ProbeKind::Sched.info()
            },
        ];
        let e = parse_in(&catalogue, "sched").unwrap_err();
        assert!(
            e.contains("probe `sched` is not built") && e.contains("available probes: tcp"),
            "{e}"
        );
        assert_eq!(parse_in(&catalogue, "all").unwrap().0, vec![ProbeKind::Tcp]);
        assert!(
            parse_list("tcp,,")
                .unwrap_err()
                .contains("empty probe name")
        );
    }
}
