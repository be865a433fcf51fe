//! The contract between the VMM and its guests, shared by both sides so they cannot drift apart.
//!
//! It owns three things: the fixed guest-physical layout the VMM reserves below
//! [`layout::LOAD_BASE`], the [`BootInfo`] block every vCPU finds in `rdi` at entry, and the
//! [`Ucall`] structure a guest hands to the host through one port-I/O exit (the pattern of the
//! Linux KVM selftests). It must never depend on anything but `core`: guests link it bare-metal.
//!
//! Everything that crosses the boundary is encoded and decoded field by field in little-endian
//! order, so the host never has to trust a guest-written byte pattern to be a valid Rust value.

#![no_std]
#![deny(missing_docs)]

/// The fixed guest-physical layout. Every address here is identity-mapped in the guest.
pub mod layout {
    /// 4 KiB, the base page size.
    pub const PAGE_SIZE: u64 = 4096;
    /// 2 MiB, the extent size and the size of one identity-mapped page-table entry.
    pub const EXTENT_SIZE: u64 = 2 << 20;

    /// The global descriptor table (null, 64-bit code, data).
    pub const GDT_ADDR: u64 = 0x1000;
    /// One [`crate::BootInfo`] block per vCPU, [`BOOT_INFO_STRIDE`] bytes apart.
    pub const BOOT_INFO_BASE: u64 = 0x10000;
    /// Distance between two vCPUs' boot-info blocks.
    pub const BOOT_INFO_STRIDE: u64 = 128;
    /// The workload arguments: `key=value` strings, each ended by a NUL byte.
    pub const ARGS_ADDR: u64 = 0x20000;
    /// Largest argument block the VMM accepts.
    pub const ARGS_MAX_LEN: u64 = 0x8000;
    /// The top-level page table.
    pub const PML4_ADDR: u64 = 0x30000;
    /// The one page-directory-pointer table (512 GiB of reach, far more than we allow).
    pub const PDPT_ADDR: u64 = 0x31000;
    /// Page directories, one per GiB of guest RAM, each with 512 2 MiB entries.
    pub const PD_BASE: u64 = 0x32000;
    /// Largest guest RAM the page-table area can map: one page directory per GiB.
    pub const MAX_RAM: u64 = 64 << 30;
    /// Lowest vCPU stack byte; stacks grow down from `STACKS_BASE + (i + 1) * STACK_SIZE`.
    pub const STACKS_BASE: u64 = 0x80000;
    /// Stack size per vCPU.
    pub const STACK_SIZE: u64 = 16 << 10;
    /// End of the area the VMM reserves; guest programs are linked and loaded at or above it.
    pub const LOAD_BASE: u64 = 4 << 20;
    /// How many vCPUs fit the stack area (and the boot-info area).
    pub const MAX_VCPUS: u64 = (LOAD_BASE - STACKS_BASE) / STACK_SIZE;

    const _: () = assert!(PD_BASE + (MAX_RAM >> 30) * PAGE_SIZE <= STACKS_BASE);
    const _: () = assert!(BOOT_INFO_BASE + MAX_VCPUS * BOOT_INFO_STRIDE <= ARGS_ADDR);
    const _: () = assert!(ARGS_ADDR + ARGS_MAX_LEN <= PML4_ADDR);
}

pub mod guests;

/// Port-I/O ports the VMM decodes.
pub mod ports {
    /// The ucall port: an `in` from it, with `rdi` holding the guest address of a [`crate::Ucall`].
    pub const UCALL: u16 = 0x1000;
    /// The exit port: an `out` of one byte ends this vCPU with that code (QEMU's isa-debug-exit).
    pub const EXIT: u16 = 0xf4;
    /// First port of the COM1 16550 UART.
    pub const COM1: u16 = 0x3f8;
    /// Number of COM1 registers.
    pub const COM1_LEN: u16 = 8;
}

/// `BootInfo::magic`: "VMMBOOT1".
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"VMMBOOT1");

