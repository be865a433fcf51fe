//! Counters and latency histograms that any thread of the manager records into, and that its
//! reports serialize: a [`Counter`] is a number, [`Latencies`] are their [`Percentiles`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::sync::lock;

/// A count that any thread adds to (relaxed: counts, never synchronisation). In the metrics it
/// is a number.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the value (a "first time it happened" mark).
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// Raises the value to `v` if it is below (a peak).
    pub fn max(&self, v: u64) {
        self.0.fetch_max(v, Ordering::Relaxed);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Counter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

/// Nanosecond latencies any thread records, from 1 ns to 100 s at 3 significant digits. In the
/// metrics they are their [`Percentiles`].
#[derive(Debug)]
pub struct Latencies(Mutex<hdrhistogram::Histogram<u64>>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(Mutex::new(latency_histogram()))
    }
}

impl Latencies {
    /// Records one duration.
    pub fn record(&self, d: std::time::Duration) {
        self.record_ns(d.as_nanos() as u64);
    }

    /// Records one duration in nanoseconds.
    pub fn record_ns(&self, ns: u64) {
        lock(&self.0).saturating_record(ns.max(1));
    }

    /// How many were recorded.
    pub fn count(&self) -> u64 {
        lock(&self.0).len()
    }

    /// Their percentiles.
    pub fn percentiles(&self) -> Percentiles {
        Percentiles::of(&lock(&self.0))
    }
}

impl Serialize for Latencies {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.percentiles().serialize(s)
    }
}

/// p50, p99, max and the count of a histogram of nanoseconds, with a coarse CDF
/// (`[quantile, value]` pairs; absent when nothing was recorded).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
    /// How many.
    pub count: u64,
    /// `[quantile, value]` at fixed quantiles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdf: Vec<(f64, u64)>,
}

impl Percentiles {
    /// The percentiles of `h`.
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        const CDF: [f64; 12] = [
            0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0,
        ];
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
            count: h.len(),
            cdf: CDF.iter().map(|&q| (q, h.value_at_quantile(q))).collect(),
        }
    }
}

/// A histogram for nanosecond latencies from 1 ns to 100 s, 3 significant digits.
pub fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 100_000_000_000, 3)
        .expect("static bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ordered() {
        let mut h = latency_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let p = Percentiles::of(&h);
        assert!(p.p50 <= p.p99 && p.p99 <= p.max);
        assert!((495_000..=505_000).contains(&p.p50), "{}", p.p50);
        assert_eq!(Percentiles::of(&latency_histogram()).count, 0);
        assert!(Percentiles::of(&latency_histogram()).cdf.is_empty());
    }
}
