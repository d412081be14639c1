//! The agent's one internal store of numbers. Probes write into it; exporters (Prometheus now,
//! OTLP later) only read and translate it, and never touch aya.
//!
//! A family is a metric name, help text, label names and its series keyed by label values.
//! Values the agent samples on demand (its own `process_*` metrics) are refreshed by read hooks
//! that run before each read of the families, so both exporters see the same fresh numbers.
//! Counters and histograms are monotonic and owned here (kernel maps are drained into them).
//!
//! Cardinality is bounded: each family holds at most `max_series` label sets; new ones past the
//! cap fold into one series whose labels are all `other`, counted per family in
//! `tanzhen_series_folded_total{metric}`. Counter and histogram series nobody updated for the
//! TTL leave the export (they come back from zero if they reappear, which Prometheus reads as a
//! counter reset).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// Static description of a metric family.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Full name without the `_total` suffix counters get on the wire (e.g. `tanzhen_tcp_connects`).
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
}

/// Label values in the order of [`Desc::labels`].
pub type LabelValues = Vec<String>;

/// Label value of the series that label sets past a family's cap fold into.
pub const OVERFLOW_LABEL: &str = "other";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain numbers behind; keep serving them.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn owned(labels: &[&str]) -> LabelValues {
    labels.iter().map(|l| (*l).to_owned()).collect()
}

/// Bounds on every family's series, shared by all families of a [`Snapshot`].
#[derive(Debug)]
pub struct Limits {
    /// Series per family; new label sets past it fold into one `other` series.
    pub max_series: usize,
    /// Series not updated for this long leave the export (`None`: never).
    pub ttl: Option<Duration>,
    /// `tanzhen_series_folded_total{metric}`: label sets folded, per family (itself unbounded).
    folded: Option<Arc<CounterVec>>,
}

impl Limits {
    /// Default series cap per family.
    pub const DEFAULT_MAX_SERIES: usize = 10_000;
    /// Default time after which a series nobody updates leaves the export.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(600);
}

/// One series' value and when it was last written.
#[derive(Debug)]
struct Entry<T> {
    value: T,
    touched: Instant,
}

/// The series of one family, bounded by [`Limits`].
#[derive(Debug)]
struct Series<T> {
    name: &'static str,
    limits: Arc<Limits>,
    /// Exempt from the TTL: series the agent itself keeps current (probe state, build info).
    persistent: AtomicBool,
    map: Mutex<BTreeMap<LabelValues, Entry<T>>>,
}

impl<T: Clone> Series<T> {
    fn new(name: &'static str, limits: Arc<Limits>) -> Self {
        Self {
            name,
            limits,
            persistent: AtomicBool::new(false),
            map: Mutex::default(),
        }
    }

    /// Applies `f` to the series `labels`, created with `init` if new; past the cap, to the
    /// `other` series (and counts the fold).
    fn update(&self, labels: &[&str], init: impl FnOnce() -> T, f: impl FnOnce(&mut T)) {
        let now = Instant::now();
        let mut map = lock(&self.map);
        let mut key = owned(labels);
        if !map.contains_key(&key) && map.len() >= self.limits.max_series {
            if let Some(folded) = &self.limits.folded {
                folded.inc_by(&[self.name], 1);
            }
            key = vec![OVERFLOW_LABEL.to_owned(); labels.len()];
        }
        let e = map.entry(key).or_insert_with(|| Entry {
            value: init(),
            touched: now,
        });
        e.touched = now;
        f(&mut e.value);
    }

    /// A copy of every live series; expired ones are dropped on the way.
    fn snapshot(&self) -> Vec<(LabelValues, T)> {
        let mut map = lock(&self.map);
        if let Some(ttl) = self.limits.ttl
            && !self.persistent.load(Ordering::Relaxed)
        {
            let now = Instant::now();
            map.retain(|_, e| now.duration_since(e.touched) <= ttl);
        }
        map.iter()
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect()
    }

    #[cfg(test)]
    fn get(&self, labels: &[&str]) -> Option<T> {
        lock(&self.map).get(&owned(labels)).map(|e| e.value.clone())
    }
}

