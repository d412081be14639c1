//! `tanzhen run`: bind the endpoint, load and attach the probes, serve until a signal, then
//! detach, flush and exit.

use std::{io, net::SocketAddr, sync::Arc};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    cli::{RunArgs, VERSION},
    export::otlp::{Otlp, OtlpConfig},
    kernel,
    live::{Fanout, Live},
    loader,
    metadata::{Metadata, k8s},
    probe::{
        ProbeError, ProbeKind,
        sched::SchedProbe,
        syscalls::{SyscallsOptions, SyscallsProbe},
        tcp::{ConnectSink, LossCounters, TcpProbe},
    },
    process, server,
    snapshot::{Desc, Snapshot},
};

/// How `run` failed, which decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command line asked for something impossible (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The agent could not start (exit code 1).
    #[error("{0}")]
    Fatal(String),
}

impl RunError {
    /// Process exit code for this error.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Fatal(_) => 1,
        }
    }
}

/// Binds `addr`, turning the usual failures into one line that says what to do.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, RunError> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        let why = match e.kind() {
            io::ErrorKind::AddrInUse => {
                "the port is already in use; stop what holds it or pick another with --listen"
                    .to_owned()
            }
            io::ErrorKind::AddrNotAvailable => {
                "no local interface has that address; use 0.0.0.0 or an address of this host"
                    .to_owned()
            }
            io::ErrorKind::PermissionDenied => {
                "permission denied (ports below 1024 need root)".to_owned()
            }
            _ => e.to_string(),
        };
        RunError::Usage(format!("cannot listen on {addr}: {why}"))
    })?;
    l.set_nonblocking(true)
        .map_err(|e| RunError::Fatal(format!("listener: {e}")))?;
    Ok(l)
}

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(args: &RunArgs) -> Result<(), RunError> {
    let otlp =
        OtlpConfig::resolve(&args.otlp, &|k| std::env::var(k).ok()).map_err(RunError::Usage)?;
    if args.listen.0.is_none() && otlp.is_none() {
        return Err(RunError::Usage(
            "--listen none leaves nothing to export; add --otlp-endpoint URL or listen on an address"
                .into(),
        ));
    }
    if args.dry_run {
        let probes: Vec<&str> = args.probes.iter().map(|p| p.name()).collect();
        let listen = args
            .listen
            .0
            .map_or_else(|| "none".to_owned(), |a| a.to_string());
        let otlp = if otlp.is_some() { "on" } else { "off" };
        println!(
            "configuration ok: probes {}; listen {listen}; otlp {otlp}",
            probes.join(",")
        );
        return Ok(());
    }
    let security = server::Security::load(&args.http).map_err(RunError::Usage)?;
    if security.tls.is_some() && args.listen.0.is_none() {
        return Err(RunError::Usage(
            "--tls-cert with --listen none: there is no endpoint to secure".into(),
        ));
    }
    crate::caps::check().map_err(RunError::Fatal)?;
    let listener = args.listen.0.map(bind).transpose()?;
    // Before the runtime starts its threads, so that they all inherit the reduced sets.
    // Logged once the probes are attached (start-up errors stay one line).
    let caps_kept = match crate::caps::drop_unused(args.drop_caps) {
        Ok(left) => format!("capabilities kept: {left}"),
        Err(e) => format!("could not drop unused capabilities: {e}"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tanzhen-rt")
        .enable_all()
        .build()
        .map_err(|e| RunError::Fatal(format!("starting the runtime: {e}")))?;
    rt.block_on(run_async(args, listener, otlp, security, &caps_kept))
}

async fn run_async(
    args: &RunArgs,
    listener: Option<std::net::TcpListener>,
    otlp: Option<OtlpConfig>,
    security: server::Security,
    caps_kept: &str,
) -> Result<(), RunError> {
    let fatal = |e: &dyn std::fmt::Display| RunError::Fatal(e.to_string());
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| fatal(&e))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| fatal(&e))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| fatal(&e))?;

    let uname = kernel::uname();
    let ttl = (!args.series_ttl.is_zero()).then_some(args.series_ttl);
    let max_series = usize::try_from(args.max_series_per_metric).unwrap_or(usize::MAX);
    let snapshot = Arc::new(Snapshot::new(max_series, ttl));
    snapshot
        .gauge(Desc {
            name: "tanzhen_build_info",
            help: "Build and kernel of this agent (value 1).",
            labels: &["version", "arch", "kernel"],
        })
        .set(&[VERSION, std::env::consts::ARCH, &uname.release], 1);
    process::register(&snapshot);
    let probe_up = snapshot.gauge(Desc {
        name: "tanzhen_probe_up",
        help: "1 when the probe is attached and running, 0 when it failed.",
        labels: &["probe"],
    });
    let loss = LossCounters::register(&snapshot);

    let otlp = otlp
        .map(|cfg| Otlp::start(&cfg, &snapshot))
        .transpose()
        .map_err(|e| RunError::Usage(format!("OTLP: {e}")))?;
    let span_sink = otlp
        .as_ref()
        .and_then(|o| o.sink.clone())
        .map(|s| s as std::sync::Arc<dyn ConnectSink>);
    // The live views' event rings get every connect and process event (one push each).
    let live = Arc::new(Live::new(
        args.event_buffer_size,
        snapshot.clone(),
        Some(loss.clone()),
        args.interval,
    ));
    let connect_sink: Arc<dyn ConnectSink> = match &span_sink {
        Some(spans) => Arc::new(Fanout(vec![spans.clone(), live.clone()])),
        None => live.clone(),
    };

    let tracefs = kernel::tracefs().map_err(|e| fatal(&e))?;
    if tracefs.mounted_now {
        log::info!("mounted tracefs at {}", tracefs.path.display());
    }
    if let Some(pid) = args.pid
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    {
        return Err(RunError::Usage(format!(
            "--pid {pid}: no such process; give the pid (tgid) of a running process"
        )));
    }
    let mut max_entries: Vec<(&'static str, u32)> = args
        .syscalls_map_entries
        .map(|n| {
            use agent_common::syscalls::{SYSCALL_COUNTS_0, SYSCALL_COUNTS_1};
            vec![(SYSCALL_COUNTS_0, n), (SYSCALL_COUNTS_1, n)]
        })
        .unwrap_or_default();
    if let Some(n) = args.sched_start_entries {
        max_entries.push((agent_common::sched::SCHED_RUNQ_START, n));
    }
    let transport = args
        .compat
        .transport
        .resolve(&kernel::has_ringbuf())
        .map_err(RunError::Usage)?;
    // The bench probe's 4 MiB ring is created with the object: one page unless it was asked for.
    if transport == crate::transport::Transport::Ringbuf && !args.probes.contains(&ProbeKind::Bench)
    {
        max_entries.push((agent_common::bench::BENCH_EVENTS, kernel::page_size()));
    }
    let btf_source = args
        .compat
        .btf_source(kernel::has_btf())
        .map_err(RunError::Usage)?;
    // The raw tracepoint and kprobe paths read struct offsets from the raw BTF: worked out once
    // (the raw BTF, several MiB, is not kept), before aya parses it for the loader, so that the
    // two parses' memory does not add up.
    let tcp = args.probes.contains(&ProbeKind::Tcp);
    let (btf, sock_layout) = btf_source
        .load_inspecting(|raw| crate::probe::tcp::SockLayout::from_btf(raw.filter(|_| tcp)))
        .map_err(RunError::Usage)?;
    let tcp_attach = args
        .compat
        .tcp_attach
        .resolve(Some(&tracefs.path), sock_layout.raw.is_ok());
    if tcp
        && args.compat.tcp_attach == crate::compat::TcpAttachChoice::Kprobe
        && let Err(why) = crate::features::kprobes(Some(&tracefs.path))
    {
        return Err(RunError::Fatal(format!(
            "--tcp-attach kprobe: this kernel cannot attach kprobes ({why}); use --tcp-attach auto or tracepoint"
        )));
    }
    if tcp
        && args.compat.tcp_attach == crate::compat::TcpAttachChoice::RawTracepoint
        && let Err(why) = &sock_layout.raw
    {
        return Err(RunError::Fatal(format!(
            "--tcp-attach raw-tracepoint: no struct sock offsets ({why}); use --tcp-attach auto or tracepoint"
        )));
    }
    log::info!(
        "event transport: {}; BTF: {}; tcp attach: {}",
        transport.name(),
        btf_source.describe(),
        crate::probe::tcp::describe(tcp_attach)
    );
    let agent_config = agent_common::AgentConfig {
        filter_tgid: args.pid.unwrap_or(0),
        _pad: 0,
    };
    let mut ebpf = loader::load(transport, btf.as_ref(), &max_entries).map_err(|e| fatal(&e))?;
    // The parsed kernel BTF takes ~10 MiB; a probe attached again later parses it anew.
    drop(btf);
    loader::configure(&mut ebpf, agent_config).map_err(|e| fatal(&e))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (meta, meta_tasks) = metadata(args, &snapshot, &stop_rx).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let ctx = ProbeCtx {
        meta,
        tracefs: tracefs.path.clone(),
        transport,
        tcp_attach,
        sock_layout,
        snapshot: snapshot.clone(),
        loss: loss.clone(),
        sink: Some(connect_sink),
        live: live.clone(),
        interval: args.interval,
        syscalls: SyscallsOptions {
            interval: args.interval,
            comm_filter: args.syscalls_comm_filter.clone(),
        },
        object: ObjectParams {
            btf: btf_source,
            max_entries,
            agent_config,
        },
    };
    let mut probes = LiveProbes::default();
    let mut attached = Vec::new();
    for &kind in args.probes.iter() {
        match probes.start(kind, &mut ebpf, &ctx, &mut tasks) {
            Ok(()) => {
                probe_up.set(&[kind.name()], 1);
                loss.decode_errors.inc_by(&[kind.name()], 0);
                live.attached(kind);
                attached.push(kind.name());
            }
            Err(e) => {
                probe_up.set(&[kind.name()], 0);
                live.detached(kind, Some(hint(&e)));
                let msg = format!("probe `{kind}` failed to attach: {}", hint(&e));
                if !args.probes.lenient() {
                    return Err(RunError::Fatal(msg));
                }
                log::error!("{msg}");
            }
        }
    }
    if attached.is_empty() {
        return Err(RunError::Fatal(
            "no probe could attach; see `tanzhen check`".into(),
        ));
    }
    log::info!("{caps_kept}");
    release_freed_memory();

    // The HTTP thread exists before the capability drop (which must reach every thread) but
    // serves only once start-up is complete: a client that sees /healthz sees the final state.
    let (go, ready) = std::sync::mpsc::channel::<()>();
    let (server, serving) = match listener {
        Some(listener) => {
            let addr = listener.local_addr().map_err(|e| fatal(&e))?;
            let scheme = if security.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let auth = if security.auth() {
                " (bearer token required)"
            } else {
                ""
            };
            let server = serve_on_own_thread(
                listener,
                snapshot.clone(),
                live.clone(),
                stop_rx.clone(),
                security,
                ready,
            )
            .map_err(|e| fatal(&e))?;
            // Rates for /api/v1/top, sampled every interval.
            let (top, snap, stop) = (live.clone(), snapshot.clone(), stop_rx.clone());
            tokio::spawn(async move { top.top.run(snap, stop).await });
            (
                Some(server),
                format!("metrics at {scheme}://{addr}/metrics{auth}"),
            )
        }
        None => (None, "no HTTP endpoint (--listen none)".to_owned()),
    };
    // After the HTTP thread exists, so that it drops them too.
    if args.drop_caps {
        drop_load_caps(&uname.release)?;
        probes.sealed = true;
    }
    log::info!(
        "tanzhen {VERSION} on {} ({}): probes {} attached; {serving}",
        uname.release,
        uname.machine,
        attached.join(",")
    );
    // Without a server nobody listens: nothing to start.
    let _ = go.send(());

    let mut running = args.clone();
    loop {
        tokio::select! {
            _ = sigint.recv() => {
                log::info!("SIGINT: detaching probes");
                break;
            }
            _ = sigterm.recv() => {
                log::info!("SIGTERM: detaching probes");
                break;
            }
            _ = sighup.recv() => {
                if let Some(new) = reload(&mut running) {
                    apply_probes(&new, &mut running, &mut probes, &mut ebpf, &ctx, &mut tasks, &probe_up);
                }
            }
            Some(res) = tasks.join_next_with_id() => {
                let id = match &res {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                };
                if let Some(kind) = probes.detached.remove(&id) {
                    match res {
                        Ok((_, Ok(()))) => log::info!("probe `{kind}` detached and drained"),
                        other => log::error!("probe `{kind}` while detaching: {other:?}"),
                    }
                    continue;
                }
                log::error!("a probe stopped unexpectedly: {res:?}");
                if let Some(kind) = probes.kind_of(id) {
                    live.detached(kind, Some(format!("stopped unexpectedly: {res:?}")));
                }
                break;
            }
        }
    }
    // Detach first (dropping Ebpf drops the links), then let the drain tasks flush what the
    // kernel already submitted, then stop serving.
    drop(ebpf);
    probes.own.clear();
    probes.stop_all();
    let _ = stop_tx.send(true);
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::error!("probe: {e}"),
            Err(e) => log::error!("probe task: {e}"),
        }
    }
    for t in meta_tasks {
        t.abort();
    }
    // Probes have flushed their last events: export them, then stop serving.
    drop(span_sink);
    if let Some(otlp) = otlp {
        otlp.shutdown().await;
    }
    if let Some(server) = server {
        match tokio::task::spawn_blocking(move || server.join()).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => log::error!("http server: {e}"),
            Ok(Err(_)) => log::error!("http server thread panicked"),
            Err(e) => log::error!("http server thread: {e}"),
        }
    }
    log::info!("stopped");
    Ok(())
}

