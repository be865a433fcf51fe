//! Noticing a vCPU that has waited too long on one page fault (`--page-server-timeout`): an
//! external page server that is alive but no longer answers. The VMM does not see the faults
//! (the server reads them), so it watches the vCPU threads instead: a thread whose kernel wait
//! channel is `handle_userfault` and whose count of voluntary context switches has not moved
//! has been asleep in one userfaultfd wait all along (being served wakes it, and it sleeps
//! again for the next fault).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often the threads are looked at.
const EVERY: Duration = Duration::from_millis(100);

/// One vCPU thread's wait, as last seen.
struct Waiting {
    since: Instant,
    switches: u64,
}

/// Watches the vCPU threads of this process for one fault waited on longer than a bound.
pub(super) struct FaultWatch {
    bound: Duration,
    next: Instant,
    waits: HashMap<String, Waiting>,
}

impl FaultWatch {
    pub(super) fn new(bound: Duration) -> Self {
        FaultWatch {
            bound,
            next: Instant::now(),
            waits: HashMap::new(),
        }
    }

    /// The name of a vCPU thread that has waited on one fault for longer than the bound, and
    /// how long, if one has (looked at every [`EVERY`]).
    pub(super) fn overdue(&mut self) -> Option<(String, Duration)> {
        let now = Instant::now();
        if now < self.next {
            return None;
        }
        self.next = now + EVERY;
        let tasks = std::fs::read_dir("/proc/self/task").ok()?;
        let mut seen = Vec::new();
        for task in tasks.flatten() {
            let dir = task.path();
            let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
                continue;
            };
            let name = name.trim().to_string();
            if !name.starts_with("vcpu") {
                continue;
            }
            let waiting = std::fs::read_to_string(dir.join("wchan"))
                .is_ok_and(|w| w.trim() == "handle_userfault");
            let switches = std::fs::read_to_string(dir.join("status"))
                .ok()
                .and_then(|s| voluntary_switches(&s));
            let (true, Some(switches)) = (waiting, switches) else {
                self.waits.remove(&name);
                continue;
            };
            seen.push(name.clone());
            let wait = self.waits.entry(name.clone()).or_insert(Waiting {
                since: now,
                switches,
            });
            if wait.switches != switches {
                // Woken (served) and asleep on another fault since.
                *wait = Waiting {
                    since: now,
                    switches,
                };
            }
            let waited = now - wait.since;
            if waited >= self.bound {
                return Some((name, waited));
            }
        }
        self.waits.retain(|name, _| seen.contains(name));
        None
    }
}

/// `voluntary_ctxt_switches` from a `/proc/.../status` text.
fn voluntary_switches(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_parse_from_status() {
        let status = "Name:\tvcpu0\nvoluntary_ctxt_switches:\t42\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(voluntary_switches(status), Some(42));
        assert_eq!(voluntary_switches("Name: x\n"), None);
    }
}
