//! Firecracker's userfaultfd handoff, both ways: this VMM handing its guest RAM to
//! `vmm uffd-serve`, a harness doing the VMM's side byte for byte (golden JSON of every schema
//! version, several regions, remove events), a page server that dies or never answers, and
//! handshakes that are refused.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Child;
use std::time::{Duration, Instant};

use integration_tests::{
    TempDir, hugetlb_available, hugetlb_lock, read_json, reports, require_kvm, spawn, vmm_fails,
    vmm_ok, wait, words,
};
use vm_extents::HostAddr;
use vm_extents::uffd::{FEATURE_EVENT_REMOVE, FEATURE_POISON, REGISTER_MODE_MISSING, Uffd};
use vmm::vm::exit_code;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MIB: usize = 1 << 20;

/// Starts `vmm uffd-serve SOCKET FILE EXTRA...` and waits until it listens.
fn serve(socket: &str, file: &str, extra: &str) -> Child {
    let mut args = vec!["uffd-serve", socket, file];
    args.extend(words(extra));
    let child = spawn(&args);
    integration_tests::wait_listening(socket);
    child
}

/// A 64 MiB guest that filled its RAM, saved, and exported raw.
fn saved_raw(dir: &TempDir) -> String {
    let image = dir.path("ram.img");
    let raw = dir.path("ram.raw");
    vmm_ok(&words(&format!(
        "run --guest verify --vcpus 2 --memory 64M --arg mode=fill --arg seed=9 \
         --collapse off --save-memory {image}"
    )));
    vmm_ok(&["image", "export", &image, &raw]);
    raw
}

const CHECK: &str = "run --guest verify --vcpus 2 --memory 64M --arg mode=check --arg seed=9";

#[test]
fn this_vmm_hands_its_ram_to_uffd_serve_at_both_granularities() {
    require_kvm!();
    let dir = TempDir::new("handoff-serve");
    let raw = saved_raw(&dir);
    let socket = dir.path("sock");
    for granularity in ["4K", "2M"] {
        let served = dir.path(&format!("served-{granularity}.json"));
        let server = serve(
            &socket,
            &raw,
            &format!("--granularity {granularity} --metrics {served}"),
        );
        let metrics = dir.path("m.json");
        // A server that answers is never taken for a stalled one.
        let run = vmm_ok(&words(&format!(
            "{CHECK} --page-source external:{socket} --metrics {metrics} \
             --page-server-timeout 2"
        )));
        let mismatches: u64 = reports(&run.stdout, "mismatches").iter().map(|r| r.1).sum();
        assert_eq!(mismatches, 0, "{granularity}: {run}");
        let pages: u64 = reports(&run.stdout, "pages").iter().map(|r| r.1).sum();
        assert!(pages > 14000, "{run}");
        let server = wait(server);
        assert_eq!(server.code, Some(0), "{server}");
        let s = read_json(&served);
        assert_eq!(s["end"], "vmm-closed", "{s}");
        // Only what the VMM had not populated itself is handed over, at its offset in RAM.
        let regions = s["regions"].as_array().unwrap();
        let handed: u64 = regions.iter().map(|r| r["size"].as_u64().unwrap()).sum();
        assert!(handed > 50 * MIB as u64 && handed < 64 * MIB as u64, "{s}");
        for r in regions {
            assert_eq!(r["page_size"], 4096, "{s}");
            let end = r["offset"].as_u64().unwrap() + r["size"].as_u64().unwrap();
            assert!(end <= 64 * MIB as u64, "{s}");
        }
        let faults = s["faults"].as_u64().unwrap();
        let huge = s["extents_2m"].as_u64().unwrap();
        if granularity == "2M" {
            assert!(huge > 20 && faults < 100, "{s}");
        } else {
            assert!(huge == 0 && faults > 14000, "{s}");
        }
        // The VMM's own handler served nothing, and no collapse ran.
        let m = read_json(&metrics);
        assert_eq!(m["memory"]["page_source"], "external", "{m}");
        assert_eq!(m["faults"]["served"], 0, "{m}");
        assert_eq!(m["collapse"]["enabled"], false, "{m}");
    }
}

