//! Snapshots of running VMs and resuming them: every trigger, 1 and 2 vCPUs, every backing,
//! both of the VMM's page sources, snapshots taken while a collapse or a prefetch runs, the
//! working set recorded and replayed, clones resumed together, and every bad snapshot refused.
//! The guests check their data: `verify` every page of every pass, `touch` the sum of what it
//! read.

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{
    TempDir, assert_no_seccomp_stop, hugetlb_available, hugetlb_lock, read_json, report_sum,
    require_kvm, spawn, vmm_fails, vmm_ok, vmm_on_terminal, vmm_within, wait, words,
};
use serde_json::Value;
use vmm::snapshot::{MEMORY_FILE, STATE_FILE, VmState, WORKING_SET_FILE};
use vmm::vm::exit_code;

/// `verify mode=stress` on 32 MiB, asking for a snapshot halfway through its second pass.
const STRESS: &str = "--guest verify --memory 32M --arg mode=stress --arg passes=4 \
                      --arg snapshot-at=2";

/// Takes a snapshot of `guest_opts` (which asks for one) into `dir`, the VM stopping there.
fn snapshot(dir: &str, guest_opts: &str, extra: &str) -> Value {
    let metrics = format!("{dir}.json");
    let run = vmm_ok(&words(&format!(
        "run {guest_opts} --snapshot {dir} --metrics {metrics} {extra}"
    )));
    assert!(run.stderr.contains("snapshotted"), "{run}");
    for file in [STATE_FILE, MEMORY_FILE] {
        assert!(Path::new(dir).join(file).is_file(), "{dir}/{file}: {run}");
    }
    let json = read_json(&metrics);
    assert_eq!(
        json["snapshots"].as_array().map(Vec::len),
        Some(1),
        "{json}"
    );
    json
}

/// Resumes `dir` with `extra` options; checks the stress guest found no mismatch in any pass
/// on any vCPU, and nothing was left charged. Returns the metrics.
fn resume_stress(dir: &str, vcpus: u64, extra: &str) -> Value {
    let metrics = format!("{dir}-resumed.json");
    let run = vmm_ok(&words(&format!(
        "run --resume {dir} --metrics {metrics} {extra}"
    )));
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{extra}: {run}");
    assert_eq!(
        report_sum(&run.stdout, "passes"),
        4 * vcpus,
        "{extra}: {run}"
    );
    let json = read_json(&metrics);
    assert_eq!(json["ledger"]["after_teardown_bytes"], 0, "{json}");
    json
}

#[test]
fn a_stress_guest_snapshotted_mid_pass_resumes_with_every_page_intact() {
    require_kvm!();
    let _pool = hugetlb_lock();
    let tmp = TempDir::new("snap-stress");
    // An image for the image page source: the stress guest overwrites it, pass by pass.
    let image = tmp.path("fill.img");
    vmm_ok(&words(&format!(
        "run --guest verify --memory 32M --arg mode=fill --save-memory {image}"
    )));
    let hugetlb = hugetlb_available("snapshot from hugetlb", 16);
    let mut cases = vec![
        (2, "--page-source zero".to_string()),
        (1, "--page-source zero --collapse off".into()),
        (2, format!("--page-source image:{image}")),
        (1, "--page-source kernel".into()),
        (2, "--backing thp".into()),
    ];
    if hugetlb {
        cases.push((1, "--backing hugetlb".into()));
    }
    for (i, (vcpus, source)) in cases.into_iter().enumerate() {
        let dir = tmp.path(&format!("s{i}"));
        snapshot(&dir, &format!("{STRESS} --vcpus {vcpus}"), &source);
        // The default resume: lazy 4 KiB, recording its working set.
        let json = resume_stress(&dir, vcpus, "");
        assert_eq!(json["working_set"]["mode"], "record", "{source}: {json}");
        assert_eq!(json["working_set"]["saved"], true, "{json}");
        assert!(json["faults"]["served"].as_u64().unwrap() > 0, "{json}");
    }
    // Resumed into every backing and restore mode, from one snapshot.
    let dir = tmp.path("s0");
    // Resumed, recording, and snapshotted into its own directory while it runs on: the
    // record (of the old snapshot) must not land beside the new one.
    let metrics = tmp.path("again.json");
    let run = vmm_ok(&words(&format!(
        "run --resume {dir} --working-set record --snapshot {dir} --snapshot-after 0.05 \
         --after-snapshot run --metrics {metrics}"
    )));
    let json = read_json(&metrics);
    if json["snapshots"].as_array().is_some_and(|s| !s.is_empty()) {
        assert_eq!(json["working_set"]["saved"], false, "{json}");
        let why = json["working_set"]["not_saved"]
            .as_str()
            .unwrap_or_default();
        assert!(why.contains("no longer holds the snapshot"), "{json}");
        assert!(run.stderr.contains(&format!("not saved: {why}")), "{run}");
        // The new snapshot has no record: record one again for the replay below.
        resume_stress(&dir, 2, "--working-set record");
    }
    let mut resumes = vec![
        "--restore eager --working-set off",
        "--backing thp",
        "--fault-granularity 2M --prefetch off --working-set off",
        // The record made above, replayed.
        "--working-set replay",
    ];
    if hugetlb {
        resumes.push("--backing hugetlb");
    }
    for extra in resumes {
        let json = resume_stress(&dir, 2, extra);
        if extra.contains("replay") {
            assert_eq!(json["working_set"]["mode"], "replay", "{json}");
            let replayed = &json["restore"]["prefetch"]["extents_replayed"];
            assert!(replayed.as_u64().unwrap() > 0, "{json}");
        }
    }
}

