//! The stalls a guest measured on its own clock ([`guest_abi::stalls`]): every timed access's
//! cycles, binned by log2 and sent as reports, merged here over vCPUs and turned into time
//! with the TSC frequency KVM reports. Unlike the host's figures (a fault's service time, a
//! lock's hold time) this includes everything the vCPU waited for: the exit, the queue before
//! the handler read the fault, the kernel's `mmap_lock`, the wake-up.

use guest_abi::stalls::{BUCKETS, STALL_BUCKET_PREFIX, STALL_MAX_KEY, upper_edge};
use serde::Serialize;

use crate::metrics::VcpuStats;

/// The guest-measured stalls of one run, over every vCPU that timed its accesses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuestStalls {
    /// Accesses timed.
    pub accesses: u64,
    /// The median access, in ns: the upper edge of its bucket.
    pub p50_ns: u64,
    /// The 99th percentile, in ns: the upper edge of its bucket (so at most 25% high).
    pub p99_ns: u64,
    /// The longest access, in ns (exact).
    pub max_ns: u64,
    /// `[bucket, accesses]` for every non-empty bucket ([`guest_abi::stalls::bucket`]).
    pub buckets: Vec<(u32, u64)>,
}

impl GuestStalls {
    /// Merges what `vcpus` reported; `None` if none timed its accesses or the TSC frequency
    /// is unknown.
    pub fn from_vcpus(vcpus: &[VcpuStats], tsc_khz: u64) -> Option<GuestStalls> {
        if tsc_khz == 0 {
            return None;
        }
        let mut counts = [0u64; BUCKETS];
        let mut max_cycles = None::<u64>;
        for v in vcpus {
            let Some(max) = v.report(STALL_MAX_KEY) else {
                continue;
            };
            max_cycles = Some(max_cycles.unwrap_or(0).max(max));
            for (key, value) in &v.reports {
                let bucket = key
                    .strip_prefix(STALL_BUCKET_PREFIX)
                    .and_then(|b| b.parse::<usize>().ok())
                    .filter(|&b| b < BUCKETS);
                if let Some(b) = bucket {
                    counts[b] += value;
                }
            }
        }
        let max_cycles = max_cycles?;
        let ns = |cycles: u64| (cycles as u128 * 1_000_000 / u128::from(tsc_khz)) as u64;
        let accesses: u64 = counts.iter().sum();
        let quantile = |q: f64| {
            let want = ((accesses as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (b, &n) in counts.iter().enumerate() {
                seen += n;
                if seen >= want {
                    // Never past the longest access actually seen.
                    return ns(upper_edge(b).min(max_cycles));
                }
            }
            ns(max_cycles)
        };
        Some(GuestStalls {
            accesses,
            p50_ns: quantile(0.50),
            p99_ns: quantile(0.99),
            max_ns: ns(max_cycles),
            buckets: counts
                .iter()
                .enumerate()
                .filter(|&(_, &n)| n > 0)
                .map(|(b, &n)| (b as u32, n))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_abi::stalls::bucket;

    #[test]
    fn every_count_lies_within_its_bucket() {
        for c in (0..5000u64).chain([u64::MAX, u64::MAX / 3, 1 << 40, (1 << 40) - 1]) {
            let b = bucket(c);
            assert!(b < BUCKETS, "{c}");
            assert!(c <= upper_edge(b), "{c} above bucket {b}");
            assert!(b == 0 || c > upper_edge(b - 1), "{c} below bucket {b}");
        }
    }

    fn vcpu(index: u32, reports: &[(&str, u64)]) -> VcpuStats {
        let mut v = VcpuStats::new(index);
        for (k, n) in reports {
            v.add_report(k.to_string(), *n);
        }
        v
    }

    #[test]
    fn buckets_merge_over_vcpus_and_quantiles_take_upper_edges() {
        // 1 GHz: one cycle is one ns.
        let a = vcpu(
            0,
            &[
                ("pages", 100),
                ("stall_max_cycles", 5000),
                ("stall_log2_40", 98),
                ("stall_log2_48", 2),
            ],
        );
        let b = vcpu(1, &[("stall_max_cycles", 9000), ("stall_log2_40", 100)]);
        let s = GuestStalls::from_vcpus(&[a, b], 1_000_000).unwrap();
        assert_eq!(s.accesses, 200);
        assert_eq!(s.buckets, vec![(40, 198), (48, 2)]);
        // Bucket 40 holds 1024 to 1279 cycles.
        assert_eq!(s.p50_ns, 1279);
        // The 198th access is the last of bucket 40.
        assert_eq!(s.p99_ns, 1279);
        assert_eq!(s.max_ns, 9000);
    }

    #[test]
    fn the_tail_is_capped_by_the_longest_access_and_nothing_reported_is_none() {
        let a = vcpu(0, &[("stall_max_cycles", 5000), ("stall_log2_51", 10)]);
        let s = GuestStalls::from_vcpus(&[a], 2_000_000).unwrap();
        assert_eq!((s.p99_ns, s.max_ns), (2500, 2500));
        assert_eq!(
            GuestStalls::from_vcpus(&[vcpu(0, &[("pages", 1)])], 1),
            None
        );
        let bogus = vcpu(0, &[("stall_max_cycles", 1), ("stall_log2_999", 1)]);
        assert_eq!(
            GuestStalls::from_vcpus(std::slice::from_ref(&bogus), 0),
            None
        );
        assert_eq!(GuestStalls::from_vcpus(&[bogus], 1).unwrap().accesses, 0);
    }
}