#[test]
fn images_export_and_import_losslessly() {
    let dir = TempDir::new("handoff-convert");
    // A 4 MiB raw file: a pattern in the first MiB, a hole, a pattern in the last page.
    let raw = dir.path("a.raw");
    let mut bytes = vec![0u8; 4 * MIB];
    for (i, b) in bytes[..MIB].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    bytes[4 * MIB - 1] = 0x5a;
    std::fs::write(&raw, &bytes).unwrap();
    let image = dir.path("a.img");
    vmm_ok(&["image", "import", &raw, &image]);
    let back = dir.path("b.raw");
    vmm_ok(&["image", "export", &image, &back]);
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "the round trip changed bytes"
    );
    // Not whole extents; not an image.
    std::fs::write(&raw, vec![1u8; 4096]).unwrap();
    vmm_fails(
        &["image", "import", &raw, &image],
        exit_code::BAD_INPUT,
        &["2 MiB", "4096 bytes"],
    );
    vmm_fails(
        &["image", "export", &raw, &back],
        exit_code::BAD_INPUT,
        &["not a vmm memory image"],
    );
}

/// Maps `len` bytes for the harness's guest RAM, hugetlb if `huge`.
fn map(len: usize, huge: bool) -> u64 {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if huge { libc::MAP_HUGETLB } else { 0 };
    // SAFETY: a fresh anonymous mapping.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap {len} (huge {huge})");
    p as u64
}

/// Reads the u64 at `addr` (blocking on the page server while the page is missing).
fn read(addr: u64) -> u64 {
    // SAFETY: `addr` lies in one of the harness's mappings.
    unsafe { (addr as *const u64).read_volatile() }
}