/// Serves HTTP on a thread of its own (a current-thread runtime), from the moment `go` says
/// start-up is complete: a scrape never waits for a runtime worker that a probe's drain keeps
/// busy, and a drain never waits for a slow client.
fn serve_on_own_thread(
    listener: std::net::TcpListener,
    snapshot: Arc<Snapshot>,
    live: Arc<Live>,
    stop: watch::Receiver<bool>,
    security: server::Security,
    go: std::sync::mpsc::Receiver<()>,
) -> io::Result<std::thread::JoinHandle<io::Result<()>>> {
    std::thread::Builder::new()
        .name("tanzhen-http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            if go.recv().is_err() {
                // Start-up failed after the thread was made.
                return Ok(());
            }
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                server::serve(listener, snapshot, live, stop, security).await
            })
        })
}

/// Starts the process -> container -> pod metadata: the Kubernetes pod watch when `--k8s`
/// says so, and the sweep of exited processes. Returns the tasks to stop at shutdown.
async fn metadata(
    args: &RunArgs,
    snapshot: &Snapshot,
    stop: &watch::Receiver<bool>,
) -> Result<(Arc<Metadata>, Vec<tokio::task::JoinHandle<()>>), RunError> {
    let mut handles = Vec::new();
    let pods = match k8s::start(&args.k8s, snapshot, stop).await {
        Ok(Some((index, watch))) => {
            handles.push(watch);
            Some(index)
        }
        Ok(None) => None,
        Err(e) => return Err(RunError::Usage(e)),
    };
    let meta = Arc::new(Metadata::new(pods));
    let m = meta.clone();
    handles.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::metadata::SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            m.sweep();
        }
    }));
    Ok((meta, handles))
}