/// What each vCPU finds at the address in `rdi` when it is first entered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// This vCPU's index, `0..vcpu_count`.
    pub vcpu_index: u64,
    /// How many vCPUs the VM has.
    pub vcpu_count: u64,
    /// Guest RAM size in bytes; RAM spans `[0, ram_size)`.
    pub ram_size: u64,
    /// First byte of RAM not used by the VMM or the loaded program (2 MiB aligned).
    pub free_start: u64,
    /// End of the free RAM (exclusive).
    pub free_end: u64,
    /// Guest address of the argument block (`key=value\0...`).
    pub args_addr: u64,
    /// Length of the argument block in bytes.
    pub args_len: u64,
    /// The host's TSC frequency in kHz, 0 when unknown, to turn cycles into time.
    pub tsc_khz: u64,
    /// What the VMM offers ([`FEATURE_FREE_REPORTING`]...).
    pub features: u64,
}

/// [`BootInfo::features`]: the VMM honours [`Command::Free`] reports (the memory comes back to
/// the host and reads as zeroes). Without it, a guest zeroes what it frees itself.
pub const FEATURE_FREE_REPORTING: u64 = 1;

const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= layout::BOOT_INFO_STRIDE);

impl BootInfo {
    /// Encodes the block as the guest will see it.
    pub fn to_bytes(&self) -> [u8; core::mem::size_of::<BootInfo>()] {
        let mut out = [0u8; core::mem::size_of::<BootInfo>()];
        let fields = [
            self.magic,
            self.vcpu_index,
            self.vcpu_count,
            self.ram_size,
            self.free_start,
            self.free_end,
            self.args_addr,
            self.args_len,
            self.tsc_khz,
            self.features,
        ];
        for (chunk, field) in out.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&field.to_le_bytes());
        }
        out
    }
}

/// Iterates the `key=value` pairs of an argument block.
pub fn args(block: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    block
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.iter().position(|&b| b == b'=') {
            Some(eq) => (&kv[..eq], &kv[eq + 1..]),
            None => (kv, &kv[kv.len()..]),
        })
}

/// Parses a size: decimal digits with an optional `K`, `M` or `G` suffix (powers of 1024), or
/// `0x`-prefixed hexadecimal bytes. Returns `None` on anything else or on overflow.
pub fn parse_size(s: &[u8]) -> Option<u64> {
    if let Some(hex) = s.strip_prefix(b"0x") {
        if hex.is_empty() {
            return None;
        }
        return hex.iter().try_fold(0u64, |acc, &c| {
            let digit = (c as char).to_digit(16)? as u64;
            acc.checked_mul(16)?.checked_add(digit)
        });
    }
    let (digits, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    if digits.is_empty() {
        return None;
    }
    let value = digits.iter().try_fold(0u64, |acc, &c| {
        let digit = (c as char).to_digit(10)? as u64;
        acc.checked_mul(10)?.checked_add(digit)
    })?;
    value.checked_mul(1 << shift)
}

/// How a guest reports the stalls it measured on its own clock: each timed memory access
/// falls in one bucket of a log2 histogram with four buckets per power of two ([`bucket`]),
/// reported as one [`Command::Report`] per non-empty bucket (key [`STALL_BUCKET_PREFIX`] then
/// the bucket number in decimal, value the count), and the longest as [`STALL_MAX_KEY`].
pub mod stalls {
    /// Buckets: four per bit of a cycle count.
    pub const BUCKETS: usize = 256;
    /// Key of the longest access, in TSC cycles.
    pub const STALL_MAX_KEY: &str = "stall_max_cycles";
    /// Key prefix of a histogram bucket: `stall_log2_48` counts accesses of 4096 to 5119
    /// cycles.
    pub const STALL_BUCKET_PREFIX: &str = "stall_log2_";

    /// The bucket of an access of `cycles`: `4 * floor(log2)` plus the two bits below the
    /// leading one (25% wide). A few instructions: the guest pays them per access.
    #[inline(always)]
    pub const fn bucket(cycles: u64) -> usize {
        let log = 63 - (cycles | 1).leading_zeros() as u64;
        let quarter = if log >= 2 {
            (cycles >> (log - 2)) & 3
        } else {
            0
        };
        (log * 4 + quarter) as usize
    }

    /// The largest cycle count in bucket `b`.
    pub const fn upper_edge(b: usize) -> u64 {
        let (log, quarter) = ((b / 4) as u32, (b % 4) as u64);
        if log < 2 {
            (1u64 << (log + 1)) - 1
        } else if log >= 63 && quarter == 3 {
            u64::MAX
        } else {
            ((4 + quarter + 1) << (log - 2)) - 1
        }
    }
}

/// Bytes of text a ucall can carry.
pub const UCALL_BUF_LEN: usize = 256;

/// A ucall: the guest fills one in its own memory and passes its address to the host.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Ucall {
    /// One of the `UCALL_*` command numbers.
    pub cmd: u64,
    /// Command arguments (see [`Command`]).
    pub args: [u64; 3],
    /// Bytes of `buf` in use.
    pub len: u64,
    /// Text: a message, a report key, or an abort's file name followed by its message.
    pub buf: [u8; UCALL_BUF_LEN],
}