/// The harness: a VMM's side of the handoff, written out as the protocol says, over three
/// regions (the middle one hugetlb where the pool allows), in each schema version's golden
/// JSON; then it reads every page back, discards some with MADV_DONTNEED (remove events) and
/// checks they read as zeroes, and closes the socket.
#[test]
fn the_handshake_byte_for_byte_in_every_schema_version_with_removes() {
    let _pool = hugetlb_lock();
    let dir = TempDir::new("handoff-harness");
    let Ok(probe) = Uffd::new(FEATURE_EVENT_REMOVE) else {
        eprintln!("SKIP: no userfaultfd");
        return;
    };
    assert_ne!(probe.features() & FEATURE_EVENT_REMOVE, 0);
    let hugetlb = hugetlb_available("handoff harness", 2);
    // Regions: 2 MiB of 4 KiB pages, 4 MiB (hugetlb where possible), 2 MiB + 12 KiB of 4 KiB.
    let sizes = [2 * MIB, 4 * MIB, 2 * MIB + 3 * 4096];
    let total: usize = sizes.iter().sum();
    // File contents: every u64 holds its own file offset plus one (no zero page of data).
    let raw = dir.path("mem.raw");
    let mut file = Vec::with_capacity(total);
    for off in (0..total as u64).step_by(8) {
        file.extend_from_slice(&(off + 1).to_le_bytes());
    }
    std::fs::write(&raw, &file).unwrap();
    let want = |off: u64| off + 1;

    for (schema, granularity) in [("1.0", "4K"), ("1.7", "2M"), ("1.12", "4K"), ("1.12", "2M")] {
        let huge_middle = hugetlb && schema != "1.0";
        let page = |i: usize| if i == 1 && huge_middle { 2 * MIB } else { 4096 };
        let bases: Vec<u64> = (0..3).map(|i| map(sizes[i], page(i) != 4096)).collect();
        let uffd = Uffd::new(FEATURE_EVENT_REMOVE).unwrap();
        for (i, &base) in bases.iter().enumerate() {
            uffd.register(HostAddr::new(base), sizes[i] as u64, REGISTER_MODE_MISSING)
                .unwrap();
        }
        // Golden JSON, as each Firecracker version writes it (field order and names).
        let mut offset = 0;
        let regions: Vec<String> = (0..3)
            .map(|i| {
                let head = format!(
                    r#"{{"base_host_virt_addr":{},"size":{},"offset":{offset}"#,
                    bases[i], sizes[i]
                );
                offset += sizes[i];
                match schema {
                    "1.0" => format!("{head}}}"),
                    "1.7" => format!(r#"{head},"page_size_kib":{}}}"#, page(i)),
                    _ => format!(
                        r#"{head},"page_size":{p},"page_size_kib":{p}}}"#,
                        p = page(i)
                    ),
                }
            })
            .collect();
        let json = format!("[{}]", regions.join(","));

        let socket = dir.path("sock");
        let served = dir.path("served.json");
        let server = serve(
            &socket,
            &raw,
            &format!("--kill-peer off --granularity {granularity} --metrics {served}"),
        );
        let stream = UnixStream::connect(&socket).unwrap();
        let sent = stream
            .send_with_fd(json.as_bytes(), uffd.as_raw_fd())
            .unwrap();
        assert_eq!(sent, json.len());

        // Every page of every region reads what the file holds there.
        let mut offset = 0u64;
        for (i, &base) in bases.iter().enumerate() {
            for at in (0..sizes[i] as u64).step_by(4096) {
                assert_eq!(
                    read(base + at),
                    want(offset + at),
                    "{schema} region {i} +{at:#x}"
                );
            }
            offset += sizes[i] as u64;
        }
        // Discard a 4 KiB page's worth and a whole huge page (or 2 MiB), then read them:
        // zeroes, while their neighbours keep the file's data.
        let discard = |addr: u64, len: usize| {
            // SAFETY: discarding pages of the harness's own mapping.
            let ret = unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED) };
            assert_eq!(ret, 0);
        };
        discard(bases[0] + 8192, 4096);
        discard(bases[1], 2 * MIB);
        assert_eq!(
            read(bases[0] + 8192),
            0,
            "{schema}: a removed page must read as zero"
        );
        assert_eq!(read(bases[0] + 4096), want(4096), "{schema}");
        assert_eq!(
            read(bases[1] + 4096),
            0,
            "{schema}: a removed huge page must read as zero"
        );
        assert_eq!(
            read(bases[1] + 2 * MIB as u64),
            want(sizes[0] as u64 + 2 * MIB as u64)
        );
        // A removed page written again holds what was written.
        // SAFETY: the harness's own mapping.
        unsafe { ((bases[0] + 8192) as *mut u64).write_volatile(77) };
        assert_eq!(read(bases[0] + 8192), 77);

        drop(stream);
        let server = wait(server);
        assert_eq!(server.code, Some(0), "{schema}: {server}");
        let s = read_json(&served);
        assert_eq!(s["end"], "vmm-closed", "{s}");
        assert!(s["removes"].as_u64().unwrap() >= 2, "{schema}: {s}");
        assert_eq!(s["regions"].as_array().unwrap().len(), 3, "{s}");
        if granularity == "2M" {
            assert!(s["extents_2m"].as_u64().unwrap() >= 2, "{schema}: {s}");
        }
        assert_eq!(s["peer_pid"], std::process::id(), "{s}");
        for (i, &base) in bases.iter().enumerate() {
            // SAFETY: unmapping the harness's own mapping, no longer used.
            unsafe { libc::munmap(base as *mut _, sizes[i]) };
        }
    }
}

