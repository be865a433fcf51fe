//! `churn`: fills its share of memory with the `verify` pattern, frees part of it in a chosen
//! shape, keeps checking and rewriting what it kept (a lost write is caught), then touches part
//! of what it freed again and checks it reads zero.
//!
//! Arguments: `shape=extents|pages|halves` (whole 2 MiB extents, scattered 4 KiB pages of every
//! extent, the upper half of extents), `free=PERCENT` (50), `report=on|off` (on: freed memory is
//! reported to the VMM with the free ucall where the VMM offers it, else zeroed by the guest;
//! off: zeroed), `passes=N` (2), `retouch=PERCENT` (25), `hold=MS` (0: how long to wait after
//! the free, for a VMM's zero-page shrinker), `seed=N`, `size=SIZE`, `timing=off|on`.
//! Which pages are freed depends only on their guest address, and each vCPU works on whole
//! extents of its own, so every vCPU frees its share of the same shape and no extent is freed
//! by two. Stages: 1 filled, 2 freed, 3 passes done. Reports `freed_pages`,
//! `kept_pages`, `reported_bytes`, `zeroed_bytes`, `free_cycles`, `retouched`, `mismatches`
//! (kept pages that lost a write) and `nonzero_after_free`; ends with 1 if either is not 0.
#![no_std]
#![no_main]

use guest_rt::layout::{EXTENT_SIZE, PAGE_SIZE};
use guest_rt::{
    Args, BootInfo, Checker, Stalls, Text, fail, free, free_reporting, my_extent_share, rdtsc,
    report, sync, timing,
};

guest_rt::entry!(main, guest_rt::guests::CHURN);

/// Ranges sent per free ucall (2 KiB of this vCPU's 16 KiB stack).
const BATCH: usize = 128;

/// Whether item `i` is among `percent` of items spread evenly.
fn spread(i: u64, percent: u64) -> bool {
    i * percent / 100 != (i + 1) * percent / 100
}

/// Which pages the shape frees.
#[derive(Clone, Copy)]
struct Shape {
    kind: &'static str,
    percent: u64,
}

impl Shape {
    fn frees(&self, gpa: u64) -> bool {
        let (extent, page) = (gpa / EXTENT_SIZE, (gpa % EXTENT_SIZE) / PAGE_SIZE);
        match self.kind {
            "extents" => spread(extent, self.percent),
            "pages" => spread(page, self.percent),
            _ => spread(extent, self.percent) && page >= EXTENT_SIZE / PAGE_SIZE / 2,
        }
    }
}

/// Gathers freed pages into ranges and gives them away a batch at a time: to the VMM, or by
/// zeroing them.
struct Freer {
    report: bool,
    ranges: [[u64; 2]; BATCH],
    n: usize,
    reported: u64,
    zeroed: u64,
}

impl Freer {
    fn page(&mut self, gpa: u64) {
        if !self.report {
            // SAFETY: a page of this vCPU's share of free, identity-mapped RAM.
            unsafe { core::ptr::write_bytes(gpa as *mut u8, 0, PAGE_SIZE as usize) };
            self.zeroed += PAGE_SIZE;
            return;
        }
        if self.n > 0 && self.ranges[self.n - 1][0] + self.ranges[self.n - 1][1] == gpa {
            self.ranges[self.n - 1][1] += PAGE_SIZE;
            return;
        }
        if self.n == BATCH {
            self.flush();
        }
        self.ranges[self.n] = [gpa, PAGE_SIZE];
        self.n += 1;
    }

    fn flush(&mut self) {
        if self.n > 0 {
            free(&self.ranges[..self.n]);
            self.reported += self.ranges[..self.n].iter().map(|r| r[1]).sum::<u64>();
            self.n = 0;
        }
    }
}

fn main(boot: &BootInfo, args: &Args) -> u64 {
    let shape = Shape {
        kind: args.choice("shape"),
        percent: args.number("free"),
    };
    let passes = args.number("passes");
    let retouch = args.number("retouch");
    let available = boot.free_end - boot.free_start;
    let size = args.size_or("size", available);
    if size > available {
        fail(
            Text::new()
                .s("size=")
                .hex(size)
                .s(" exceeds the ")
                .hex(available)
                .s(" bytes of free RAM"),
        );
    }
    let (base, pages) = my_extent_share(boot, boot.free_start, size);
    let all = move || (0..pages).map(move |p| base + p * PAGE_SIZE);
    let kept = move || all().filter(move |&gpa| !shape.frees(gpa));
    let mut c = Checker::new(args.number("seed"));
    let mut stalls = timing(args).then(Stalls::start);
    let mut lap = || {
        if let Some(s) = stalls.as_mut() {
            s.lap();
        }
    };

    all().for_each(|gpa| c.write(gpa, 0));
    sync(1);

    let mut freer = Freer {
        report: args.choice("report") == "on" && free_reporting(boot),
        ranges: [[0; 2]; BATCH],
        n: 0,
        reported: 0,
        zeroed: 0,
    };
    let started = rdtsc();
    let mut freed = 0;
    for gpa in all().filter(|&gpa| shape.frees(gpa)) {
        freer.page(gpa);
        freed += 1;
    }
    freer.flush();
    let free_cycles = rdtsc() - started;
    sync(2);
    let hold = args.number("hold") * boot.tsc_khz;
    let held = rdtsc();
    while rdtsc() - held < hold {
        core::hint::spin_loop();
    }

    for pass in 1..=passes {
        kept().for_each(|gpa| {
            c.check(gpa, pass - 1);
            c.write(gpa, pass);
            lap();
        });
    }
    kept().for_each(|gpa| c.check(gpa, passes));
    let mismatches = c.mismatches;
    sync(3);

    let mut retouched = 0;
    for (k, gpa) in all().filter(|&gpa| shape.frees(gpa)).enumerate() {
        if spread(k as u64, retouch) {
            c.check_zero(gpa);
            c.write(gpa, 0);
            c.check(gpa, 0);
            retouched += 1;
        }
    }
    let nonzero = c.mismatches - mismatches;

    if let Some(s) = &stalls {
        s.report();
    }
    report("pages", pages);
    report("freed_pages", freed);
    report("kept_pages", pages - freed);
    report("reported_bytes", freer.reported);
    report("zeroed_bytes", freer.zeroed);
    report("free_cycles", free_cycles);
    report("retouched", retouched);
    report("mismatches", mismatches);
    report("nonzero_after_free", nonzero);
    u64::from(mismatches != 0 || nonzero != 0)
}
