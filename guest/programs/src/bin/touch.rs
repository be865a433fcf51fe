//! `touch`: each vCPU touches its own share of a memory range, one 4 KiB page at a time, and
//! reports the pages it touched and the guest cycles it took.
//!
//! Arguments: `pattern=seq|random`, `access=write|read`, `passes=N` (1), `size=SIZE` (all free
//! RAM), `seed=N` (random order seed), `timing=off|on` (on: time every access and report the
//! longest and a log2 histogram, see `guest_abi::stalls`), `fill=on` (first write every page of
//! free RAM, untimed), `snapshot=on` (then, once every vCPU has filled, vCPU 0 asks for a
//! snapshot; the timed part is what a resumed VM does), `spread=on` (`size` as whole extents
//! picked from all of free RAM: at random with `pattern=random`).
//! Reads report `sum`, the sum of the first word of every page read: with `fill=on` each holds
//! its own address, so a resumed guest that read the wrong memory reports another sum.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use guest_rt::{
    Args, BootInfo, Shuffle, Stalls, Text, fail,
    layout::{EXTENT_SIZE, PAGE_SIZE},
    my_share, rdtsc, report, snapshot, timing,
};

/// vCPUs done filling (the barrier before the snapshot).
static FILLED: AtomicU64 = AtomicU64::new(0);

guest_rt::entry!(main, guest_rt::guests::TOUCH);

fn main(boot: &BootInfo, args: &Args) -> u64 {
    let random = args.choice("pattern") == "random";
    let write = args.choice("access") == "write";
    let passes = args.number("passes");
    let seed = args.number("seed");
    let free = boot.free_end - boot.free_start;
    let size = args.size_or("size", free);
    if size > free {
        fail(
            Text::new()
                .s("size=")
                .hex(size)
                .s(" exceeds the ")
                .hex(free)
                .s(" bytes of free RAM"),
        );
    }
    let (base, pages) = my_share(boot, boot.free_start, size);
    if args.choice("fill") == "on" {
        let (first, count) = my_share(boot, boot.free_start, free);
        for p in 0..count {
            let gpa = first + p * PAGE_SIZE;
            // SAFETY: `gpa` lies in this vCPU's share of free, identity-mapped guest RAM.
            unsafe { (gpa as *mut u64).write_volatile(gpa) };
        }
    }
    if args.choice("snapshot") == "on" {
        FILLED.fetch_add(1, Ordering::SeqCst);
        while FILLED.load(Ordering::SeqCst) < boot.vcpu_count {
            core::hint::spin_loop();
        }
        if boot.vcpu_index == 0 {
            snapshot();
        }
    }

    let start = rdtsc();
    let mut sum = 0u64;
    if args.choice("spread") == "on" {
        let extents = free / EXTENT_SIZE;
        let chosen = (size / EXTENT_SIZE).clamp(1, extents.max(1));
        let mut touched = 0;
        for pass in 0..passes {
            // The same extents every pass, each one vCPU's alone.
            let (mut shuffled, mut in_order) = (Shuffle::new(extents, seed), 0..chosen);
            let order: &mut dyn Iterator<Item = u64> = match random {
                true => &mut shuffled,
                false => &mut in_order,
            };
            for (j, extent) in order.take(chosen as usize).enumerate() {
                if j as u64 % boot.vcpu_count != boot.vcpu_index {
                    continue;
                }
                let first = boot.free_start + extent * EXTENT_SIZE;
                let end = (first + EXTENT_SIZE).min(boot.free_end);
                let mut p = first;
                while p < end {
                    // SAFETY: `p` lies in free, identity-mapped guest RAM; each extent is one
                    // vCPU's alone.
                    unsafe {
                        if write {
                            (p as *mut u64).write_volatile(pass);
                        } else {
                            sum = sum.wrapping_add((p as *const u64).read_volatile());
                        }
                    }
                    p += PAGE_SIZE;
                    touched += 1;
                }
            }
        }
        let cycles = rdtsc() - start;
        report("pages", touched);
        report("cycles", cycles);
        if !write {
            report("sum", sum);
        }
        return 0;
    }
    if timing(args) {
        let mut stalls = Stalls::start();
        for pass in 0..passes {
            let mut visit = |page: u64| {
                let p = (base + page * PAGE_SIZE) as *mut u64;
                // SAFETY: `p` lies in this vCPU's share of free, identity-mapped guest RAM.
                unsafe {
                    if write {
                        p.write_volatile(pass);
                    } else {
                        sum = sum.wrapping_add(p.read_volatile());
                    }
                }
                stalls.lap();
            };
            if random {
                Shuffle::new(pages, seed ^ boot.vcpu_index ^ pass).for_each(&mut visit);
            } else {
                (0..pages).for_each(&mut visit);
            }
        }
        let cycles = rdtsc() - start;
        core::hint::black_box(sum);
        report("pages", pages * passes);
        report("cycles", cycles);
        stalls.report();
        return 0;
    }
    for pass in 0..passes {
        if random {
            for page in Shuffle::new(pages, seed ^ boot.vcpu_index ^ pass) {
                let p = (base + page * PAGE_SIZE) as *mut u64;
                // SAFETY: `p` lies in this vCPU's share of free, identity-mapped guest RAM.
                unsafe {
                    if write {
                        p.write_volatile(pass);
                    } else {
                        sum = sum.wrapping_add(p.read_volatile());
                    }
                }
            }
        } else if write {
            // The common case gets its own loop: a store, an add, a compare and a branch per
            // page, since every guest instruction is emulated on nested hosts.
            let (mut p, end) = (base, base + pages * PAGE_SIZE);
            while p < end {
                // SAFETY: as above.
                unsafe { (p as *mut u64).write_volatile(pass) };
                p += PAGE_SIZE;
            }
        } else {
            let (mut p, end) = (base, base + pages * PAGE_SIZE);
            while p < end {
                // SAFETY: as above.
                sum = sum.wrapping_add(unsafe { (p as *const u64).read_volatile() });
                p += PAGE_SIZE;
            }
        }
    }
    let cycles = rdtsc() - start;
    report("pages", pages * passes);
    report("cycles", cycles);
    if !write {
        report("sum", sum);
    }
    0
}