#[test]
fn a_killed_page_server_ends_the_vmm_with_204_within_2s() {
    require_kvm!();
    let dir = TempDir::new("handoff-killed");
    let raw = saved_raw(&dir);
    let socket = dir.path("sock");
    // Slow reads keep the guest faulting for seconds.
    let mut server = serve(&socket, &raw, "--image-latency 300");
    let vmm = spawn(&words(&format!(
        "{CHECK} --page-source external:{socket} --log-level info"
    )));
    std::thread::sleep(Duration::from_millis(800));
    // Stopped first, so that every vCPU is waiting on a fault when the server dies.
    // SAFETY: signals our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(300));
    server.kill().unwrap();
    let killed = Instant::now();
    let run = wait(vmm);
    let took = killed.elapsed();
    let _ = server.wait();
    assert_eq!(run.code, Some(i32::from(exit_code::VMM_FAILED)), "{run}");
    assert!(
        took < Duration::from_secs(2),
        "the VMM took {took:?} to stop\n{run}"
    );
    assert!(
        run.stderr.contains("page server at") && run.stderr.contains("hung up"),
        "{run}"
    );
    // The vCPUs waiting on the dead server were released by poisoning what it never served
    // (where the kernel can), not by unregistering: no access completed with a zero page.
    let can_poison = Uffd::new(FEATURE_EVENT_REMOVE | FEATURE_POISON).is_ok();
    if can_poison {
        assert!(run.stderr.contains("poisoned the"), "{run}");
    }
    // No vCPU went on with a page the server never served: no guest saw a wrong value.
    assert!(!run.stdout.contains("mismatch at"), "{run}");
    assert!(
        reports(&run.stdout, "mismatches").iter().all(|r| r.1 == 0),
        "{run}"
    );
}

#[test]
fn sigterm_ends_a_page_server_with_its_metrics_and_the_vmm_with_it() {
    require_kvm!();
    let dir = TempDir::new("handoff-sigterm");
    let raw = saved_raw(&dir);
    let socket = dir.path("sock");
    let served = dir.path("served.json");
    let server = serve(
        &socket,
        &raw,
        &format!("--image-latency 300 --metrics {served}"),
    );
    let vmm = spawn(&words(&format!("{CHECK} --page-source external:{socket}")));
    std::thread::sleep(Duration::from_millis(800));
    // SAFETY: signals our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let server = wait(server);
    let run = wait(vmm);
    assert_eq!(server.code, Some(143), "{server}");
    let s = read_json(&served);
    assert_eq!(s["end"], "stopped by signal 15", "{s}");
    assert!(s["faults"].as_u64().unwrap() > 0, "{s}");
    // The VMM could not go on: the server killed it (or it saw the hang-up first: 204).
    assert!(server.stderr.contains("killed the VMM"), "{server}");
    assert!(
        run.code.is_none() || run.code == Some(i32::from(exit_code::VMM_FAILED)),
        "{run}"
    );
}

/// A page server that takes the handshake and never answers a fault.
fn silent_server(socket: &str) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let (_regions, _uffd) = vm_extents::handoff::receive(&stream, &|| false).unwrap();
        // Hold both until the VMM closes its end.
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut &stream, &mut buf);
    })
}

