//! Restoring a guest from a memory image in every mode: eager, lazy 4 KiB, lazy 2 MiB, and
//! with the prefetcher racing the vCPUs; the restored guest checks every page it reads.

use integration_tests::{
    TempDir, hugetlb_lock, read_json, report_sum, require_kvm, vmm_fails, vmm_ok, words,
};
use serde_json::Value;
use vmm::vm::exit_code;

/// Saves a 64 MiB image from a guest that filled all of its RAM on 2 vCPUs.
fn saved_image(dir: &TempDir) -> String {
    let image = dir.path("ram.img");
    vmm_ok(&words(&format!(
        "run --guest verify --vcpus 2 --memory 64M --arg mode=fill --arg seed=5 \
         --collapse off --save-memory {image}"
    )));
    image
}

/// Restores `image` with `extra` options, checks every page on 2 vCPUs, and returns the
/// metrics after checking that nothing was lost or left charged.
fn restore(dir: &TempDir, image: &str, extra: &str) -> Value {
    let metrics = dir.path("m.json");
    let run = vmm_ok(&words(&format!(
        "run --guest verify --vcpus 2 --memory 64M --arg mode=check --arg seed=5 \
         --page-source image:{image} --metrics {metrics} {extra}"
    )));
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{extra}: {run}");
    // All of free RAM (64 MiB less the 4 MiB load area and the stacks), both shares.
    assert!(report_sum(&run.stdout, "pages") > 14000, "{run}");
    let json = read_json(&metrics);
    assert_eq!(json["ledger"]["after_teardown_bytes"], 0, "{extra}: {json}");
    json
}

#[test]
fn every_restore_mode_reads_back_every_page() {
    require_kvm!();
    let _pool = hugetlb_lock();
    let dir = TempDir::new("restore");
    let image = saved_image(&dir);
    let ram = 64u64 << 20;

    // Eager: the whole image is in before the guest starts; the guest takes no fault.
    for backing in ["small", "thp"] {
        let json = restore(
            &dir,
            &image,
            &format!("--restore eager --backing {backing}"),
        );
        let r = &json["restore"];
        assert_eq!(r["mode"], "eager");
        assert_eq!(json["faults"]["served"], 0, "{json}");
        assert!(
            r["image_bytes_read"].as_u64().unwrap() >= ram - (4 << 20),
            "{r}"
        );
        assert!(r.get("prefetch").is_none(), "{r}");
        assert!(json["to_first_instruction_ns"].as_u64().unwrap() > 0);
    }

    // Lazy, no prefetch: every page comes through a fault.
    for granularity in ["4K", "2M"] {
        let json = restore(
            &dir,
            &image,
            &format!("--prefetch off --fault-granularity {granularity} --collapse off"),
        );
        assert!(json["faults"]["served"].as_u64().unwrap() > 0, "{json}");
        assert!(json["restore"].get("prefetch").is_none());
    }

    // The prefetcher races the vCPUs (on by default for a lazy image), at both
    // granularities, with one thread and with three.
    for extra in [
        "--huge-source thp --collapse off",
        "--huge-source thp --collapse off --fault-granularity 2M --prefetch-threads 3",
    ] {
        let json = restore(&dir, &image, extra);
        let p = &json["restore"]["prefetch"];
        let filled = p["extents_huge"].as_u64().unwrap() + p["extents_small"].as_u64().unwrap();
        assert!(filled > 0, "{extra}: {p}");
        assert!(p["done_ns"].as_u64().unwrap() > 0, "{extra}: finished: {p}");
        assert_eq!(
            p["bytes_read"].as_u64().unwrap(),
            2 * 1024 * 1024 * (filled + p["extents_raced"].as_u64().unwrap())
        );
        // Every extent is resident; most are huge (those the VMM wrote itself before the
        // guest started, and those the guest faulted in 4 KiB pages first, are not).
        let ext = &json["memory"]["extents"];
        assert_eq!(ext["unpopulated"], 0, "{extra}: {json}");
        assert!(ext["huge"].as_u64().unwrap() * 2 >= 32, "{extra}: {ext}");
        assert_eq!(
            json["kernel"]["anon_huge_kb"].as_u64().unwrap(),
            ext["huge"].as_u64().unwrap() * 2048,
            "{extra}: {json}"
        );
    }

    // Under --huge-limit the prefetcher fills the rest with 4 KiB pages.
    let json = restore(
        &dir,
        &image,
        "--huge-source thp --collapse off --huge-limit 8M",
    );
    let p = &json["restore"]["prefetch"];
    assert!(p["extents_small"].as_u64().unwrap() > 0, "{p}");
    assert!(json["ledger"]["peak_charged_bytes"].as_u64().unwrap() <= 8 << 20);
    assert_eq!(json["memory"]["extents"]["unpopulated"], 0, "{json}");
}

#[test]
fn restore_options_are_checked() {
    require_kvm!();
    vmm_fails(
        &words("run --restore eager"),
        exit_code::BAD_INPUT,
        &["--restore eager applies to --page-source image:PATH"],
    );
    vmm_fails(
        &words("run --page-source zero --prefetch on"),
        exit_code::BAD_INPUT,
        &["--prefetch on applies to --page-source image:PATH"],
    );
    for n in ["0", "17"] {
        vmm_fails(
            &words(&format!("run --prefetch-threads {n}")),
            exit_code::BAD_INPUT,
            &[&format!(
                "--prefetch-threads {n} is out of range: allowed 1 to 16"
            )],
        );
    }
    let dir = TempDir::new("restore-options");
    let image = saved_image(&dir);
    vmm_fails(
        &words(&format!(
            "run --memory 64M --page-source image:{image} --restore eager --fault-granularity 2M"
        )),
        exit_code::BAD_INPUT,
        &["do not apply to --restore eager"],
    );
}
