//! `tanzhen check` and `tanzhen probes`: what this kernel supports, and for every requested probe
//! how it will attach and send its events, or exactly why it cannot load.
//!
//! The report is built once ([`Report`]) and printed as a table or as JSON (`--output json`,
//! schema in README.md). BPF features are probed by trying them (`features.rs`); each probe's
//! programs are loaded into the kernel (and unloaded, never attached), so the verifier itself
//! says whether they can run here.

use std::fmt::Write as _;

use aya::{Ebpf, programs::Program};
use serde_json::{Value, json};

use crate::{
    caps,
    cli::{CheckArgs, OutputFormat},
    compat::{BtfSource, TcpAttach},
    features::{self, Features, Probed},
    kernel, loader,
    probe::{Hook, PROBES, ProbeKind, sched, syscalls, tcp},
    transport::Transport,
};

/// How a probe would run here, or why it cannot.
#[derive(Debug)]
struct ProbeReport {
    name: &'static str,
    /// `tracepoint`, `raw_tracepoint` or `kprobe`.
    method: &'static str,
    /// The hooks (`tracepoint sock:inet_sock_set_state`, ...).
    attach: String,
    /// The event transport, for probes that send events.
    transport: Option<Transport>,
    /// Why it cannot load; empty when it can.
    problems: Vec<String>,
}

/// Everything `check` found.
struct Report {
    json: Value,
    probes: Vec<ProbeReport>,
}

/// Runs the checks and prints the report; `Ok(true)` when every requested probe can load.
/// `Err` is a usage error (one line, exit 2).
pub fn check(args: &CheckArgs) -> Result<bool, String> {
    let report = build(args)?;
    let ok = report.probes.iter().all(|p| p.problems.is_empty());
    match args.output {
        OutputFormat::Json => {
            let mut v = report.json;
            v["probes"] = Value::Array(report.probes.iter().map(probe_json).collect());
            v["ok"] = Value::Bool(ok);
            println!(
                "{}",
                serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
            );
        }
        OutputFormat::Table => print!("{}", table(&report.json, &report.probes)),
    }
    Ok(ok)
}

fn probe_json(p: &ProbeReport) -> Value {
    json!({
        "name": p.name,
        "ok": p.problems.is_empty(),
        "attach_method": p.method,
        "attach": p.attach,
        "transport": p.transport.map(Transport::name),
        "problems": p.problems,
    })
}

fn probed(p: &Probed) -> Value {
    p.supported.map_or(Value::Null, Value::Bool)
}

