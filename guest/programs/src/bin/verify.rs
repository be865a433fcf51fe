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
//! Mismatches are printed with their guest address (the first few), counted, and make the
//! guest end with code 1.
#![no_std]
#![no_main]

use guest_rt::{
    Args, BootInfo, Shuffle, Stalls, Text, fail, layout::PAGE_SIZE, my_share, report, timing,
};

guest_rt::entry!(main, guest_rt::guests::VERIFY);

/// Offsets of the words that carry the pattern in each page.
const WORDS: [u64; 3] = [0, PAGE_SIZE / 2, PAGE_SIZE - 8];
const MAX_PRINTED: u64 = 8;

/// The expected value of word `w` of the page at `gpa` after pass `pass`.
fn pattern(seed: u64, gpa: u64, pass: u64, w: u64) -> u64 {
    // splitmix64 finaliser: every (seed, address, pass, word) gives an unrelated value.
    let mut z = seed
        .wrapping_add(gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(pass.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(w);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Checker {
    seed: u64,
    mismatches: u64,
}

impl Checker {
    fn write(&self, gpa: u64, pass: u64) {
        for (w, off) in WORDS.iter().enumerate() {
            // SAFETY: `gpa` is a page of this vCPU's share of free, identity-mapped RAM.
            unsafe {
                ((gpa + off) as *mut u64).write_volatile(pattern(self.seed, gpa, pass, w as u64))
            };
        }
    }

    fn check(&mut self, gpa: u64, pass: u64) {
        for (w, off) in WORDS.iter().enumerate() {
            // SAFETY: as in `write`.
            let got = unsafe { ((gpa + off) as *const u64).read_volatile() };
            let want = pattern(self.seed, gpa, pass, w as u64);
            if got != want {
                if self.mismatches < MAX_PRINTED {
                    Text::new()
                        .s("mismatch at ")
                        .hex(gpa + off)
                        .s(": expected ")
                        .hex(want)
                        .s(", found ")
                        .hex(got)
                        .s(" (pass ")
                        .dec(pass)
                        .s(")")
                        .print();
                    report("mismatch_gpa", gpa + off);
                }
                self.mismatches += 1;
            }
        }
    }
}

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
    let mut c = Checker {
        seed: args.number("seed"),
        mismatches: 0,
    };
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
            for pass in 1..passes {
                pages_iter().for_each(|gpa| {
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