#[test]
fn a_page_server_that_never_answers_still_lets_timeout_and_sigterm_end_the_vmm() {
    require_kvm!();
    let dir = TempDir::new("handoff-silent");
    let socket = dir.path("sock");
    let server = silent_server(&socket);
    let started = Instant::now();
    vmm_fails(
        &words(&format!(
            "{CHECK} --page-source external:{socket} --timeout 1"
        )),
        exit_code::TIMED_OUT,
        &["did not finish within --timeout"],
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    server.join().unwrap();

    std::fs::remove_file(&socket).unwrap();
    let server = silent_server(&socket);
    let vmm = spawn(&words(&format!("{CHECK} --page-source external:{socket}")));
    std::thread::sleep(Duration::from_millis(800));
    // SAFETY: signals our own child.
    unsafe { libc::kill(vmm.id() as i32, libc::SIGTERM) };
    let signalled = Instant::now();
    let run = wait(vmm);
    assert!(signalled.elapsed() < Duration::from_secs(5), "{run}");
    assert!(run.stderr.contains("stopped by signal 15"), "{run}");
    assert_ne!(run.code, Some(0), "{run}");
    server.join().unwrap();

    // With a bound on one fault's wait, the VMM ends itself: 204, naming the vCPU.
    std::fs::remove_file(&socket).unwrap();
    let server = silent_server(&socket);
    let started = Instant::now();
    vmm_fails(
        &words(&format!(
            "{CHECK} --page-source external:{socket} --page-server-timeout 1"
        )),
        exit_code::VMM_FAILED,
        &["on one page fault the page server has not answered (--page-server-timeout)"],
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    server.join().unwrap();
}

#[test]
fn malformed_handshakes_are_refused_with_a_message() {
    let dir = TempDir::new("handoff-malformed");
    let raw = dir.path("mem.raw");
    std::fs::write(&raw, vec![0u8; 2 * MIB]).unwrap();
    let socket = dir.path("sock");
    let Ok(uffd) = Uffd::new(FEATURE_EVENT_REMOVE) else {
        eprintln!("SKIP: no userfaultfd");
        return;
    };
    let region = |size: usize, page: usize| {
        format!(
            r#"[{{"base_host_virt_addr":{},"size":{size},"offset":0,"page_size":{page},"page_size_kib":{page}}}]"#,
            2 * MIB
        )
    };
    let cases: [(String, bool, &str); 5] = [
        ("not json".into(), true, "malformed handshake: not JSON"),
        (
            r#"{"regions":[]}"#.into(),
            true,
            "the top level is not an array",
        ),
        (
            region(4 * MIB, 4096),
            true,
            "regions reach 4M into the memory file",
        ),
        (
            region(2 * MIB, 8192),
            true,
            "page size 8192 is not 4096 or 2097152",
        ),
        (region(2 * MIB, 4096), false, "carried no userfaultfd"),
    ];
    for (json, with_fd, needle) in cases {
        let server = serve(&socket, &raw, "--kill-peer off");
        let mut stream = UnixStream::connect(&socket).unwrap();
        if with_fd {
            stream
                .send_with_fd(json.as_bytes(), uffd.as_raw_fd())
                .unwrap();
        } else {
            stream.write_all(json.as_bytes()).unwrap();
        }
        let run = wait(server);
        assert_eq!(
            run.code,
            Some(i32::from(exit_code::BAD_INPUT)),
            "{json}: {run}"
        );
        assert!(
            run.stderr.contains(needle),
            "{json}: wanted {needle:?}\n{run}"
        );
        drop(stream);
    }
    // A descriptor that is not a userfaultfd (reading /dev/zero never runs dry) is refused at
    // once, not served: before the check the server spun on it for ever, deaf to signals.
    for (path, needle) in [
        ("/dev/zero", "is /dev/zero, not a userfaultfd"),
        ("/dev/urandom", "is /dev/urandom, not a userfaultfd"),
    ] {
        let fake = std::fs::File::open(path).unwrap();
        let server = serve(&socket, &raw, "--kill-peer off");
        let stream = UnixStream::connect(&socket).unwrap();
        stream
            .send_with_fd(region(2 * MIB, 4096).as_bytes(), fake.as_raw_fd())
            .unwrap();
        let started = Instant::now();
        let run = wait(server);
        assert!(started.elapsed() < Duration::from_secs(5), "{run}");
        assert_eq!(run.code, Some(i32::from(exit_code::BAD_INPUT)), "{run}");
        assert!(run.stderr.contains(needle), "{path}: {run}");
    }
}

/// Firecracker's `fault_all` example handler, as it works: at the first fault it copies every
/// region whole with `UFFDIO_COPY` (a page already present stops the copy: it fails the
/// test, as it panics the example), then wakes whatever faults later. Returns how many
/// regions it filled.
fn fault_all_server(socket: &str, file: String) -> std::thread::JoinHandle<usize> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let (regions, fd) = vm_extents::handoff::receive(&stream, &|| false).unwrap();
        let uffd = Uffd::from_owned(fd.into(), 0);
        let data = std::fs::read(&file).unwrap();
        let mut filled = false;
        let mut faults = Vec::new();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            assert!(unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } > 0);
            if fds[1].revents != 0 {
                return if filled { regions.len() } else { 0 };
            }
            faults.clear();
            uffd.read_faults(&mut faults).unwrap();
            for fault in &faults {
                if !filled {
                    for r in &regions {
                        let src = data[r.offset as usize..][..r.size].as_ptr();
                        // SAFETY: the region was handed over to us to fill, and `src` holds
                        // its `size` bytes.
                        let done = unsafe {
                            uffd.copy(HostAddr::new(r.base_host_virt_addr), src, r.size as u64)
                        };
                        assert_eq!(
                            done.unwrap(),
                            vm_extents::uffd::Resolved::Filled,
                            "a page of handed-over region {r:?} was already present"
                        );
                    }
                    filled = true;
                }
                uffd.wake(HostAddr::new(fault.address & !4095), 4096)
                    .unwrap();
            }
        }
    })
}

