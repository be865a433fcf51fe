//! The ledger: huge-page memory charged to the VM against a limit (this VMM's memory cgroup).
//!
//! Every huge page the collapse thread takes is charged before it is used and uncharged on
//! every path that gives it back, and at teardown for every page still in guest RAM. The
//! balance never goes negative and ends at zero.

use std::sync::atomic::{AtomicU64, Ordering};

/// A charge that would exceed the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "charging {bytes} bytes would exceed the huge-page limit ({charged} of {limit} bytes charged)"
)]
pub struct ChargeError {
    /// Bytes asked for.
    pub bytes: u64,
    /// Bytes charged at the time.
    pub charged: u64,
    /// The limit.
    pub limit: u64,
}

/// Called on every charge attempt (tests use it to check which locks are held).
pub type ChargeObserver = Box<dyn Fn() + Send + Sync>;

/// Bytes charged against a limit.
pub struct Ledger {
    limit: u64,
    charged: AtomicU64,
    peak: AtomicU64,
    failures: AtomicU64,
    observer: Option<ChargeObserver>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("limit", &self.limit)
            .field("charged", &self.charged())
            .field("peak", &self.peak())
            .finish()
    }
}

impl Ledger {
    /// A ledger with nothing charged.
    pub fn new(limit: u64) -> Self {
        Ledger {
            limit,
            charged: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            observer: None,
        }
    }

    /// A ledger that calls `observer` on every charge attempt.
    pub fn with_observer(limit: u64, observer: ChargeObserver) -> Self {
        Ledger {
            observer: Some(observer),
            ..Self::new(limit)
        }
    }

    /// Charges `bytes`, or fails without changing anything if that would pass the limit.
    pub fn charge(&self, bytes: u64) -> Result<(), ChargeError> {
        if let Some(observe) = &self.observer {
            observe();
        }
        let mut current = self.charged.load(Ordering::Acquire);
        fail::fail_point!("ledger-charge", |_| {
            self.failures.fetch_add(1, Ordering::Relaxed);
            Err(ChargeError {
                bytes,
                charged: current,
                limit: self.limit,
            })
        });
        loop {
            let next = current.checked_add(bytes).filter(|&n| n <= self.limit);
            let Some(next) = next else {
                self.failures.fetch_add(1, Ordering::Relaxed);
                return Err(ChargeError {
                    bytes,
                    charged: current,
                    limit: self.limit,
                });
            };
            match self.charged.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::AcqRel);
                    return Ok(());
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives back `bytes` charged earlier.
    ///
    /// # Panics
    /// If more is uncharged than is charged: that is a bookkeeping bug that would otherwise
    /// let the VM exceed its limit later.
    pub fn uncharge(&self, bytes: u64) {
        let previous = self.charged.fetch_sub(bytes, Ordering::AcqRel);
        assert!(
            previous >= bytes,
            "ledger underflow: uncharging {bytes} with {previous} charged"
        );
    }

    /// Bytes charged now.
    pub fn charged(&self) -> u64 {
        self.charged.load(Ordering::Acquire)
    }

    /// The most ever charged at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Charges refused so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Charge(u64),
        Uncharge(usize),
    }

    proptest! {
        /// The ledger against a naive model: a list of outstanding charges.
        #[test]
        fn ledger_matches_model(limit in 0u64..64, ops in proptest::collection::vec(
            prop_oneof![(1u64..16).prop_map(Op::Charge), any::<usize>().prop_map(Op::Uncharge)], 0..200)) {
            let ledger = Ledger::new(limit);
            let mut outstanding: Vec<u64> = Vec::new();
            let (mut peak, mut failures) = (0, 0);
            for op in ops {
                match op {
                    Op::Charge(n) => {
                        let total: u64 = outstanding.iter().sum();
                        let ok = total + n <= limit;
                        prop_assert_eq!(ledger.charge(n).is_ok(), ok);
                        if ok { outstanding.push(n); peak = peak.max(total + n); } else { failures += 1; }
                    }
                    Op::Uncharge(i) => {
                        if outstanding.is_empty() { continue; }
                        let n = outstanding.remove(i % outstanding.len());
                        ledger.uncharge(n);
                    }
                }
                prop_assert_eq!(ledger.charged(), outstanding.iter().sum::<u64>());
                prop_assert!(ledger.charged() <= limit);
            }
            prop_assert_eq!(ledger.peak(), peak);
            prop_assert_eq!(ledger.failures(), failures);
            for n in outstanding.drain(..) { ledger.uncharge(n); }
            prop_assert_eq!(ledger.charged(), 0);
        }
    }

    #[test]
    #[should_panic(expected = "ledger underflow")]
    fn uncharging_more_than_charged_is_a_bug() {
        let ledger = Ledger::new(10);
        ledger.charge(4).unwrap();
        ledger.uncharge(5);
    }

    #[test]
    fn concurrent_charges_never_pass_the_limit() {
        let ledger = std::sync::Arc::new(Ledger::new(100));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = ledger.clone();
                std::thread::spawn(move || (0..1000).filter(|_| l.charge(1).is_ok()).count())
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 100);
        assert_eq!(ledger.charged(), 100);
        assert_eq!(ledger.failures(), 3900);
    }
}