#[test]
fn a_resumed_touch_guest_reports_what_an_unbroken_run_does() {
    require_kvm!();
    let tmp = TempDir::new("snap-touch");
    let touch = "--guest touch --vcpus 2 --memory 32M --arg fill=on --arg snapshot=on \
                 --arg access=read --arg pattern=random --arg spread=on --arg size=8M";
    // Unbroken: without --snapshot the guest's ucall is only logged.
    let unbroken = vmm_ok(&words(&format!("run {touch}")));
    let sums = |stdout: &str| {
        let mut by_vcpu = integration_tests::reports(stdout, "sum");
        by_vcpu.sort_unstable();
        by_vcpu
    };
    let want = sums(&unbroken.stdout);
    assert_eq!(want.len(), 2, "{unbroken}");
    // Snapshotted, and running on.
    let dir = tmp.path("t");
    let metrics = tmp.path("t.json");
    let on = vmm_ok(&words(&format!(
        "run {touch} --snapshot {dir} --after-snapshot run --metrics {metrics}"
    )));
    assert_eq!(sums(&on.stdout), want, "{on}");
    assert_eq!(read_json(&metrics)["snapshots"][0]["trigger"]["guest"], 0);
    // Resumed, twice (recording, then replaying).
    for mode in ["record", "replay"] {
        let resumed = vmm_ok(&words(&format!("run --resume {dir}")));
        assert_eq!(sums(&resumed.stdout), want, "{mode}: {resumed}");
        assert!(resumed.stderr.contains(mode), "{resumed}");
        assert_eq!(report_sum(&resumed.stdout, "pages"), 2048, "{resumed}");
    }
}

/// Waits until the VM started by `--metrics-interval` has written its first line (its run
/// loop, and the SIGUSR1 handler, are up).
fn wait_for_metrics_line(metrics: &str) {
    let lines = format!("{metrics}.jsonl");
    let start = Instant::now();
    while !Path::new(&lines).exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no {lines}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigusr1_and_the_timer_snapshot_a_vm_that_resumes_and_is_snapshotted_again() {
    require_kvm!();
    let tmp = TempDir::new("snap-triggers");
    // A guest that does not end by itself: stress passes until stopped.
    let endless = "run --guest verify --vcpus 2 --memory 16M --arg mode=stress \
                   --arg passes=1000000";
    let (a, metrics) = (tmp.path("a"), tmp.path("a.json"));
    let child = spawn(&words(&format!(
        "{endless} --snapshot {a} --metrics {metrics} --metrics-interval 0.05"
    )));
    wait_for_metrics_line(&metrics);
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) }, 0);
    let run = wait(child);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stderr.contains("asked by SIGUSR1"), "{run}");
    assert_eq!(read_json(&metrics)["snapshots"][0]["trigger"], "signal");

    // Resumed, then snapshotted again by the timer: a snapshot of a resumed VM.
    let b = tmp.path("b");
    let run = vmm_ok(&words(&format!(
        "run --resume {a} --snapshot {b} --snapshot-after 0.3"
    )));
    assert!(run.stderr.contains("asked by --snapshot-after"), "{run}");
    assert!(!run.stdout.contains("mismatch"), "{run}");
    // Resumed from that, for a while: every page it checks is right (mismatches are printed
    // as they are found).
    let (run, _) = vmm_within(
        &words(&format!("run --resume {b} --timeout 1")),
        &[],
        Duration::from_secs(120),
    );
    assert_eq!(run.code, Some(i32::from(exit_code::TIMED_OUT)), "{run}");
    assert!(!run.stdout.contains("mismatch"), "{run}");
}

