//! Guest RAM in 2 MiB extents: page sources, backings, memory images, and the VMM's view of
//! memory checked against the kernel's.

use std::time::Duration;

use integration_tests::{
    TempDir, hugetlb_available, hugetlb_pool, read_json, report_sum, require_kvm, spawn, vmm,
    vmm_fails, vmm_ok, wait,
};
use serde_json::Value;
use vmm::vm::exit_code;

const MIB: u64 = 1 << 20;

/// Runs `verify mode=stress` on 2 vCPUs and returns the metrics.
fn stress(memory: &str, backing: &str, source: &str, extra: &[&str]) -> Value {
    let dir = TempDir::new("stress");
    let metrics = dir.path("m.json");
    let mut args = vec![
        "run",
        "--guest",
        "verify",
        "--vcpus",
        "2",
        "--memory",
        memory,
        "--backing",
        backing,
        "--page-source",
        source,
        "--arg",
        "mode=stress",
        "--arg",
        "passes=2",
        "--metrics",
        &metrics,
    ];
    args.extend_from_slice(extra);
    let run = vmm_ok(&args);
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{run}");
    let json = read_json(&metrics);
    let ext = &json["memory"]["extents"];
    let total = ext["total"].as_u64().unwrap();
    assert_eq!(
        total * 2 * MIB,
        json["memory"]["size_bytes"].as_u64().unwrap()
    );
    assert_eq!(
        ext["unpopulated"].as_u64().unwrap()
            + ext["small"].as_u64().unwrap()
            + ext["huge"].as_u64().unwrap(),
        total
    );
    json
}

/// A small image made by `verify mode=fill` with `seed`, for `memory` of RAM.
fn filled_image(dir: &TempDir, memory: &str, seed: &str) -> String {
    let image = dir.path("ram.img");
    let run = vmm_ok(&[
        "run",
        "--guest",
        "verify",
        "--vcpus",
        "2",
        "--memory",
        memory,
        "--arg",
        "mode=fill",
        "--arg",
        &format!("seed={seed}"),
        "--save-memory",
        &image,
    ]);
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{run}");
    image
}

#[test]
fn stress_with_each_page_source_on_small_pages() {
    require_kvm!();
    let dir = TempDir::new("sources");
    let image = filled_image(&dir, "16M", "3");
    for source in ["kernel", "zero", &format!("image:{image}")] {
        // The fault path alone (the prefetcher has a test of its own).
        let json = stress(
            "16M",
            "small",
            source,
            &["--collapse", "off", "--prefetch", "off"],
        );
        let ext = &json["memory"]["extents"];
        assert_eq!(ext["huge"], 0, "{source}");
        // The whole free area was written: every extent is populated.
        assert_eq!(ext["unpopulated"], 0, "{source}: {ext}");
        assert_eq!(json["kernel"]["anon_huge_kb"], 0, "{source}");
        let served = json["faults"]["served"].as_u64().unwrap();
        if source == "kernel" {
            assert_eq!(served, 0);
        } else {
            // 10 MiB of free RAM (16 - 6) in 4 KiB pages, each served once.
            assert_eq!(served, 10 * 256, "{source}");
        }
    }
}

#[test]
fn touch_with_zero_source_serves_exactly_the_pages_touched() {
    require_kvm!();
    let dir = TempDir::new("touch-zero");
    let metrics = dir.path("m.json");
    for (pattern, size) in [("seq", "6M"), ("random", "4004K")] {
        let run = vmm_ok(&[
            "run",
            "--guest",
            "touch",
            "--vcpus",
            "2",
            "--memory",
            "32M",
            "--page-source",
            "zero",
            "--arg",
            &format!("pattern={pattern}"),
            "--arg",
            &format!("size={size}"),
            "--arg",
            "passes=2",
            "--metrics",
            &metrics,
            "--collapse",
            "off",
        ]);
        let touched = report_sum(&run.stdout, "pages") / 2;
        let json = read_json(&metrics);
        assert_eq!(
            json["faults"]["served"].as_u64().unwrap(),
            touched,
            "{pattern}: {run}"
        );
        let service = &json["faults"]["service_ns"];
        let (p50, p99, max) = (
            service["p50"].as_u64().unwrap(),
            service["p99"].as_u64().unwrap(),
            service["max"].as_u64().unwrap(),
        );
        assert!(0 < p50 && p50 <= p99 && p99 <= max, "{service}");
        // The table agrees: the VMM's area (6 MiB, populated at boot) plus the touched pages.
        let ext = &json["memory"]["extents"];
        assert_eq!(
            ext["small_pages"].as_u64().unwrap(),
            6 * 256 + touched,
            "{ext}"
        );
    }
}

