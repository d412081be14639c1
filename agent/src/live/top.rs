//! Top processes by rate: every interval the sampler reads the snapshot's counters, subtracts
//! the previous reading and keeps the per-process-name rates of the last interval for
//! `/api/v1/top` (and its `follow=true` stream).
//!
//! Rates are per process name (`comm`), the label the metrics carry. A counter that went down
//! (its series expired through `--series-ttl` and came back) counts from zero.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::snapshot::{Family, Snapshot};

/// What `/api/v1/top?by=` ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum By {
    /// System calls per second (syscalls probe).
    Syscalls,
    /// TCP connect attempts per second (tcp probe).
    Connects,
    /// Seconds spent waiting in a run queue per second (sched probe).
    Runqueue,
}

impl By {
    /// Every ranking, in display order.
    pub const ALL: [Self; 3] = [Self::Syscalls, Self::Connects, Self::Runqueue];

    /// The name in `?by=`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Syscalls => "syscalls",
            Self::Connects => "connects",
            Self::Runqueue => "runqueue",
        }
    }

    /// Parses a `?by=` value.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == s)
    }

    /// What `rate` means for this ranking.
    #[must_use]
    pub fn unit(self) -> &'static str {
        match self {
            Self::Syscalls => "syscalls/s",
            Self::Connects => "connects/s",
            Self::Runqueue => "run-queue wait s/s",
        }
    }
}

/// One process name's rates over a window.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub comm: String,
    /// The ranking value (see [`By::unit`]).
    pub rate: f64,
    /// Extra columns by ranking: `errors_per_second`, `top_syscall` / `established_per_second`,
    /// `failed_per_second` / `wakeups_per_second`, `avg_latency_ns`.
    pub extra: serde_json::Map<String, Value>,
}

/// The rates of one interval, every ranking.
#[derive(Clone, Debug)]
pub struct Window {
    /// When the window ended.
    pub end: SystemTime,
    /// Its length in seconds (0 before the first full window).
    pub seconds: f64,
    pub rows: BTreeMap<By, Vec<Row>>,
}

