//! The built-in guests, end to end through the `vmm` binary on /dev/kvm.

use integration_tests::{TempDir, read_json, reports, require_kvm, vmm, vmm_fails, vmm_ok};
use vmm::vm::exit_code;

#[test]
fn hello_greets_from_every_vcpu_and_exits_zero() {
    require_kvm!();
    let run = vmm_ok(&["run", "--guest", "hello", "--vcpus", "2", "--memory", "16M"]);
    assert_eq!(
        run.stdout.lines().collect::<Vec<_>>(),
        [
            "Hello from vCPU 0 of 2 (16 MiB of guest RAM)",
            "Hello from vCPU 1 of 2 (16 MiB of guest RAM)"
        ],
        "{run}"
    );
}

#[test]
fn make_run_default_is_hello() {
    require_kvm!();
    let run = vmm_ok(&["run"]);
    assert!(
        run.stdout.contains("Hello from vCPU 0 of 1 (128 MiB"),
        "{run}"
    );
}

/// Runs `touch` and returns the pages each vCPU reported.
fn touch(vcpus: &str, pattern: &str, access: &str, size: &str) -> Vec<(u32, u64)> {
    let dir = TempDir::new("touch");
    let metrics = dir.path("m.json");
    let mut args = vec![
        "run",
        "--guest",
        "touch",
        "--memory",
        "32M",
        "--vcpus",
        vcpus,
        "--metrics",
        &metrics,
    ];
    let (p, a, s) = (
        format!("pattern={pattern}"),
        format!("access={access}"),
        format!("size={size}"),
    );
    args.extend(["--arg", &p, "--arg", &a]);
    if !size.is_empty() {
        args.extend(["--arg", &s]);
    }
    let run = vmm_ok(&args);
    let cycles = reports(&run.stdout, "cycles");
    assert_eq!(cycles.len(), vcpus.parse::<usize>().unwrap(), "{run}");
    assert!(cycles.iter().all(|&(_, c)| c > 0), "{run}");
    let json = read_json(&metrics);
    assert_eq!(json["exit_code"], 0);
    assert_eq!(
        json["vcpus"].as_array().unwrap().len(),
        vcpus.parse::<usize>().unwrap()
    );
    let mut pages = reports(&run.stdout, "pages");
    pages.sort();
    pages
}

#[test]
fn touch_one_vcpu_sequential_covers_all_free_ram() {
    require_kvm!();
    // 32 MiB of RAM, the first 4 MiB reserved and the program's extent (4-6 MiB) in use.
    let pages = touch("1", "seq", "write", "");
    assert_eq!(pages, [(0, (32 - 6) << 8)]);
}

#[test]
fn touch_two_vcpus_random_splits_the_range() {
    require_kvm!();
    let pages = touch("2", "random", "write", "8M");
    assert_eq!(pages, [(0, 1024), (1, 1024)]);
}

#[test]
fn touch_two_vcpus_sequential_reads() {
    require_kvm!();
    let pages = touch("2", "seq", "read", "4M");
    assert_eq!(pages, [(0, 512), (1, 512)]);
}

#[test]
fn touch_one_vcpu_random_uneven_size() {
    require_kvm!();
    // 1001 pages over one vCPU in random order: every page exactly once.
    let pages = touch("1", "random", "write", "4004K");
    assert_eq!(pages, [(0, 1001)]);
}

#[test]
fn verify_fills_then_checks_in_one_run() {
    require_kvm!();
    let run = vmm_ok(&[
        "run",
        "--guest",
        "verify",
        "--vcpus",
        "2",
        "--memory",
        "24M",
        "--arg",
        "mode=fill-check",
        "--arg",
        "seed=42",
    ]);
    let mut mismatches = reports(&run.stdout, "mismatches");
    mismatches.sort();
    assert_eq!(mismatches, [(0, 0), (1, 0)], "{run}");
}

#[test]
fn verify_stress_passes_on_two_vcpus() {
    require_kvm!();
    let run = vmm_ok(&[
        "run",
        "--guest",
        "verify",
        "--vcpus",
        "2",
        "--memory",
        "16M",
        "--arg",
        "mode=stress",
        "--arg",
        "passes=3",
    ]);
    assert_eq!(reports(&run.stdout, "passes").len(), 2, "{run}");
}