#[test]
fn thp_backing_reports_huge_extents_and_smaps_agrees() {
    require_kvm!();
    let json = stress("32M", "thp", "kernel", &[]);
    let huge = json["memory"]["extents"]["huge"].as_u64().unwrap();
    let anon_huge_kb = json["kernel"]["anon_huge_kb"].as_u64().unwrap();
    assert_eq!(huge * 2048, anon_huge_kb, "{json}");
    // THP in madvise mode on an idle machine gives every extent; never fewer than most.
    assert!(huge >= 12, "only {huge} of 16 extents huge: {json}");
}

#[test]
fn hugetlb_backing_reports_huge_extents_and_smaps_agrees() {
    require_kvm!();
    if !hugetlb_available("hugetlb_backing", 8) {
        return;
    }
    let dir = TempDir::new("hugetlb");
    let image = filled_image(&dir, "16M", "5");
    for source in ["kernel".to_string(), format!("image:{image}")] {
        let json = stress("16M", "hugetlb", &source, &[]);
        assert_eq!(json["memory"]["extents"]["huge"], 8, "{json}");
        assert_eq!(json["kernel"]["hugetlb_kb"], 8 * 2048, "{json}");
    }
}

#[test]
fn thp_backing_with_uffd_sources_fills_up_front() {
    require_kvm!();
    let dir = TempDir::new("thp-image");
    let image = filled_image(&dir, "16M", "7");
    let json = stress("16M", "thp", "zero", &[]);
    assert_eq!(
        json["faults"]["served"], 0,
        "huge backings are populated up front"
    );
    let run = vmm_ok(&[
        "run",
        "--guest",
        "verify",
        "--memory",
        "16M",
        "--backing",
        "thp",
        "--page-source",
        &format!("image:{image}"),
        "--arg",
        "mode=check",
        "--arg",
        "seed=7",
    ]);
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{run}");
}

#[test]
fn hugetlb_with_a_short_pool_is_refused_before_the_guest_starts() {
    require_kvm!();
    let (total, _) = hugetlb_pool();
    let memory = format!("{}M", (total + 1).max(8) * 2);
    vmm_fails(
        &["run", "--memory", &memory, "--backing", "hugetlb"],
        exit_code::BAD_INPUT,
        &[
            "--backing hugetlb needs",
            "free 2 MiB huge pages",
            "echo",
            "/proc/sys/vm/nr_hugepages",
        ],
    );
}

#[test]
fn save_then_restore_lazily_from_the_image() {
    require_kvm!();
    let dir = TempDir::new("restore");
    let image = filled_image(&dir, "24M", "11");
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 4096 + 24 * MIB);
    let metrics = dir.path("m.json");
    let run = vmm_ok(&[
        "run",
        "--guest",
        "verify",
        "--vcpus",
        "2",
        "--memory",
        "24M",
        "--page-source",
        &format!("image:{image}"),
        "--arg",
        "mode=check",
        "--arg",
        "seed=11",
        "--metrics",
        &metrics,
        "--collapse",
        "off",
        "--prefetch",
        "off",
    ]);
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{run}");
    let json = read_json(&metrics);
    assert_eq!(
        json["faults"]["served"].as_u64().unwrap(),
        18 * 256,
        "served lazily, page by page"
    );
    // The data really comes from the image: another seed's pattern is not there.
    let run = vmm(&[
        "run",
        "--guest",
        "verify",
        "--memory",
        "24M",
        "--page-source",
        &format!("image:{image}"),
        "--arg",
        "mode=check",
        "--arg",
        "seed=12",
    ]);
    assert_eq!(run.code, Some(1), "{run}");
    // Saving over an existing image replaces it whole, and a failed guest saves nothing.
    let before = std::fs::read(&image).unwrap();
    let run = vmm(&[
        "run",
        "--guest",
        "verify",
        "--memory",
        "24M",
        "--arg",
        "mode=check",
        "--save-memory",
        &image,
    ]);
    assert_eq!(run.code, Some(1));
    assert_ne!(
        std::fs::read(&image).unwrap(),
        before,
        "a guest that finished (code 1) is saved"
    );
    let run = vmm(&[
        "run",
        "--guest",
        "misbehave",
        "--arg",
        "kind=triple-fault",
        "--memory",
        "24M",
        "--save-memory",
        &image,
    ]);
    assert_eq!(run.code, Some(i32::from(exit_code::GUEST_FAILED)));
    assert!(run.stderr.contains("not saving memory"), "{run}");
    assert_eq!(
        std::fs::read_dir(&dir.0).unwrap().count(),
        2,
        "no temporary files left"
    );
}

