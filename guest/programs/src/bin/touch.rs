//! `touch`: each vCPU touches its own share of a memory range, one 4 KiB page at a time, and
//! reports the pages it touched and the guest cycles it took.
//!
//! Arguments: `pattern=seq|random`, `access=write|read`, `passes=N` (1), `size=SIZE` (all free
//! RAM), `seed=N` (random order seed).
#![no_std]
#![no_main]

use guest_rt::{Args, BootInfo, Shuffle, Text, fail, layout::PAGE_SIZE, my_share, rdtsc, report};

guest_rt::entry!(main);

fn main(boot: &BootInfo, args: &Args) -> u64 {
    let random = args.choice("pattern", &["seq", "random"]) == "random";
    let write = args.choice("access", &["write", "read"]) == "write";
    let passes = args.size("passes", 1);
    let seed = args.size("seed", 1);
    let free = boot.free_end - boot.free_start;
    let size = args.size("size", free);
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
    for pass in 0..passes {
        let mut touch = |page: u64| {
            let p = (base + page * PAGE_SIZE) as *mut u64;
            // SAFETY: `p` lies in this vCPU's share of free, identity-mapped guest RAM.
            unsafe {
                if write {
                    p.write_volatile(page ^ pass);
                } else {
                    sum = sum.wrapping_add(p.read_volatile());
                }
            }
        };
        if random {
            Shuffle::new(pages, seed ^ boot.vcpu_index ^ pass).for_each(&mut touch);
        } else {
            (0..pages).for_each(&mut touch);
        }
    }
    let cycles = rdtsc() - start;
    core::hint::black_box(sum);
    report("pages", pages * passes);
    report("cycles", cycles);
    0
}
