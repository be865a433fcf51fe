//! `verify`: writes a per-page pattern derived from `seed` and each page's guest address, and
//! checks it, so that a lost or misplaced write is caught.
//!
//! Arguments: `mode=fill-check|fill|check|stress`, `seed=N` (1), `passes=N` (stress, 4),
//! `pass=N` (the pass whose pattern `check` expects, 0), `size=SIZE` (all free RAM),
//! `timing=off|on` (on: time every page's check and write, and report the longest and a log2
//! histogram, see `guest_abi::stalls`), `pattern=seq|random` (the order `check` visits pages
//! in: a restored guest's working set, touched at random).
//! Each vCPU works on its own share. Three words per page (first, middle, last) carry the
//! pattern. In `stress`, every pass checks what the previous pass wrote before writing anew.
//! `snapshot-at=N` (stress): vCPU 0 asks for a snapshot halfway through pass N, so that a VM
//! resumed from it must finish the pass with the pattern intact.
//! Mismatches are printed with their guest address (the first few), counted, and make the
//! guest end with code 1.
#![no_std]
#![no_main]

use guest_rt::{
    Args, BootInfo, Checker, Shuffle, Stalls, Text, fail, layout::PAGE_SIZE, my_share, report,
    snapshot, timing,
};

guest_rt::entry!(main, guest_rt::guests::VERIFY);

fn main(boot: &BootInfo, args: &Args) -> u64 {
    let mode = args.choice("mode");
    let random = args.choice("pattern") == "random";
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
    let pages_iter = move || (0..pages).map(move |p| base + p * PAGE_SIZE);
    let mut c = Checker::new(args.number("seed"));
    let mut stalls = timing(args).then(Stalls::start);
    // Times the page just visited, when timing.
    let mut lap = || {
        if let Some(s) = stalls.as_mut() {
            s.lap();
        }
    };

    match mode {
        "fill" => pages_iter().for_each(|gpa| {
            c.write(gpa, 0);
            lap();
        }),
        "check" => {
            let pass = args.number("pass");
            let order = c.seed ^ boot.vcpu_index;
            let mut visit = |gpa| {
                c.check(gpa, pass);
                lap();
            };
            if random {
                Shuffle::new(pages, order).for_each(|p| visit(base + p * PAGE_SIZE));
            } else {
                pages_iter().for_each(visit);
            }
        }
        "fill-check" => {
            pages_iter().for_each(|gpa| {
                c.write(gpa, 0);
                lap();
            });
            pages_iter().for_each(|gpa| {
                c.check(gpa, 0);
                lap();
            });
        }
        _ => {
            let passes = args.number("passes");
            pages_iter().for_each(|gpa| {
                c.write(gpa, 0);
                lap();
            });
            let snapshot_at = args.number("snapshot-at");
            for pass in 1..passes {
                pages_iter().enumerate().for_each(|(i, gpa)| {
                    if pass == snapshot_at && boot.vcpu_index == 0 && i as u64 == pages / 2 {
                        snapshot();
                    }
                    c.check(gpa, pass - 1);
                    c.write(gpa, pass);
                    lap();
                });
            }
            pages_iter().for_each(|gpa| {
                c.check(gpa, passes.max(1) - 1);
                lap();
            });
            report("passes", passes);
        }
    }
    if let Some(s) = &stalls {
        s.report();
    }
    report("pages", pages);
    report("mismatches", c.mismatches);
    u64::from(c.mismatches != 0)
}
