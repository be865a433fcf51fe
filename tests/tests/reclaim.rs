//! Memory given back: the `churn` guest frees memory in every shape and the VMM reclaims it per
//! 2 MiB extent, from every page source, with the collapse thread running and two vCPUs
//! writing; what the guest kept is intact, what it freed reads zero, and the kernel's view of
//! resident memory agrees with the extent table's.

use std::time::Duration;

use integration_tests::{
    TempDir, assert_no_seccomp_stop, hugetlb_available, hugetlb_lock, read_json, report_sum,
    require_kvm, spawn, vmm_fails, vmm_ok, vmm_on_terminal, wait, words,
};
use serde_json::Value;
use vmm::vm::exit_code;

const MIB: u64 = 1 << 20;

/// Runs `churn` on 2 vCPUs over 32 MiB with `extra` options and checks what every run must
/// hold: the guest found nothing lost and every freed page zero, nothing was re-inflated, the
/// ledger is back at zero after teardown, and the pages the extent table holds populated agree
/// with the kernel's (`Rss`, hugetlb, the shared zero page) within 2%. Returns the metrics.
fn churn(extra: &str) -> Value {
    // Huge pages come from the hugetlb pool where it has them (`--huge-source auto`): one run
    // at a time takes them, so each can tell that it gave every one back.
    let _pool = hugetlb_lock();
    let dir = TempDir::new("churn");
    let metrics = dir.path("m.json");
    let line = format!(
        "run --guest churn --vcpus 2 --memory 32M --metrics {metrics} --timeout 300 {extra}"
    );
    let run = vmm_ok(&words(&line));
    let what = format!("{line}\n{run}");
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{what}");
    assert_eq!(report_sum(&run.stdout, "nonzero_after_free"), 0, "{what}");
    assert!(report_sum(&run.stdout, "freed_pages") > 0, "{what}");
    let json = read_json(&metrics);
    let r = &json["reclaim"];
    assert_eq!(r["reinflated_bytes"], 0, "{what}\n{r}");
    assert_eq!(json["ledger"]["after_teardown_bytes"], 0, "{what}");
    let ext = &json["memory"]["extents"];
    let ours =
        ext["huge"].as_u64().unwrap() * 2 * MIB + ext["small_pages"].as_u64().unwrap() * 4096;
    // The kernel's populated pages: `Rss`, the hugetlb pages, and the entries that map the
    // shared zero page, which `Rss` leaves out. The kernel maps that page where the guest read
    // an untouched page (kernel page source), and in place of the zero 4 KiB pages of a THP
    // it splits: a collapse's page that an access split on its way in (a split move) leaves
    // the extent populated in full, its zero pages holding no memory.
    let k = &json["kernel"];
    let kernel = (k["rss_kb"].as_u64().unwrap()
        + k["hugetlb_kb"].as_u64().unwrap()
        + k["zero_pfn_kb"]
            .as_u64()
            .expect("PAGEMAP_SCAN on this kernel"))
        * 1024;
    let off = ours.abs_diff(kernel) as f64 / kernel as f64;
    assert!(
        off <= 0.02,
        "ours {ours}, the kernel's {kernel}: {what}\n{json}"
    );
    json
}

/// A 32 MiB image that `verify mode=fill` filled: every page holds data the freed pages must
/// not come back with.
fn filled_image(dir: &TempDir) -> String {
    let image = dir.path("ram.img");
    vmm_ok(&words(&format!(
        "run --guest verify --vcpus 2 --memory 32M --arg mode=fill --save-memory {image}"
    )));
    image
}

