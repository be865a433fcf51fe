//! `guest_rt`: the tiny runtime every guest program links.
//!
//! It owns the entry point (`entry!`), the panic handler (which becomes an abort ucall), the port
//! I/O the guest uses to reach the host (ucalls, the serial console), workload arguments and the
//! handful of memory intrinsics a `no_std` program needs when it links without a C library.
//! Guests run with every instruction emulated on nested KVM hosts, so everything here is written
//! to execute as few instructions as it reasonably can.

#![no_std]

use core::arch::asm;

pub use guest_abi::guests;
use guest_abi::guests::{Guest, Kind, Value};
use guest_abi::{BOOT_MAGIC, ports};
pub use guest_abi::{BootInfo, Ucall, layout};

/// Defines `_start` to call `$main(&BootInfo, &Args) -> u64`, then report that code as done;
/// `$guest` is the program's declaration in `guest_abi::guests` (its arguments).
#[macro_export]
macro_rules! entry {
    ($main:path, $guest:expr) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn _start(boot: &'static $crate::BootInfo) -> ! {
            $crate::start(boot, &$guest, $main)
        }
    };
}

/// The body of `_start`: check the boot block, run `main`, report its result.
pub fn start(
    boot: &'static BootInfo,
    guest: &'static Guest,
    main: fn(&BootInfo, &Args) -> u64,
) -> ! {
    if boot.magic != BOOT_MAGIC {
        fail(Text::new().s("bad boot-info magic ").hex(boot.magic));
    }
    let args = Args::new(boot, guest);
    let code = main(boot, &args);
    done(code)
}

/// Sends a ucall: the host reads `rdi`, validates the address and decodes the struct.
pub fn ucall(u: &Ucall) {
    // SAFETY: an `in` from the ucall port only exits to the host, which reads the struct at
    // `rdi` and writes nothing back into guest memory; `al` is declared clobbered.
    unsafe {
        asm!("in al, dx", in("dx") ports::UCALL, in("rdi") u as *const Ucall, out("al") _,
             options(nostack, preserves_flags));
    }
}

/// Asks the VMM for a snapshot of the VM now; returns when the VM runs on (in this VM, when it
/// keeps running after the snapshot, or in a VM resumed from it).
pub fn snapshot() {
    ucall(&Ucall::snapshot());
}

/// Reports a named value to the host.
pub fn report(key: &str, value: u64) {
    ucall(&Ucall::report(key.as_bytes(), value));
}

/// Whether the VMM takes free memory back ([`free`] then reports it; else the guest zeroes it).
pub fn free_reporting(boot: &BootInfo) -> bool {
    boot.features & guest_abi::FEATURE_FREE_REPORTING != 0
}

/// Gives the host `ranges` (guest address, length; 4 KiB aligned), at most
/// [`guest_abi::FREE_MAX_RANGES`] per call: when it returns, the memory is the host's until
/// touched again, and reads as zeroes. Only where [`free_reporting`] says the VMM offers it.
pub fn free(ranges: &[[u64; 2]]) {
    // `[u64; 2]` is the ABI's 16-byte range on x86-64: address, then length, little-endian.
    ucall(&Ucall::free(ranges.as_ptr() as u64, ranges.len() as u64));
}

/// Writes and checks per-page patterns ([`pattern`]) in pages of free RAM the caller owns,
/// counting (and printing the first few of) the words that do not hold what they should.
pub struct Checker {
    /// The patterns' seed.
    pub seed: u64,
    /// Words that did not hold their pattern (or, for [`Checker::check_zero`], zero).
    pub mismatches: u64,
}

/// How many mismatches are printed.
const MAX_PRINTED: u64 = 8;

impl Checker {
    /// A checker of the patterns seeded by `seed`.
    pub fn new(seed: u64) -> Self {
        Checker {
            seed,
            mismatches: 0,
        }
    }

    /// Writes pass `pass`'s pattern into the page at `gpa`.
    pub fn write(&self, gpa: u64, pass: u64) {
        for (w, off) in PATTERN_WORDS.iter().enumerate() {
            // SAFETY: `gpa` is a page of this vCPU's share of free, identity-mapped RAM.
            unsafe {
                ((gpa + off) as *mut u64).write_volatile(pattern(self.seed, gpa, pass, w as u64))
            };
        }
    }

    /// Checks that the page at `gpa` holds pass `pass`'s pattern.
    pub fn check(&mut self, gpa: u64, pass: u64) {
        for (w, off) in PATTERN_WORDS.iter().enumerate() {
            self.expect(gpa + off, pattern(self.seed, gpa, pass, w as u64), pass);
        }
    }