/// SIGHUP: re-reads the configuration file; applies the log level, logs one line per other
/// change (they take effect at the next start). An invalid file changes nothing.
fn reload(running: &mut RunArgs) -> Option<RunArgs> {
    let Some(path) = running.file.config.clone() else {
        log::warn!("SIGHUP: no --config file to reload");
        return None;
    };
    let path = path.display();
    let new = match crate::cli::Cli::reload_run_args() {
        Ok(new) => new,
        Err(e) => {
            log::error!("SIGHUP: {e}; keeping the running configuration");
            return None;
        }
    };
    let changes = reload_changes(running, &new);
    if changes.is_empty() {
        log::info!("SIGHUP: reloaded {path}: no changes");
    }
    for change in &changes {
        log::info!("SIGHUP: reloaded {path}: {change}");
    }
    if new.log_level != running.log_level {
        log::set_max_level(new.log_level.into());
        running.log_level = new.log_level;
    }
    log::debug!("SIGHUP: log level now {:?}", running.log_level);
    Some(new)
}

/// Hands the heap freed after loading (parsed BTF and object files, relocation buffers: several
/// MiB) back to the kernel. glibc keeps freed heap pages mapped otherwise, and they would count
/// in the agent's resident memory for its whole life. musl's allocator returns them itself.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What attaching a probe needs besides the `Ebpf` object.
struct ProbeCtx {
    meta: Arc<Metadata>,
    tracefs: std::path::PathBuf,
    transport: crate::transport::Transport,
    tcp_attach: crate::compat::TcpAttach,
    /// Struct offsets of the raw tracepoint and kprobe TCP paths.
    sock_layout: crate::probe::tcp::SockLayout,
    snapshot: Arc<Snapshot>,
    loss: LossCounters,
    sink: Option<Arc<dyn ConnectSink>>,
    /// The live views' hub (process events go to its rings).
    live: Arc<Live>,
    interval: std::time::Duration,
    syscalls: SyscallsOptions,
    /// How the object was loaded, to load a fresh copy for a probe attached again.
    object: ObjectParams,
}