#[test]
fn churn_gives_memory_back_in_every_shape_from_every_source() {
    require_kvm!();
    let dir = TempDir::new("churn-sources");
    let image = filled_image(&dir);
    for source in [
        "kernel".to_string(),
        "zero".into(),
        format!("image:{image}"),
    ] {
        for shape in ["extents", "pages", "halves"] {
            let json = churn(&format!("--page-source {source} --arg shape={shape}"));
            let r = &json["reclaim"];
            let what = format!("{source} {shape}: {r}");
            assert_eq!(r["enabled"], true, "{what}");
            assert!(r["reports"].as_u64().unwrap() > 0, "{what}");
            // Half of 26 MiB of free RAM (the VMM's area and the program take 6 MiB).
            let reclaimed = r["reclaimed_bytes"].as_u64().unwrap();
            let expected = if shape == "halves" { 6 * MIB } else { 12 * MIB };
            assert!(reclaimed >= expected, "{what}");
            assert_eq!(r["kept_bytes"], 0, "{what}");
            match shape {
                "extents" => assert!(
                    r["extents_discarded"].as_u64().unwrap() > 0 || source != "kernel",
                    "{what}"
                ),
                _ => assert_eq!(r["extents_discarded"], 0, "{what}"),
            }
        }
    }
}

#[test]
fn huge_extents_are_discarded_split_or_kept_by_the_share_freed() {
    require_kvm!();
    // Collapsed before the free (the zero source serves 2 MiB faults whole).
    let base = "--page-source zero --fault-granularity 2M";
    let json = churn(&format!("{base} --arg shape=extents"));
    let r = &json["reclaim"];
    // Each vCPU frees whole extents of its own share: every one goes whole.
    assert!(r["extents_discarded"].as_u64().unwrap() >= 6, "{r}");
    assert_eq!(r["discarded_huge_bytes"], r["reclaimed_bytes"], "{r}");
    let json = churn(&format!("{base} --arg shape=halves"));
    let r = &json["reclaim"];
    // Split (THP) or demoted (hugetlb, where the pool has pages).
    let split =
        |r: &Value| r["extents_split"].as_u64().unwrap() + r["extents_demoted"].as_u64().unwrap();
    assert!(split(r) >= 6, "{r}");
    // A tenth of each extent's pages is under the split threshold: the huge pages stay, and
    // the freed pages read zero all the same (the guest checked).
    let json = churn(&format!("{base} --arg shape=pages --arg free=10"));
    let r = &json["reclaim"];
    assert_eq!(r["reclaimed_bytes"], 0, "{r}");
    assert!(r["huge_kept"].as_u64().unwrap() > 0, "{r}");
    assert!(r["kept_bytes"].as_u64().unwrap() > 0, "{r}");
    // With the threshold at 32 pages, the same tenth splits them.
    let json = churn(&format!(
        "{base} --arg shape=pages --arg free=10 --reclaim-split-pages 32"
    ));
    let r = &json["reclaim"];
    assert!(split(r) > 0, "{r}");
    assert_eq!(r["split_pages"], 32, "{r}");
}

#[test]
fn hugetlb_pages_given_back_go_back_to_the_pool() {
    require_kvm!();
    if !hugetlb_available("reclaim of hugetlb extents", 16) {
        return;
    }
    let json = churn(
        "--page-source zero --fault-granularity 2M --huge-source hugetlb --arg shape=extents",
    );
    let r = &json["reclaim"];
    assert!(r["extents_discarded"].as_u64().unwrap() >= 6, "{r}");
    let back = |json: &Value| {
        assert_eq!(
            json["kernel"]["hugetlb_free_after_teardown"], json["kernel"]["hugetlb_free_before"],
            "{json}"
        )
    };
    back(&json);
    // Half of each extent freed: demoted to 4 KiB pages, the hugetlb page back in the pool.
    let json =
        churn("--page-source zero --fault-granularity 2M --huge-source hugetlb --arg shape=halves");
    let r = &json["reclaim"];
    assert!(r["extents_demoted"].as_u64().unwrap() >= 6, "{r}");
    assert_eq!(r["kept_bytes"], 0, "{r}");
    back(&json);
}