#[test]
fn firecrackers_fault_all_handler_serves_this_vmm() {
    require_kvm!();
    let dir = TempDir::new("handoff-fault-all");
    let raw = saved_raw(&dir);
    let socket = dir.path("sock");
    let server = fault_all_server(&socket, raw);
    let run = vmm_ok(&words(&format!(
        "{CHECK} --page-source external:{socket} --page-server-timeout 10"
    )));
    assert_eq!(
        reports(&run.stdout, "mismatches")
            .iter()
            .map(|r| r.1)
            .sum::<u64>(),
        0,
        "{run}"
    );
    assert!(
        server.join().unwrap() > 0,
        "the handler filled nothing\n{run}"
    );
}

/// A second `vmm uffd-serve` on the path of a live one is refused and leaves it be: only a
/// socket nobody listens on is stale.
#[test]
fn a_second_server_never_takes_a_live_servers_socket() {
    require_kvm!();
    let dir = TempDir::new("handoff-second");
    let raw = saved_raw(&dir);
    let socket = dir.path("sock");
    let first = serve(&socket, &raw, "");
    vmm_fails(
        &["uffd-serve", &socket, &raw],
        exit_code::BAD_INPUT,
        &["another page server is listening on it"],
    );
    let run = vmm_ok(&words(&format!("{CHECK} --page-source external:{socket}")));
    assert!(
        reports(&run.stdout, "mismatches").iter().all(|r| r.1 == 0),
        "{run}"
    );
    let first = wait(first);
    assert_eq!(first.code, Some(0), "{first}");
    // A socket left by a server that is gone is stale: replaced.
    let listener = UnixListener::bind(&socket).unwrap();
    drop(listener);
    let server = serve(&socket, &raw, "");
    // SAFETY: signals our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    assert_eq!(wait(server).code, Some(143));
}

/// SIGINT and SIGTERM end a server that has no VMM yet as they end one serving: 130 or 143,
/// and its socket removed.
#[test]
fn a_signal_before_any_vmm_ends_the_server_and_removes_its_socket() {
    let dir = TempDir::new("handoff-early-signal");
    let raw = dir.path("mem.raw");
    std::fs::write(&raw, vec![0u8; 2 * MIB]).unwrap();
    let socket = dir.path("sock");
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let server = serve(&socket, &raw, "");
        // SAFETY: signals our own child.
        unsafe { libc::kill(server.id() as i32, signal) };
        let run = wait(server);
        assert_eq!(run.code, Some(code), "{run}");
        assert!(run.stderr.contains("stopped by signal"), "{run}");
        assert!(
            std::fs::symlink_metadata(&socket).is_err(),
            "socket left\n{run}"
        );
    }
}