/// Size of an encoded [`Ucall`].
pub const UCALL_SIZE: usize = core::mem::size_of::<Ucall>();
const _: () = assert!(UCALL_SIZE == 5 * 8 + UCALL_BUF_LEN);

const UCALL_PRINT: u64 = 1;
const UCALL_SYNC: u64 = 2;
const UCALL_REPORT: u64 = 3;
const UCALL_DONE: u64 = 4;
const UCALL_ABORT: u64 = 5;
const UCALL_FREE: u64 = 6;
const UCALL_SNAPSHOT: u64 = 7;

/// The most ranges one [`Command::Free`] report carries.
pub const FREE_MAX_RANGES: u64 = 1024;
/// Bytes of one range in a free report: its guest address and its length, each a
/// little-endian `u64`.
pub const FREE_RANGE_SIZE: u64 = 16;

/// A decoded ucall. Text borrowed from the guest is raw bytes: the guest may write anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// Print a line of text.
    Print(&'a [u8]),
    /// The guest reached a numbered stage.
    Sync(u64),
    /// A named measurement.
    Report {
        /// What was measured.
        key: &'a [u8],
        /// The value.
        value: u64,
    },
    /// This vCPU finished with an exit code.
    Done(u64),
    /// The guest freed memory: `count` ranges (each [`FREE_RANGE_SIZE`] bytes, 4 KiB aligned)
    /// at guest address `ranges`. When the ucall returns, the host has the memory back and
    /// every page in the ranges reads as zeroes (the analogue of virtio-balloon free page
    /// reporting, with the contents gone).
    Free {
        /// Guest address of the array of ranges.
        ranges: u64,
        /// How many ranges, at most [`FREE_MAX_RANGES`].
        count: u64,
    },
    /// Snapshot the VM now (where the VMM was given somewhere to save it): the VMM pauses
    /// every vCPU, this one just after the ucall, and saves the VM. A VM resumed from the
    /// snapshot goes on from the instruction after the ucall, as the original does when it
    /// keeps running.
    Snapshot,
    /// The guest gave up: an assertion or a panic.
    Abort {
        /// Source file.
        file: &'a [u8],
        /// Source line.
        line: u64,
        /// What went wrong.
        message: &'a [u8],
    },
}

/// Why a guest-written ucall could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// `cmd` is not a known command number.
    UnknownCommand(u64),
    /// `len` is larger than the buffer.
    BadLength(u64),
    /// An abort's file-name length is larger than `len`.
    BadFileLength(u64),
    /// A free report with more than [`FREE_MAX_RANGES`] ranges.
    TooManyRanges(u64),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::UnknownCommand(cmd) => write!(f, "unknown ucall command {cmd}"),
            Self::BadLength(len) => {
                write!(
                    f,
                    "ucall text length {len} exceeds the {UCALL_BUF_LEN}-byte buffer"
                )
            }
            Self::BadFileLength(len) => {
                write!(f, "abort file-name length {len} exceeds the text length")
            }
            Self::TooManyRanges(n) => {
                write!(f, "a free report of {n} ranges (at most {FREE_MAX_RANGES})")
            }
        }
    }
}

