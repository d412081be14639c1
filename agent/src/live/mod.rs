//! Live views: what `/api/v1/*`, `tanzhen watch` and `tanzhen top` show.
//!
//! - [`Ring`]: a bounded in-memory ring of the most recent discrete events of one kind (TCP
//!   connects, process exec, process exit), fed by the probes' decoders through their sinks
//!   ([`ConnectSink`], [`ProcSink`]). A push is one short mutex hold and no allocation; followers
//!   are woken only when there are some. Labels (exe, container) are resolved when an event is
//!   read, not when it is pushed, so the cost stays in the probe drain loop only when the API
//!   is used.
//! - [`top`]: per-interval rates of the snapshot's counters by process name.
//! - [`Live`]: the hub holding the rings, the top windows and each probe's state.
//! - [`api`] serves them over HTTP; [`client`], [`watch`] and [`tui`] are the terminal side.

pub mod api;
pub mod client;
pub mod top;
pub mod tui;
pub mod watch;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use agent_common::{
    sched::{PROC_EVENT_EXEC, PROC_EVENT_EXIT, ProcEvent},
    tcp::{AF_INET6, TCP_EVENT_ACCEPT, TCP_EVENT_CONNECT_ESTABLISHED, TcpEvent},
};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::{
    metadata::cgroup,
    probe::{
        ProbeKind,
        sched::ProcSink,
        tcp::{ConnectSink, LossCounters, comm_str, peer},
    },
    snapshot::{Family, Snapshot},
};

/// Default capacity of each event ring (`--event-buffer-size`).
pub const DEFAULT_EVENT_BUFFER: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The event streams `/api/v1/events?probe=` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// TCP connect outcomes (tcp probe).
    Tcp,
    /// Successful execve (sched probe).
    Exec,
    /// Process exits (sched probe).
    Exit,
}

impl Stream {
    /// Every stream, in the order the API lists them.
    pub const ALL: [Self; 3] = [Self::Tcp, Self::Exec, Self::Exit];

    /// The name in `?probe=`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Exec => "exec",
            Self::Exit => "exit",
        }
    }

    /// Parses a `?probe=` value.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// The probe that feeds this stream.
    #[must_use]
    pub fn probe(self) -> ProbeKind {
        match self {
            Self::Tcp => ProbeKind::Tcp,
            Self::Exec | Self::Exit => ProbeKind::Sched,
        }
    }
}

struct RingInner<T> {
    /// Sequence number of the next push (the first event is 1).
    next_seq: u64,
    buf: VecDeque<T>,
}

/// A bounded ring of the last `capacity` events, numbered 1, 2, ... in push order. Sequence
/// numbers are contiguous: a reader that sees a jump knows how many events it missed.
pub struct Ring<T> {
    capacity: usize,
    inner: Mutex<RingInner<T>>,
    notify: Notify,
    followers: AtomicUsize,
}