/// What loading the eBPF object took.
struct ObjectParams {
    /// Where the BTF came from: parsed again for a fresh copy (rare: a probe attached again),
    /// rather than kept parsed in memory all the time.
    btf: crate::compat::BtfSource,
    max_entries: Vec<(&'static str, u32)>,
    agent_config: agent_common::AgentConfig,
}

/// `--drop-caps`: drops the load capabilities from every thread, keeping what reading /proc
/// needs, and CAP_BPF/CAP_SYS_ADMIN where the kernel checks them on every map read.
fn drop_load_caps(release: &str) -> Result<(), RunError> {
    use crate::caps;
    let mut keep = caps::KEEP_RUNTIME;
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let version = kernel::parse_release(release).unwrap_or((0, 0));
    if !caps::maps_readable_without_bpf_caps(version, disabled) {
        keep |= (1 << caps::CAP_BPF) | (1 << caps::CAP_SYS_ADMIN);
        log::warn!(
            "--drop-caps: keeping CAP_BPF and CAP_SYS_ADMIN: before Linux 6.5 with \
             kernel.unprivileged_bpf_disabled={disabled}, reading the probes' maps needs them"
        );
    }
    let left = caps::drop_all_threads(keep)
        .map_err(|e| RunError::Fatal(format!("--drop-caps: dropping capabilities: {e}")))?;
    log::info!(
        "--drop-caps: capabilities of all {} threads now: {left}; SIGHUP can no longer attach probes",
        caps::tasks().len()
    );
    Ok(())
}

type ProbeTasks = tokio::task::JoinSet<Result<(), ProbeError>>;

/// The attached probes, each with its own stop signal so one can be detached at runtime.
#[derive(Default)]
struct LiveProbes {
    running: Vec<(ProbeKind, watch::Sender<bool>, tokio::task::Id)>,
    /// Probes detached at runtime: their kernel maps went with their drain task, so attaching
    /// one again loads a fresh copy of the object for it.
    removed: Vec<ProbeKind>,
    /// Those fresh copies, by the probe attached from them (dropping one detaches it).
    own: std::collections::HashMap<ProbeKind, aya::Ebpf>,
    /// `--drop-caps` dropped the capabilities that load programs: nothing can attach now.
    sealed: bool,
    /// Drain tasks told to stop, whose end is expected.
    detached: std::collections::HashMap<tokio::task::Id, ProbeKind>,
}

impl LiveProbes {
    /// Loads and attaches `kind` and spawns its drain task.
    fn start(
        &mut self,
        kind: ProbeKind,
        ebpf: &mut aya::Ebpf,
        ctx: &ProbeCtx,
        tasks: &mut ProbeTasks,
    ) -> Result<(), ProbeError> {
        if self.sealed {
            return Err(ProbeError::Unsupported {
                probe: kind.name(),
                reason: "--drop-caps dropped the capabilities that load probes after start-up; \
                         restart tanzhen to attach it"
                    .into(),
            });
        }
        let mut fresh = None;
        if self.removed.contains(&kind) {
            let object = &ctx.object;
            let unsupported = |reason: String| ProbeError::Unsupported {
                probe: kind.name(),
                reason,
            };
            let btf = object.btf.load().map_err(unsupported)?;
            let mut copy =
                loader::load(ctx.transport, btf.as_ref(), &object.max_entries).map_err(|e| {
                    unsupported(format!("loading a fresh copy of the eBPF object: {e}"))
                })?;
            drop(btf);
            release_freed_memory();
            loader::configure(&mut copy, object.agent_config)?;
            ctx.loss.rebase(kind.name());
            fresh = Some(copy);
        }
        let ebpf = fresh.as_mut().unwrap_or(ebpf);
        let (tx, rx) = watch::channel(false);
        let handle = match kind {
            ProbeKind::Tcp => {
                let p = TcpProbe::attach(
                    ebpf,
                    &ctx.tracefs,
                    ctx.tcp_attach,
                    &ctx.sock_layout,
                    ctx.transport,
                    &ctx.snapshot,
                    ctx.loss.clone(),
                    ctx.sink.clone(),
                    ctx.meta.clone(),
                )?;
                tasks.spawn(p.run(rx))
            }
            ProbeKind::Sched => {
                let p = SchedProbe::attach(
                    ebpf,
                    &ctx.tracefs,
                    ctx.transport,
                    &ctx.snapshot,
                    ctx.loss.clone(),
                    ctx.interval,
                    Some(ctx.live.clone()),
                    ctx.meta.clone(),
                )?;
                tasks.spawn(p.run(rx))
            }
            ProbeKind::Bench => {
                let p = crate::probe::bench::BenchProbe::attach(
                    ebpf,
                    ctx.transport,
                    &ctx.snapshot,
                    ctx.loss.clone(),
                )?;
                tasks.spawn(p.run(rx))
            }
            ProbeKind::Syscalls => {
                let p = SyscallsProbe::attach(
                    ebpf,
                    &ctx.tracefs,
                    &ctx.snapshot,
                    ctx.loss.clone(),
                    ctx.syscalls.clone(),
                    ctx.meta.clone(),
                )?;
                tasks.spawn(p.run(rx))
            }
        };
        self.running.push((kind, tx, handle.id()));
        if let Some(copy) = fresh {
            self.own.insert(kind, copy);
        }
        Ok(())
    }