#[test]
fn bad_images_are_refused() {
    require_kvm!();
    let dir = TempDir::new("bad-images");
    let image = filled_image(&dir, "8M", "1");
    let source = format!("image:{image}");
    vmm_fails(
        &["run", "--memory", "16M", "--page-source", &source],
        exit_code::BAD_INPUT,
        &[
            "holds 8M of guest RAM but --memory is 16M",
            "run with --memory 8M",
        ],
    );
    let missing = format!("image:{}", dir.path("nope.img"));
    vmm_fails(
        &["run", "--memory", "8M", "--page-source", &missing],
        exit_code::BAD_INPUT,
        &["cannot open memory image", "nope.img"],
    );
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    file.set_len(4096 + 5 * MIB).unwrap();
    vmm_fails(
        &["run", "--memory", "8M", "--page-source", &source],
        exit_code::BAD_INPUT,
        &["is truncated", "expected 8392704"],
    );
    let not_image = dir.path("text.img");
    std::fs::write(&not_image, "just some text, not guest memory\n").unwrap();
    vmm_fails(
        &[
            "run",
            "--memory",
            "8M",
            "--page-source",
            &format!("image:{not_image}"),
        ],
        exit_code::BAD_INPUT,
        &["is not a vmm memory image"],
    );
    vmm_fails(
        &["run", "--page-source", "disk"],
        exit_code::BAD_INPUT,
        &["\"disk\"", "image:PATH"],
    );
    vmm_fails(
        &["run", "--backing", "huge"],
        exit_code::BAD_INPUT,
        &["'huge'", "possible values: small, thp, hugetlb"],
    );
}