impl<T: Copy> Ring<T> {
    /// An empty ring holding at most `capacity` (at least 1) events.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            inner: Mutex::new(RingInner {
                next_seq: 1,
                buf: VecDeque::with_capacity(capacity),
            }),
            notify: Notify::new(),
            followers: AtomicUsize::new(0),
        }
    }

    /// Most events the ring holds.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends `ev`, dropping the oldest event when full.
    pub fn push(&self, ev: T) {
        {
            let mut r = lock(&self.inner);
            if r.buf.len() == self.capacity {
                r.buf.pop_front();
            }
            r.buf.push_back(ev);
            r.next_seq += 1;
        }
        if self.followers.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Events pushed since start.
    #[must_use]
    pub fn pushed(&self) -> u64 {
        lock(&self.inner).next_seq - 1
    }

    /// The last `n` events with their sequence numbers, oldest first.
    #[must_use]
    pub fn last(&self, n: usize) -> Vec<(u64, T)> {
        let r = lock(&self.inner);
        let skip = r.buf.len().saturating_sub(n);
        let first = r.next_seq - r.buf.len() as u64;
        r.buf
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(i, e)| (first + i as u64, *e))
            .collect()
    }

    /// Events with a sequence number of at least `seq`, oldest first, and the next sequence
    /// number to ask for.
    #[must_use]
    pub fn since(&self, seq: u64) -> (Vec<(u64, T)>, u64) {
        let r = lock(&self.inner);
        let first = r.next_seq - r.buf.len() as u64;
        let skip = usize::try_from(seq.saturating_sub(first)).unwrap_or(usize::MAX);
        let out = r
            .buf
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(i, e)| (first + i as u64, *e))
            .collect();
        (out, r.next_seq)
    }

    /// Sequence number the next push gets.
    #[must_use]
    pub fn next_seq(&self) -> u64 {
        lock(&self.inner).next_seq
    }

    /// Waits until events with a sequence number of at least `seq` exist (or `timeout` passes)
    /// and returns them with the next sequence number to ask for.
    pub async fn wait_since(&self, seq: u64, timeout: Duration) -> (Vec<(u64, T)>, u64) {
        self.followers.fetch_add(1, Ordering::SeqCst);
        let _guard = Follower(&self.followers);
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registered before looking, so a push between the look and the wait still wakes us.
        notified.as_mut().enable();
        let (evs, next) = self.since(seq);
        if !evs.is_empty() {
            return (evs, next);
        }
        let _ = tokio::time::timeout(timeout, notified).await;
        self.since(seq)
    }
}

/// Counts a follower for as long as it waits.
struct Follower<'a>(&'a AtomicUsize);

impl Drop for Follower<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the agent knows of a probe's state, for `/api/v1/probes`.
#[derive(Clone, Debug, Default)]
struct ProbeState {
    attached: bool,
    attached_at: Option<SystemTime>,
    last_error: Option<String>,
}

/// How a probe attaches: (attach method, transport of its data to userspace).
#[must_use]
pub fn mechanics(kind: ProbeKind) -> (&'static str, &'static str) {
    match kind {
        ProbeKind::Tcp => ("tracepoint", "ringbuf"),
        ProbeKind::Syscalls => ("raw_tracepoint", "kernel_maps"),
        ProbeKind::Sched => ("tracepoint", "ringbuf+kernel_maps"),
        ProbeKind::Bench => ("raw_tracepoint", "ringbuf"),
    }
}

/// Counter families whose sum is a probe's "events seen".
fn event_families(kind: ProbeKind) -> &'static [&'static str] {
    match kind {
        ProbeKind::Tcp => &["tanzhen_tcp_connects", "tanzhen_tcp_accepts"],
        ProbeKind::Syscalls => &["tanzhen_syscalls"],
        ProbeKind::Bench => &["tanzhen_bench_events"],
        ProbeKind::Sched => &[
            "tanzhen_sched_context_switches",
            "tanzhen_process_execs",
            "tanzhen_process_exits",
        ],
    }
}

/// The live-view hub: event rings, top windows and probe states.
pub struct Live {
    pub tcp: Ring<TcpEvent>,
    pub exec: Ring<ProcEvent>,
    pub exit: Ring<ProcEvent>,
    pub top: top::Top,
    snapshot: Arc<Snapshot>,
    loss: Option<LossCounters>,
    probes: Mutex<BTreeMap<ProbeKind, ProbeState>>,
}

impl Live {
    /// A hub with rings of `buffer` events each, reading rates from `snapshot` every `interval`.
    #[must_use]
    pub fn new(
        buffer: usize,
        snapshot: Arc<Snapshot>,
        loss: Option<LossCounters>,
        interval: Duration,
    ) -> Self {
        Self {
            tcp: Ring::new(buffer),
            exec: Ring::new(buffer),
            exit: Ring::new(buffer),
            top: top::Top::new(interval),
            snapshot,
            loss,
            probes: Mutex::default(),
        }
    }

    /// The snapshot the top rates come from.
    #[must_use]
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// Records that `kind` attached.
    pub fn attached(&self, kind: ProbeKind) {
        let mut p = lock(&self.probes);
        let s = p.entry(kind).or_default();
        s.attached = true;
        s.attached_at = Some(SystemTime::now());
    }