    /// Checks that the pattern's words of the page at `gpa` read zero (memory given back).
    pub fn check_zero(&mut self, gpa: u64) {
        for off in PATTERN_WORDS {
            self.expect(gpa + off, 0, 0);
        }
    }

    fn expect(&mut self, at: u64, want: u64, pass: u64) {
        // SAFETY: as in `write`.
        let got = unsafe { (at as *const u64).read_volatile() };
        if got == want {
            return;
        }
        if self.mismatches < MAX_PRINTED {
            Text::new()
                .s("mismatch at ")
                .hex(at)
                .s(": expected ")
                .hex(want)
                .s(", found ")
                .hex(got)
                .s(" (pass ")
                .dec(pass)
                .s(")")
                .print();
            report("mismatch_gpa", at);
        }
        self.mismatches += 1;
    }
}

/// The offsets of the words a page's pattern is written to (first, middle, last).
pub const PATTERN_WORDS: [u64; 3] = [0, layout::PAGE_SIZE / 2, layout::PAGE_SIZE - 8];

/// The value of word `w` of the page at `gpa` after pass `pass`: every (seed, address, pass,
/// word) gives an unrelated value (the splitmix64 finaliser), so a lost or misplaced write
/// is caught.
pub fn pattern(seed: u64, gpa: u64, pass: u64, w: u64) -> u64 {
    let mut z = seed
        .wrapping_add(gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(pass.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(w);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stalls one vCPU's memory accesses took, on its own clock: the longest and a log2
/// histogram (the convention is [`guest_abi::stalls`]). Recording costs a `rdtsc` and a dozen
/// instructions per access, so timed loops pay it only when asked (`timing=on`).
pub struct Stalls {
    max: u64,
    buckets: [u64; guest_abi::stalls::BUCKETS],
    last: u64,
}

impl Stalls {
    /// Starts the clock: the first access is timed from here.
    pub fn start() -> Self {
        Stalls {
            max: 0,
            buckets: [0; guest_abi::stalls::BUCKETS],
            last: rdtsc(),
        }
    }

    /// Records the time since the previous call (or [`Stalls::start`]): one access, with
    /// the few instructions of loop around it.
    #[inline(always)]
    pub fn lap(&mut self) {
        let now = rdtsc();
        let cycles = now.wrapping_sub(self.last);
        self.last = now;
        self.max = self.max.max(cycles);
        self.buckets[guest_abi::stalls::bucket(cycles)] += 1;
    }

    /// Sends the longest access and every non-empty bucket to the host.
    pub fn report(&self) {
        use guest_abi::stalls::{STALL_BUCKET_PREFIX, STALL_MAX_KEY};
        report(STALL_MAX_KEY, self.max);
        for (bucket, &count) in self.buckets.iter().enumerate() {
            if count > 0 {
                let key = Text::new().s(STALL_BUCKET_PREFIX).dec(bucket as u64);
                ucall(&Ucall::report(key.as_bytes(), count));
            }
        }
    }
}

/// Whether the workload arguments ask for every access to be timed (`timing=on`).
#[track_caller]
pub fn timing(args: &Args) -> bool {
    args.choice("timing") == "on"
}

/// Tells the host this vCPU reached `stage`.
pub fn sync(stage: u64) {
    ucall(&Ucall::sync(stage));
}

/// Ends this vCPU with `code`.
pub fn done(code: u64) -> ! {
    ucall(&Ucall::done(code));
    // The host stops running a vCPU once it is done; never return into the caller anyway.
    loop {
        halt();
    }
}

/// Executes `hlt`.
pub fn halt() {
    // SAFETY: `hlt` only stops this vCPU until the host resumes it.
    unsafe { asm!("hlt", options(nomem, nostack)) };
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` reads a counter; it touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Writes one byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port writes reach the host's device model, never guest memory.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// Reads one byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port reads reach the host's device model, never guest memory.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) };
    value
}

/// Writes bytes to the COM1 transmit register with one string instruction, so that a whole
/// line costs the host a handful of exits instead of one per byte.
pub fn serial_write(bytes: &[u8]) {
    // SAFETY: `rep outsb` reads `rcx` bytes from `rsi`, which point into the live slice.
    unsafe {
        asm!("rep outsb", in("dx") ports::COM1, inout("rsi") bytes.as_ptr() => _,
             inout("rcx") bytes.len() => _, options(nostack, readonly));
    }
}

/// A fixed-size text builder, `Text::new().s("x = ").dec(x)`; overflow is truncated.
///
/// Guests do not use `core::fmt`: its precompiled number and padding code uses SSE
/// instructions (`pinsrw`, `pxor`...) that the instruction emulator of nested KVM hosts cannot
/// execute, which ends the guest with an emulation failure. These few methods compile to
/// plain integer code.
pub struct Text {
    buf: [u8; guest_abi::UCALL_BUF_LEN],
    len: usize,
}

impl Text {
    /// An empty text.
    pub const fn new() -> Self {
        Text {
            buf: [0; guest_abi::UCALL_BUF_LEN],
            len: 0,
        }
    }

    /// The text so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn push(&mut self, b: u8) {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    /// Appends a string.
    pub fn s(mut self, text: &str) -> Self {
        for &b in text.as_bytes() {
            self.push(b);
        }
        self
    }

    /// Appends raw bytes.
    pub fn bytes(mut self, text: &[u8]) -> Self {
        for &b in text {
            self.push(b);
        }
        self
    }

    /// Appends `v` in decimal.
    pub fn dec(mut self, v: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        let mut v = v;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.push(digits[n]);
        }
        self
    }

    /// Appends `v` as `0x`-prefixed hexadecimal.
    pub fn hex(mut self, v: u64) -> Self {
        self.push(b'0');
        self.push(b'x');
        let mut started = false;
        for shift in (0..16).rev() {
            let nibble = ((v >> (shift * 4)) & 0xf) as u8;
            if nibble != 0 || started || shift == 0 {
                started = true;
                self.push(if nibble < 10 {
                    b'0' + nibble
                } else {
                    b'a' + nibble - 10
                });
            }
        }
        self
    }

    /// Sends the text to the host as a print ucall.
    pub fn print(&self) {
        ucall(&Ucall::print(self.as_bytes()));
    }

    /// Writes the text and a newline to the serial console.
    pub fn serial_line(mut self) {
        self.push(b'\n');
        serial_write(self.as_bytes());
    }
}

impl Default for Text {
    fn default() -> Self {
        Self::new()
    }
}

/// Aborts the guest with `text` as the message, at the caller's source location.
#[track_caller]
pub fn fail(text: Text) -> ! {
    fail_at(core::panic::Location::caller(), text)
}

/// Aborts the guest with `text` as the message, at `at`.
pub fn fail_at(at: &core::panic::Location<'_>, text: Text) -> ! {
    abort(at.file(), at.line(), text.as_bytes())
}

fn abort(file: &str, line: u32, message: &[u8]) -> ! {
    let mut u = Ucall::abort(file.as_bytes(), u64::from(line));
    u.push_text(message);
    ucall(&u);
    loop {
        halt();
    }
}

/// The workload's `key=value` arguments, read as the guest's declaration in
/// `guest_abi::guests` says: its defaults, its choices, its ranges. The VMM checked every value
/// against the same declaration before the guest started, so a refusal here is a bug.
pub struct Args {
    block: &'static [u8],
    guest: &'static Guest,
    free_ram: u64,
}

impl Args {
    fn new(boot: &BootInfo, guest: &'static Guest) -> Self {
        // SAFETY: the VMM placed `args_len` bytes at `args_addr` inside identity-mapped RAM and
        // never changes them while the guest runs.
        let block = unsafe {
            core::slice::from_raw_parts(boot.args_addr as *const u8, boot.args_len as usize)
        };
        Args {
            block,
            guest,
            free_ram: boot.free_end - boot.free_start,
        }
    }

    /// The raw value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'static [u8]> {
        guest_abi::args(self.block)
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, v)| v)
    }

    /// The parsed value of `key`, if given.
    #[track_caller]
    fn value(&self, key: &str) -> Option<Value> {
        let at = core::panic::Location::caller();
        let given = self.get(key)?;
        match self.guest.arg(key).parse(given, self.free_ram) {
            Ok(v) => Some(v),
            Err(_) => {
                let t = Text::new().s("argument ").s(key).s("=").bytes(given);
                fail_at(at, t.s(" is not allowed (`vmm guests` says what is)"))
            }
        }
    }

    /// `key`, a number or size, or its declared default.
    #[track_caller]
    pub fn number(&self, key: &str) -> u64 {
        match (self.value(key), self.guest.arg(key).default) {
            (Some(Value::Number(n)), _) | (None, guests::Default::Value(n)) => n,
            _ => fail(
                Text::new()
                    .s("argument ")
                    .s(key)
                    .s(" has no numeric default"),
            ),
        }
    }

    /// `key`, a size, or `computed` where the default is worked out at run time.
    #[track_caller]
    pub fn size_or(&self, key: &str, computed: u64) -> u64 {
        match self.value(key) {
            Some(Value::Number(n)) => n,
            _ => computed,
        }
    }

    /// `key`, one of its declared choices (the first by default).
    #[track_caller]
    pub fn choice(&self, key: &str) -> &'static str {
        let Kind::Choice(choices) = self.guest.arg(key).kind else {
            fail(Text::new().s("argument ").s(key).s(" is not a choice"))
        };
        match self.value(key) {
            Some(Value::Choice(i)) => choices[i],
            _ => choices[0],
        }
    }
}

/// This vCPU's share of `[start, start + size)`, in whole pages: `(first byte, page count)`.
pub fn my_share(boot: &BootInfo, start: u64, size: u64) -> (u64, u64) {
    let pages = size / layout::PAGE_SIZE;
    let per = pages / boot.vcpu_count;
    let extra = pages % boot.vcpu_count;
    let i = boot.vcpu_index;
    let first = i * per + i.min(extra);
    let count = per + u64::from(i < extra);
    (start + first * layout::PAGE_SIZE, count)
}

/// This vCPU's share of `[start, start + size)` (`start` 2 MiB aligned) in whole extents, as
/// `(first byte, page count)`: every extent belongs to one vCPU (the last vCPU also takes a
/// partial extent at the end), so what one vCPU does to an extent no other vCPU does.
pub fn my_extent_share(boot: &BootInfo, start: u64, size: u64) -> (u64, u64) {
    let per_extent = layout::EXTENT_SIZE / layout::PAGE_SIZE;
    let pages = size / layout::PAGE_SIZE;
    let (extents, tail) = (pages / per_extent, pages % per_extent);
    let (per, extra) = (extents / boot.vcpu_count, extents % boot.vcpu_count);
    let i = boot.vcpu_index;
    let first = i * per + i.min(extra);
    let mut count = (per + u64::from(i < extra)) * per_extent;
    if i == boot.vcpu_count - 1 {
        count += tail;
    }
    (start + first * layout::EXTENT_SIZE, count)
}

/// A permutation of `0..n` visited in a pseudo-random order: a full-period linear congruential
/// generator modulo the next power of two, skipping values `>= n`. Costs a few instructions
/// per element and no memory.
pub struct Shuffle {
    n: u64,
    mask: u64,
    state: u64,
    left: u64,
}

impl Shuffle {
    /// A permutation of `0..n` seeded by `seed`.
    pub fn new(n: u64, seed: u64) -> Self {
        let mask = n.max(1).next_power_of_two() - 1;
        Shuffle {
            n,
            mask,
            state: seed & mask,
            left: n,
        }
    }
}

impl Iterator for Shuffle {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.left == 0 {
            return None;
        }
        loop {
            // a = 1 (mod 4) and c odd give the full period 2^k (Hull-Dobell).
            self.state = self
                .state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                & self.mask;
            if self.state < self.n {
                self.left -= 1;
                return Some(self.state);
            }
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
    // Only static messages: formatting would run core::fmt (see `Text`).
    let message = info
        .message()
        .as_str()
        .unwrap_or("panic (use guest_rt::fail for details)");
    abort(file, line, message.as_bytes())
}

// Memory intrinsics. Without a C library the compiler's calls to these need a definition; the
// string instructions keep them small and cannot be turned back into calls to themselves.

/// # Safety
/// Standard `memcpy` contract: `n` bytes valid at both pointers, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes.
    unsafe {
        asm!("rep movsb", inout("rdi") dest => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard `memmove` contract: `n` bytes valid at both pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dest does not start inside the source.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: copy backwards (direction flag set, then cleared) from the last byte.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             inout("rcx") n => _, options(nostack));
    }
    dest
}

/// # Safety
/// Standard `memset` contract: `n` bytes valid at `dest`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dest` is valid for `n` bytes.
    unsafe {
        asm!("rep stosb", inout("rdi") dest => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard `memcmp` contract: `n` bytes valid at both pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: `i < n`, within both ranges.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// Standard `bcmp` contract: `n` bytes valid at both pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `core` was built for a target that unwinds and references this symbol from
/// code paths we never reach (`panic = "abort"`); it only has to exist for the link.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