#[test]
fn a_failing_page_source_ends_the_vm_with_a_clear_error() {
    require_kvm!();
    let dir = TempDir::new("failing-source");
    let image = dir.path("ram.img");
    vmm_ok(&["run", "--memory", "256M", "--save-memory", &image]);
    // The guest walks 250 MiB page by page; the image loses its data shortly after it starts.
    let child = spawn(&[
        "run",
        "--guest",
        "touch",
        "--memory",
        "256M",
        "--page-source",
        &format!("image:{image}"),
        "--arg",
        "passes=1000",
        "--collapse",
        "off",
        "--prefetch",
        "off",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let run = wait(child);
    assert_eq!(run.code, Some(i32::from(exit_code::VMM_FAILED)), "{run}");
    assert!(
        run.stderr
            .contains("the page source failed for guest address"),
        "{run}"
    );
    // And says why: the image shrank under it.
    assert!(
        run.stderr
            .contains("changed while the VM ran (it is 4096 bytes now"),
        "{run}"
    );
}

/// The same with the prefetcher reading a dense image behind the guest: whichever reader
/// meets the cut-short file first ends the VM, saying why; no SIGBUS, no hang.
#[test]
fn an_image_cut_short_under_the_prefetcher_ends_the_vm_with_a_clear_error() {
    require_kvm!();
    let dir = TempDir::new("prefetch-cut");
    let image = dir.path("ram.img");
    vmm_ok(&[
        "run",
        "--guest",
        "verify",
        "--memory",
        "512M",
        "--arg",
        "mode=fill",
        "--collapse",
        "off",
        "--save-memory",
        &image,
    ]);
    let child = spawn(&[
        "run",
        "--guest",
        "touch",
        "--memory",
        "512M",
        "--page-source",
        &format!("image:{image}"),
        "--arg",
        "passes=1000",
        "--collapse",
        "off",
        "--huge-source",
        "thp",
    ]);
    std::thread::sleep(Duration::from_millis(100));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let run = wait(child);
    assert_eq!(run.code, Some(i32::from(exit_code::VMM_FAILED)), "{run}");
    assert!(
        run.stderr.contains("prefetching guest address")
            || run
                .stderr
                .contains("the page source failed for guest address"),
        "{run}"
    );
    // Why: the image shrank under it (seen before a read, or by the read itself).
    assert!(
        run.stderr
            .contains("changed while the VM ran (it is 4096 bytes now")
            || run
                .stderr
                .contains("reached the end of the file (was it truncated"),
        "{run}"
    );
}

#[test]
fn metrics_interval_writes_json_lines_while_running() {
    require_kvm!();
    let dir = TempDir::new("interval");
    let metrics = dir.path("m.json");
    vmm_ok(&[
        "run",
        "--guest",
        "touch",
        "--memory",
        "64M",
        "--page-source",
        "zero",
        "--arg",
        "passes=3",
        "--metrics",
        &metrics,
        "--metrics-interval",
        "0.1",
    ]);
    let lines = std::fs::read_to_string(format!("{metrics}.jsonl")).unwrap();
    let lines: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2, "{lines:?}");
    let served: Vec<u64> = lines
        .iter()
        .map(|l| l["faults"]["served"].as_u64().unwrap())
        .collect();
    assert!(served.windows(2).all(|w| w[0] <= w[1]), "{served:?}");
    assert!(
        lines
            .iter()
            .all(|l| l["elapsed_ns"].as_u64().is_some() && l["memory"]["extents"]["total"] == 32)
    );
    vmm_fails(
        &["run", "--metrics-interval", "1"],
        exit_code::BAD_INPUT,
        &["--metrics-interval needs --metrics"],
    );
}

#[test]
fn metrics_name_the_kernel_view() {
    require_kvm!();
    let dir = TempDir::new("kernel-view");
    let metrics = dir.path("m.json");
    vmm_ok(&["run", "--memory", "8M", "--metrics", &metrics]);
    let json = read_json(&metrics);
    for key in ["anon_huge_kb", "hugetlb_kb", "kvm_pages_2m"] {
        assert!(
            json["kernel"].get(key).is_some(),
            "kernel.{key} missing: {json}"
        );
    }
    for key in ["unpopulated", "small", "huge"] {
        assert!(
            json["memory"]["extents"][key].is_u64(),
            "memory.extents.{key}: {json}"
        );
    }
    for key in ["p50", "p99", "max"] {
        assert!(
            json["faults"]["service_ns"][key].is_u64(),
            "faults.service_ns.{key}: {json}"
        );
    }
}

#[test]
fn extent_granular_faults_map_whole_extents_from_the_image() {
    require_kvm!();
    let dir = TempDir::new("extent-faults");
    let image = filled_image(&dir, "24M", "21");
    let metrics = dir.path("m.json");
    let line = format!(
        "run --guest verify --vcpus 2 --memory 24M --page-source image:{image} --arg mode=check \
         --arg seed=21 --fault-granularity 2M --collapse off --prefetch off --metrics {metrics}"
    );
    let run = vmm_ok(&integration_tests::words(&line));
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{run}");
    let json = read_json(&metrics);
    let mapped = json["faults"]["extents_mapped"].as_u64().unwrap();
    // 18 MiB of free RAM: 9 extents, each resolved by one huge page on its first fault.
    assert_eq!(mapped, 9, "{json}");
    assert_eq!(json["memory"]["extents"]["huge"], 9);
    // THP or hugetlb pages, whichever the pool had (auto).
    let kernel = &json["kernel"];
    let huge_kb = kernel["anon_huge_kb"].as_u64().unwrap() + kernel["hugetlb_kb"].as_u64().unwrap();
    assert_eq!(huge_kb, 9 * 2048, "{kernel}");
    assert_eq!(json["ledger"]["after_teardown_bytes"], 0);
    vmm_fails(
        &integration_tests::words("run --fault-granularity 2M"),
        exit_code::BAD_INPUT,
        &["--fault-granularity applies to --page-source zero or image"],
    );
    vmm_fails(
        &integration_tests::words("run --page-source zero --fault-granularity 12K"),
        exit_code::BAD_INPUT,
        &["--fault-granularity 12K", "power of two from 4K to 2M"],
    );
}

/// The pool allocates ahead of demand, as deep as demand asks and never past what the ledger
/// can still charge: with `--huge-limit 6M` no more than three pages are ever ready or aimed
/// at, however fast 2 MiB faults take them; everything goes back at teardown.
#[test]
fn the_pool_pipeline_stays_within_the_huge_limit() {
    require_kvm!();
    let _pool = integration_tests::hugetlb_lock();
    let json = stress(
        "64M",
        "small",
        "zero",
        &[
            "--fault-granularity",
            "2M",
            "--huge-limit",
            "6M",
            "--huge-source",
            "thp",
        ],
    );
    let pool = &json["collapse"]["pool"];
    assert!(pool["depth_peak"].as_u64().unwrap() <= 3, "{pool}");
    assert!(pool["ready_peak"].as_u64().unwrap() <= 3, "{pool}");
    assert!(pool["refill_threads"].as_u64().unwrap() >= 1, "{pool}");
    let hit = pool["hit_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&hit), "{pool}");
    assert!(pool["alloc_ns"]["count"].as_u64().unwrap() >= 1, "{pool}");
    assert_eq!(json["ledger"]["after_teardown_bytes"], 0, "{json}");
    assert!(json["ledger"]["peak_charged_bytes"].as_u64().unwrap() <= 6 * MIB);
    // Without a limit, demand takes the depth above its least (the collapse announces its
    // batches, the faults take pages fast), still within the documented cap.
    let json = stress(
        "64M",
        "small",
        "zero",
        &["--fault-granularity", "2M", "--huge-source", "thp"],
    );
    let pool = &json["collapse"]["pool"];
    let depth = pool["depth_peak"].as_u64().unwrap();
    assert!(
        depth <= vm_extents::MemoryConfig::MAX_POOL_AHEAD as u64,
        "{pool}"
    );
    assert_eq!(json["ledger"]["after_teardown_bytes"], 0, "{json}");
}
