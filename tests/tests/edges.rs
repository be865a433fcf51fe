//! Trust at the edges: every path a user names and everything a guest can do is refused or
//! bounded before it can cost data, host files or host memory.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::Command;
use std::time::Duration;

use integration_tests::{
    Nobody, TempDir, is_root, report_sum, require_kvm, vmm, vmm_fails, vmm_ok, vmm_within, wait,
    words,
};
use vmm::vm::exit_code;

fn mkfifo(path: &str) {
    let status = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(status.success());
}

/// `verify mode=fill seed=7` on 64 MiB, saved to `image`.
fn fill(image: &str) {
    let run = vmm_ok(&words(&format!(
        "run --guest verify --memory 64M --arg mode=fill --arg seed=7 --save-memory {image}"
    )));
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{run}");
}

/// `verify mode=check seed=7` on 64 MiB restored from `image`; returns the mismatches.
fn check(image: &str) -> u64 {
    let run = vmm(&words(&format!(
        "run --guest verify --memory 64M --arg mode=check --arg seed=7 --page-source \
         image:{image} --collapse off"
    )));
    assert!(matches!(run.code, Some(0 | 1)), "{run}");
    report_sum(&run.stdout, "mismatches")
}

#[test]
fn save_memory_never_replaces_a_device_a_link_a_fifo_or_a_directory() {
    require_kvm!();
    let dir = TempDir::new("save-targets");
    let link = dir.path("link");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    let sub = dir.path("sub");
    std::fs::create_dir(&sub).unwrap();
    let mut targets = vec![
        (link.clone(), "a symbolic link"),
        (fifo.clone(), "a FIFO"),
        (sub.clone(), "a directory"),
        ("/tmp".to_string(), "a directory"),
    ];
    let node = dir.path("null");
    if is_root() {
        // A private copy of /dev/null: the system's own is never put at risk by the test.
        let status = Command::new("mknod")
            .args([&node, "c", "1", "3"])
            .status()
            .unwrap();
        assert!(status.success());
        targets.push((node.clone(), "a character device"));
    }
    for (target, kind) in &targets {
        let run = vmm_fails(
            &["run", "--memory", "64M", "--save-memory", target],
            exit_code::BAD_INPUT,
            &[&format!("--save-memory {target}: it is {kind}")],
        );
        assert!(
            !run.stdout.contains("Hello"),
            "refused before the guest ran\n{run}"
        );
    }
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    if is_root() {
        let meta = std::fs::metadata(&node).unwrap();
        assert!(meta.file_type().is_char_device() && meta.rdev() == libc::makedev(1, 3));
    }
}