fn build(args: &CheckArgs) -> Result<Report, String> {
    let uname = kernel::uname();
    let version = kernel::parse_release(&uname.release);
    let kernel_btf = kernel::has_btf();
    let btf_source = args.compat.btf_source(kernel_btf)?;
    let (btf, sock_layout) = btf_source.load_inspecting(tcp::SockLayout::from_btf)?;

    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = caps::parse_cap_eff(&status);
    let caps_missing = cap_eff.and_then(caps::missing);
    let has = |bit: u32| cap_eff.map(|e| e & (1u64 << bit) != 0);

    let feats = Features::probe();
    let tracefs = kernel::tracefs();
    let tracefs_path = tracefs.as_ref().ok().map(|t| t.path.clone());
    let kprobes = features::kprobes(tracefs_path.as_deref());
    let lockdown = features::lockdown();

    let ringbuf_result = match (&feats.ringbuf.supported, &feats.ringbuf.error) {
        (Some(b), _) => Ok(*b),
        (None, e) => Err(e.clone().unwrap_or_default()),
    };
    let transport = args.compat.transport.resolve(&ringbuf_result);

    let mut json = json!({
        "kernel": {
            "release": uname.release,
            "arch": uname.machine,
        },
        "btf": {
            "kernel": kernel_btf,
            "source": match &btf_source {
                BtfSource::Kernel => "kernel",
                BtfSource::File(_) => "file",
                BtfSource::None => "none",
            },
            "path": match &btf_source {
                BtfSource::Kernel => Some(crate::compat::KERNEL_BTF.to_owned()),
                BtfSource::File(p) => Some(p.display().to_string()),
                BtfSource::None => None,
            },
        },
        "features": {
            "ringbuf": probed(&feats.ringbuf),
            "perf_event_array": probed(&feats.perf_event_array),
            "global_data": probed(&feats.global_data),
            "bounded_loops": probed(&feats.bounded_loops),
            "probe_read_kernel": probed(&feats.probe_read_kernel),
            "get_current_cgroup_id": probed(&feats.cgroup_id_helper),
            "tracepoint_programs": probed(&feats.tracepoint_programs),
            "raw_tracepoint_programs": probed(&feats.raw_tracepoint_programs),
            "kprobe_programs": probed(&feats.kprobe_programs),
        },
        "tracefs": match &tracefs {
            Ok(t) => json!({"path": t.path.display().to_string(), "mounted_now": t.mounted_now, "error": null}),
            Err(e) => json!({"path": null, "mounted_now": false, "error": e.to_string()}),
        },
        "kprobes": match &kprobes {
            Ok(how) => json!({"supported": true, "detail": how}),
            Err(why) => json!({"supported": false, "detail": why}),
        },
        "lockdown": lockdown,
        "capabilities": {
            "cap_eff": cap_eff.map(|e| format!("{e:016x}")),
            "CAP_BPF": has(caps::CAP_BPF),
            "CAP_PERFMON": has(caps::CAP_PERFMON),
            "CAP_SYS_ADMIN": has(caps::CAP_SYS_ADMIN),
            "enough": caps_missing.is_none(),
        },
        "transport": {
            "requested": format!("{:?}", args.compat.transport).to_lowercase(),
            "selected": transport.as_ref().ok().map(|t| t.name()),
            "error": transport.as_ref().err(),
        },
    });
    let feature_errors: serde_json::Map<String, Value> = [
        ("ringbuf", &feats.ringbuf),
        ("perf_event_array", &feats.perf_event_array),
        ("bounded_loops", &feats.bounded_loops),
        ("get_current_cgroup_id", &feats.cgroup_id_helper),
        ("tracepoint_programs", &feats.tracepoint_programs),
        ("raw_tracepoint_programs", &feats.raw_tracepoint_programs),
        ("kprobe_programs", &feats.kprobe_programs),
    ]
    .into_iter()
    .filter_map(|(k, p)| p.error.clone().map(|e| (k.to_owned(), json!(e))))
    .collect();
    json["feature_errors"] = Value::Object(feature_errors);

    // Load the object of the chosen transport, then each requested probe's programs.
    let mut ebpf: Result<Ebpf, String> = match (&caps_missing, &transport) {
        (Some(line), _) => Err(line.clone()),
        (None, Err(e)) => Err(e.clone()),
        (None, Ok(t)) => loader::load(*t, btf.as_ref(), &[]).map_err(|e| e.to_string()),
    };
    // What the TCP probe's raw tracepoint would read (only BTF has it).
    let raw_offsets = sock_layout.raw;
    let mut probes = Vec::new();
    for &kind in args.probes.iter() {
        let info = kind.info();
        let mut problems = Vec::new();
        let tcp_attach = args
            .compat
            .tcp_attach
            .resolve(tracefs_path.as_deref(), raw_offsets.is_ok());
        let kprobe_path = kind == ProbeKind::Tcp && tcp_attach == TcpAttach::Kprobe;
        let raw_path = kind == ProbeKind::Tcp && tcp_attach == TcpAttach::RawTracepoint;
        if raw_path && let Err(why) = &raw_offsets {
            problems.push(format!(
                "no struct sock offsets for the raw tracepoint: {why}"
            ));
        }
        if let Some(v) = version
            && v < info.min_kernel
        {
            problems.push(format!(
                "needs kernel >= {}.{}",
                info.min_kernel.0, info.min_kernel.1
            ));
        }
        match &tracefs {
            Ok(_) if kprobe_path => {
                if let Err(why) = &kprobes {
                    problems.push(format!("kprobes are not available: {why}"));
                }
                problems.extend(missing_functions(tcp::KPROBES));
            }
            Ok(t) => {
                for hook in info.hooks {
                    let Hook::Tracepoint { category, name } = *hook;
                    if !t
                        .path
                        .join("events")
                        .join(category)
                        .join(name)
                        .join("format")
                        .exists()
                    {
                        problems.push(format!("{hook} missing"));
                    }
                }
                if problems.is_empty()
                    && let Err(e) = layout(kind, &t.path)
                {
                    problems.push(e);
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
        let (attach, sends_events, programs) = match kind {
            ProbeKind::Tcp => (
                tcp::describe(tcp_attach).to_owned(),
                true,
                tcp::programs(tcp_attach),
            ),
            ProbeKind::Sched => (info.hook_list(), true, &sched::HOOKS[..]),
            ProbeKind::Syscalls => (
                "raw tracepoints raw_syscalls:sys_enter, raw_syscalls:sys_exit, sched:sched_switch, \
                 sched:sched_process_exit"
                    .to_owned(),
                false,
                syscalls::PROGRAMS,
            ),
            ProbeKind::Bench => (
                "raw tracepoint raw_syscalls:sys_enter".to_owned(),
                true,
                crate::probe::bench::PROGRAMS,
            ),
        };
        match &mut ebpf {
            Ok(ebpf) => problems.extend(load_programs(ebpf, programs)),
            Err(e) => problems.push(format!("cannot load the eBPF object: {e}")),
        }
        let method = match kind {
            ProbeKind::Syscalls | ProbeKind::Bench => "raw_tracepoint",
            _ if raw_path => "raw_tracepoint",
            _ if kprobe_path => "kprobe",
            _ => "tracepoint",
        };
        probes.push(ProbeReport {
            name: info.name,
            method,
            attach,
            transport: if sends_events {
                transport.as_ref().ok().copied()
            } else {
                None
            },
            problems,
        });
    }
    Ok(Report { json, probes })
}

/// Kernel functions a kprobe needs that /proc/kallsyms does not list (`required` ones only).
fn missing_functions(kprobes: &[(&str, &str, bool)]) -> Vec<String> {
    let Ok(syms) = std::fs::read_to_string("/proc/kallsyms") else {
        return Vec::new();
    };
    let known: std::collections::HashSet<&str> = syms
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    kprobes
        .iter()
        .filter(|&&(_, f, required)| required && !known.contains(f))
        .map(|&(_, f, _)| format!("kernel function {f} is not in /proc/kallsyms"))
        .collect()
}

/// Checks that the tracepoints' fields are where the probe reads them.
fn layout(kind: ProbeKind, tracefs: &std::path::Path) -> Result<(), String> {
    match kind {
        ProbeKind::Tcp => {
            let f = kernel::tracepoint_format(tracefs, "sock", "inet_sock_set_state")
                .map_err(|e| e.to_string())?;
            tcp::offsets(&f).map(|_| ()).map_err(|e| e.to_string())
        }
        ProbeKind::Sched => {
            let f = sched::SchedFormats::read(tracefs).map_err(|e| e.to_string())?;
            sched::config(&f).map(|_| ()).map_err(|e| e.to_string())
        }
        ProbeKind::Syscalls | ProbeKind::Bench => Ok(()),
    }
}

/// Loads each program into the kernel (the verifier runs), then unloads it; returns one line
/// per program that failed.
fn load_programs(ebpf: &mut Ebpf, names: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    for &name in names {
        let res = match ebpf.program_mut(name) {
            None => Err(format!("program `{name}` is missing from the eBPF object")),
            Some(Program::TracePoint(p)) => {
                p.load().and_then(|()| p.unload()).map_err(|e| short(&e))
            }
            Some(Program::RawTracePoint(p)) => {
                p.load().and_then(|()| p.unload()).map_err(|e| short(&e))
            }
            Some(Program::KProbe(p)) => p.load().and_then(|()| p.unload()).map_err(|e| short(&e)),
            Some(_) => Err(format!("program `{name}` has an unexpected type")),
        };
        if let Err(e) = res {
            problems.push(format!("program {name} does not load: {e}"));
        }
    }
    problems
}

/// A load error on one line: its first line plus the verifier's last words.
fn short(e: &aya::programs::ProgramError) -> String {
    let text = match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let last: Vec<&str> = log
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("processed ")
                        && !l.starts_with("verification time")
                        && !l.starts_with("stack depth")
                })
                .collect();
            let tail = last.iter().rev().take(2).rev().copied().collect::<Vec<_>>();
            if tail.is_empty() {
                format!("BPF_PROG_LOAD: {io_error}")
            } else {
                format!("BPF_PROG_LOAD: {io_error}; verifier: {}", tail.join(" / "))
            }
        }
        e => e.to_string(),
    };
    text.replace('\n', " ")
}