/// A family of monotonic counters.
#[derive(Debug)]
pub struct CounterVec {
    pub desc: Desc,
    series: Series<u64>,
}

impl CounterVec {
    /// Adds `v` to the series `labels`.
    pub fn inc_by(&self, labels: &[&str], v: u64) {
        debug_assert_eq!(labels.len(), self.desc.labels.len(), "{}", self.desc.name);
        self.series
            .update(labels, || 0, |c| *c = c.saturating_add(v));
    }

    /// Raises the series to `total` (a monotonic total read from the kernel); never lowers it.
    pub fn set_total(&self, labels: &[&str], total: u64) {
        self.series.update(labels, || 0, |c| *c = (*c).max(total));
    }

    /// Keeps this family's series past the TTL (for series the agent refreshes itself).
    pub fn persistent(&self) -> &Self {
        self.series.persistent.store(true, Ordering::Relaxed);
        self
    }

    /// Current value of one series (0 when absent).
    #[cfg(test)]
    #[must_use]
    pub fn get(&self, labels: &[&str]) -> u64 {
        self.series.get(labels).unwrap_or(0)
    }

    /// A copy of every series.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(LabelValues, u64)> {
        self.series.snapshot()
    }
}

/// A family of gauges. Gauges are state the agent sets itself: they never expire.
#[derive(Debug)]
pub struct GaugeVec {
    pub desc: Desc,
    series: Series<i64>,
}

impl GaugeVec {
    /// Sets the series `labels` to `v`.
    pub fn set(&self, labels: &[&str], v: i64) {
        self.series.update(labels, || v, |g| *g = v);
    }

    /// A copy of every series.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(LabelValues, i64)> {
        self.series.snapshot()
    }
}

/// Whether a [`FloatVec`] is exported as a counter or a gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatKind {
    /// Monotonic (e.g. CPU seconds); exported with `_total`.
    Counter,
    /// A value that goes up and down (e.g. resident memory).
    Gauge,
}

/// A family of floating-point values the agent samples itself (its own process metrics).
/// Like gauges they never expire; a counter's samples must only grow.
#[derive(Debug)]
pub struct FloatVec {
    pub desc: Desc,
    pub kind: FloatKind,
    series: Series<f64>,
}

impl FloatVec {
    /// Sets the series `labels` to `v`.
    pub fn set(&self, labels: &[&str], v: f64) {
        self.series.update(labels, || v, |g| *g = v);
    }

    /// A copy of every series.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(LabelValues, f64)> {
        self.series.snapshot()
    }
}

/// One histogram series: per-bucket (non-cumulative) counts, the overflow bucket last.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramData {
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

/// A family of histograms with fixed upper bounds (Prometheus `le` semantics: `v <= bound`).
#[derive(Debug)]
pub struct HistogramVec {
    pub desc: Desc,
    /// Finite, strictly increasing upper bounds; `+Inf` is implied.
    pub bounds: &'static [f64],
    series: Series<HistogramData>,
}

