//! A memory cgroup of the benchmark's own, to put the kernel under memory pressure: the
//! process moves into it for one run, the limit is lowered step by step towards a target (each
//! write makes the kernel reclaim inside the cgroup, its shrinkers included), then lifted; at
//! the end the process moves back and the cgroup is removed. cgroup v1's memory controller
//! (`memory.limit_in_bytes`) or v2's (`memory.max`), whichever this host mounts.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::BenchError;

/// The memory cgroup this process is in, and one made inside it for a run.
pub struct Memcg {
    /// Where the process was.
    home: PathBuf,
    /// The cgroup made for the run.
    dir: PathBuf,
    /// The limit file (`memory.limit_in_bytes` or `memory.max`).
    limit: &'static str,
    /// The usage file.
    usage: &'static str,
    /// What lifts the limit.
    unlimited: &'static str,
}

impl Memcg {
    /// Makes a memory cgroup `name-PID` inside this process's own, and moves the process in.
    pub fn enter(name: &str) -> Result<Memcg, BenchError> {
        let setup = |what: String| BenchError::Setup(format!("memory cgroup: {what}"));
        let cgroups = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| setup(format!("reading /proc/self/cgroup: {e}")))?;
        let (home, limit, usage, unlimited) = if let Some(path) = cgroups
            .lines()
            .filter_map(|l| l.split_once(':').and_then(|(_, r)| r.split_once(':')))
            .find(|(controllers, _)| controllers.split(',').any(|c| c == "memory"))
            .map(|(_, path)| path)
        {
            (
                Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "-1",
            )
        } else if let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) {
            (
                Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')),
                "memory.max",
                "memory.current",
                "max",
            )
        } else {
            return Err(setup("this process is in no memory cgroup".into()));
        };
        let dir = home.join(format!("{name}-{}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| setup(format!("making {}: {e}", dir.display())))?;
        let memcg = Memcg {
            home,
            dir,
            limit,
            usage,
            unlimited,
        };
        if !memcg.dir.join(limit).exists() {
            return Err(setup(format!(
                "{} has no {limit} (the memory controller is not enabled there)",
                memcg.dir.display()
            )));
        }
        memcg.move_to(&memcg.dir)?;
        Ok(memcg)
    }

    fn move_to(&self, cgroup: &Path) -> Result<(), BenchError> {
        fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).map_err(|e| {
            BenchError::Setup(format!(
                "memory cgroup: moving this process into {}: {e}",
                cgroup.display()
            ))
        })
    }

    /// Bytes charged to the cgroup.
    pub fn usage(&self) -> u64 {
        fs::read_to_string(self.dir.join(self.usage))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Lowers the limit in `step`s from the usage towards `target`, each write making the
    /// kernel reclaim; stops where the kernel can reclaim no more (the write is refused) or at
    /// the target; then lifts the limit. Returns the lowest limit the kernel met.
    pub fn squeeze(&self, target: u64, step: u64) -> u64 {
        let file = self.dir.join(self.limit);
        let mut limit = self.usage();
        let mut met = limit;
        while limit > target {
            limit = limit.saturating_sub(step).max(target);
            // v1 refuses (EBUSY) a limit it cannot reclaim down to; v2 takes it and reclaims
            // what it can (and would OOM-kill past that: the usage says where it stopped).
            if fs::write(&file, limit.to_string()).is_err() || self.usage() > limit {
                break;
            }
            met = limit;
        }
        let _ = fs::write(&file, self.unlimited);
        met
    }
}

impl Drop for Memcg {
    /// Moves the process back and removes the cgroup (once what was charged to it, the run's
    /// guest RAM, is freed).
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join(self.limit), self.unlimited);
        if let Err(e) = self.move_to(&self.home.clone()) {
            log::warn!("{e}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = fs::remove_dir(&self.dir) {
            if Instant::now() > deadline {
                log::warn!("removing the memory cgroup {}: {e}", self.dir.display());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A counter of `/proc/vmstat`.
pub fn vmstat(name: &str) -> Option<u64> {
    fs::read_to_string("/proc/vmstat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A kernel setting changed for a run, restored on drop.
pub struct Setting {
    path: &'static str,
    was: String,
}

impl Setting {
    /// Writes `value` to `path`, keeping what was there.
    pub fn set(path: &'static str, value: &str) -> Result<Setting, BenchError> {
        let failed =
            |e: std::io::Error| BenchError::Setup(format!("setting {path} to {value}: {e}"));
        let was = fs::read_to_string(path).map_err(failed)?;
        fs::write(path, value).map_err(failed)?;
        Ok(Setting {
            path,
            was: was.trim().to_string(),
        })
    }
}

impl Drop for Setting {
    fn drop(&mut self) {
        if let Err(e) = fs::write(self.path, &self.was) {
            log::warn!("restoring {} to {}: {e}", self.path, self.was);
        }
    }
}
