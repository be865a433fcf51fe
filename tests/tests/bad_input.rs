//! Bad input gets a clear message naming the bad value and what is allowed, a distinct non-zero
//! exit code, and no panic.

use integration_tests::{TempDir, require_kvm, vmm_fails};
use vmm::loader::BUILTIN_IMAGES;
use vmm::vm::exit_code::BAD_INPUT;

fn hello_image() -> Vec<u8> {
    BUILTIN_IMAGES
        .iter()
        .find(|(n, _)| *n == "hello")
        .expect("hello is built in")
        .1
        .to_vec()
}

/// Writes `bytes` to a file in `dir` and returns its path.
fn guest_file(dir: &TempDir, name: &str, bytes: &[u8]) -> String {
    let path = dir.path(name);
    std::fs::write(&path, bytes).expect("write guest file");
    path
}

#[test]
fn memory_not_a_multiple_of_2m() {
    require_kvm!();
    vmm_fails(
        &["run", "--memory", "129M"],
        BAD_INPUT,
        &["--memory 129M", "multiple of 2 MiB", "130M"],
    );
}

#[test]
fn memory_zero_or_unparseable() {
    vmm_fails(
        &["run", "--memory", "0"],
        BAD_INPUT,
        &["\"0\"", "greater than zero"],
    );
    vmm_fails(
        &["run", "--memory", "lots"],
        BAD_INPUT,
        &["\"lots\"", "K, M or G"],
    );
    vmm_fails(&["run", "--memory", "12Q"], BAD_INPUT, &["\"12Q\""]);
}

#[test]
fn memory_out_of_range() {
    require_kvm!();
    vmm_fails(
        &["run", "--memory", "2M"],
        BAD_INPUT,
        &["--memory 2M is out of range", "allowed 6M"],
    );
    vmm_fails(
        &["run", "--memory", "100G"],
        BAD_INPUT,
        &["--memory 100G is out of range"],
    );
}

#[test]
fn vcpus_zero_or_too_many() {
    require_kvm!();
    vmm_fails(
        &["run", "--vcpus", "0"],
        BAD_INPUT,
        &["--vcpus 0 is out of range", "allowed 1 to"],
    );
    vmm_fails(
        &["run", "--vcpus", "100000"],
        BAD_INPUT,
        &["--vcpus 100000 is out of range"],
    );
    vmm_fails(&["run", "--vcpus", "two"], BAD_INPUT, &["'two'"]);
}

#[test]
fn bad_timeout_and_args() {
    vmm_fails(&["run", "--timeout", "-1"], BAD_INPUT, &["-1"]);
    vmm_fails(&["run", "--timeout", "0"], BAD_INPUT, &["--timeout 0"]);
    vmm_fails(
        &["run", "--arg", "novalue"],
        BAD_INPUT,
        &["\"novalue\"", "KEY=VALUE"],
    );
}

#[test]
fn unknown_builtin_lists_the_known_ones() {
    require_kvm!();
    vmm_fails(
        &["run", "--guest", "helo"],
        BAD_INPUT,
        &["\"helo\"", "hello, misbehave, touch, verify"],
    );
}

#[test]
fn missing_guest_file() {
    require_kvm!();
    vmm_fails(
        &["run", "--guest", "/nonexistent/guest.elf"],
        BAD_INPUT,
        &["/nonexistent/guest.elf", "No such file"],
    );
}

#[test]
fn guest_file_not_elf() {
    require_kvm!();
    let dir = TempDir::new("notelf");
    let path = guest_file(&dir, "script.sh", b"#!/bin/sh\necho hi\n");
    vmm_fails(
        &["run", "--guest", &path],
        BAD_INPUT,
        &[&path, "not an ELF file"],
    );
}

#[test]
fn guest_file_not_x86_64() {
    require_kvm!();
    let dir = TempDir::new("arm");
    let mut image = hello_image();
    image[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    let path = guest_file(&dir, "arm.elf", &image);
    vmm_fails(
        &["run", "--guest", &path],
        BAD_INPUT,
        &["machine is 183, not x86_64"],
    );
}

#[test]
fn guest_file_pie_or_dynamic() {
    require_kvm!();
    let dir = TempDir::new("dyn");
    let mut pie = hello_image();
    pie[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
    let path = guest_file(&dir, "pie.elf", &pie);
    vmm_fails(
        &["run", "--guest", &path],
        BAD_INPUT,
        &["ET_DYN", "-static -no-pie"],
    );

    let mut dynamic = hello_image();
    let phoff = u64::from_le_bytes(dynamic[32..40].try_into().unwrap()) as usize;
    dynamic[phoff..phoff + 4].copy_from_slice(&3u32.to_le_bytes()); // first header: PT_INTERP
    let path = guest_file(&dir, "dyn.elf", &dynamic);
    vmm_fails(
        &["run", "--guest", &path],
        BAD_INPUT,
        &["dynamically linked"],
    );

    // A real dynamically linked program from the host, if there is one.
    if std::path::Path::new("/bin/true").exists() {
        vmm_fails(
            &["run", "--guest", "/bin/true"],
            BAD_INPUT,
            &["/bin/true is not usable"],
        );
    }
}

#[test]
fn guest_file_that_does_not_fit() {
    require_kvm!();
    let dir = TempDir::new("fit");
    let image = hello_image();
    let phoff = u64::from_le_bytes(image[32..40].try_into().unwrap()) as usize;
    let load = (0..u16::from_le_bytes(image[56..58].try_into().unwrap()) as usize)
        .map(|i| phoff + i * 56)
        .find(|&p| u32::from_le_bytes(image[p..p + 4].try_into().unwrap()) == 1)
        .expect("a PT_LOAD header");
    for (name, addr) in [("low.elf", 0x1000u64), ("high.elf", 1 << 40)] {
        let mut bad = image.clone();
        bad[load + 16..load + 24].copy_from_slice(&addr.to_le_bytes());
        let path = guest_file(&dir, name, &bad);
        vmm_fails(
            &["run", "--guest", &path, "--memory", "16M"],
            BAD_INPUT,
            &["does not fit", "[0x400000, 0x1000000)"],
        );
    }
    let path = guest_file(&dir, "truncated.elf", &image[..200]);
    vmm_fails(&["run", "--guest", &path], BAD_INPUT, &["truncated"]);
}

#[test]
fn missing_kvm_device_says_what_to_check() {
    vmm_fails(
        &["run", "--kvm-device", "/nonexistent/kvm"],
        BAD_INPUT,
        &[
            "cannot open /nonexistent/kvm",
            "KVM is enabled",
            "may read and write",
        ],
    );
}
