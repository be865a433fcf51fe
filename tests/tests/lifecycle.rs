//! How a run ends: timeout, signals, a user's own executable, the metrics summary.

use std::time::Duration;

use integration_tests::{TempDir, read_json, require_kvm, spawn, vmm_fails, vmm_ok, wait};
use vmm::loader::BUILTIN_IMAGES;
use vmm::vm::exit_code;

/// A `touch` run long enough to still be going when the test acts on it.
const ENDLESS: [&str; 8] = [
    "run",
    "--guest",
    "touch",
    "--memory",
    "8M",
    "--arg",
    "passes=100000000",
    "--vcpus=2",
];

#[test]
fn timeout_stops_a_guest_that_does_not_finish() {
    require_kvm!();
    let mut args = ENDLESS.to_vec();
    args.extend(["--timeout", "1"]);
    vmm_fails(
        &args,
        exit_code::TIMED_OUT,
        &["did not finish within --timeout 1s"],
    );
}

#[test]
fn sigterm_and_sigint_stop_the_guest_cleanly() {
    require_kvm!();
    for (sig, code) in [(libc::SIGTERM, 128 + 15), (libc::SIGINT, 128 + 2)] {
        let dir = TempDir::new("signal");
        let metrics = dir.path("m.json");
        let mut args = ENDLESS.to_vec();
        args.extend(["--metrics", &metrics]);
        let child = spawn(&args);
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: signalling our own child process, which is still running (not yet waited).
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let run = wait(child);
        assert_eq!(run.code, Some(code), "{run}");
        assert!(run.stderr.contains("stopped by signal"), "{run}");
        // A clean stop still writes the summary.
        assert_eq!(read_json(&metrics)["exit_code"], code);
    }
}

#[test]
fn a_users_own_static_executable_runs_from_a_path() {
    require_kvm!();
    let dir = TempDir::new("user-elf");
    let path = dir.path("hello.elf");
    let hello = BUILTIN_IMAGES
        .iter()
        .find(|(n, _)| *n == "hello")
        .unwrap()
        .1;
    std::fs::write(&path, hello).unwrap();
    let run = vmm_ok(&["run", "--guest", &path, "--memory", "8M"]);
    assert!(
        run.stdout.starts_with("Hello from vCPU 0 of 1 (8 MiB"),
        "{}",
        run.stdout
    );
}

#[test]
fn metrics_summary_counts_exits_per_vcpu() {
    require_kvm!();
    let dir = TempDir::new("metrics");
    let metrics = dir.path("m.json");
    vmm_ok(&[
        "run",
        "--guest",
        "hello",
        "--vcpus",
        "2",
        "--memory",
        "8M",
        "--metrics",
        &metrics,
    ]);
    let json = read_json(&metrics);
    assert_eq!(json["exit_code"], 0);
    assert!(json["wall_time_ns"].as_u64().unwrap() > 0);
    let vcpus = json["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2);
    for (i, v) in vcpus.iter().enumerate() {
        assert_eq!(v["index"], i);
        assert_eq!(v["exit_code"], 0);
        // At least one serial write and the done ucall.
        assert!(v["exits"]["io_out"].as_u64().unwrap() >= 1, "{v}");
        assert!(v["exits"]["io_in"].as_u64().unwrap() >= 1, "{v}");
    }
}

#[test]
fn metrics_path_in_a_missing_directory_is_refused_before_running() {
    require_kvm!();
    vmm_fails(
        &[
            "run",
            "--memory",
            "8M",
            "--metrics",
            "/nonexistent/dir/m.json",
        ],
        exit_code::BAD_INPUT,
        &[
            "--metrics /nonexistent/dir/m.json",
            "/nonexistent/dir does not exist",
        ],
    );
}