    /// Records that `kind` is not attached, and why (None: detached on purpose).
    pub fn detached(&self, kind: ProbeKind, error: Option<String>) {
        let mut p = lock(&self.probes);
        let s = p.entry(kind).or_default();
        s.attached = false;
        if error.is_some() {
            s.last_error = error;
        }
    }

    /// Capacity of each ring.
    #[must_use]
    pub fn buffer_size(&self) -> usize {
        self.tcp.capacity()
    }

    /// The last `n` events of `stream` as JSON, oldest first.
    #[must_use]
    pub fn recent(&self, stream: Stream, n: usize) -> Vec<Value> {
        let mut r = Resolver::new(self);
        match stream {
            Stream::Tcp => self
                .tcp
                .last(n)
                .into_iter()
                .map(|(s, e)| tcp_json(s, &e, &mut r))
                .collect(),
            Stream::Exec => self
                .exec
                .last(n)
                .into_iter()
                .map(|(s, e)| proc_json(s, &e, &mut r))
                .collect(),
            Stream::Exit => self
                .exit
                .last(n)
                .into_iter()
                .map(|(s, e)| proc_json(s, &e, &mut r))
                .collect(),
        }
    }

    /// Sequence number the next event of `stream` gets.
    #[must_use]
    pub fn next_seq(&self, stream: Stream) -> u64 {
        match stream {
            Stream::Tcp => self.tcp.next_seq(),
            Stream::Exec => self.exec.next_seq(),
            Stream::Exit => self.exit.next_seq(),
        }
    }

    /// Events pushed to `stream` since start.
    #[must_use]
    pub fn pushed(&self, stream: Stream) -> u64 {
        match stream {
            Stream::Tcp => self.tcp.pushed(),
            Stream::Exec => self.exec.pushed(),
            Stream::Exit => self.exit.pushed(),
        }
    }

    /// Waits for events of `stream` numbered `seq` or later (at most `timeout`); returns them
    /// as JSON and the next sequence number.
    pub async fn follow(&self, stream: Stream, seq: u64, timeout: Duration) -> (Vec<Value>, u64) {
        let mut r = Resolver::new(self);
        match stream {
            Stream::Tcp => {
                let (evs, next) = self.tcp.wait_since(seq, timeout).await;
                let v = evs.iter().map(|(s, e)| tcp_json(*s, e, &mut r)).collect();
                (v, next)
            }
            Stream::Exec | Stream::Exit => {
                let ring = if stream == Stream::Exec {
                    &self.exec
                } else {
                    &self.exit
                };
                let (evs, next) = ring.wait_since(seq, timeout).await;
                let v = evs.iter().map(|(s, e)| proc_json(*s, e, &mut r)).collect();
                (v, next)
            }
        }
    }

    /// `/api/v1/probes`: every probe of the catalogue with its state and counts.
    #[must_use]
    pub fn probes_json(&self) -> Value {
        let families = self.snapshot.families();
        let counter_sum = |names: &[&str]| -> u64 {
            families
                .iter()
                .filter_map(|f| match f {
                    Family::Counter(c) if names.contains(&c.desc.name) => {
                        Some(c.snapshot().iter().map(|(_, v)| *v).sum::<u64>())
                    }
                    _ => None,
                })
                .sum()
        };
        let states = lock(&self.probes).clone();
        let mut out = Vec::new();
        for info in crate::probe::PROBES.iter().filter(|p| p.built) {
            let state = states.get(&info.kind).cloned().unwrap_or_default();
            let (method, transport) = mechanics(info.kind);
            let mut lost = BTreeMap::new();
            let mut decode_errors = 0;
            if let Some(loss) = &self.loss {
                for (labels, v) in loss.events_lost.snapshot() {
                    if labels.first().map(String::as_str) == Some(info.name) {
                        *lost
                            .entry(labels.get(1).cloned().unwrap_or_default())
                            .or_insert(0) += v;
                    }
                }
                decode_errors = loss
                    .decode_errors
                    .snapshot()
                    .iter()
                    .filter(|(l, _)| l.first().map(String::as_str) == Some(info.name))
                    .map(|(_, v)| *v)
                    .sum::<u64>();
            }
            let streams: Vec<Value> = Stream::ALL
                .into_iter()
                .filter(|s| s.probe() == info.kind)
                .map(|s| json!({"name": s.name(), "events": self.pushed(s)}))
                .collect();
            out.push(json!({
                "name": info.name,
                "attached": state.attached,
                "attached_at": state.attached_at.map(rfc3339),
                "attach_method": method,
                "transport": transport,
                "hooks": info.hooks.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "events_seen": counter_sum(event_families(info.kind)),
                "events_lost": lost.values().sum::<u64>(),
                "events_lost_by_reason": lost,
                "decode_errors": decode_errors,
                "last_error": state.last_error,
                "streams": streams,
            }));
        }
        json!({ "probes": out, "event_buffer_size": self.buffer_size() })
    }
}

