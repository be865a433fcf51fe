//! Rate-limited logging for anything a guest can trigger: one misbehaving guest must not turn
//! the VMM's log into its own flood.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines one call site may log per window.
pub const LINES_PER_WINDOW: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Per-call-site state for [`log_ratelimited!`](crate::log_ratelimited).
#[derive(Debug)]
pub struct RateLimit {
    state: Mutex<Option<(Instant, u32, u64)>>,
}

impl RateLimit {
    /// A fresh limiter (for a `static`).
    pub const fn new() -> Self {
        RateLimit {
            state: Mutex::new(None),
        }
    }

    /// Whether a line may be logged now; when a new window opens after suppression, also how
    /// many lines were suppressed in the last one.
    pub fn check(&self) -> (bool, u64) {
        let now = Instant::now();
        let mut state = crate::sync::lock(&self.state);
        let (start, count, suppressed) = state.get_or_insert((now, 0, 0));
        let mut reported = 0;
        if now.duration_since(*start) >= WINDOW {
            reported = *suppressed;
            *start = now;
            *count = 0;
            *suppressed = 0;
        }
        if *count < LINES_PER_WINDOW {
            *count += 1;
            (true, reported)
        } else {
            *suppressed += 1;
            (false, reported)
        }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `log_ratelimited!(Level, "fmt", args...)`: logs at most [`LINES_PER_WINDOW`] lines per
/// [`WINDOW`] from this call site, and says how many were suppressed.
#[macro_export]
macro_rules! log_ratelimited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        let (allowed, suppressed) = LIMIT.check();
        if suppressed > 0 {
            log::log!($level, "({suppressed} similar messages suppressed)");
        }
        if allowed {
            log::log!($level, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_window_then_suppresses() {
        let limit = RateLimit::new();
        let allowed = (0..100).filter(|_| limit.check().0).count();
        assert_eq!(allowed, LINES_PER_WINDOW as usize);
    }
}