    /// Detaches `kind`'s programs, then tells its drain task to flush and stop. Its metrics
    /// stay in the snapshot; the other probes are untouched.
    fn stop(&mut self, kind: ProbeKind, ebpf: &mut aya::Ebpf) -> Result<(), String> {
        let Some(i) = self.running.iter().position(|(k, ..)| *k == kind) else {
            return Ok(());
        };
        let ebpf = self.own.get_mut(&kind).unwrap_or(ebpf);
        for name in programs(kind) {
            let res = match ebpf.program_mut(name) {
                Some(aya::programs::Program::TracePoint(p)) => p.unload(),
                Some(aya::programs::Program::RawTracePoint(p)) => p.unload(),
                Some(aya::programs::Program::KProbe(p)) => p.unload(),
                Some(_) => return Err(format!("{name}: unexpected program type")),
                None => continue,
            };
            match res {
                // The programs of the TCP attach method not in use were never loaded.
                Ok(()) | Err(aya::programs::ProgramError::NotLoaded) => {}
                Err(e) => return Err(format!("unloading {name}: {e}")),
            }
        }
        let (_, tx, id) = self.running.remove(i);
        self.own.remove(&kind);
        self.detached.insert(id, kind);
        if !self.removed.contains(&kind) {
            self.removed.push(kind);
        }
        let _ = tx.send(true);
        Ok(())
    }

