//! Prometheus exposition of the [`Snapshot`]: prometheus-client encodes OpenMetrics text, and
//! [`to_prometheus_text`] turns it into the classic 0.0.4 text format for scrapers (and
//! promtool 2.42) that do not negotiate OpenMetrics.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use crate::snapshot::{Family, FloatKind, LabelValues, Snapshot};

/// Content type of [`render`]`(.., Format::OpenMetrics)`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`render`]`(.., Format::Text)`.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Exposition format chosen from the scraper's `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Text,
}

impl Format {
    /// OpenMetrics when the scraper asks for it (Prometheus does), classic text otherwise.
    #[must_use]
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Text,
        }
    }

    /// The HTTP content type of this format.
    #[must_use]
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Self::Text => TEXT_CONTENT_TYPE,
        }
    }
}

/// Renders every family of `snapshot`.
pub fn render(snapshot: &Arc<Snapshot>, format: Format) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
    let mut out = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(match format {
        Format::OpenMetrics => out,
        Format::Text => to_prometheus_text(&out),
    })
}

#[derive(Debug)]
struct SnapshotCollector(Arc<Snapshot>);

fn label_pairs<'a>(names: &'a [&'static str], values: &'a LabelValues) -> Vec<(&'a str, &'a str)> {
    names
        .iter()
        .copied()
        .zip(values.iter().map(String::as_str))
        .collect()
}

/// Encodes one sample set, adding the label set only when there is one (no `name{}`).
fn with_labels(
    m: &mut MetricEncoder<'_>,
    labels: &[(&str, &str)],
    f: impl FnOnce(&mut MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    if labels.is_empty() {
        f(m)
    } else {
        f(&mut m.encode_family(&labels)?)
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in self.0.families() {
            match family {
                Family::Counter(c) => {
                    let mut m = encoder.encode_descriptor(
                        c.desc.name,
                        c.desc.help,
                        None,
                        MetricType::Counter,
                    )?;
                    for (values, v) in c.snapshot() {
                        let labels = label_pairs(c.desc.labels, &values);
                        with_labels(&mut m, &labels, |e| {
                            e.encode_counter::<NoLabelSet, u64, u64>(&v, None)
                        })?;
                    }
                }
                Family::Gauge(g) => {
                    let mut m = encoder.encode_descriptor(
                        g.desc.name,
                        g.desc.help,
                        None,
                        MetricType::Gauge,
                    )?;
                    for (values, v) in g.snapshot() {
                        let labels = label_pairs(g.desc.labels, &values);
                        with_labels(&mut m, &labels, |e| e.encode_gauge(&v))?;
                    }
                }
                Family::Float(f) => {
                    let kind = match f.kind {
                        FloatKind::Counter => MetricType::Counter,
                        FloatKind::Gauge => MetricType::Gauge,
                    };
                    let mut m = encoder.encode_descriptor(f.desc.name, f.desc.help, None, kind)?;
                    for (values, v) in f.snapshot() {
                        let labels = label_pairs(f.desc.labels, &values);
                        with_labels(&mut m, &labels, |e| match f.kind {
                            FloatKind::Counter => {
                                e.encode_counter::<NoLabelSet, f64, u64>(&v, None)
                            }
                            FloatKind::Gauge => e.encode_gauge(&v),
                        })?;
                    }
                }
                Family::Histogram(h) => {
                    let mut m = encoder.encode_descriptor(
                        h.desc.name,
                        h.desc.help,
                        None,
                        MetricType::Histogram,
                    )?;
                    for (values, d) in h.snapshot() {
                        let labels = label_pairs(h.desc.labels, &values);
                        // prometheus-client takes non-cumulative (bound, count) pairs and
                        // accumulates them itself; the overflow bucket is +Inf.
                        let buckets: Vec<(f64, u64)> = h
                            .bounds
                            .iter()
                            .copied()
                            .chain(std::iter::once(f64::INFINITY))
                            .zip(d.counts.iter().copied())
                            .collect();
                        with_labels(&mut m, &labels, |e| {
                            e.encode_histogram::<NoLabelSet>(d.sum, d.count, &buckets, None)
                        })?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Converts OpenMetrics text (as prometheus-client writes it) to the Prometheus 0.0.4 text
/// format: counters' `# HELP`/`# TYPE` take the `_total` name their samples carry, `info`
/// becomes a gauge named `<name>_info`, and `# UNIT`/`# EOF` go.
#[must_use]
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters: Vec<&str> = Vec::new();
    let mut infos: Vec<&str> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.splitn(2, ' ');
            let (name, kind) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
            match kind {
                "counter" => counters.push(name),
                "info" => infos.push(name),
                _ => {}
            }
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
        {
            let prefix = &line[..7];
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(&name) {
                out.push_str(&format!("{prefix}{name}_total {tail}\n"));
            } else if infos.contains(&name) {
                let tail = if prefix == "# TYPE " { "gauge" } else { tail };
                out.push_str(&format!("{prefix}{name}_info {tail}\n"));
            } else {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Desc;

    fn sample() -> Arc<Snapshot> {
        let s = Arc::new(Snapshot::default());
        let c = s.counter(Desc {
            name: "t_connects",
            help: "Connects.",
            labels: &["comm", "outcome"],
        });
        c.inc_by(&["curl", "established"], 3);
        let g = s.gauge(Desc {
            name: "t_up",
            help: "Up.",
            labels: &["probe"],
        });
        g.set(&["tcp"], 1);
        let h = s.histogram(
            Desc {
                name: "t_duration_seconds",
                help: "Duration.",
                labels: &[],
            },
            &[0.1, 1.0],
        );
        h.observe(&[], 0.05);
        h.observe(&[], 0.5);
        h.observe(&[], 5.0);
        s.float(
            Desc {
                name: "process_cpu_seconds",
                help: "CPU.",
                labels: &[],
            },
            FloatKind::Counter,
        )
        .set(&[], 1.25);
        s.float(
            Desc {
                name: "process_resident_memory_bytes",
                help: "RSS.",
                labels: &[],
            },
            FloatKind::Gauge,
        )
        .set(&[], 4096.0);
        s
    }

    #[test]
    fn openmetrics_has_cumulative_buckets_and_eof() {
        let out = render(&sample(), Format::OpenMetrics).unwrap();
        assert!(
            out.contains("t_connects_total{comm=\"curl\",outcome=\"established\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("t_duration_seconds_bucket{le=\"0.1\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("t_duration_seconds_bucket{le=\"1.0\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("t_duration_seconds_bucket{le=\"+Inf\"} 3"),
            "{out}"
        );
        assert!(out.contains("t_duration_seconds_count 3"), "{out}");
        assert!(out.trim_end().ends_with("# EOF"), "{out}");
    }

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let out = render(&sample(), Format::Text).unwrap();
        assert!(out.contains("# TYPE t_connects_total counter\n"), "{out}");
        assert!(out.contains("# HELP t_connects_total Connects.\n"), "{out}");
        assert!(out.contains("# TYPE t_up gauge\n"), "{out}");
        assert!(!out.contains("# EOF"), "{out}");
        assert!(!out.contains("# UNIT"), "{out}");
        assert!(
            out.contains(
                "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.25\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes 4096.0\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn info_becomes_gauge() {
        let om = "# HELP x Build.\n# TYPE x info\nx_info{v=\"1\"} 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_info Build.\n# TYPE x_info gauge\nx_info{v=\"1\"} 1\n"
        );
    }

    #[test]
    fn negotiation() {
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        assert_eq!(Format::negotiate(None), Format::Text);
    }
}