impl ConnectSink for Live {
    fn connect(&self, ev: &TcpEvent) {
        self.tcp.push(*ev);
    }
}

impl ProcSink for Live {
    fn process(&self, ev: &ProcEvent) {
        match ev.kind {
            PROC_EVENT_EXEC => self.exec.push(*ev),
            PROC_EVENT_EXIT => self.exit.push(*ev),
            _ => {}
        }
    }
}

/// Hands every connect to two sinks (OTLP spans and the live ring).
pub struct Fanout(pub Vec<Arc<dyn ConnectSink>>);

impl ConnectSink for Fanout {
    fn connect(&self, ev: &TcpEvent) {
        for s in &self.0 {
            s.connect(ev);
        }
    }
}

/// Process labels resolved at read time: from /proc while the process lives, else from the
/// exec ring. Cached for one batch of events.
struct Resolver<'a> {
    live: &'a Live,
    cache: HashMap<u32, (Option<String>, cgroup::CgroupInfo)>,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to put `bpf_ktime_get_ns` stamps on the wall clock.
    offset_ns: i128,
}

impl<'a> Resolver<'a> {
    fn new(live: &'a Live) -> Self {
        Self {
            live,
            cache: HashMap::new(),
            offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
        }
    }

    fn process(&mut self, tgid: u32, tid: u32, comm: &[u8], exe: Option<String>, cg: u64) -> Value {
        let live = self.live;
        let (found_exe, info) = self
            .cache
            .entry(tgid)
            .or_insert_with(|| {
                let exe = std::fs::read_link(format!("/proc/{tgid}/exe"))
                    .ok()
                    .map(|p| p.to_string_lossy().into_owned())
                    .or_else(|| {
                        live.exec
                            .last(live.exec.capacity())
                            .iter()
                            .rev()
                            .find(|(_, e)| e.tgid == tgid)
                            .map(|(_, e)| cstr(&e.filename))
                    });
                let info = std::fs::read_to_string(format!("/proc/{tgid}/cgroup"))
                    .map(|t| cgroup::parse_proc_cgroup(&t))
                    .unwrap_or_default();
                (exe, info)
            })
            .clone();
        let (runtime, container_id) = info
            .container
            .map_or((None, None), |(r, id)| (Some(r.name()), Some(id)));
        json!({
            "pid": tgid,
            "tid": tid,
            "comm": comm_str(comm),
            "exe": exe.or(found_exe),
            "cgroup_id": cg,
            "container_id": container_id,
            "container_runtime": runtime,
            "pod_uid": info.pod_uid,
            // Filled by the Kubernetes metadata work; null until then.
            "pod": null,
            "namespace": null,
            "container": null,
        })
    }