#[test]
fn snapshots_and_resumes_under_seccomp_on_a_terminal() {
    require_kvm!();
    let tmp = TempDir::new("snap-seccomp");
    let dir = tmp.path("s");
    let limit = Duration::from_secs(120);
    let trace = [("RUST_LOG", "trace")];
    let (run, _) = vmm_on_terminal(
        &words(&format!(
            "run {STRESS} --vcpus 2 --page-source zero --snapshot {dir} --seccomp on \
             --log-level trace"
        )),
        &trace,
        limit,
    );
    assert_eq!(run.code, Some(0), "{run}");
    assert_no_seccomp_stop("snapshot", &run);
    for extra in ["", "--working-set replay"] {
        let (run, _) = vmm_on_terminal(
            &words(&format!(
                "run --resume {dir} --seccomp on --log-level trace {extra}"
            )),
            &trace,
            limit,
        );
        assert_eq!(run.code, Some(0), "{extra}: {run}");
        assert_no_seccomp_stop("resume", &run);
        assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{run}");
    }
}

#[test]
fn clones_resumed_together_each_get_their_own_ram_from_one_image() {
    require_kvm!();
    let tmp = TempDir::new("snap-clones");
    let dir = tmp.path("t");
    let touch = "--guest touch --vcpus 1 --memory 32M --arg fill=on --arg snapshot=on \
                 --arg access=write --arg pattern=random --arg spread=on --arg size=8M";
    snapshot(&dir, touch, "");
    let clones: Vec<_> = (0..3)
        .map(|i| {
            let metrics = tmp.path(&format!("c{i}.json"));
            let child = spawn(&words(&format!(
                "run --resume {dir} --working-set off --metrics {metrics}"
            )));
            (child, metrics)
        })
        .collect();
    for (child, metrics) in clones {
        let run = wait(child);
        assert_eq!(run.code, Some(0), "{run}");
        assert_eq!(report_sum(&run.stdout, "pages"), 2048, "{run}");
        let json = read_json(&metrics);
        assert!(json["restore"]["image_bytes_read"].as_u64().unwrap() > 0);
    }
    // The clones wrote their own RAM: the snapshot's image is as it was.
    let resumed = vmm_ok(&words(&format!("run --resume {dir} --working-set off")));
    assert_eq!(report_sum(&resumed.stdout, "pages"), 2048, "{resumed}");
}

/// A copy of the snapshot `from` at `to`, its state changed by `edit` (then sealed again, so
/// that only the body's own checks can refuse it).
fn tampered(from: &str, to: &str, edit: impl FnOnce(&mut VmState)) {
    std::fs::create_dir_all(to).unwrap();
    for file in [STATE_FILE, MEMORY_FILE] {
        std::fs::copy(Path::new(from).join(file), Path::new(to).join(file)).unwrap();
    }
    let bytes = std::fs::read(Path::new(to).join(STATE_FILE)).unwrap();
    let (mut state, _) = VmState::decode(&bytes).unwrap();
    edit(&mut state);
    std::fs::write(Path::new(to).join(STATE_FILE), state.encode()).unwrap();
}