impl HistogramVec {
    fn empty(&self) -> HistogramData {
        HistogramData {
            counts: vec![0; self.bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation `v`.
    pub fn observe(&self, labels: &[&str], v: f64) {
        let idx = bucket_index(self.bounds, v);
        self.series.update(
            labels,
            || self.empty(),
            |h| {
                h.counts[idx] += 1;
                h.sum += v;
                h.count += 1;
            },
        );
    }

    /// Adds pre-bucketed counts (one per bound, then the `+Inf` overflow), e.g. drained from a
    /// kernel log2 histogram, and their `sum`. Extra trailing counts fold into `+Inf`.
    pub fn add_counts(&self, labels: &[&str], counts: &[u64], sum: f64) {
        let n = self.bounds.len();
        self.series.update(
            labels,
            || self.empty(),
            |h| {
                for (i, c) in counts.iter().enumerate() {
                    h.counts[i.min(n)] += c;
                    h.count += c;
                }
                h.sum += sum;
            },
        );
    }

    /// A copy of every series.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(LabelValues, HistogramData)> {
        self.series.snapshot()
    }
}

/// Index of the bucket that counts `v`: the first bound `>= v`, or `bounds.len()` (the `+Inf`
/// bucket) past the last one. NaN lands in `+Inf`.
#[must_use]
pub fn bucket_index(bounds: &[f64], v: f64) -> usize {
    if v.is_nan() {
        return bounds.len();
    }
    bounds.partition_point(|b| *b < v)
}

/// Upper bounds, in seconds, of the kernel's log2 nanosecond slots 0..=63
/// ([`agent_common::hist`]): slot `s` counts durations below `2^s` ns, exported as `le=2^s ns`.
/// Slot 64 is the `+Inf` bucket.
pub static LOG2_NS_BOUNDS: [f64; 64] = {
    let mut b = [0.0; 64];
    let mut s = 0;
    while s < 64 {
        #[expect(clippy::cast_precision_loss, reason = "powers of two are exact in f64")]
        {
            b[s] = agent_common::hist::slot_upper_bound(s) as f64 / 1e9;
        }
        s += 1;
    }
    b
};

/// Any family, for exporters that walk them all.
#[derive(Clone, Debug)]
pub enum Family {
    Counter(Arc<CounterVec>),
    Gauge(Arc<GaugeVec>),
    Histogram(Arc<HistogramVec>),
    Float(Arc<FloatVec>),
}

/// Runs before every read of the families (each scrape, each OTLP export) to refresh values
/// sampled on demand, such as the agent's own process metrics.
pub type ReadHook = Box<dyn Fn() + Send + Sync>;

/// The registry of families, in registration order, and the limits they share.
pub struct Snapshot {
    limits: Arc<Limits>,
    families: Mutex<Vec<Family>>,
    hooks: Mutex<Vec<ReadHook>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("limits", &self.limits)
            .field("families", &self.families)
            .field("hooks", &lock(&self.hooks).len())
            .finish()
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        Self::new(Limits::DEFAULT_MAX_SERIES, Some(Limits::DEFAULT_TTL))
    }
}

impl Snapshot {
    /// A snapshot whose families hold at most `max_series` series each (plus the `other`
    /// overflow series) and drop series untouched for `ttl`. It exports
    /// `tanzhen_series_folded_total{metric}` itself.
    #[must_use]
    pub fn new(max_series: usize, ttl: Option<Duration>) -> Self {
        let desc = Desc {
            name: "tanzhen_series_folded",
            help: "Label sets folded into the `other` series because the metric reached --max-series-per-metric.",
            labels: &["metric"],
        };
        let unbounded = Arc::new(Limits {
            max_series: usize::MAX,
            ttl: None,
            folded: None,
        });
        let folded = Arc::new(CounterVec {
            desc,
            series: Series::new(desc.name, unbounded),
        });
        let limits = Arc::new(Limits {
            max_series,
            ttl,
            folded: Some(folded.clone()),
        });
        Self {
            limits,
            families: Mutex::new(vec![Family::Counter(folded)]),
            hooks: Mutex::default(),
        }
    }

    /// Label sets folded into `other`, per metric.
    #[cfg(test)]
    #[must_use]
    pub fn folded(&self) -> Vec<(LabelValues, u64)> {
        self.limits
            .folded
            .as_ref()
            .map(|f| f.snapshot())
            .unwrap_or_default()
    }

    /// Shows the family in `tanzhen_series_folded_total` from the start, at 0.
    fn announce(&self, desc: &Desc) {
        if let Some(f) = &self.limits.folded {
            f.inc_by(&[desc.name], 0);
        }
    }

    /// Registers a counter family.
    pub fn counter(&self, desc: Desc) -> Arc<CounterVec> {
        self.announce(&desc);
        let c = Arc::new(CounterVec {
            desc,
            series: Series::new(desc.name, self.limits.clone()),
        });
        lock(&self.families).push(Family::Counter(c.clone()));
        c
    }