    fn wall_ns(&self, ts_ns: u64) -> u64 {
        u64::try_from(i128::from(ts_ns) + self.offset_ns).unwrap_or(0)
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// A NUL-terminated byte string as text.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn tcp_json(seq: u64, ev: &TcpEvent, r: &mut Resolver<'_>) -> Value {
    let (kind, outcome) = match ev.kind {
        TCP_EVENT_ACCEPT => ("accept", None),
        TCP_EVENT_CONNECT_ESTABLISHED => ("connect", Some("established")),
        _ => ("connect", Some("failed")),
    };
    let src = if ev.family == AF_INET6 {
        std::net::SocketAddr::new(std::net::IpAddr::from(ev.saddr), ev.sport)
    } else {
        let a = [ev.saddr[0], ev.saddr[1], ev.saddr[2], ev.saddr[3]];
        std::net::SocketAddr::new(std::net::IpAddr::from(a), ev.sport)
    };
    let wall = r.wall_ns(ev.ts_ns);
    json!({
        "seq": seq,
        "probe": "tcp",
        "type": kind,
        "time": rfc3339_ns(wall),
        "time_unix_ns": wall,
        "outcome": outcome,
        "latency_ns": ev.latency_ns,
        "family": if ev.family == AF_INET6 { "ipv6" } else { "ipv4" },
        "src": src.to_string(),
        "dst": peer(ev).to_string(),
        "dport": ev.dport,
        "process": r.process(ev.tgid, ev.pid, &ev.comm, None, ev.cgroup_id),
    })
}

fn proc_json(seq: u64, ev: &ProcEvent, r: &mut Resolver<'_>) -> Value {
    let exec = ev.kind == PROC_EVENT_EXEC;
    let filename = exec.then(|| cstr(&ev.filename));
    let wall = r.wall_ns(ev.ts_ns);
    json!({
        "seq": seq,
        "probe": if exec { "exec" } else { "exit" },
        "type": if exec { "exec" } else { "exit" },
        "time": rfc3339_ns(wall),
        "time_unix_ns": wall,
        "filename": filename,
        "process": r.process(ev.tgid, ev.pid, &ev.comm, filename.clone(), ev.cgroup_id),
    })
}

/// `t` as RFC 3339 UTC with milliseconds.
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    let ns = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    rfc3339_ns(ns)
}

/// Unix nanoseconds as RFC 3339 UTC with microseconds (`2026-11-23T23:59:01.123456Z`).
#[must_use]
pub fn rfc3339_ns(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1_000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_events_numbered() {
        let r = Ring::new(3);
        assert_eq!(r.last(10), vec![]);
        for i in 0..5u32 {
            r.push(i);
        }
        assert_eq!(r.pushed(), 5);
        assert_eq!(r.last(10), vec![(3, 2), (4, 3), (5, 4)]);
        assert_eq!(r.last(2), vec![(4, 3), (5, 4)]);
        assert_eq!(r.since(4), (vec![(4, 3), (5, 4)], 6));
        // Asking for overwritten events returns what is left: the jump shows the gap.
        assert_eq!(r.since(1).0.first(), Some(&(3, 2)));
        assert_eq!(r.since(6), (vec![], 6));
    }

    #[tokio::test]
    async fn followers_wake_on_push() {
        let r = Arc::new(Ring::new(4));
        let seq = r.next_seq();
        let r2 = r.clone();
        let waiter = tokio::spawn(async move { r2.wait_since(seq, Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        r.push(7u32);
        let (evs, next) = waiter.await.unwrap();
        assert_eq!((evs, next), (vec![(1, 7)], 2));
        assert_eq!(r.followers.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339_ns(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_ns(1_795_996_741_123_456_789),
            "2026-11-29T23:59:01.123456Z"
        );
        assert_eq!(
            rfc3339_ns(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    #[test]
    fn tcp_events_as_json() {
        let live = Live::new(8, Arc::default(), None, Duration::from_secs(1));
        let ev = crate::probe::tcp::test_event(
            TCP_EVENT_CONNECT_ESTABLISHED,
            b"tzapi",
            1,
            1_500_000,
            [10, 0, 0, 1],
        );
        live.connect(&ev);
        let v = live.recent(Stream::Tcp, 10);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0]["outcome"], "established");
        assert_eq!(v[0]["dst"], "10.0.0.1:80");
        assert_eq!(v[0]["src"], "127.0.0.1:40000");
        assert_eq!(v[0]["process"]["comm"], "tzapi");
        assert_eq!(v[0]["process"]["pid"], 42);
        assert!(v[0]["process"]["pod"].is_null());
        assert_eq!(v[0]["seq"], 1);
    }
}