#[test]
fn verify_check_of_unwritten_memory_reports_mismatches() {
    require_kvm!();
    // Fresh RAM holds zeroes, not the pattern: the checker must notice and fail.
    let run = vmm(&[
        "run",
        "--guest",
        "verify",
        "--memory",
        "8M",
        "--arg",
        "mode=check",
    ]);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stdout.contains("mismatch at 0x600000: expected 0x"),
        "{run}"
    );
    let mismatches = reports(&run.stdout, "mismatches");
    assert_eq!(
        mismatches,
        [(0, 3 * 512)],
        "three words in each of 512 pages\n{run}"
    );
}

#[test]
fn misbehave_triple_fault_ends_with_registers() {
    require_kvm!();
    vmm_fails(
        &[
            "run",
            "--guest",
            "misbehave",
            "--arg",
            "kind=triple-fault",
            "--memory",
            "8M",
        ],
        exit_code::GUEST_FAILED,
        &["triple-fault", "rip=0x", "cr3=0x30000"],
    );
}

#[test]
fn misbehave_bad_ucall_is_refused() {
    require_kvm!();
    vmm_fails(
        &[
            "run",
            "--guest",
            "misbehave",
            "--arg",
            "kind=bad-ucall",
            "--memory",
            "8M",
        ],
        exit_code::GUEST_FAILED,
        &["ucall address 0x4000000000000", "rdi=0x4000000000000"],
    );
}

#[test]
fn misbehave_unknown_port_reads_all_ones_and_goes_on() {
    require_kvm!();
    let run = vmm_ok(&[
        "run",
        "--guest",
        "misbehave",
        "--arg",
        "kind=unknown-port",
        "--memory",
        "8M",
    ]);
    assert!(
        run.stdout
            .contains("unclaimed port read 0xff, unclaimed MMIO read 0xffffffff"),
        "{run}"
    );
    assert!(run.stderr.contains("unclaimed port 0x2345"), "{run}");
}

#[test]
fn misbehave_serial_flood_is_rate_limited() {
    require_kvm!();
    let dir = TempDir::new("flood");
    let metrics = dir.path("m.json");
    let run = vmm_ok(&[
        "run",
        "--guest",
        "misbehave",
        "--arg",
        "kind=serial-flood",
        "--arg",
        "bytes=192K",
        "--memory",
        "8M",
        "--metrics",
        &metrics,
    ]);
    let json = read_json(&metrics);
    let written = json["console"]["written_bytes"].as_u64().unwrap();
    let dropped = json["console"]["dropped_bytes"].as_u64().unwrap();
    assert_eq!(written + dropped, (192 << 10) + 1);
    assert_eq!(run.stdout.len() as u64, written);
    assert!(dropped > 0, "{written} written, nothing dropped");
    assert!(
        run.stderr.contains(&format!("dropped {dropped} bytes")),
        "{run}"
    );
}

/// A guest that aborts is reported with its file, line and message. (The built-in `touch`
/// copied to a file: the VMM checks a built-in's arguments before it boots, but not those of
/// a guest file, so this one reaches the guest, which refuses it itself.)
#[test]
fn guest_abort_is_reported_with_location() {
    require_kvm!();
    let dir = integration_tests::TempDir::new("guest-abort");
    let touch = integration_tests::builtin_as_file(&dir, "touch");
    vmm_fails(
        &[
            "run",
            "--guest",
            &touch,
            "--arg",
            "pattern=zigzag",
            "--memory",
            "8M",
        ],
        exit_code::GUEST_ABORTED,
        &[
            "guest aborted on vcpu0",
            "touch.rs:",
            "argument pattern=zigzag is not allowed",
        ],
    );
}

#[test]
fn guests_lists_every_builtin() {
    let run = vmm_ok(&["guests"]);
    for name in ["hello", "touch", "verify", "misbehave"] {
        assert!(run.stdout.contains(name), "{run}");
    }
    assert!(run.stdout.contains("pattern=seq|random"), "{run}");
}