    /// Registers a gauge family (exempt from the TTL).
    pub fn gauge(&self, desc: Desc) -> Arc<GaugeVec> {
        self.announce(&desc);
        let series = Series::new(desc.name, self.limits.clone());
        series.persistent.store(true, Ordering::Relaxed);
        let g = Arc::new(GaugeVec { desc, series });
        lock(&self.families).push(Family::Gauge(g.clone()));
        g
    }

    /// Registers a histogram family with the given finite upper bounds.
    pub fn histogram(&self, desc: Desc, bounds: &'static [f64]) -> Arc<HistogramVec> {
        self.announce(&desc);
        debug_assert!(
            bounds.windows(2).all(|w| w[0] < w[1]),
            "{} bounds",
            desc.name
        );
        let h = Arc::new(HistogramVec {
            desc,
            bounds,
            series: Series::new(desc.name, self.limits.clone()),
        });
        lock(&self.families).push(Family::Histogram(h.clone()));
        h
    }

    /// Registers a family of floating-point values (exempt from the TTL).
    pub fn float(&self, desc: Desc, kind: FloatKind) -> Arc<FloatVec> {
        self.announce(&desc);
        let series = Series::new(desc.name, self.limits.clone());
        series.persistent.store(true, Ordering::Relaxed);
        let f = Arc::new(FloatVec { desc, kind, series });
        lock(&self.families).push(Family::Float(f.clone()));
        f
    }

    /// Runs `hook` before every [`Snapshot::families`] (i.e. on every scrape and export).
    /// Hooks must be cheap: they run on the exporters' path.
    pub fn on_read(&self, hook: ReadHook) {
        lock(&self.hooks).push(hook);
    }

    /// Every family registered so far, after the read hooks have refreshed theirs.
    #[must_use]
    pub fn families(&self) -> Vec<Family> {
        for hook in lock(&self.hooks).iter() {
            hook();
        }
        lock(&self.families).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.001, 0.01, 0.1];

    #[test]
    fn bucket_index_uses_le_semantics() {
        assert_eq!(bucket_index(BOUNDS, 0.0), 0);
        assert_eq!(
            bucket_index(BOUNDS, 0.001),
            0,
            "a value on a bound belongs to it"
        );
        assert_eq!(bucket_index(BOUNDS, 0.0010001), 1);
        assert_eq!(bucket_index(BOUNDS, 0.1), 2);
        assert_eq!(bucket_index(BOUNDS, 5.0), 3, "past the last bound is +Inf");
        assert_eq!(bucket_index(BOUNDS, f64::NAN), 3);
    }

    #[test]
    fn histogram_counts_sum_and_count() {
        let s = Snapshot::default();
        let h = s.histogram(
            Desc {
                name: "h",
                help: "h",
                labels: &[],
            },
            BOUNDS,
        );
        for v in [0.0005, 0.002, 0.002, 7.0] {
            h.observe(&[], v);
        }
        let (_, d) = h.snapshot().pop().unwrap();
        assert_eq!(d.counts, vec![1, 2, 0, 1]);
        assert_eq!(d.count, 4);
        assert!((d.sum - 7.0045).abs() < 1e-9);
    }