impl Ucall {
    const fn empty(cmd: u64) -> Self {
        Ucall {
            cmd,
            args: [0; 3],
            len: 0,
            buf: [0; UCALL_BUF_LEN],
        }
    }

    /// Appends text, truncating what does not fit.
    pub fn push_text(&mut self, text: &[u8]) {
        let start = self.len as usize;
        let n = text.len().min(UCALL_BUF_LEN - start);
        self.buf[start..start + n].copy_from_slice(&text[..n]);
        self.len += n as u64;
    }

    /// A print command.
    pub fn print(text: &[u8]) -> Self {
        let mut u = Self::empty(UCALL_PRINT);
        u.push_text(text);
        u
    }

    /// A sync command.
    pub const fn sync(stage: u64) -> Self {
        let mut u = Self::empty(UCALL_SYNC);
        u.args[0] = stage;
        u
    }

    /// A report command.
    pub fn report(key: &[u8], value: u64) -> Self {
        let mut u = Self::empty(UCALL_REPORT);
        u.args[0] = value;
        u.push_text(key);
        u
    }

    /// A done command.
    pub const fn done(code: u64) -> Self {
        let mut u = Self::empty(UCALL_DONE);
        u.args[0] = code;
        u
    }

    /// A free report of `count` ranges at guest address `ranges`.
    pub const fn free(ranges: u64, count: u64) -> Self {
        let mut u = Self::empty(UCALL_FREE);
        u.args[0] = ranges;
        u.args[1] = count;
        u
    }

    /// A snapshot command.
    pub const fn snapshot() -> Self {
        Self::empty(UCALL_SNAPSHOT)
    }

    /// An abort command; append the message with [`Ucall::push_text`].
    pub fn abort(file: &[u8], line: u64) -> Self {
        let mut u = Self::empty(UCALL_ABORT);
        u.push_text(file);
        u.args[0] = line;
        u.args[1] = u.len;
        u
    }

    /// Encodes the ucall exactly as it lies in guest memory.
    pub fn to_bytes(&self) -> [u8; UCALL_SIZE] {
        let mut out = [0u8; UCALL_SIZE];
        let words = [self.cmd, self.args[0], self.args[1], self.args[2], self.len];
        for (chunk, word) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out[40..].copy_from_slice(&self.buf);
        out
    }