    fn stop_all(&mut self) {
        for (_, tx, _) in self.running.drain(..) {
            let _ = tx.send(true);
        }
    }

    /// The probe whose drain task is `id`.
    fn kind_of(&self, id: tokio::task::Id) -> Option<ProbeKind> {
        self.running.iter().find(|r| r.2 == id).map(|r| r.0)
    }

    fn kinds(&self) -> Vec<ProbeKind> {
        self.running.iter().map(|(k, ..)| *k).collect()
    }
}

/// The kernel programs of a probe.
fn programs(kind: ProbeKind) -> &'static [&'static str] {
    match kind {
        ProbeKind::Tcp => crate::probe::tcp::PROGRAMS,
        ProbeKind::Sched => &crate::probe::sched::HOOKS,
        ProbeKind::Syscalls => crate::probe::syscalls::PROGRAMS,
        ProbeKind::Bench => crate::probe::bench::PROGRAMS,
    }
}

/// SIGHUP with a different probe set: attaches the new probes and detaches the dropped ones.
fn apply_probes(
    new: &RunArgs,
    running: &mut RunArgs,
    live: &mut LiveProbes,
    ebpf: &mut aya::Ebpf,
    ctx: &ProbeCtx,
    tasks: &mut ProbeTasks,
    probe_up: &crate::snapshot::GaugeVec,
) {
    let want: Vec<ProbeKind> = new.probes.iter().copied().collect();
    for kind in live.kinds() {
        if !want.contains(&kind) {
            match live.stop(kind, ebpf) {
                Ok(()) => {
                    probe_up.set(&[kind.name()], 0);
                    ctx.live.detached(kind, None);
                    log::info!("SIGHUP: probe `{kind}` detached");
                }
                Err(e) => log::error!("SIGHUP: detaching probe `{kind}`: {e}"),
            }
        }
    }
    for &kind in &want {
        if live.kinds().contains(&kind) {
            continue;
        }
        match live.start(kind, ebpf, ctx, tasks) {
            Ok(()) => {
                probe_up.set(&[kind.name()], 1);
                ctx.loss.decode_errors.inc_by(&[kind.name()], 0);
                ctx.live.attached(kind);
                log::info!("SIGHUP: probe `{kind}` attached");
            }
            Err(e) => {
                probe_up.set(&[kind.name()], 0);
                ctx.live.detached(kind, Some(hint(&e)));
                log::error!("SIGHUP: probe `{kind}` failed to attach: {}", hint(&e));
            }
        }
    }
    running.probes = new.probes.clone();
}

