//! The bodies of the fuzz targets: everything that parses bytes a user or a guest controls.
//! `fuzz/` runs them under libFuzzer (`make fuzz`, nightly); `make test` replays every input
//! kept in `fuzz/corpus/` and `fuzz/artifacts/` through them on stable, so a crash found once
//! stays fixed. Each one checks what must hold of a result, not only that nothing panics.

use std::os::fd::{AsRawFd, FromRawFd};

use guest_abi::layout::{LOAD_BASE, PAGE_SIZE};
use guest_abi::{UCALL_SIZE, Ucall};

use crate::cli::{Cli, Command};
use crate::devices::Devices;
use crate::loader::parse_executable;
use crate::metrics::VcpuStats;
use crate::ucall::{self, UcallResult};
use vm_extents::ram_image::{self, HEADER_SIZE, RamImage};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*`).
pub const TARGETS: &[(&str, Target)] = &[
    ("elf", elf),
    ("image", image),
    ("ucall", ucall),
    ("options", options),
    ("handshake", handshake),
    ("snapshot", snapshot),
];

/// A snapshot's VM state file and a working-set record, as `--resume` reads them: whatever
/// passes the checks is consistent (one state per vCPU, by index; RAM whole extents; a record
/// inside RAM, nothing twice) and encodes back to a file that decodes the same.
pub fn snapshot(data: &[u8]) {
    use crate::snapshot::state::{MAGIC, seal};
    use crate::snapshot::{VmState, working_set};
    // As given (the header's checks), and as a body behind a header that fits it (so the
    // fuzzer reaches the JSON and the body's own checks without forging a checksum).
    for bytes in [data.to_vec(), seal(MAGIC, data)] {
        if let Ok((state, _)) = VmState::decode(&bytes) {
            assert!(state.vcpus > 0 && state.vcpus as usize == state.vcpu.len());
            assert!(
                state
                    .vcpu
                    .iter()
                    .enumerate()
                    .all(|(i, v)| v.index as usize == i)
            );
            assert!(state.vcpu.iter().any(|v| v.ended.is_none()));
            assert!(state.memory.is_multiple_of(vm_extents::EXTENT_SIZE) && state.memory > 0);
            let again = state.encode();
            let (back, _) = VmState::decode(&again).expect("a state this build wrote");
            assert_eq!(back.encode(), again);
        }
    }
    // A record for snapshot 0 of 1 GiB of RAM (the fuzzer finds the id in the body).
    let ram = 1 << 30;
    for bytes in [data.to_vec(), seal(working_set::MAGIC, data)] {
        if let Ok(set) = working_set::decode(&bytes, 0, ram) {
            assert!(set.check(ram).is_ok());
            assert_eq!(
                working_set::decode(&working_set::encode(0, &set), 0, ram),
                Ok(set)
            );
        }
    }
}

/// A page server's view of a handoff handshake: whatever passes the checks can be served from
/// a file of that length (each region whole pages, aligned, inside the file, apart from every
/// other region in the address space and in the file).
pub fn handshake(data: &[u8]) {
    use vm_extents::handoff;
    let Ok(regions) = handoff::parse(data) else {
        return;
    };
    let reach = regions.iter().try_fold(0u64, |t, r| {
        Some(t.max(r.offset.checked_add(r.size as u64)?))
    });
    for len in [reach.unwrap_or(u64::MAX), 0, 4096, u64::MAX] {
        if handoff::check(&regions, std::path::Path::new("mem"), len).is_err() {
            continue;
        }
        assert!(reach.is_some_and(|reach| reach <= len));
        for (i, r) in regions.iter().enumerate() {
            let page = r.page_bytes();
            assert!(page == PAGE_SIZE || page == 2 << 20);
            assert!(r.size > 0 && (r.size as u64).is_multiple_of(page));
            assert!(r.base_host_virt_addr.is_multiple_of(page));
            assert!(r.offset.is_multiple_of(page));
            for o in &regions[..i] {
                assert!(o.end() <= r.base_host_virt_addr || r.end() <= o.base_host_virt_addr);
                let (r_end, o_end) = (r.offset + r.size as u64, o.offset + o.size as u64);
                assert!(o_end <= r.offset || r_end <= o.offset);
            }
        }
        // A text written back parses to the same regions.
        assert_eq!(
            handoff::parse(handoff::encode(&regions).as_bytes()).unwrap(),
            regions
        );
    }
}

/// The guest ELF loader's checks: whatever it accepts fits the guest.
pub fn elf(data: &[u8]) {
    for ram in [8 << 20, 64 << 20, 1 << 30] {
        let Ok(exe) = parse_executable(data, ram) else {
            continue;
        };
        let mut segments = exe.segments.clone();
        segments.sort_by_key(|s| s.addr);
        for s in &segments {
            assert!(
                s.addr >= LOAD_BASE && s.addr + s.mem_size <= ram,
                "{s:?} outside RAM"
            );
            assert!(s.file_size <= s.mem_size);
            assert!(s.offset + s.file_size <= data.len() as u64);
        }
        for pair in segments.windows(2) {
            assert!(pair[0].addr + pair[0].mem_size <= pair[1].addr, "overlap");
        }
        assert!(
            segments
                .iter()
                .any(|s| (s.addr..s.addr + s.mem_size).contains(&exe.entry))
        );
    }
}

/// A memory image file: the header checks, the hole map and positioned reads, on a real
/// (memory-backed, sparse) file. The input is the file's first 32 bytes (the header's fields),
/// then its length as 8 bytes (at most 64 MiB past the header), then the bytes of RAM that
/// follow the header; the rest of the file is a hole.
pub fn image(data: &[u8]) {
    let _ = ram_image::parse_header(data);
    let (head, rest) = data.split_at(data.len().min(32));
    let (len, contents) = match rest.split_first_chunk::<8>() {
        Some((len, contents)) => (u64::from_le_bytes(*len), contents),
        None => (head.len() as u64, &[][..]),
    };
    let len = len.min(HEADER_SIZE + (64 << 20));
    // SAFETY: memfd_create takes a NUL-ended name and flags and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"vmm-fuzz-image".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh fd we own.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len).expect("size the memfd");
    let mut header = [0u8; HEADER_SIZE as usize];
    header[..head.len()].copy_from_slice(head);
    let header_len = (HEADER_SIZE.min(len)) as usize;
    use std::os::unix::fs::FileExt;
    file.write_all_at(&header[..header_len], 0)
        .expect("write the header");
    if len > HEADER_SIZE {
        let n = contents.len().min((len - HEADER_SIZE) as usize);
        file.write_all_at(&contents[..n], HEADER_SIZE)
            .expect("write the contents");
    }
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let ram = match ram_image::parse_header(&header) {
        ram_image::Header::Ram(ram) => ram,
        ram_image::Header::NotAnImage => 2 << 20,
    };
    let Ok(image) = RamImage::open(std::path::Path::new(&path), ram) else {
        return;
    };
    // Accepted: the file is exactly a header and `ram` bytes, so every page reads.
    assert_eq!(len, HEADER_SIZE + ram);
    let mut page = [0u8; PAGE_SIZE as usize];
    let last = ram - PAGE_SIZE;
    for gpa in (0..ram).step_by(PAGE_SIZE as usize).take(32).chain([last]) {
        image
            .read_at(&mut page, gpa)
            .expect("a page inside an accepted image");
        let at = gpa as usize;
        let expected = contents.get(at..).unwrap_or(&[]);
        let n = expected.len().min(PAGE_SIZE as usize);
        assert_eq!(&page[..n], &expected[..n]);
        assert!(page[n..].iter().all(|&b| b == 0));
        if image.is_hole(gpa, PAGE_SIZE) {
            assert!(page.iter().all(|&b| b == 0), "a hole holds data");
        }
    }
    image.check_unchanged().expect("nothing changed it");
}

/// A ucall struct as a guest may write it: decoded, and acted on.
pub fn ucall(data: &[u8]) {
    let mut bytes = [0u8; UCALL_SIZE];
    let n = data.len().min(UCALL_SIZE);
    bytes[..n].copy_from_slice(&data[..n]);
    let devices = Devices::new(Box::new(std::io::sink()), Box::new(std::io::sink()));
    let mut stats = VcpuStats::new(0);
    match ucall::dispatch(&bytes, &devices, 0x1000, &mut stats) {
        UcallResult::Invalid(why) => assert!(Ucall::decode(&bytes).is_err(), "{why}"),
        _ => assert!(Ucall::decode(&bytes).is_ok()),
    }
    assert!(stats.reports.len() <= 1);
    let text = ucall::guest_text(data);
    assert!(!text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)));
}

/// The command line: sizes, guest arguments, page sources and every `vmm run` option, parsed
/// and validated as the binary does (against a made-up host).
pub fn options(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = text.parse::<crate::config::ByteSize>();
    let _ = text.parse::<crate::config::GuestArg>();
    let _ = text.parse::<vm_extents::PageSourceKind>();
    let args = std::iter::once("vmm").chain(text.split(['\n', ' ']).filter(|a| !a.is_empty()));
    let Ok(cli) = <Cli as clap::Parser>::try_parse_from(args) else {
        return;
    };
    if let Command::Run(run) = cli.command
        && let Ok(config) = run.to_config()
        && config.validate(24 << 30, 1024).is_ok()
    {
        assert!(config.memory.0 >= crate::config::MIN_MEMORY);
        assert!(config.memory.0.is_multiple_of(2 << 20));
        assert!(config.vcpus >= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_takes_empty_and_odd_inputs() {
        for (name, target) in TARGETS {
            for input in [
                &b""[..],
                b"\x7fELF",
                b"VMMIMAGE",
                &[0xff; 300],
                b"run --memory 8M",
            ] {
                target(input);
                let _ = name;
            }
        }
    }
}
