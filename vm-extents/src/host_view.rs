//! What the host kernel says about guest memory, read so it can be set beside the VMM's own
//! view: which pages are present (`PAGEMAP_SCAN`, else `mincore`), which are mapped huge and
//! which map the shared zero page (`PAGEMAP_SCAN`), the `Rss`, `AnonHugePages` and
//! `*_Hugetlb` totals in `/proc/self/smaps`, the mappings the process has, the hugetlb pool,
//! and KVM's VM statistics (`KVM_GET_STATS_FD`).
//! Nothing here changes memory.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::{HostAddr, PAGE_SIZE};

pub use crate::sys::pagemap::{PAGE_IS_HUGE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT};
use crate::sys::pagemap::{PAGEMAP_SCAN, PageRegion, PmScanArg};

/// A file of this process's own in `/proc`, opened once and read from its start each time:
/// asked by the collapse and the pool threads, it must not cost an open each time, fail for
/// want of a file descriptor, or need a system call their seccomp filters do not allow.
struct ProcFile {
    path: &'static str,
    file: std::sync::OnceLock<File>,
}

impl ProcFile {
    const fn new(path: &'static str) -> Self {
        ProcFile {
            path,
            file: std::sync::OnceLock::new(),
        }
    }

    fn get(&self) -> io::Result<&File> {
        if let Some(file) = self.file.get() {
            return Ok(file);
        }
        let file = File::open(self.path)?;
        Ok(self.file.get_or_init(|| file))
    }

    /// The whole file as it is now.
    fn read(&self) -> io::Result<Vec<u8>> {
        let file = self.get()?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = file.read_at(&mut buf, out.len() as u64)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }
}

static PAGEMAP: ProcFile = ProcFile::new("/proc/self/pagemap");
static SMAPS: ProcFile = ProcFile::new("/proc/self/smaps");
static MAPS: ProcFile = ProcFile::new("/proc/self/maps");

/// Opens the `/proc` files the memory threads read, before those threads start (and before
/// any seccomp filter is installed).
pub fn open_views() -> io::Result<()> {
    for file in [&PAGEMAP, &SMAPS, &MAPS] {
        file.get()?;
    }
    Ok(())
}

fn pagemap() -> io::Result<&'static File> {
    PAGEMAP.get()
}