#[test]
fn bad_snapshots_and_options_are_refused_with_the_reason() {
    require_kvm!();
    let tmp = TempDir::new("snap-bad");
    let dir = tmp.path("good");
    snapshot(&dir, &format!("{STRESS} --vcpus 2"), "--page-source zero");
    let bad = exit_code::BAD_INPUT;
    let fails = |args: &str, needles: &[&str]| {
        vmm_fails(&words(args), bad, needles);
    };

    // Options that contradict the snapshot, or need one.
    fails(
        &format!("run --resume {dir} --vcpus 1"),
        &["2 vCPUs and --vcpus asks for 1"],
    );
    fails(
        &format!("run --resume {dir} --memory 64M"),
        &["--memory asks for 64M"],
    );
    fails(
        &format!("run --resume {dir} --guest touch"),
        &["runs guest verify"],
    );
    fails(
        &format!("run --resume {dir} --arg seed=2"),
        &["leave --arg out"],
    );
    fails(
        &format!("run --resume {dir} --page-source zero"),
        &["leave --page-source"],
    );
    fails(
        &format!("run --resume {dir} --reclaim off"),
        &["reclaim is on"],
    );
    fails(
        &format!("run --resume {dir} --working-set replay"),
        &["no working-set record"],
    );
    fails(
        &format!("run --resume {dir} --working-set record --restore eager"),
        &["--working-set record", "--restore lazy"],
    );
    fails("run --working-set record", &["applies to a resumed VM"]);
    fails(
        "run --snapshot-after 1",
        &["--snapshot-after applies only with --snapshot"],
    );
    fails(
        "run --after-snapshot run",
        &["--after-snapshot applies only with --snapshot"],
    );
    fails(
        &format!(
            "run --snapshot {} --page-source external:/tmp/none.sock",
            tmp.path("x")
        ),
        &["cannot save a VM whose RAM an external page server fills"],
    );

    // Paths that are no snapshot, or no place for one.
    let file = tmp.path("plain");
    std::fs::write(&file, b"x").unwrap();
    fails(
        &format!("run --resume {file}"),
        &["is a regular file, not a snapshot"],
    );
    fails(
        &format!("run --resume {}", tmp.path("missing")),
        &["cannot read it"],
    );
    fails(
        &format!("run --snapshot {file}"),
        &["a snapshot is a directory"],
    );
    let other = tmp.path("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(Path::new(&other).join("notes"), b"mine").unwrap();
    fails(&format!("run --snapshot {other}"), &["holds no snapshot"]);
    assert!(
        Path::new(&other).join("notes").exists(),
        "nothing of the user's touched"
    );
    fails(&format!("run --resume {other}"), &["has no vm.state"]);

    // The state file truncated, corrupted, of another version, from another build, edited.
    let state = std::fs::read(Path::new(&dir).join(STATE_FILE)).unwrap();
    let copy = |name: &str, bytes: &[u8]| {
        let to = tmp.path(name);
        std::fs::create_dir(&to).unwrap();
        std::fs::copy(
            Path::new(&dir).join(MEMORY_FILE),
            Path::new(&to).join(MEMORY_FILE),
        )
        .unwrap();
        std::fs::write(Path::new(&to).join(STATE_FILE), bytes).unwrap();
        to
    };
    let cut = copy("cut", &state[..state.len() / 2]);
    fails(&format!("run --resume {cut}"), &["truncated"]);
    let mut flipped = state.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x20;
    let flipped = copy("flipped", &flipped);
    fails(
        &format!("run --resume {flipped}"),
        &["checksum", "corrupt or was changed"],
    );
    let v9 =
        String::from_utf8(state.clone())
            .unwrap()
            .replacen("vmm-snapshot 1 ", "vmm-snapshot 9 ", 1);
    let v9 = copy("v9", v9.as_bytes());
    fails(&format!("run --resume {v9}"), &["format version 9"]);
    let build = tmp.path("build");
    tampered(&dir, &build, |s| s.build = "0.0.9+0123456789ab".into());
    fails(
        &format!("run --resume {build}"),
        &["taken by build 0.0.9+0123456789ab"],
    );
    let tsc = tmp.path("tsc");
    tampered(&dir, &tsc, |s| s.tsc_khz += 1000);
    fails(&format!("run --resume {tsc}"), &["TSC runs at"]);
    let count = tmp.path("count");
    tampered(&dir, &count, |s| {
        s.vcpu.pop();
    });
    fails(
        &format!("run --resume {count}"),
        &["says 2 vCPUs but holds the state of 1"],
    );
    // A register state KVM refuses (CR0 without protection in long mode).
    let regs = tmp.path("regs");
    tampered(&dir, &regs, |s| s.vcpu[0].sregs.0.cr0 = 0x8000_0000);
    fails(
        &format!("run --resume {regs}"),
        &["cannot resume it: vcpu0: KVM_SET_SREGS"],
    );

    // The memory image missing or cut short.
    let noimage = tmp.path("noimage");
    std::fs::create_dir(&noimage).unwrap();
    std::fs::copy(
        Path::new(&dir).join(STATE_FILE),
        Path::new(&noimage).join(STATE_FILE),
    )
    .unwrap();
    fails(&format!("run --resume {noimage}"), &["has no memory.img"]);
    let short = tmp.path("short");
    tampered(&dir, &short, |_| {});
    let img = Path::new(&short).join(MEMORY_FILE);
    let len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    fails(&format!("run --resume {short}"), &["memory.img"]);

    // A working-set record for another snapshot.
    let stale = tmp.path("stale");
    tampered(&dir, &stale, |_| {});
    std::fs::write(
        Path::new(&stale).join(WORKING_SET_FILE),
        vmm::snapshot::working_set::encode(1, &Default::default()),
    )
    .unwrap();
    fails(
        &format!("run --resume {stale}"),
        &["recorded from snapshot 00000001"],
    );

    // After all that, the good snapshot still resumes.
    resume_stress(&dir, 2, "--working-set off");
}

/// Snapshots taken while the memory threads are busy: a collapse slowed in the middle, and a
/// prefetch slowed per extent, so the pause lands inside them; the resumed guest checks every
/// page.
#[cfg(feature = "failpoints")]
#[test]
fn a_snapshot_taken_during_a_collapse_or_a_prefetch_is_consistent() {
    require_kvm!();
    let tmp = TempDir::new("snap-busy");
    let limit = Duration::from_secs(300);
    // An endless stress guest whose extents the collapse thread keeps promoting, each
    // collapse slowed in its middle; SIGUSR1 once the metrics show a collapse under way.
    let dir = tmp.path("collapse");
    let metrics = tmp.path("collapse.json");
    let mut child = std::process::Command::new(integration_tests::vmm_bin())
        .args(words(&format!(
            "run --guest verify --vcpus 2 --memory 16M --arg mode=stress --arg passes=1000000 \
             --page-source zero --collapse on --collapse-scan-sleep 0 --snapshot {dir} \
             --metrics {metrics} --metrics-interval 0.05"
        )))
        .env("FAILPOINTS", "collapse-present-pages=sleep(20)")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = format!("{metrics}.jsonl");
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&lines).unwrap_or_default();
        let collapsing = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| l["collapse"]["collapse_alloc"].as_u64().unwrap_or(0) > 0);
        if collapsing {
            break;
        }
        assert!(start.elapsed() < limit, "no collapse began: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signals our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(read_json(&metrics)["snapshots"][0]["trigger"], "signal");
    // Resumed for a while: every page it checks is right (a mismatch is printed as found).
    let (run, _) = vmm_within(
        &words(&format!("run --resume {dir} --timeout 1")),
        &[],
        limit,
    );
    assert_eq!(run.code, Some(i32::from(exit_code::TIMED_OUT)), "{run}");
    assert!(!run.stdout.contains("mismatch"), "{run}");

    // An endless stress guest, snapshotted by itself at pass 2, resumed with a prefetcher
    // whose every read of the image takes 3 s, and snapshotted again by the timer while
    // that prefetch is still going. The reads hold no lock and no claim, so the guest's
    // faults fill what it touches meanwhile; the prefetcher takes its first extents as it
    // starts, before the vCPUs do, so its end lies 3 s after that, however fast the guest
    // runs (a sleep between extents instead let a quick guest fill the rest first).
    let endless = tmp.path("endless");
    snapshot(
        &endless,
        "--guest verify --vcpus 2 --memory 16M --arg mode=stress --arg passes=1000000 \
         --arg snapshot-at=2",
        "--page-source zero",
    );
    let again = tmp.path("prefetch");
    let metrics = tmp.path("prefetch.json");
    let (run, _) = vmm_within(
        &words(&format!(
            "run --resume {endless} --working-set off --snapshot {again} \
             --snapshot-after 0.2 --metrics {metrics}"
        )),
        &[("FAILPOINTS", "prefetch-read=sleep(3000)")],
        limit,
    );
    assert_eq!(run.code, Some(0), "{run}");
    let json = read_json(&metrics);
    let at = json["snapshots"][0]["at_ns"].as_u64().unwrap();
    let done = json["restore"]["prefetch"]["done_ns"].as_u64().unwrap();
    assert!(
        done == 0 || done > at,
        "the prefetch was over before the snapshot: {json}"
    );
    // Resumed from that for a while: every page it checks is right (a mismatch is printed
    // as it is found).
    let (run, _) = vmm_within(
        &words(&format!("run --resume {again} --timeout 1")),
        &[],
        limit,
    );
    assert_eq!(run.code, Some(i32::from(exit_code::TIMED_OUT)), "{run}");
    assert!(!run.stdout.contains("mismatch"), "{run}");
}
