//! How a run ended, and what it reports: the summary `--metrics` writes.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::error::exit_code;
use crate::metrics::VcpuStats;
use crate::stalls::GuestStalls;
use vm_extents::MemoryReport;
use vm_extents::ram_image::SaveStats;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every vCPU sent done; the largest code.
    Done(u64),
    /// A vCPU aborted.
    Aborted {
        /// Its index.
        vcpu: u32,
        /// `file:line: message`.
        what: String,
    },
    /// A vCPU failed (triple fault, bad ucall, internal error...).
    Failed {
        /// Its index.
        vcpu: u32,
        /// What happened, with registers.
        what: String,
    },
    /// `--timeout` expired.
    TimedOut(Duration),
    /// SIGINT or SIGTERM.
    Interrupted(i32),
    /// A VMM thread failed while the guest ran (the fault handler).
    VmmFailed(String),
    /// A snapshot was taken and the VM stopped there (`--after-snapshot stop`).
    Snapshotted(crate::snapshot::Trigger),
    /// The guest finished, but saving its memory failed (the old image, if any, is intact).
    SaveFailed {
        /// The guest's own code.
        code: u64,
        /// Why the save failed.
        what: String,
    },
}

impl Outcome {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Done(code) => (*code).min(u64::from(exit_code::GUEST_MAX)) as u8,
            Outcome::Snapshotted(_) => 0,
            Outcome::Aborted { .. } => exit_code::GUEST_ABORTED,
            Outcome::Failed { .. } => exit_code::GUEST_FAILED,
            Outcome::TimedOut(_) => exit_code::TIMED_OUT,
            Outcome::Interrupted(sig) => 128 + *sig as u8,
            Outcome::VmmFailed(_) | Outcome::SaveFailed { .. } => exit_code::VMM_FAILED,
        }
    }

    /// A one-line description for the user.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Done(code) => format!("guest finished with code {code}"),
            Outcome::Snapshotted(by) => {
                format!("snapshotted (asked by {by}) and stopped; resume it with --resume")
            }
            Outcome::Aborted { vcpu, what } => format!("guest aborted on vcpu{vcpu}: {what}"),
            Outcome::Failed { vcpu, what } => format!("vcpu{vcpu} failed: {what}"),
            Outcome::TimedOut(t) => {
                format!(
                    "the guest did not finish within --timeout {}s; stopped it",
                    t.as_secs_f64()
                )
            }
            Outcome::Interrupted(sig) => format!("stopped by signal {sig}"),
            Outcome::VmmFailed(what) => format!("the VMM failed while the guest ran: {what}"),
            Outcome::SaveFailed { code, what } => {
                format!("the guest finished with code {code}, but saving its memory failed: {what}")
            }
        }
    }
}

/// Console output: what was written and what the rate limits dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConsoleSection {
    /// Serial bytes written.
    pub written_bytes: u64,
    /// Serial bytes dropped.
    pub dropped_bytes: u64,
    /// Ucall text bytes (prints, reports) written.
    pub ucall_written_bytes: u64,
    /// Ucall text bytes dropped.
    pub ucall_dropped_bytes: u64,
}

/// What `--save-memory` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct SavedImage {
    /// Where.
    pub path: PathBuf,
    /// How many pages of each kind.
    pub pages: SaveStats,
}

/// A snapshot this run took.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotTaken {
    /// Where.
    pub path: PathBuf,
    /// What asked for it.
    pub trigger: crate::snapshot::Trigger,
    /// When, in ns since the vCPUs started.
    pub at_ns: u64,
    /// How long the vCPUs were paused for it, in ns.
    pub paused_ns: u64,
    /// The memory image's pages.
    pub memory: SaveStats,
}

/// What a resumed VM did with its working set.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkingSetSection {
    /// `record`, `replay` or `none`.
    pub mode: &'static str,
    /// Extents in the record (recorded now, or replayed).
    pub extents: u64,
    /// 4 KiB pages in the record.
    pub pages: u64,
    /// Whether a record was written into the snapshot at the end of the run.
    pub saved: bool,
    /// Why a record made this run was not written (absent when it was, or none was made).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_saved: Option<String>,
}

/// The result of a run, which `--metrics` writes as JSON.
#[derive(Debug)]
pub struct RunSummary {
    /// The outcome, for the user.
    pub outcome: Outcome,
    /// From the first vCPU start to the end of teardown.
    pub wall: Duration,
    /// From the start of the build (memory mapped, an eager restore copied in) to the first
    /// vCPU start.
    pub to_first_instruction: Duration,
    /// From the first vCPU start to the end of the guest (every vCPU done, or the run
    /// stopped).
    pub guest: Duration,
    /// Per-vCPU counters.
    pub vcpus: Vec<VcpuStats>,
    /// Console output.
    pub console: ConsoleSection,
    /// What memory reported just before teardown, with teardown's results filled in.
    pub memory: MemoryReport,
    /// What `--save-memory` wrote, if it ran.
    pub saved: Option<SavedImage>,
    /// The TSC frequency KVM reported, in kHz (0 if unknown), to turn guest cycles into time.
    pub tsc_khz: u64,
    /// The snapshots taken.
    pub snapshots: Vec<SnapshotTaken>,
    /// A resumed VM's working set.
    pub working_set: Option<WorkingSetSection>,
}

/// The summary's JSON shape: the run's own fields, then memory's sections.
#[derive(Serialize)]
struct SummaryJson<'a> {
    exit_code: u8,
    outcome: String,
    wall_time_ns: u64,
    to_first_instruction_ns: u64,
    guest_time_ns: u64,
    vcpus: &'a [VcpuStats],
    console: ConsoleSection,
    saved_image: &'a Option<SavedImage>,
    snapshots: &'a [SnapshotTaken],
    #[serde(skip_serializing_if = "Option::is_none")]
    working_set: &'a Option<WorkingSetSection>,
    /// What the guest measured itself, where it timed its accesses (`timing=on`).
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_stalls: Option<GuestStalls>,
    #[serde(flatten)]
    memory: &'a MemoryReport,
}

impl RunSummary {
    /// The stalls the guest measured, merged over vCPUs (`None` unless it timed them).
    pub fn guest_stalls(&self) -> Option<GuestStalls> {
        GuestStalls::from_vcpus(&self.vcpus, self.tsc_khz)
    }

    /// The JSON summary written by `--metrics`.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(SummaryJson {
            exit_code: self.outcome.exit_code(),
            outcome: self.outcome.describe(),
            wall_time_ns: self.wall.as_nanos() as u64,
            to_first_instruction_ns: self.to_first_instruction.as_nanos() as u64,
            guest_time_ns: self.guest.as_nanos() as u64,
            vcpus: &self.vcpus,
            console: self.console,
            saved_image: &self.saved,
            snapshots: &self.snapshots,
            working_set: &self.working_set,
            guest_stalls: self.guest_stalls(),
            memory: &self.memory,
        })
        .expect("the summary is plain data")
    }
}