/// Host address ranges in `[start, end)` whose pages all have every category in `mask`.
/// `Ok(None)` when the kernel has no `PAGEMAP_SCAN` (before Linux 6.7).
pub fn scan(start: u64, end: u64, mask: u64) -> io::Result<Option<Vec<Range<u64>>>> {
    let pagemap = pagemap()?;
    let mut regions = vec![PageRegion::default(); 512];
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start: at,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            category_mask: mask,
            return_mask: mask,
            ..Default::default()
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len` regions into our
        // buffer and `walk_end` into `arg`; it changes nothing in the address space.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN() as _, &mut arg) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EINVAL) if at == start => Ok(None),
                _ => Err(err),
            };
        }
        for r in &regions[..n as usize] {
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r.start..r.end),
            }
        }
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(Some(out))
}

/// Whether the 2 MiB at `start` are mapped by one huge (PMD-level) entry.
pub fn is_mapped_huge(start: HostAddr) -> bool {
    use crate::EXTENT_SIZE;
    let start = start.raw();
    match scan(start, start + EXTENT_SIZE, PAGE_IS_HUGE) {
        Ok(Some(ranges)) => ranges
            .iter()
            .any(|r| r.start <= start && start + EXTENT_SIZE <= r.end),
        // Without PAGEMAP_SCAN, the mapping's own smaps entry says (exact where the 2 MiB are
        // a mapping of their own, as a pool page is; a lower bound inside guest RAM).
        _ => smaps_totals(HostAddr::new(start), HostAddr::new(start + EXTENT_SIZE))
            .is_ok_and(|t| t.anon_huge_kb == EXTENT_SIZE >> 10),
    }
}

/// Bytes of `[start, end)` whose entries map the kernel's shared zero page: populated (a
/// read or write there faults no more to a userfaultfd) yet holding no memory, so `Rss`
/// leaves them out. The kernel maps it where a read touched an untouched anonymous page, and
/// in place of the all-zero 4 KiB pages of a THP it splits. `None` without `PAGEMAP_SCAN`.
pub fn zero_pfn_bytes(start: HostAddr, end: HostAddr) -> io::Result<Option<u64>> {
    Ok(scan(start.raw(), end.raw(), PAGE_IS_PFNZERO)?
        .map(|ranges| ranges.iter().map(|r| r.end - r.start).sum()))
}

/// Which 4 KiB pages of `[start, start + len)` are present, one bool per page.
pub fn present_pages(start: HostAddr, len: u64) -> io::Result<Vec<bool>> {
    let start = start.raw();
    let pages = (len / PAGE_SIZE) as usize;
    if let Some(ranges) = scan(start, start + len, PAGE_IS_PRESENT)? {
        let mut present = vec![false; pages];
        for r in ranges {
            let first = ((r.start - start) / PAGE_SIZE) as usize;
            let last = ((r.end - start) / PAGE_SIZE) as usize;
            present[first..last.min(pages)].fill(true);
        }
        return Ok(present);
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: `start..start+len` is a mapping of ours; mincore writes one byte per page into
    // `vec`, which holds exactly that many.
    if unsafe { libc::mincore(start as *mut libc::c_void, len as usize, vec.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
}

/// The kernel's totals for the mappings inside `[start, end)`, from `/proc/self/smaps`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SmapsTotals {
    /// `AnonHugePages` in kB (THP).
    pub anon_huge_kb: u64,
    /// `Private_Hugetlb` + `Shared_Hugetlb` in kB.
    pub hugetlb_kb: u64,
    /// `Rss` in kB.
    pub rss_kb: u64,
}

/// Sums smaps fields over every VMA that lies inside `[start, end)`.
pub fn smaps_totals(start: HostAddr, end: HostAddr) -> io::Result<SmapsTotals> {
    let text = SMAPS.read()?;
    Ok(parse_smaps(
        &String::from_utf8_lossy(&text),
        start.raw(),
        end.raw(),
    ))
}

fn parse_smaps(text: &str, start: u64, end: u64) -> SmapsTotals {
    let mut totals = SmapsTotals::default();
    let mut inside = false;
    for line in text.lines() {
        let header = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| {
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            });
        if let Some((a, b)) = header.filter(|_| !line.ends_with(" kB") && line.contains(' ')) {
            inside = a >= start && b <= end;
            continue;
        }
        if !inside {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kb = value
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
        match key {
            "AnonHugePages" => totals.anon_huge_kb += kb,
            "Private_Hugetlb" | "Shared_Hugetlb" => totals.hugetlb_kb += kb,
            "Rss" => totals.rss_kb += kb,
            _ => {}
        }
    }
    totals
}

/// The 2 MiB hugetlb pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HugetlbPool {
    /// Pages in the pool.
    pub total: u64,
    /// Pages free (not reserved or in use).
    pub free: u64,
}

const HUGETLB_DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Reads the 2 MiB hugetlb pool's size; a kernel without one reports an empty pool.
pub fn hugetlb_pool() -> HugetlbPool {
    let read = |name: &str| {
        std::fs::read_to_string(format!("{HUGETLB_DIR}/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Free pages that are already promised to a mapping are not available to us.
    let free = read("free_hugepages").saturating_sub(read("resv_hugepages"));
    HugetlbPool {
        total: read("nr_hugepages"),
        free,
    }
}

/// Reads one KVM VM statistic by name (such as `pages_2m`) through `KVM_GET_STATS_FD`.
pub fn kvm_vm_stat(vm: &kvm_ioctls::VmFd, name: &str) -> io::Result<Option<u64>> {
    use kvm_bindings::{kvm_stats_desc, kvm_stats_header};
    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd we then own.
    let raw = unsafe { libc::ioctl(vm.as_raw_fd(), crate::sys::KVM_GET_STATS_FD() as _) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let mut bytes = [0u8; std::mem::size_of::<kvm_stats_header>()];
    file.read_exact_at(&mut bytes, 0)?;
    // SAFETY: `kvm_stats_header` is plain integers, valid for any bytes, and `bytes` holds
    // exactly one (read unaligned).
    let header: kvm_stats_header = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let fixed = std::mem::size_of::<kvm_stats_desc>();
    let desc_size = fixed + header.name_size as usize;
    let mut descs = vec![0u8; desc_size * header.num_desc as usize];
    file.read_exact_at(&mut descs, u64::from(header.desc_offset))?;
    for raw_desc in descs.chunks_exact(desc_size) {
        // SAFETY: as for the header: plain integers, `raw_desc` holds at least one (the name
        // that follows it is read from the bytes after).
        let desc: kvm_stats_desc = unsafe { std::ptr::read_unaligned(raw_desc.as_ptr().cast()) };
        let raw_name = &raw_desc[fixed..];
        let len = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        if &raw_name[..len] == name.as_bytes() {
            let mut value = [0u8; 8];
            file.read_exact_at(
                &mut value,
                u64::from(header.data_offset) + u64::from(desc.offset),
            )?;
            return Ok(Some(u64::from_le_bytes(value)));
        }
    }
    Ok(None)
}

/// `vm.max_map_count`.
pub fn max_map_count() -> io::Result<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")?
        .trim()
        .parse()
        .map_err(io::Error::other)
}

/// The mappings that cover any of `[start, end)` now (guest RAM starts as one; every
/// `mremap`ed extent splits it).
pub fn mappings_in(start: HostAddr, end: HostAddr) -> io::Result<u64> {
    let (start, end) = (start.raw(), end.raw());
    let text = MAPS.read()?;
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|&(a, b)| a < end && start < b)
        .count() as u64)
}

/// The mappings this process has now (lines of `/proc/self/maps`).
pub fn mappings() -> io::Result<u64> {
    let text = MAPS.read()?;
    Ok(text.iter().filter(|&&b| b == b'\n').count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_totals_count_only_vmas_inside_the_range() {
        let text = "\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0 \n\
Size:               4096 kB\n\
Rss:                2048 kB\n\
AnonHugePages:      2048 kB\n\
Private_Hugetlb:       0 kB\n\
7f0000400000-7f0000600000 rw-p 00000000 00:00 0 \n\
Rss:                2048 kB\n\
Private_Hugetlb:    2048 kB\n\
Shared_Hugetlb:        0 kB\n\
7f1000000000-7f1000200000 rw-p 00000000 00:00 0 \n\
AnonHugePages:      2048 kB\n";
        let t = parse_smaps(text, 0x7f00_0000_0000, 0x7f00_0060_0000);
        assert_eq!(
            t,
            SmapsTotals {
                anon_huge_kb: 2048,
                hugetlb_kb: 2048,
                rss_kb: 4096
            }
        );
    }

    #[test]
    fn present_pages_follow_touches() {
        let len = 16 * PAGE_SIZE as usize;
        let p: *mut libc::c_void = crate::huge::page::map_anonymous(len, 0)
            .expect("mmap")
            .as_ptr()
            .cast();
        for page in [0usize, 3, 15] {
            // SAFETY: inside the mapping.
            unsafe {
                (p as *mut u8)
                    .add(page * PAGE_SIZE as usize)
                    .write_volatile(1)
            };
        }
        let present = present_pages(HostAddr::of(p), len as u64).unwrap();
        let expected: Vec<bool> = (0..16).map(|i| [0, 3, 15].contains(&i)).collect();
        assert_eq!(present, expected);
        // SAFETY: our own mapping.
        unsafe { libc::munmap(p, len) };
    }

    #[test]
    fn pages_only_read_map_the_shared_zero_page() {
        let len = 16 * PAGE_SIZE as usize;
        let p: *mut u8 = crate::huge::page::map_anonymous(len, 0)
            .expect("mmap")
            .as_ptr()
            .cast();
        let (start, end) = (HostAddr::of(p), HostAddr::of(p) + len as u64);
        for page in [1usize, 2, 9] {
            // SAFETY: inside the mapping.
            unsafe { p.add(page * PAGE_SIZE as usize).read_volatile() };
        }
        // SAFETY: inside the mapping.
        unsafe { p.add(2 * PAGE_SIZE as usize).write_volatile(1) };
        let Some(zero) = zero_pfn_bytes(start, end).unwrap() else {
            eprintln!("SKIP: no PAGEMAP_SCAN on this kernel");
            return;
        };
        // Pages 1 and 9 were read only; page 2 was written after its read (its own page now).
        assert_eq!(zero, 2 * PAGE_SIZE);
        let present = present_pages(start, len as u64).unwrap();
        assert_eq!(present.iter().filter(|&&p| p).count(), 3);
        // SAFETY: our own mapping.
        unsafe { libc::munmap(p.cast(), len) };
    }
}