#[test]
fn without_reclaim_the_guest_zeroes_what_it_frees() {
    require_kvm!();
    let _pool = hugetlb_lock();
    for extra in ["--reclaim off", "--arg report=off"] {
        let dir = TempDir::new("churn-off");
        let metrics = dir.path("m.json");
        let run = vmm_ok(&words(&format!(
            "run --guest churn --memory 32M --metrics {metrics} {extra}"
        )));
        assert_eq!(report_sum(&run.stdout, "nonzero_after_free"), 0, "{run}");
        assert_eq!(report_sum(&run.stdout, "reported_bytes"), 0, "{run}");
        assert!(report_sum(&run.stdout, "zeroed_bytes") > 0, "{run}");
        let json = read_json(&metrics);
        assert_eq!(json["reclaim"]["reclaimed_bytes"], 0, "{extra}");
        assert_eq!(
            json["reclaim"]["enabled"],
            extra.contains("report"),
            "{extra}"
        );
    }
}

#[test]
fn a_free_report_past_the_end_of_ram_ends_the_vcpu_and_frees_nothing() {
    require_kvm!();
    let _pool = hugetlb_lock();
    vmm_fails(
        &[
            "run",
            "--guest",
            "misbehave",
            "--memory",
            "16M",
            "--arg",
            "kind=bad-free",
        ],
        exit_code::GUEST_FAILED,
        &[
            "free report failed",
            "is not guest RAM",
            "0xfff000 (+0x2000)",
        ],
    );
    vmm_fails(
        &[
            "run",
            "--guest",
            "churn",
            "--memory",
            "16M",
            "--reclaim-split-pages",
            "0",
        ],
        exit_code::BAD_INPUT,
        &["--reclaim-split-pages 0 is out of range: allowed 1 to 512"],
    );
    for (extra, says) in [
        (
            "--reclaim-shrinker on --reclaim-shrinker-rate 4K",
            "--reclaim-shrinker-rate 4K is out of range: allowed 1M to 64G",
        ),
        (
            "--reclaim-shrinker-rate 64M",
            "--reclaim-shrinker-rate applies only with --reclaim-shrinker on",
        ),
        (
            "--reclaim-shrinker on --reclaim off",
            "--reclaim-shrinker on gives memory back by reclaim's rules: it needs reclaim on",
        ),
        (
            "--reclaim-shrinker on --backing thp",
            "--reclaim-shrinker on needs 4 KiB backing",
        ),
        (
            "--reclaim-shrinker on --page-source external:/nonexistent.sock",
            "--reclaim-shrinker on cannot run with an external page server",
        ),
    ] {
        vmm_fails(
            &words(&format!("run --guest churn --memory 16M {extra}")),
            exit_code::BAD_INPUT,
            &[says],
        );
    }
}

/// A guest that does not report what it frees (it zeroes it) gets it taken back all the same
/// by the zero-page shrinker, from every page source, with the seccomp filters on: the freed
/// memory leaves the host, the collapse does not bring it back, nothing the guest kept is
/// lost. The guest waits 3 s after its free (`hold`) so the shrinker's two passes fall
/// before its end however fast it runs.
#[test]
fn the_zero_page_shrinker_takes_back_what_a_silent_guest_zeroed() {
    require_kvm!();
    let dir = TempDir::new("churn-shrinker");
    let image = filled_image(&dir);
    for (source, shape) in [
        ("kernel", "extents"),
        ("kernel", "pages"),
        ("zero", "extents"),
        ("zero", "pages"),
        (&*format!("image:{image}"), "extents"),
    ] {
        let json = churn(&format!(
            "--page-source {source} --reclaim-shrinker on --seccomp on --arg report=off \
             --arg shape={shape} --arg hold=3000"
        ));
        let r = &json["reclaim"];
        let what = format!("{source} {shape}: {r}");
        assert_eq!(r["reports"], 0, "{what}");
        assert_eq!(r["shrinker_rate"], 256 * MIB, "{what}");
        // Half of 26 MiB of free RAM, zeroed by the guest: all of it found.
        let taken = r["shrinker_bytes"].as_u64().unwrap();
        assert!(taken >= 12 * MIB, "{what}");
        assert_eq!(r["reported_given_back_bytes"], 0, "{what}");
    }
}

/// Starts `vmm uffd-serve SOCKET FILE` and waits until it listens.
fn serve(socket: &str, file: &str, metrics: &str) -> std::process::Child {
    let child = spawn(&["uffd-serve", socket, file, "--metrics", metrics]);
    integration_tests::wait_listening(socket);
    child
}