/// A VMM killed with faults in flight is an end, not the server's failure: exit 0, and no
/// signal sent to whatever now has its pid.
#[test]
fn a_vmm_that_dies_while_served_ends_the_server_normally() {
    require_kvm!();
    let dir = TempDir::new("handoff-vmm-dies");
    let raw = saved_raw(&dir);
    let socket = dir.path("sock");
    let served = dir.path("served.json");
    // Slow reads: every vCPU is waiting on a fault when the VMM dies.
    let server = serve(
        &socket,
        &raw,
        &format!("--image-latency 200 --metrics {served}"),
    );
    let mut vmm = spawn(&words(&format!("{CHECK} --page-source external:{socket}")));
    std::thread::sleep(Duration::from_millis(800));
    vmm.kill().unwrap();
    let _ = vmm.wait();
    let run = wait(server);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(!run.stderr.contains("killed the VMM"), "{run}");
    assert_eq!(read_json(&served)["end"], "vmm-closed");
}

/// The memory file cut short while it is served is a failure while serving (204), as the VMM
/// gives for its own image; the VMM it can no longer serve is killed.
#[test]
fn a_memory_file_truncated_while_served_ends_the_server_with_204() {
    require_kvm!();
    let dir = TempDir::new("handoff-truncated");
    let raw = saved_raw(&dir);
    let socket = dir.path("sock");
    let server = serve(&socket, &raw, "");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(8 * MIB as u64)
        .unwrap();
    let vmm = spawn(&words(&format!("{CHECK} --page-source external:{socket}")));
    let server = wait(server);
    let run = wait(vmm);
    assert_eq!(
        server.code,
        Some(i32::from(exit_code::VMM_FAILED)),
        "{server}"
    );
    assert!(
        server
            .stderr
            .contains("reading the memory file while serving"),
        "{server}"
    );
    assert!(
        run.code.is_none() || run.code == Some(i32::from(exit_code::VMM_FAILED)),
        "{run}"
    );
}

/// The page server on a terminal, logging at `trace`, with every benign probe made: nothing
/// steps outside its filter, and it says it runs under it.
#[test]
#[cfg(feature = "failpoints")]
fn the_page_server_on_a_terminal_stays_inside_its_filter() {
    require_kvm!();
    let dir = TempDir::new("handoff-tty");
    let raw = saved_raw(&dir);
    let socket = dir.path("sock");
    let server = {
        let (socket, raw) = (socket.clone(), raw.clone());
        std::thread::spawn(move || {
            integration_tests::vmm_on_terminal(
                &["uffd-serve", &socket, &raw, "--log-level", "trace"],
                &[("FAILPOINTS", "seccomp-probes=return")],
                Duration::from_secs(120),
            )
            .0
        })
    };
    integration_tests::wait_listening(&socket);
    let run = vmm_ok(&words(&format!("{CHECK} --page-source external:{socket}")));
    assert!(
        reports(&run.stdout, "mismatches").iter().all(|r| r.1 == 0),
        "{run}"
    );
    let server = server.join().unwrap();
    integration_tests::assert_no_seccomp_stop("uffd-serve", &server);
    assert_eq!(server.code, Some(0), "{server}");
    assert!(
        server
            .stdout
            .contains("under the PageServer seccomp filter"),
        "{server}"
    );
}

#[test]
fn a_page_server_kills_a_vmm_it_cannot_serve() {
    require_kvm!();
    let dir = TempDir::new("handoff-kill-peer");
    // 32 MiB of file for a 64 MiB guest: refused, and the VMM (which would wait forever if it
    // were Firecracker) is killed.
    let raw = dir.path("short.raw");
    std::fs::write(&raw, vec![0u8; 32 * MIB]).unwrap();
    let socket = dir.path("sock");
    let server = serve(&socket, &raw, "");
    let vmm = spawn(&words(&format!("{CHECK} --page-source external:{socket}")));
    let server = wait(server);
    let run = wait(vmm);
    assert_eq!(
        server.code,
        Some(i32::from(exit_code::BAD_INPUT)),
        "{server}"
    );
    assert!(server.stderr.contains("regions reach 64M"), "{server}");
    assert!(server.stderr.contains("killed the VMM (pid"), "{server}");
    // Killed by the server, or (had it seen the hang-up first) ended with 204.
    assert!(
        run.code.is_none() || run.code == Some(i32::from(exit_code::VMM_FAILED)),
        "{run}"
    );
}

