//! `touch`: each vCPU touches its own share of a memory range, one 4 KiB page at a time, and
//! reports the pages it touched and the guest cycles it took.
//!
//! Arguments: `pattern=seq|random`, `access=write|read`, `passes=N` (1), `size=SIZE` (all free
//! RAM), `seed=N` (random order seed), `timing=off|on` (on: time every access and report the
//! longest and a log2 histogram, see `guest_abi::stalls`).
#![no_std]
#![no_main]

use guest_rt::{
    Args, BootInfo, Shuffle, Stalls, Text, fail, layout::PAGE_SIZE, my_share, rdtsc, report, timing,
};

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

    let start = rdtsc();
    let mut sum = 0u64;
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
    core::hint::black_box(sum);
    report("pages", pages * passes);
    report("cycles", cycles);
    0
}