    /// Decodes a ucall read from guest memory, checking every length the guest supplied.
    pub fn decode(bytes: &[u8; UCALL_SIZE]) -> Result<Command<'_>, DecodeError> {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        let (cmd, args, len) = (word(0), [word(1), word(2), word(3)], word(4));
        if len > UCALL_BUF_LEN as u64 {
            return Err(DecodeError::BadLength(len));
        }
        let text = &bytes[40..40 + len as usize];
        Ok(match cmd {
            UCALL_PRINT => Command::Print(text),
            UCALL_SYNC => Command::Sync(args[0]),
            UCALL_REPORT => Command::Report {
                key: text,
                value: args[0],
            },
            UCALL_DONE => Command::Done(args[0]),
            UCALL_SNAPSHOT => Command::Snapshot,
            UCALL_FREE => {
                if args[1] > FREE_MAX_RANGES {
                    return Err(DecodeError::TooManyRanges(args[1]));
                }
                Command::Free {
                    ranges: args[0],
                    count: args[1],
                }
            }
            UCALL_ABORT => {
                if args[1] > len {
                    return Err(DecodeError::BadFileLength(args[1]));
                }
                let (file, message) = text.split_at(args[1] as usize);
                Command::Abort {
                    file,
                    line: args[0],
                    message,
                }
            }
            other => return Err(DecodeError::UnknownCommand(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_round_trips() {
        let cases: [(Ucall, Command<'_>); 7] = [
            (Ucall::snapshot(), Command::Snapshot),
            (
                Ucall::free(0x40_0000, 3),
                Command::Free {
                    ranges: 0x40_0000,
                    count: 3,
                },
            ),
            (Ucall::print(b"hi"), Command::Print(b"hi")),
            (Ucall::sync(7), Command::Sync(7)),
            (
                Ucall::report(b"pages", 42),
                Command::Report {
                    key: b"pages",
                    value: 42,
                },
            ),
            (Ucall::done(3), Command::Done(3)),
            (
                {
                    let mut u = Ucall::abort(b"main.rs", 12);
                    u.push_text(b"boom");
                    u
                },
                Command::Abort {
                    file: b"main.rs",
                    line: 12,
                    message: b"boom",
                },
            ),
        ];
        for (ucall, expected) in cases {
            let bytes = ucall.to_bytes();
            assert_eq!(Ucall::decode(&bytes), Ok(expected));
        }
    }

    #[test]
    fn guest_supplied_lengths_are_checked() {
        assert_eq!(
            Ucall::decode(&Ucall::free(0, FREE_MAX_RANGES + 1).to_bytes()),
            Err(DecodeError::TooManyRanges(FREE_MAX_RANGES + 1))
        );
        let mut bytes = Ucall::print(b"x").to_bytes();
        bytes[32..40].copy_from_slice(&(UCALL_BUF_LEN as u64 + 1).to_le_bytes());
        assert_eq!(
            Ucall::decode(&bytes),
            Err(DecodeError::BadLength(UCALL_BUF_LEN as u64 + 1))
        );

        let mut abort = Ucall::abort(b"f.rs", 1).to_bytes();
        abort[16..24].copy_from_slice(&100u64.to_le_bytes());
        assert_eq!(Ucall::decode(&abort), Err(DecodeError::BadFileLength(100)));

        let mut unknown = Ucall::done(0).to_bytes();
        unknown[0..8].copy_from_slice(&99u64.to_le_bytes());
        assert_eq!(
            Ucall::decode(&unknown),
            Err(DecodeError::UnknownCommand(99))
        );
    }

    #[test]
    fn long_text_is_truncated_not_overflowed() {
        let long = [b'a'; UCALL_BUF_LEN + 10];
        let u = Ucall::print(&long);
        assert_eq!(u.len as usize, UCALL_BUF_LEN);
        assert!(
            matches!(Ucall::decode(&u.to_bytes()), Ok(Command::Print(t)) if t.len() == UCALL_BUF_LEN)
        );
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size(b"4096"), Some(4096));
        assert_eq!(parse_size(b"4K"), Some(4096));
        assert_eq!(parse_size(b"2m"), Some(2 << 20));
        assert_eq!(parse_size(b"1G"), Some(1 << 30));
        assert_eq!(parse_size(b"0x1000"), Some(4096));
        for bad in [
            &b""[..],
            b"M",
            b"12Q",
            b"-1",
            b"0x",
            b"99999999999999999999",
            b"20000000000G",
        ] {
            assert_eq!(parse_size(bad), None, "{:?}", core::str::from_utf8(bad));
        }
    }

    #[test]
    fn args_split_into_pairs() {
        let block = b"mode=fill\0seed=7\0flag\0\0";
        let pairs: [(&[u8], &[u8]); 3] = [(b"mode", b"fill"), (b"seed", b"7"), (b"flag", b"")];
        assert!(args(block).eq(pairs));
    }

    #[test]
    fn boot_info_encodes_in_field_order() {
        let info = BootInfo {
            magic: BOOT_MAGIC,
            vcpu_index: 1,
            vcpu_count: 2,
            ..Default::default()
        };
        let bytes = info.to_bytes();
        assert_eq!(&bytes[0..8], b"VMMBOOT1");
        assert_eq!(bytes[8], 1);
        assert_eq!(bytes[16], 2);
    }
}