#[test]
fn bad_external_options_are_refused() {
    require_kvm!();
    let dir = TempDir::new("handoff-bad");
    let missing = dir.path("nobody-listens");
    vmm_fails(
        &words(&format!("{CHECK} --page-source external:{missing}")),
        exit_code::BAD_INPUT,
        &["cannot connect to the page server socket", "vmm uffd-serve"],
    );
    for (extra, needle) in [
        (
            "--collapse on",
            "--collapse on cannot run with --page-source external",
        ),
        ("--backing thp", "needs --backing small"),
        (
            "--save-memory /tmp/x.img",
            "--save-memory cannot save a guest served by an external",
        ),
        ("--fault-granularity 2M", "--fault-granularity applies to"),
        ("--prefetch on", "--prefetch on applies to"),
        (
            "--page-server-timeout 0",
            "--page-server-timeout 0 is out of range",
        ),
    ] {
        vmm_fails(
            &words(&format!("{CHECK} --page-source external:{missing} {extra}")),
            exit_code::BAD_INPUT,
            &[needle],
        );
    }
    vmm_fails(
        &words("run --page-source external:"),
        exit_code::BAD_INPUT,
        &["external:SOCKET"],
    );
    // The server refuses a path that is not a socket, and a file it cannot serve.
    let file = dir.path("f.raw");
    std::fs::write(&file, [0u8; 4096]).unwrap();
    vmm_fails(
        &["uffd-serve", &file, &file],
        exit_code::BAD_INPUT,
        &["not a socket"],
    );
    vmm_fails(
        &["uffd-serve", &dir.path("s"), &missing],
        exit_code::BAD_INPUT,
        &["memory file"],
    );
}

/// `vmm uffd-serve` runs under its seccomp filter from the handshake on: a call outside it
/// (the fault point makes one) ends the server at once, naming the call.
#[test]
#[cfg(feature = "failpoints")]
fn the_page_server_runs_under_its_seccomp_filter() {
    let dir = TempDir::new("handoff-seccomp");
    let raw = dir.path("mem.raw");
    std::fs::write(&raw, vec![0u8; 2 * MIB]).unwrap();
    let Ok(uffd) = Uffd::new(FEATURE_EVENT_REMOVE) else {
        eprintln!("SKIP: no userfaultfd");
        return;
    };
    let base = map(2 * MIB, false);
    uffd.register(HostAddr::new(base), 2 * MIB as u64, REGISTER_MODE_MISSING)
        .unwrap();
    let socket = dir.path("sock");
    let server = std::process::Command::new(integration_tests::vmm_bin())
        .args(["uffd-serve", &socket, &raw, "--kill-peer", "off"])
        .env("FAILPOINTS", "seccomp-page-server=1*return")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The socket's file appears at bind(), before listen(): until then a connect is refused.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match UnixStream::connect(&socket) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ),
                    "{e}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("uffd-serve never listened on {socket}: {e}"),
        }
    };
    let json = format!(
        r#"[{{"base_host_virt_addr":{base},"size":{},"offset":0}}]"#,
        2 * MIB
    );
    stream
        .send_with_fd(json.as_bytes(), uffd.as_raw_fd())
        .unwrap();
    let run = wait(server);
    assert_eq!(run.code, Some(i32::from(exit_code::VMM_FAILED)), "{run}");
    let said = format!(
        "seccomp: thread 'vmm' made system call {}, which its filter does not allow",
        libc::SYS_getppid
    );
    assert!(run.stderr.contains(&said), "{run}");
    // SAFETY: unmapping the test's own mapping.
    unsafe { libc::munmap(base as *mut _, 2 * MIB) };
}
