//! The server's counters, rendered in the Prometheus text format (version 0.0.4) by hand.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// A histogram with fixed upper bounds (cumulative counts are computed when rendered).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    sum_bits: AtomicU64,
}

impl Histogram {
    /// A histogram with buckets `le = bounds[i]` and `+Inf`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one observation.
    pub fn observe(&self, x: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| x <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + x).to_bits())
            });
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The largest bucket bound holding an observation (`+Inf` above the last bound), or
    /// `None` when empty.
    pub fn max_bucket(&self) -> Option<f64> {
        let in_bounds: u64 = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        if self.count() > in_bounds {
            return Some(f64::INFINITY);
        }
        self.bounds
            .iter()
            .zip(&self.counts)
            .rev()
            .find(|(_, c)| c.load(Ordering::Relaxed) > 0)
            .map(|(b, _)| *b)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let sum = f64::from_bits(self.sum_bits.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

const LATENCY: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const TOKENS: &[f64] = &[
    64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// Everything `GET /metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Latency of `POST /predict`, arrival to response, every status.
    pub request_duration: Histogram,
    /// Time of each batch's forward passes.
    pub inference_duration: Histogram,
    /// Inputs per batch.
    pub batch_size: Histogram,
    /// Requests per batch.
    pub batch_requests: Histogram,
    /// Tokens per batch (before padding).
    pub batch_tokens: Histogram,
    /// Requests waiting for a worker.
    pub queue_depth: AtomicI64,
    /// `POST /predict` requests being handled.
    pub in_flight: AtomicI64,
    /// Inputs predicted.
    pub inputs: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            request_duration: Histogram::new(LATENCY),
            inference_duration: Histogram::new(LATENCY),
            batch_size: Histogram::new(SIZES),
            batch_requests: Histogram::new(SIZES),
            batch_tokens: Histogram::new(TOKENS),
            queue_depth: AtomicI64::new(0),
            in_flight: AtomicI64::new(0),
            inputs: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, path: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((path.to_string(), status)).or_default() += 1;
    }

    /// Requests answered so far with `status` on `path`.
    pub fn requests(&self, path: &str, status: u16) -> u64 {
        let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&(path.to_string(), status)).copied().unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP ferrotune_requests_total HTTP requests answered, by path and status.\n",
        );
        out.push_str("# TYPE ferrotune_requests_total counter\n");
        {
            let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            for ((path, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "ferrotune_requests_total{{path=\"{path}\",status=\"{status}\"}} {n}"
                );
            }
        }
        self.request_duration.render(
            &mut out,
            "ferrotune_request_duration_seconds",
            "Latency of POST /predict from arrival to response.",
        );
        self.inference_duration.render(
            &mut out,
            "ferrotune_inference_duration_seconds",
            "Time of one batch's forward passes.",
        );
        self.batch_size
            .render(&mut out, "ferrotune_batch_size", "Inputs per batch.");
        self.batch_requests
            .render(&mut out, "ferrotune_batch_requests", "Requests per batch.");
        self.batch_tokens.render(
            &mut out,
            "ferrotune_batch_tokens",
            "Tokens per batch, before padding.",
        );
        let gauges = [
            (
                "ferrotune_queue_depth",
                "Requests waiting for an inference worker.",
                self.queue_depth.load(Ordering::Relaxed),
            ),
            (
                "ferrotune_requests_in_flight",
                "POST /predict requests being handled.",
                self.in_flight.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP ferrotune_inputs_total Inputs predicted.\n\
             # TYPE ferrotune_inputs_total counter\nferrotune_inputs_total {}",
            self.inputs.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets() {
        let m = Metrics::default();
        m.batch_size.observe(1.0);
        m.batch_size.observe(3.0);
        m.batch_size.observe(1000.0);
        m.request("/predict", 200);
        let text = m.render();
        assert!(
            text.contains("ferrotune_batch_size_bucket{le=\"1\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("ferrotune_batch_size_bucket{le=\"4\"} 2\n"));
        assert!(text.contains("ferrotune_batch_size_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("ferrotune_batch_size_sum 1004\n"));
        assert!(text.contains("ferrotune_requests_total{path=\"/predict\",status=\"200\"} 1\n"));
        assert_eq!(m.batch_size.max_bucket(), Some(f64::INFINITY));
        assert_eq!(m.batch_requests.max_bucket(), None);
    }
}
