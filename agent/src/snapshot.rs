//! The agent's one internal store of numbers. Probes write into it; exporters (Prometheus now,
//! OTLP later) only read and translate it, and never touch aya.
//!
//! A family is a metric name, help text, label names and its series keyed by label values.
//! Counters and histograms are monotonic and owned here (kernel maps are drained into them).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain numbers behind; keep serving them.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn owned(labels: &[&str]) -> LabelValues {
    labels.iter().map(|l| (*l).to_owned()).collect()
}

/// A family of monotonic counters.
#[derive(Debug)]
pub struct CounterVec {
    pub desc: Desc,
    series: Mutex<BTreeMap<LabelValues, u64>>,
}

impl CounterVec {
    fn new(desc: Desc) -> Self {
        Self {
            desc,
            series: Mutex::default(),
        }
    }

    /// Adds `v` to the series `labels`.
    pub fn inc_by(&self, labels: &[&str], v: u64) {
        debug_assert_eq!(labels.len(), self.desc.labels.len(), "{}", self.desc.name);
        let mut s = lock(&self.series);
        let c = s.entry(owned(labels)).or_insert(0);
        *c = c.saturating_add(v);
    }

    /// Raises the series to `total` (a monotonic total read from the kernel); never lowers it.
    pub fn set_total(&self, labels: &[&str], total: u64) {
        let mut s = lock(&self.series);
        let c = s.entry(owned(labels)).or_insert(0);
        *c = (*c).max(total);
    }

    /// Current value of one series (0 when absent).
    #[cfg(test)]
    #[must_use]
    pub fn get(&self, labels: &[&str]) -> u64 {
        lock(&self.series).get(&owned(labels)).copied().unwrap_or(0)
    }

    /// A copy of every series.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(LabelValues, u64)> {
        lock(&self.series)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// A family of gauges.
#[derive(Debug)]
pub struct GaugeVec {
    pub desc: Desc,
    series: Mutex<BTreeMap<LabelValues, i64>>,
}

impl GaugeVec {
    fn new(desc: Desc) -> Self {
        Self {
            desc,
            series: Mutex::default(),
        }
    }

    /// Sets the series `labels` to `v`.
    pub fn set(&self, labels: &[&str], v: i64) {
        lock(&self.series).insert(owned(labels), v);
    }

    /// A copy of every series.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(LabelValues, i64)> {
        lock(&self.series)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
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
    series: Mutex<BTreeMap<LabelValues, HistogramData>>,
}

impl HistogramVec {
    fn new(desc: Desc, bounds: &'static [f64]) -> Self {
        debug_assert!(
            bounds.windows(2).all(|w| w[0] < w[1]),
            "{} bounds",
            desc.name
        );
        Self {
            desc,
            bounds,
            series: Mutex::default(),
        }
    }

    /// Records one observation `v`.
    pub fn observe(&self, labels: &[&str], v: f64) {
        let idx = bucket_index(self.bounds, v);
        let mut s = lock(&self.series);
        let h = s.entry(owned(labels)).or_insert_with(|| HistogramData {
            counts: vec![0; self.bounds.len() + 1],
            sum: 0.0,
            count: 0,
        });
        h.counts[idx] += 1;
        h.sum += v;
        h.count += 1;
    }

    /// Adds pre-bucketed counts (one per bound, then the `+Inf` overflow), e.g. drained from a
    /// kernel log2 histogram, and their `sum`. Extra trailing counts fold into `+Inf`.
    pub fn add_counts(&self, labels: &[&str], counts: &[u64], sum: f64) {
        let n = self.bounds.len();
        let mut s = lock(&self.series);
        let h = s.entry(owned(labels)).or_insert_with(|| HistogramData {
            counts: vec![0; n + 1],
            sum: 0.0,
            count: 0,
        });
        for (i, c) in counts.iter().enumerate() {
            h.counts[i.min(n)] += c;
            h.count += c;
        }
        h.sum += sum;
    }

    /// A copy of every series.
    #[must_use]
    pub fn snapshot(&self) -> Vec<(LabelValues, HistogramData)> {
        lock(&self.series)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
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
}

/// The registry of families, in registration order.
#[derive(Debug, Default)]
pub struct Snapshot {
    families: Mutex<Vec<Family>>,
}

impl Snapshot {
    /// Registers a counter family.
    pub fn counter(&self, desc: Desc) -> Arc<CounterVec> {
        let c = Arc::new(CounterVec::new(desc));
        lock(&self.families).push(Family::Counter(c.clone()));
        c
    }

    /// Registers a gauge family.
    pub fn gauge(&self, desc: Desc) -> Arc<GaugeVec> {
        let g = Arc::new(GaugeVec::new(desc));
        lock(&self.families).push(Family::Gauge(g.clone()));
        g
    }

    /// Registers a histogram family with the given finite upper bounds.
    pub fn histogram(&self, desc: Desc, bounds: &'static [f64]) -> Arc<HistogramVec> {
        let h = Arc::new(HistogramVec::new(desc, bounds));
        lock(&self.families).push(Family::Histogram(h.clone()));
        h
    }

    /// Every family registered so far.
    #[must_use]
    pub fn families(&self) -> Vec<Family> {
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