#[test]
fn output_targets_are_checked_before_the_guest_runs() {
    require_kvm!();
    for (flag, path, needle) in [
        (
            "--save-memory",
            "/proc/vmm-test.img",
            "cannot create files in /proc",
        ),
        (
            "--metrics",
            "/proc/vmm-test.json",
            "cannot create files in /proc",
        ),
        ("--metrics", "/tmp", "it is a directory"),
        ("--save-memory", "/nonexistent/dir/x.img", "does not exist"),
    ] {
        let run = vmm_fails(
            &["run", "--memory", "8M", flag, path],
            exit_code::BAD_INPUT,
            &[needle],
        );
        assert!(!run.stdout.contains("Hello"), "{run}");
    }
    // A metrics FIFO with no reader is refused at once instead of blocking.
    let dir = TempDir::new("metrics-fifo");
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    let (run, took) = vmm_within(
        &["run", "--memory", "8M", "--metrics", &fifo],
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(run.code, Some(i32::from(exit_code::BAD_INPUT)), "{run}");
    assert!(
        run.stderr.contains("no process has open for reading"),
        "{run}"
    );
    assert!(took < Duration::from_secs(10));
    // With a reader, the summary goes down the FIFO and the FIFO stays a FIFO.
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    std::thread::sleep(Duration::from_millis(100));
    let run = vmm_ok(&["run", "--memory", "8M", "--metrics", &fifo]);
    let text = reader.join().unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}\n{run}"));
    assert_eq!(json["exit_code"], 0);
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

/// Outputs that would fail only when written are refused before the guest runs: names too
/// long for the temporary an atomic write goes through, a symbolic link where the interval
/// lines go, and an image converted onto itself.
#[test]
fn outputs_that_would_fail_late_are_refused_up_front() {
    require_kvm!();
    let dir = TempDir::new("late-outputs");
    // 248 bytes: a valid name, but `.NAME.tmp-PID` is longer than NAME_MAX.
    let long = dir.path(&"x".repeat(248));
    for flag in ["--save-memory", "--metrics"] {
        let run = vmm_fails(
            &["run", "--memory", "8M", flag, &long],
            exit_code::BAD_INPUT,
            &[flag, "its file name is 248 bytes", "at most 242 bytes"],
        );
        assert!(!run.stdout.contains("Hello"), "{run}");
    }
    // The longest name allowed works end to end.
    let longest = dir.path(&"y".repeat(242));
    integration_tests::vmm_ok(&["run", "--memory", "8M", "--save-memory", &longest]);
    assert!(std::fs::metadata(&longest).is_ok());
    // A symbolic link where `--metrics-interval` appends its lines.
    let metrics = dir.path("m.json");
    let target = dir.path("elsewhere");
    std::fs::write(&target, "").unwrap();
    std::os::unix::fs::symlink(&target, format!("{metrics}.jsonl")).unwrap();
    let run = vmm_fails(
        &[
            "run",
            "--memory",
            "8M",
            "--metrics",
            &metrics,
            "--metrics-interval",
            "1",
        ],
        exit_code::BAD_INPUT,
        &["m.json.jsonl", "never through a symbolic link"],
    );
    assert!(!run.stdout.contains("Hello"), "{run}");
    // Converting an image onto itself, by one name or two.
    let image = dir.path("ram.img");
    integration_tests::vmm_ok(&["run", "--memory", "8M", "--save-memory", &image]);
    let raw = dir.path("ram.raw");
    integration_tests::vmm_ok(&["image", "export", &image, &raw]);
    let alias = dir.path("alias.img");
    std::fs::hard_link(&image, &alias).unwrap();
    let before = std::fs::read(&image).unwrap();
    for (command, from, to) in [
        ("export", &image, &image),
        ("export", &image, &alias),
        ("import", &raw, &raw),
    ] {
        vmm_fails(
            &["image", command, from, to],
            exit_code::BAD_INPUT,
            &["it is the file being read"],
        );
    }
    assert_eq!(std::fs::read(&image).unwrap(), before, "the image changed");
    vmm_fails(
        &["image", "export", &image, &dir.path(&"z".repeat(250))],
        exit_code::BAD_INPUT,
        &["its file name is 250 bytes"],
    );
}

#[test]
fn a_file_owned_by_another_user_in_a_sticky_directory_is_refused_up_front() {
    require_kvm!();
    let Some(nobody) = Nobody::new("sticky") else {
        return;
    };
    // /tmp is sticky: nobody may not rename over root's file there.
    let theirs = format!("/tmp/vmm-test-rootfile-{}", std::process::id());
    std::fs::write(&theirs, b"root's").unwrap();
    for flag in ["--save-memory", "--metrics"] {
        let run = nobody.vmm(&["run", "--memory", "8M", "--collapse", "off", flag, &theirs]);
        assert_eq!(run.code, Some(i32::from(exit_code::BAD_INPUT)), "{run}");
        assert!(
            run.stderr
                .contains("is sticky, so this user may not replace it"),
            "{run}"
        );
        assert!(!run.stdout.contains("Hello"), "{run}");
    }
    assert_eq!(std::fs::read(&theirs).unwrap(), b"root's");
    std::fs::remove_file(&theirs).unwrap();
}

#[test]
fn restore_then_save_keeps_every_byte_of_the_image() {
    require_kvm!();
    let dir = TempDir::new("restore-save");
    let (a, b) = (dir.path("a.img"), dir.path("b.img"));
    fill(&a);
    // A guest that touches almost nothing, restored from a and saved to b.
    vmm_ok(&words(&format!(
        "run --guest hello --memory 64M --page-source image:{a} --save-memory {b}"
    )));
    assert_eq!(check(&b), 0, "b.img lost what a.img held");
    let blocks = |p: &str| std::fs::metadata(p).unwrap().blocks();
    assert!(
        blocks(&b) * 10 >= blocks(&a) * 9,
        "{} vs {}",
        blocks(&b),
        blocks(&a)
    );
    // Saving over the image being restored from, with 2 MiB faults and collapse on.
    vmm_ok(&words(&format!(
        "run --guest hello --memory 64M --page-source image:{a} --fault-granularity 2M \
         --save-memory {a}"
    )));
    assert_eq!(check(&a), 0, "a.img lost data when saved over itself");
}

#[test]
fn guest_files_and_images_must_be_regular_files() {
    require_kvm!();
    let dir = TempDir::new("inputs");
    let fifo = dir.path("fifo");
    mkfifo(&fifo);
    for args in [
        vec!["run", "--guest", fifo.as_str()],
        vec!["run", "--page-source", &format!("image:{fifo}")],
        vec!["run", "--guest", "/dev/zero"],
        vec!["run", "--page-source", "image:/dev/zero"],
        vec!["run", "--page-source", "image:/tmp"],
        vec!["run", "--guest", "/tmp/"],
    ] {
        let (run, took) = vmm_within(&args, &[], Duration::from_secs(20));
        assert_eq!(
            run.code,
            Some(i32::from(exit_code::BAD_INPUT)),
            "{args:?}\n{run}"
        );
        assert!(run.stderr.contains("not a regular file"), "{args:?}\n{run}");
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
    }
    let big = dir.path("big.elf");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(vmm::loader::MAX_GUEST_FILE + 1)
        .unwrap();
    vmm_fails(
        &["run", "--guest", &big],
        exit_code::BAD_INPUT,
        &["bytes; at most 268435456 are allowed"],
    );
}

#[test]
fn an_unprivileged_user_runs_by_default_and_is_told_what_needs_userfaultfd() {
    require_kvm!();
    let Some(nobody) = Nobody::new("unprivileged") else {
        return;
    };
    let setting = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").ok();
    if setting.as_deref().map(str::trim) != Some("0") {
        eprintln!("SKIP: vm.unprivileged_userfaultfd is not 0 here");
        return;
    }
    let run = nobody.vmm(&["run", "--memory", "16M"]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stderr.contains("running without the collapse thread"),
        "{run}"
    );
    assert!(run.stderr.contains("--collapse off"), "{run}");
    let run = nobody.vmm(&["run", "--memory", "16M", "--collapse", "on"]);
    assert_eq!(run.code, Some(i32::from(exit_code::BAD_INPUT)), "{run}");
    for needle in [
        "the collapse thread needs a userfaultfd",
        "vm.unprivileged_userfaultfd=1",
        "/dev/userfaultfd",
        "--collapse off",
    ] {
        assert!(run.stderr.contains(needle), "{needle}\n{run}");
    }
    assert!(!run.stderr.contains("--page-source collapse"), "{run}");
    let run = nobody.vmm(&["run", "--memory", "16M", "--page-source", "zero"]);
    assert_eq!(run.code, Some(i32::from(exit_code::BAD_INPUT)), "{run}");
    assert!(
        run.stderr
            .contains("--page-source zero needs a userfaultfd"),
        "{run}"
    );
}

#[test]
fn a_ucall_into_untouched_memory_never_hangs_the_vmm() {
    require_kvm!();
    let dir = TempDir::new("untouched-ucall");
    let image = dir.path("ram.img");
    fill(&image);
    let image_source = format!("image:{image}");
    for source in ["kernel", "zero", image_source.as_str()] {
        for granularity in ["4K", "2M"] {
            if source == "kernel" && granularity == "2M" {
                continue;
            }
            for collapse in ["on", "off"] {
                let args = [
                    "run",
                    "--guest",
                    "misbehave",
                    "--arg",
                    "kind=untouched-ucall",
                    "--memory",
                    "64M",
                    "--page-source",
                    source,
                    "--fault-granularity",
                    granularity,
                    "--collapse",
                    collapse,
                    "--timeout",
                    "3",
                ];
                let (run, took) = vmm_within(&args, &[], Duration::from_secs(30));
                // The host serves the read like any first touch, finds no valid ucall there,
                // and ends the vCPU.
                assert_eq!(
                    run.code,
                    Some(i32::from(exit_code::GUEST_FAILED)),
                    "{args:?}\n{run}"
                );
                assert!(
                    run.stderr.contains("malformed ucall at 0x3fff000"),
                    "{args:?}\n{run}"
                );
                assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature (make test)"
)]
fn timeout_and_sigterm_end_a_vm_whose_faults_are_never_served() {
    require_kvm!();
    // The handler stalls on every fault: vCPUs wait in faults nobody serves.
    let stall = [("FAILPOINTS", "fault-serve=sleep(60000)")];
    for (guest, arg) in [
        ("touch", "pattern=seq"),
        ("misbehave", "kind=untouched-ucall"),
    ] {
        let args = [
            "run",
            "--guest",
            guest,
            "--arg",
            arg,
            "--memory",
            "64M",
            "--page-source",
            "zero",
            "--timeout",
            "2",
        ];
        let (run, took) = vmm_within(&args, &stall, Duration::from_secs(40));
        assert_eq!(
            run.code,
            Some(i32::from(exit_code::TIMED_OUT)),
            "{guest}\n{run}"
        );
        assert!(
            took < Duration::from_secs(15),
            "{guest}: took {took:?}\n{run}"
        );
    }
    let child = {
        let mut cmd = Command::new(integration_tests::vmm_bin());
        cmd.args(words("run --guest touch --memory 64M --page-source zero"))
            .env("FAILPOINTS", stall[0].1)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    std::thread::sleep(Duration::from_millis(800));
    let start = std::time::Instant::now();
    // SAFETY: signalling our own child, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let run = wait(child);
    assert_eq!(run.code, Some(128 + libc::SIGTERM), "{run}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn guest_reads_of_a_collapsing_extent_are_served_once() {
    require_kvm!();
    let dir = TempDir::new("wp-reads");
    let metrics = dir.path("m.json");
    let run = vmm_ok(&words(&format!(
        "run --guest touch --memory 64M --arg access=read --page-source zero --metrics {metrics}"
    )));
    let json = integration_tests::read_json(&metrics);
    let touched = report_sum(&run.stdout, "pages");
    // One vCPU: no two faults ever race for a page, so every fault fills one (a read of a
    // write-protected, never-populated page once looped, found "already present").
    assert_eq!(json["faults"]["already_present"], 0, "{json}");
    assert!(
        json["faults"]["served"].as_u64().unwrap() <= touched,
        "{json}"
    );
    assert!(
        json["collapse"]["pages_collapsed"].as_u64().unwrap() > 0,
        "{json}"
    );
}

#[test]
fn the_pool_kept_ready_is_bounded() {
    require_kvm!();
    vmm_fails(
        &words("run --memory 64M --huge-pool-ahead 100000"),
        exit_code::BAD_INPUT,
        &["--huge-pool-ahead 100000 is out of range: allowed 0 to 32"],
    );
    vmm_fails(
        &words("run --memory 1G --huge-pool-ahead 65"),
        exit_code::BAD_INPUT,
        &["allowed 0 to 64"],
    );
    vmm_ok(&words("run --memory 64M --huge-pool-ahead 32"));
}

#[test]
fn a_guest_cannot_flood_the_host_through_ucalls() {
    require_kvm!();
    let dir = TempDir::new("ucall-flood");
    let metrics = dir.path("m.json");
    const COUNT: u64 = 20000;
    for kind in ["print-flood", "report-flood"] {
        let run = vmm_ok(&words(&format!(
            "run --guest misbehave --arg kind={kind} --arg count={COUNT} --memory 8M --metrics \
             {metrics}"
        )));
        let json = integration_tests::read_json(&metrics);
        let dropped = json["console"]["ucall_dropped_bytes"].as_u64().unwrap();
        let written = json["console"]["ucall_written_bytes"].as_u64().unwrap();
        // Every byte the guest sent is written or counted as dropped, whole lines only.
        let offered: u64 = (0..COUNT)
            .map(|i| match kind {
                "print-flood" => {
                    "[vcpu0] flooding the host with print ucalls, line after line\n".len()
                }
                _ => format!("[vcpu0] key-{i} = {i}\n").len(),
            } as u64)
            .sum();
        assert_eq!(written + dropped, offered, "{kind}: {json}");
        // The burst and the steady rate over the run, nothing more, however fast the guest
        // ran (the limiter's dropping itself is tested on its own, with no guest).
        let secs = json["wall_time_ns"].as_u64().unwrap() / 1_000_000_000 + 1;
        assert!(
            written <= (64 << 10) + secs * (16 << 10),
            "{kind}: {written} bytes"
        );
        assert!(run.stdout.len() as u64 <= written, "{kind}");
        assert_eq!(
            run.stderr
                .contains("bytes of ucall prints and reports (rate limit)"),
            dropped > 0,
            "{run}"
        );
        if kind == "report-flood" {
            let vcpu = &json["vcpus"][0];
            assert_eq!(
                vcpu["reports"].as_array().unwrap().len(),
                vmm::metrics::MAX_REPORTS
            );
            assert_eq!(
                vcpu["reports_dropped"],
                COUNT - vmm::metrics::MAX_REPORTS as u64
            );
        }
        assert!(std::fs::metadata(&metrics).unwrap().len() < 1 << 20);
    }
}

#[test]
fn guest_escape_sequences_never_reach_the_terminal() {
    require_kvm!();
    let run = vmm_ok(&words(
        "run --guest misbehave --arg kind=escapes --memory 8M",
    ));
    assert!(
        !run.stdout.contains('\x1b') && !run.stdout.contains('\x07'),
        "{:?}",
        run.stdout
    );
    assert!(
        run.stdout.contains("serial ^[[2J^[]0;owned^G end"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("ucall ^[[31m red ^[[0m end"),
        "{}",
        run.stdout
    );
}

#[test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature (make test)"
)]
fn a_signal_during_a_save_stops_it_and_leaves_the_old_image() {
    require_kvm!();
    let dir = TempDir::new("save-signal");
    let image = dir.path("ram.img");
    fill(&image);
    let before = std::fs::read(&image).unwrap();
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        // The save waits a second in the fault point, long enough for the signal to land.
        let mut cmd = Command::new(integration_tests::vmm_bin());
        cmd.args(words(&format!(
            "run --guest hello --memory 64M --save-memory {image}"
        )))
        .env("FAILPOINTS", "save-start=sleep(1500)")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let child = cmd.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        // SAFETY: signalling our own child, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let run = wait(child);
        assert_eq!(run.code, Some(code), "{run}");
        assert!(run.stderr.contains("a signal stopped the save"), "{run}");
        assert_eq!(
            std::fs::read(&image).unwrap(),
            before,
            "the old image is intact"
        );
        assert_eq!(
            std::fs::read_dir(&dir.0).unwrap().count(),
            1,
            "no temporary left"
        );
    }
}

#[test]
fn a_temporary_left_by_a_killed_save_is_removed_by_the_next() {
    require_kvm!();
    let dir = TempDir::new("stale-tmp");
    let image = dir.path("ram.img");
    // As left by a save that was killed (a PID that cannot exist).
    let stale = dir.path(".ram.img.tmp-2147483600");
    std::fs::write(&stale, b"half an image").unwrap();
    vmm_ok(&words(&format!("run --memory 8M --save-memory {image}")));
    assert!(!std::path::Path::new(&stale).exists());
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
}

#[test]
fn small_bad_values_are_named_with_what_is_allowed() {
    require_kvm!();
    for (line, needle) in [
        ("run --timeout 1e9", "--timeout 1000000000 is out of range"),
        ("run --memory 99999999999G", "too large"),
        (
            "run --memory 64M --huge-limit 3M",
            "--huge-limit 3M is not allowed",
        ),
        ("run --memory 64M --huge-limit 1", "multiple of 2 MiB"),
        (
            "run --memory 64M --huge-limit 4M --collapse off",
            "--huge-limit applies only",
        ),
        (
            "run --memory 64M --huge-limit 4M --backing thp",
            "--huge-limit applies only",
        ),
        (
            "run --kvm-device /dev/null",
            "/dev/null is not a KVM device",
        ),
        ("run --kvm-device /etc/passwd", "it is a regular file"),
    ] {
        vmm_fails(&words(line), exit_code::BAD_INPUT, &[needle]);
    }
}

#[test]
fn every_guest_argument_default_is_documented() {
    let run = vmm_ok(&["guests"]);
    // Every argument of every built-in, from the one declaration the guests read too.
    for guest in vmm::loader::BUILTINS {
        assert!(run.stdout.contains(&format!("{}: ", guest.name)), "{run}");
        for arg in guest.args {
            let line = format!(
                "--arg {}={}  {}",
                arg.name,
                vmm::loader::placeholder(arg),
                vmm::loader::describe(arg, None)
            );
            assert!(run.stdout.contains(&line), "{line:?} missing\n{run}");
            assert!(run.stdout.contains(arg.help), "{run}");
        }
    }
    for needle in [
        "--arg timing=off|on",
        "--arg pattern=seq|random",
        "(default triple-fault)",
    ] {
        assert!(run.stdout.contains(needle), "{needle:?}\n{run}");
    }
}