fn yes_no(v: &Value) -> String {
    match v {
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::Null => "unknown".into(),
        v => v.to_string(),
    }
}

fn table(j: &Value, probes: &[ProbeReport]) -> String {
    let mut out = String::new();
    let mut row = |k: &str, v: &str| {
        let _ = writeln!(out, "{k:<26} {v}");
    };
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    row("kernel release", &s(&j["kernel"]["release"]));
    row("architecture", &s(&j["kernel"]["arch"]));
    let btf = &j["btf"];
    row(
        "kernel BTF",
        if btf["kernel"] == json!(true) {
            "present (/sys/kernel/btf/vmlinux)"
        } else {
            "absent (tanzhen does not need it)"
        },
    );
    row(
        "BTF used",
        &match btf["path"].as_str() {
            Some(p) => format!("{} ({p})", s(&btf["source"])),
            None => s(&btf["source"]),
        },
    );
    let f = &j["features"];
    let errs = &j["feature_errors"];
    for (key, label, note) in [
        ("ringbuf", "BPF ring buffer", "(5.8; else perf buffers)"),
        ("perf_event_array", "perf event array", "(4.3)"),
        ("global_data", "global data", "(5.2; not needed)"),
        ("bounded_loops", "bounded loops", "(5.3; not needed)"),
        (
            "probe_read_kernel",
            "bpf_probe_read_kernel",
            "(5.5; not needed)",
        ),
        ("get_current_cgroup_id", "cgroup id helper", "(4.18)"),
        ("tracepoint_programs", "tracepoint programs", "(4.7)"),
        (
            "raw_tracepoint_programs",
            "raw tracepoint programs",
            "(4.17)",
        ),
        ("kprobe_programs", "kprobe programs", "(4.1)"),
    ] {
        let mut v = format!("{} {note}", yes_no(&f[key]));
        if let Some(e) = errs[key].as_str() {
            let _ = write!(v, ": probing failed: {e}");
        }
        row(label, &v);
    }
    let t = &j["tracefs"];
    row(
        "tracefs",
        &match t["path"].as_str() {
            Some(p) if t["mounted_now"] == json!(true) => format!("mounted now at {p}"),
            Some(p) => format!("mounted at {p}"),
            None => format!("MISSING: {}", s(&t["error"])),
        },
    );
    let k = &j["kprobes"];
    row(
        "kprobes",
        &format!(
            "{}: {}",
            if k["supported"] == json!(true) {
                "yes"
            } else {
                "no"
            },
            s(&k["detail"])
        ),
    );
    row(
        "lockdown",
        &j["lockdown"].as_str().map_or_else(
            || "not available (no lockdown LSM)".to_owned(),
            str::to_owned,
        ),
    );
    let c = &j["capabilities"];
    row(
        "capabilities",
        &format!(
            "CAP_BPF {}, CAP_PERFMON {}, CAP_SYS_ADMIN {} (CapEff {}){}",
            yes_no(&c["CAP_BPF"]),
            yes_no(&c["CAP_PERFMON"]),
            yes_no(&c["CAP_SYS_ADMIN"]),
            c["cap_eff"].as_str().unwrap_or("unknown"),
            if c["enough"] == json!(true) {
                ""
            } else {
                ": NOT ENOUGH to load probes"
            }
        ),
    );
    let tr = &j["transport"];
    row(
        "event transport",
        &match tr["selected"].as_str() {
            Some(sel) => format!("{sel} (--transport {})", s(&tr["requested"])),
            None => format!("NONE: {}", s(&tr["error"])),
        },
    );
    for p in probes {
        let via = match p.transport {
            Some(t) => format!(" via {}", t.name()),
            None => String::new(),
        };
        let v = if p.problems.is_empty() {
            format!("ok: {}{via}", p.attach)
        } else {
            format!("CANNOT LOAD: {}", p.problems.join("; "))
        };
        row(&format!("probe {}", p.name), &v);
    }
    out
}

/// Prints the probe catalogue.
pub fn probes() {
    let mut out = String::new();
    for p in PROBES {
        let state = if p.built {
            ""
        } else {
            "  [not built in this version]"
        };
        let _ = writeln!(out, "{}{state}\n  {}", p.name, p.summary);
        let hooks = p.hook_list();
        let _ = writeln!(out, "  hooks:       {hooks}");
        let _ = writeln!(out, "  min kernel:  {}.{}", p.min_kernel.0, p.min_kernel.1);
        let _ = writeln!(out, "  metrics:     {}\n", p.metrics.join(", "));
    }
    print!("{out}");
}