/// One line per setting that differs between `old` and `new` (values of secrets are not shown).
fn reload_changes(old: &RunArgs, new: &RunArgs) -> Vec<String> {
    let restart = "takes effect at the next start";
    let names =
        |p: &crate::probe::ProbeList| p.iter().map(|k| k.name()).collect::<Vec<_>>().join(",");
    let mut out = Vec::new();
    let mut diff = |key: &str, a: String, b: String, applied: bool| {
        if a != b {
            let when = if applied { "applied" } else { restart };
            out.push(format!("{key} {a} -> {b} ({when})"));
        }
    };
    diff(
        "log_level",
        format!("{:?}", old.log_level).to_lowercase(),
        format!("{:?}", new.log_level).to_lowercase(),
        true,
    );
    diff("probes", names(&old.probes), names(&new.probes), true);
    diff(
        "listen",
        format!("{:?}", old.listen.0),
        format!("{:?}", new.listen.0),
        false,
    );
    diff(
        "interval",
        format!("{:?}", old.interval),
        format!("{:?}", new.interval),
        false,
    );
    diff(
        "max_series_per_metric",
        old.max_series_per_metric.to_string(),
        new.max_series_per_metric.to_string(),
        false,
    );
    diff(
        "series_ttl",
        format!("{:?}", old.series_ttl),
        format!("{:?}", new.series_ttl),
        false,
    );
    diff(
        "drop_caps",
        old.drop_caps.to_string(),
        new.drop_caps.to_string(),
        false,
    );
    if format!("{:?}", old.otlp) != format!("{:?}", new.otlp) {
        out.push(format!("otlp settings changed ({restart})"));
    }
    if format!("{:?}", old.compat) != format!("{:?}", new.compat) {
        out.push(format!("transport/btf settings changed ({restart})"));
    }
    if format!("{:?}", old.k8s) != format!("{:?}", new.k8s) {
        out.push(format!("k8s settings changed ({restart})"));
    }
    // Paths only; the token file's content is read at start.
    if format!("{:?}", old.http) != format!("{:?}", new.http) {
        out.push(format!("tls/auth settings changed ({restart})"));
    }
    out
}

/// Adds the usual fix to errors whose cause is common.
fn hint(e: &ProbeError) -> String {
    let s = e.to_string();
    if s.contains("Operation not permitted") || s.contains("EPERM") {
        format!("{s} (run as root, or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)")
    } else {
        s
    }
}

#[cfg(test)]
mod reload_tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(v: &[&str]) -> RunArgs {
        let mut argv = vec!["tanzhen", "run"];
        argv.extend_from_slice(v);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(r) => *r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_line_per_change_without_secrets() {
        let old = args(&["--probes", "tcp"]);
        assert!(reload_changes(&old, &old).is_empty());
        let new = args(&[
            "--probes",
            "tcp,sched",
            "--log-level",
            "debug",
            "--series-ttl",
            "1h",
            "--otlp-header",
            "authorization=Bearer s3cret",
            "--auth-token-file",
            "/etc/tanzhen/token",
        ]);
        assert_eq!(
            reload_changes(&old, &new),
            [
                "log_level info -> debug (applied)",
                "probes tcp -> tcp,sched (applied)",
                "series_ttl 600s -> 3600s (takes effect at the next start)",
                "otlp settings changed (takes effect at the next start)",
                "tls/auth settings changed (takes effect at the next start)",
            ]
        );
    }
}