#[test]
fn memory_given_back_reaches_a_page_server_as_removes() {
    require_kvm!();
    let dir = TempDir::new("churn-external");
    let image = filled_image(&dir);
    let raw = dir.path("ram.raw");
    vmm_ok(&["image", "export", &image, &raw]);
    let socket = dir.path("sock");
    let served = dir.path("served.json");
    let server = serve(&socket, &raw, &served);
    let metrics = dir.path("m.json");
    let run = vmm_ok(&words(&format!(
        "run --guest churn --vcpus 2 --memory 32M --page-source external:{socket} \
         --arg shape=pages --metrics {metrics}"
    )));
    assert_eq!(report_sum(&run.stdout, "mismatches"), 0, "{run}");
    assert_eq!(report_sum(&run.stdout, "nonzero_after_free"), 0, "{run}");
    let server = wait(server);
    assert_eq!(server.code, Some(0), "{server}");
    let s = read_json(&served);
    let removed = s["removed_bytes"].as_u64().unwrap();
    let reclaimed = read_json(&metrics)["reclaim"]["reclaimed_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        reclaimed > 0 && removed >= reclaimed,
        "removed {removed}, reclaimed {reclaimed}: {s}"
    );
}

/// Reclaim runs on the vCPU threads (and the shrinker's): on a terminal, at log level trace, with the filters on,
/// no path of it (4 KiB pages, THP and hugetlb extents, each shape) steps outside them.
#[test]
fn reclaim_stays_inside_the_vcpu_filter_on_a_terminal() {
    require_kvm!();
    let _pool = hugetlb_lock();
    let hugetlb = hugetlb_available("reclaim under seccomp, hugetlb half", 16);
    for extra in [
        "--arg shape=pages",
        "--page-source zero --arg shape=halves",
        "--page-source zero --fault-granularity 2M --arg shape=extents",
        "--page-source zero --fault-granularity 2M --huge-source hugetlb --arg shape=extents",
        "--page-source zero --fault-granularity 2M --huge-source hugetlb --arg shape=halves",
        // The zero-page shrinker's thread: discards, demotions, discards of whole pages.
        "--page-source zero --fault-granularity 2M --reclaim-shrinker on --arg report=off \
         --arg shape=halves --arg hold=1000",
        "--reclaim-shrinker on --arg report=off --arg shape=extents --arg hold=1000",
    ] {
        if extra.contains("hugetlb") && !hugetlb {
            continue;
        }
        let line = format!(
            "run --guest churn --vcpus 2 --memory 32M --log-level trace --seccomp on {extra}"
        );
        let (run, _) = vmm_on_terminal(&words(&line), &[], Duration::from_secs(120));
        assert_no_seccomp_stop(&line, &run);
        assert_eq!(run.code, Some(0), "{line}\n{run}");
    }
}

/// A give-back that fails inside the VMM ends the VM as the VMM's failure (204), names it, and
/// leaves nothing charged.
#[test]
#[cfg(feature = "failpoints")]
fn a_failed_give_back_ends_the_vm_as_the_vmms_failure() {
    require_kvm!();
    let _pool = hugetlb_lock();
    let dir = TempDir::new("churn-inject");
    let metrics = dir.path("m.json");
    let line = format!(
        "run --guest churn --vcpus 2 --memory 32M --page-source zero --fault-granularity 2M \
         --metrics {metrics}"
    );
    let (run, _) = vmm_on_terminal(
        &words(&line),
        &[(
            "FAILPOINTS",
            "reclaim-extent=2*off->1*return;seccomp-probes=return",
        )],
        Duration::from_secs(120),
    );
    assert_no_seccomp_stop(&line, &run);
    assert_eq!(run.code, Some(i32::from(exit_code::VMM_FAILED)), "{run}");
    assert!(
        run.stderr.contains("the guest's free report failed"),
        "{run}"
    );
    assert!(run.stderr.contains("giving back extent"), "{run}");
    let json = read_json(&metrics);
    assert_eq!(json["ledger"]["after_teardown_bytes"], 0, "{json}");
}