    #[test]
    fn pre_bucketed_counts_from_log2_slots() {
        let s = Snapshot::default();
        let h = s.histogram(
            Desc {
                name: "l",
                help: "l",
                labels: &["k"],
            },
            &LOG2_NS_BOUNDS,
        );
        let mut slots = [0u64; agent_common::hist::HIST_SLOTS];
        slots[agent_common::hist::slot(1_500)] = 3; // 1.5 µs -> slot 11 (< 2048 ns)
        slots[64] = 1;
        h.add_counts(&["a"], &slots, 4.5e-6);
        h.add_counts(&["a"], &slots, 4.5e-6);
        let (_, d) = h.snapshot().pop().unwrap();
        assert_eq!(d.count, 8);
        assert_eq!(d.counts[11], 6);
        assert_eq!(d.counts[64], 2, "slot 64 is +Inf");
        assert!((LOG2_NS_BOUNDS[11] - 2.048e-6).abs() < 1e-15);
        assert!(LOG2_NS_BOUNDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn series_past_the_cap_fold_into_other() {
        let s = Snapshot::new(2, None);
        let c = s.counter(Desc {
            name: "c",
            help: "c",
            labels: &["comm", "kind"],
        });
        c.inc_by(&["a", "x"], 1);
        c.inc_by(&["b", "x"], 1);
        c.inc_by(&["c", "x"], 5);
        c.inc_by(&["d", "y"], 7);
        c.inc_by(&["a", "x"], 1);
        assert_eq!(c.get(&["a", "x"]), 2, "existing series keep counting");
        assert_eq!(c.get(&["other", "other"]), 12);
        assert_eq!(c.snapshot().len(), 3, "the cap plus the overflow series");
        assert_eq!(s.folded(), vec![(vec!["c".to_owned()], 2)]);
        assert_eq!(
            s.families().len(),
            2,
            "the folded family is registered first"
        );
        let h = s.histogram(
            Desc {
                name: "h",
                help: "h",
                labels: &["k"],
            },
            BOUNDS,
        );
        for k in ["1", "2", "3"] {
            h.observe(&[k], 0.5);
        }
        assert_eq!(h.snapshot().len(), 3);
        assert_eq!(
            s.folded(),
            vec![(vec!["c".to_owned()], 2), (vec!["h".to_owned()], 1)]
        );
    }

    #[test]
    fn untouched_series_expire_but_gauges_and_persistent_families_stay() {
        let s = Snapshot::new(100, Some(Duration::from_millis(30)));
        let c = s.counter(Desc {
            name: "c",
            help: "c",
            labels: &["k"],
        });
        let p = s.counter(Desc {
            name: "p",
            help: "p",
            labels: &["k"],
        });
        p.persistent();
        let g = s.gauge(Desc {
            name: "g",
            help: "g",
            labels: &[],
        });
        c.inc_by(&["old"], 1);
        p.inc_by(&["old"], 1);
        g.set(&[], 1);
        std::thread::sleep(Duration::from_millis(60));
        c.inc_by(&["new"], 1);
        let live: Vec<_> = c
            .snapshot()
            .into_iter()
            .map(|(k, _)| k[0].clone())
            .collect();
        assert_eq!(live, vec!["new"]);
        assert_eq!(p.snapshot().len(), 1);
        assert_eq!(g.snapshot().len(), 1);
    }

    #[test]
    fn read_hooks_refresh_float_families_before_each_read() {
        let s = Snapshot::new(100, Some(Duration::from_millis(1)));
        let f = s.float(
            Desc {
                name: "f",
                help: "f",
                labels: &[],
            },
            FloatKind::Counter,
        );
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (f2, c2) = (f.clone(), calls.clone());
        s.on_read(Box::new(move || {
            let n = c2.fetch_add(1, Ordering::Relaxed) + 1;
            #[expect(clippy::cast_precision_loss, reason = "small test numbers")]
            f2.set(&[], n as f64 * 0.5);
        }));
        assert!(f.snapshot().is_empty(), "nothing until the first read");
        let _ = s.families();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.families().len(), 2);
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(
            f.snapshot(),
            vec![(vec![], 1.0)],
            "refreshed on read and exempt from the TTL"
        );
    }

    #[test]
    fn counters_add_and_take_kernel_totals() {
        let s = Snapshot::default();
        let c = s.counter(Desc {
            name: "c",
            help: "c",
            labels: &["a", "b"],
        });
        c.inc_by(&["x", "y"], 2);
        c.inc_by(&["x", "y"], 3);
        c.inc_by(&["x", "z"], 1);
        assert_eq!(c.get(&["x", "y"]), 5);
        c.set_total(&["x", "y"], 4);
        assert_eq!(
            c.get(&["x", "y"]),
            5,
            "a kernel total never lowers a counter"
        );
        c.set_total(&["x", "y"], 9);
        assert_eq!(c.get(&["x", "y"]), 9);
        assert_eq!(c.snapshot().len(), 2);
    }
}