impl Window {
    /// The window as `/api/v1/top` answers: the `limit` highest rows of `by`.
    #[must_use]
    pub fn json(&self, by: By, limit: usize) -> Value {
        let rows: Vec<Value> = self
            .rows
            .get(&by)
            .map(|r| r.iter().take(limit))
            .into_iter()
            .flatten()
            .map(|r| {
                let mut o = serde_json::Map::new();
                o.insert("comm".into(), r.comm.clone().into());
                o.insert("rate".into(), json!(round(r.rate)));
                o.extend(r.extra.clone());
                Value::Object(o)
            })
            .collect();
        json!({
            "by": by.name(),
            "unit": by.unit(),
            "window_end": super::rfc3339(self.end),
            "window_seconds": round(self.seconds),
            "rows": rows,
        })
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The top sampler's output, shared with the API.
pub struct Top {
    interval: Duration,
    tx: watch::Sender<Arc<Window>>,
}

impl Top {
    /// No window yet; [`Top::run`] fills them every `interval`.
    #[must_use]
    pub fn new(interval: Duration) -> Self {
        let (tx, _) = watch::channel(Arc::new(Window {
            end: SystemTime::now(),
            seconds: 0.0,
            rows: BTreeMap::new(),
        }));
        Self { interval, tx }
    }

    /// The latest window.
    #[must_use]
    pub fn latest(&self) -> Arc<Window> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees each new window.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Arc<Window>> {
        self.tx.subscribe()
    }

    /// Samples `snapshot` every interval until `stop` turns true.
    pub async fn run(&self, snapshot: Arc<Snapshot>, mut stop: watch::Receiver<bool>) {
        let mut prev = Totals::read(&snapshot);
        let mut at = Instant::now();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = Totals::read(&snapshot);
            let secs = at.elapsed().as_secs_f64();
            at = Instant::now();
            let window = now.window(&prev, secs);
            prev = now;
            self.tx.send_replace(Arc::new(window));
        }
    }
}

/// Counter totals read from the snapshot, keyed by family and label values.
#[derive(Debug, Default)]
struct Totals {
    counters: HashMap<(&'static str, Vec<String>), u64>,
    /// Histogram (count, sum) by family and labels.
    hists: HashMap<(&'static str, Vec<String>), (u64, f64)>,
}

const SYSCALLS: &str = "tanzhen_syscalls";
const SYSCALL_ERRORS: &str = "tanzhen_syscall_errors";
const CONNECTS: &str = "tanzhen_tcp_connects";
const RUNQ: &str = "tanzhen_sched_runqueue_latency_seconds";

impl Totals {
    fn read(snapshot: &Snapshot) -> Self {
        let mut t = Self::default();
        for f in snapshot.families() {
            match f {
                Family::Counter(c)
                    if [SYSCALLS, SYSCALL_ERRORS, CONNECTS].contains(&c.desc.name) =>
                {
                    for (labels, v) in c.snapshot() {
                        t.counters.insert((c.desc.name, labels), v);
                    }
                }
                Family::Histogram(h) if h.desc.name == RUNQ => {
                    for (labels, d) in h.snapshot() {
                        t.hists.insert((h.desc.name, labels), (d.count, d.sum));
                    }
                }
                _ => {}
            }
        }
        t
    }

    /// Increase of every counter series of `family` since `prev`, as (labels, delta).
    fn deltas<'a>(
        &'a self,
        prev: &'a Self,
        family: &'static str,
    ) -> impl Iterator<Item = (&'a [String], u64)> + 'a {
        self.counters
            .iter()
            .filter(move |((f, _), _)| *f == family)
            .map(move |(k, &v)| {
                let before = prev.counters.get(k).copied().unwrap_or(0);
                let d = if v >= before { v - before } else { v };
                (k.1.as_slice(), d)
            })
    }

    #[expect(clippy::cast_precision_loss, reason = "rates need not be exact")]
    fn window(&self, prev: &Self, secs: f64) -> Window {
        let secs_nz = secs.max(1e-9);
        let per_s = |n: u64| n as f64 / secs_nz;
        let mut rows = BTreeMap::new();

        // syscalls: per comm the total, the errors and the busiest syscall.
        let mut calls: HashMap<&str, (u64, u64, &str, u64)> = HashMap::new();
        for (labels, d) in self.deltas(prev, SYSCALLS) {
            let (Some(comm), Some(sc)) = (labels.first(), labels.get(1)) else {
                continue;
            };
            let e = calls.entry(comm.as_str()).or_insert((0, 0, "", 0));
            e.0 += d;
            if d > e.3 {
                e.2 = sc.as_str();
                e.3 = d;
            }
        }
        for (labels, d) in self.deltas(prev, SYSCALL_ERRORS) {
            if let Some(comm) = labels.first()
                && let Some(e) = calls.get_mut(comm.as_str())
            {
                e.1 += d;
            }
        }
        let mut r: Vec<Row> = calls
            .into_iter()
            .filter(|(_, c)| c.0 > 0)
            .map(|(comm, (n, errs, top, _))| Row {
                comm: comm.to_owned(),
                rate: per_s(n),
                extra: obj(json!({
                    "errors_per_second": round(per_s(errs)),
                    "top_syscall": top,
                })),
            })
            .collect();
        sort(&mut r);
        rows.insert(By::Syscalls, r);

        // connects: per comm, split by outcome.
        let mut conns: HashMap<&str, (u64, u64)> = HashMap::new();
        for (labels, d) in self.deltas(prev, CONNECTS) {
            let (Some(comm), Some(outcome)) = (labels.first(), labels.get(1)) else {
                continue;
            };
            let e = conns.entry(comm.as_str()).or_default();
            if outcome == "established" {
                e.0 += d;
            } else {
                e.1 += d;
            }
        }
        let mut r: Vec<Row> = conns
            .into_iter()
            .filter(|(_, (a, b))| a + b > 0)
            .map(|(comm, (est, failed))| Row {
                comm: comm.to_owned(),
                rate: per_s(est + failed),
                extra: obj(json!({
                    "established_per_second": round(per_s(est)),
                    "failed_per_second": round(per_s(failed)),
                })),
            })
            .collect();
        sort(&mut r);
        rows.insert(By::Connects, r);

        // runqueue: waiting time per second, wakeups per second, mean wait; per comm (summed
        // over the containers a comm runs in).
        let mut by_comm: BTreeMap<String, (u64, f64)> = BTreeMap::new();
        for (k, &(count, sum)) in self.hists.iter().filter(|((f, _), _)| *f == RUNQ) {
            let (c0, s0) = prev.hists.get(k).copied().unwrap_or((0, 0.0));
            let (dc, ds) = if count >= c0 {
                (count - c0, (sum - s0).max(0.0))
            } else {
                (count, sum)
            };
            let e = by_comm
                .entry(k.1.first().cloned().unwrap_or_default())
                .or_default();
            e.0 += dc;
            e.1 += ds;
        }
        let mut r: Vec<Row> = by_comm
            .into_iter()
            .filter(|(_, (dc, _))| *dc > 0)
            .map(|(comm, (dc, ds))| Row {
                comm,
                rate: ds / secs_nz,
                extra: obj(json!({
                    "wakeups_per_second": round(per_s(dc)),
                    "avg_latency_ns": (ds / dc as f64 * 1e9).round(),
                })),
            })
            .collect();
        sort(&mut r);
        rows.insert(By::Runqueue, r);

        Window {
            end: SystemTime::now(),
            seconds: secs,
            rows,
        }
    }
}

fn obj(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// Highest rate first; ties by name so the order is stable.
fn sort(rows: &mut [Row]) {
    rows.sort_by(|a, b| b.rate.total_cmp(&a.rate).then_with(|| a.comm.cmp(&b.comm)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Desc, LOG2_NS_BOUNDS};

    #[test]
    fn rates_per_comm_over_the_window() {
        let s = Snapshot::default();
        let calls = s.counter(Desc {
            name: SYSCALLS,
            help: "",
            labels: &["comm", "syscall"],
        });
        let errs = s.counter(Desc {
            name: SYSCALL_ERRORS,
            help: "",
            labels: &["comm", "syscall"],
        });
        let conns = s.counter(Desc {
            name: CONNECTS,
            help: "",
            labels: &["comm", "outcome"],
        });
        let runq = s.histogram(
            Desc {
                name: RUNQ,
                help: "",
                labels: &["comm", "namespace", "pod", "container", "workload"],
            },
            &LOG2_NS_BOUNDS,
        );
        calls.inc_by(&["a", "read"], 100);
        conns.inc_by(&["a", "failed"], 5);
        let t0 = Totals::read(&s);
        calls.inc_by(&["a", "read"], 10);
        calls.inc_by(&["a", "write"], 30);
        errs.inc_by(&["a", "write"], 4);
        calls.inc_by(&["b", "getpid"], 60);
        conns.inc_by(&["a", "established"], 2);
        conns.inc_by(&["b", "failed"], 6);
        runq.add_counts(&["c", "", "", "", ""], &[0, 2], 0.001);
        runq.add_counts(&["c", "", "", "f00d", ""], &[0, 2], 0.001);
        let w = Totals::read(&s).window(&t0, 2.0);
        let sys = &w.rows[&By::Syscalls];
        assert_eq!(
            sys.iter()
                .map(|r| (r.comm.as_str(), r.rate))
                .collect::<Vec<_>>(),
            [("b", 30.0), ("a", 20.0)]
        );
        assert_eq!(sys[1].extra["top_syscall"], "write");
        assert_eq!(sys[1].extra["errors_per_second"], 2.0);
        let c = &w.rows[&By::Connects];
        assert_eq!(
            c.iter()
                .map(|r| (r.comm.as_str(), r.rate))
                .collect::<Vec<_>>(),
            [("b", 3.0), ("a", 1.0)]
        );
        let rq = &w.rows[&By::Runqueue];
        assert_eq!(rq.len(), 1);
        assert_eq!(rq[0].extra["wakeups_per_second"], 2.0);
        assert_eq!(rq[0].extra["avg_latency_ns"], 500_000.0);
        let j = w.json(By::Syscalls, 1);
        assert_eq!(j["rows"].as_array().unwrap().len(), 1);
        assert_eq!(j["rows"][0]["comm"], "b");
        assert_eq!(j["window_seconds"], 2.0);
    }
}
