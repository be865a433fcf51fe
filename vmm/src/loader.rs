//! Guest programs: the built-in ones embedded at build time, and a user's own static x86_64 ELF
//! executable, checked before anything is loaded.
//!
//! The checks are the point of this module: a guest file comes from the user and its headers
//! say where it wants to be written in guest RAM. Every segment must be `PT_LOAD` data inside
//! the file, and land inside RAM above the area the VMM reserves (page tables, boot info,
//! stacks). linux-loader's ELF loader targets kernels (PVH notes, `e_phys`-relative loading)
//! and does not make these checks, so the few header fields we need are read here directly.

use std::path::{Path, PathBuf};

use guest_abi::layout::LOAD_BASE;

use crate::units::ByteSize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

include!(concat!(env!("OUT_DIR"), "/builtin_images.rs"));

pub use guest_abi::guests::{ALL as BUILTINS, Guest as Builtin};
use guest_abi::guests::{Arg, Default, Kind, Refused};

/// Largest guest file the VMM reads: far more than any program that fits the guest's page
/// tables needs, small enough that reading it costs nothing to fear.
pub const MAX_GUEST_FILE: u64 = 256 << 20;

/// Errors from finding, checking or loading a guest program.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// The file is not a regular file of a sane size.
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    /// Neither a built-in name nor an existing file.
    #[error("no built-in guest is called {name:?} and no such file exists; built-ins: {known}")]
    Unknown {
        /// What was asked for.
        name: String,
        /// The built-in names.
        known: String,
    },
    /// The file could not be read.
    #[error("cannot read guest file {}", path.display())]
    Read {
        /// The file named.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A `--arg` the built-in guest does not take.
    #[error(transparent)]
    Arg(Box<ArgError>),
    /// The file is not a loadable static x86_64 executable.
    #[error("guest file {} is not usable: {reason}", path.display())]
    Invalid {
        /// The file (or built-in name).
        path: PathBuf,
        /// What is wrong with it, and what is allowed.
        reason: String,
    },
    /// Writing a segment into guest memory failed.
    #[error("could not load segment at {addr:#x} of guest {}", path.display())]
    Load {
        /// The file named.
        path: PathBuf,
        /// Segment address.
        addr: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Why a built-in guest refuses a `--arg`.
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    /// A key the guest does not take.
    #[error(
        "--arg {key}={value}: guest {guest} takes no argument {key:?}{hint}; it takes {takes} \
         (`vmm guests` lists them)"
    )]
    Unknown {
        /// The guest.
        guest: &'static str,
        /// The key given.
        key: String,
        /// Its value.
        value: String,
        /// A suggestion, or nothing.
        hint: String,
        /// What it does take.
        takes: String,
    },
    /// A value the key does not take.
    #[error("--arg {key}={value}: {why}; {key} takes {allowed}")]
    Bad {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        why: String,
        /// What the key takes, with its default.
        allowed: String,
    },
    /// The same key twice.
    #[error("--arg {key}= is given twice ({first} and {second}); give each key once")]
    Twice {
        /// The key.
        key: String,
        /// The first value.
        first: String,
        /// The second value.
        second: String,
    },
}

impl From<ArgError> for ProgramError {
    fn from(e: ArgError) -> Self {
        ProgramError::Arg(Box::new(e))
    }
}

/// What to say when a guest file of the user's own fails in the guest: guests are
/// bare-metal programs, and the usual mistake is to give one made for Linux.
pub fn bare_metal_hint(exe: &Executable) -> String {
    let looks = if exe.has_tls {
        " This one has thread-local storage, as a C library's programs do: it looks made for \
         Linux."
    } else {
        ""
    };
    format!(
        "hint: a guest is a bare-metal program, entered in 64-bit long mode with no operating \
         system: no system calls, no Linux ABI, no C library, and no SSE arithmetic (the host's \
         instruction emulator lacks it); a static Linux executable stops at its first such \
         instruction.{looks} README, Writing your own guest, says what a guest may do."
    )
}

/// A guest program ready to check and load.
#[derive(Debug, Clone)]
pub struct GuestProgram {
    /// The built-in name or the file path, for messages.
    pub origin: PathBuf,
    bytes: std::borrow::Cow<'static, [u8]>,
    /// The built-in's declaration (its arguments); none for a user's own file.
    builtin: Option<&'static Builtin>,
}

/// One `PT_LOAD` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address of the segment.
    pub addr: u64,
    /// Offset of its bytes in the file.
    pub offset: u64,
    /// Bytes taken from the file.
    pub file_size: u64,
    /// Bytes in memory (the rest is zero).
    pub mem_size: u64,
}

/// A checked executable: where it starts and what to copy where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executable {
    /// The entry point.
    pub entry: u64,
    /// The loadable segments.
    pub segments: Vec<Segment>,
    /// Whether it carries thread-local storage (`PT_TLS`): a C library's program, made for an
    /// operating system, not a bare-metal guest.
    pub has_tls: bool,
}

impl Executable {
    /// One past the highest byte any segment occupies.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.addr + s.mem_size)
            .max()
            .unwrap_or(LOAD_BASE)
    }
}

const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_TLS: u32 = 7;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks ELF headers against a guest of `ram_size` bytes. The error is the reason, phrased
/// to say what is allowed.
pub fn parse_executable(bytes: &[u8], ram_size: u64) -> Result<Executable, String> {
    if bytes.len() < EHDR_SIZE || &bytes[..4] != b"\x7fELF" {
        return Err("not an ELF file (bad magic or shorter than an ELF header)".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file; only x86_64 executables run".into());
    }
    let machine = u16_at(bytes, 18);
    if machine != EM_X86_64 {
        return Err(format!(
            "ELF machine is {machine}, not x86_64 ({EM_X86_64})"
        ));
    }
    match u16_at(bytes, 16) {
        ET_EXEC => {}
        ET_DYN => {
            return Err(
                "a position-independent executable or shared object (ET_DYN); \
                 link a static executable with -static -no-pie"
                    .into(),
            );
        }
        other => return Err(format!("ELF type {other} is not an executable (ET_EXEC)")),
    }
    let entry = u64_at(bytes, 24);
    let phoff = u64_at(bytes, 32);
    let phentsize = u16_at(bytes, 54) as usize;
    let phnum = u16_at(bytes, 56) as u64;
    if phentsize != PHDR_SIZE {
        return Err(format!(
            "program header size {phentsize}, expected {PHDR_SIZE}"
        ));
    }
    let table_end = phnum
        .checked_mul(PHDR_SIZE as u64)
        .and_then(|n| n.checked_add(phoff))
        .filter(|&end| end <= bytes.len() as u64)
        .ok_or("program headers lie outside the file (truncated?)")?;
    let mut segments = Vec::new();
    let mut has_tls = false;
    for ph in bytes[phoff as usize..table_end as usize].chunks_exact(PHDR_SIZE) {
        match u32_at(ph, 0) {
            PT_TLS => {
                has_tls = true;
                continue;
            }
            PT_INTERP | PT_DYNAMIC => {
                return Err(
                    "dynamically linked (has an interpreter or a dynamic section); \
                            only static executables run"
                        .into(),
                );
            }
            PT_LOAD => {}
            _ => continue,
        }
        let seg = Segment {
            offset: u64_at(ph, 8),
            addr: u64_at(ph, 16),
            file_size: u64_at(ph, 32),
            mem_size: u64_at(ph, 40),
        };
        if seg.file_size > seg.mem_size {
            return Err(format!(
                "segment at {:#x} has more file bytes than memory",
                seg.addr
            ));
        }
        if seg
            .offset
            .checked_add(seg.file_size)
            .is_none_or(|e| e > bytes.len() as u64)
        {
            return Err(format!(
                "segment at {:#x} reaches past the end of the file (truncated?)",
                seg.addr
            ));
        }
        let end = seg.addr.checked_add(seg.mem_size);
        if seg.addr < LOAD_BASE || end.is_none_or(|e| e > ram_size) {
            return Err(format!(
                "segment [{:#x}, {:#x}) does not fit: segments must lie in [{LOAD_BASE:#x}, \
                 {ram_size:#x}), above the VMM's reserved area and inside guest RAM",
                seg.addr,
                end.unwrap_or(u64::MAX)
            ));
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err("no loadable (PT_LOAD) segment".into());
    }
    // Loaded one after the other, overlapping segments would overwrite each other's bytes.
    let mut sorted: Vec<&Segment> = segments.iter().collect();
    sorted.sort_by_key(|s| s.addr);
    for pair in sorted.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.addr + a.mem_size > b.addr {
            return Err(format!(
                "segments [{:#x}, {:#x}) and [{:#x}, {:#x}) overlap; each byte of guest memory \
                 may come from one segment only",
                a.addr,
                a.addr + a.mem_size,
                b.addr,
                b.addr + b.mem_size
            ));
        }
    }
    if !segments
        .iter()
        .any(|s| (s.addr..s.addr + s.mem_size).contains(&entry))
    {
        return Err(format!(
            "entry point {entry:#x} is outside every loadable segment"
        ));
    }
    Ok(Executable {
        entry,
        segments,
        has_tls,
    })
}

impl GuestProgram {
    /// A built-in by name, or else a file path.
    pub fn find(name_or_path: &str) -> Result<Self, ProgramError> {
        if let Some((name, bytes)) = BUILTIN_IMAGES.iter().find(|(n, _)| *n == name_or_path) {
            return Ok(GuestProgram {
                origin: PathBuf::from(name),
                bytes: std::borrow::Cow::Borrowed(bytes),
                builtin: BUILTINS.iter().find(|b| b.name == *name),
            });
        }
        let path = Path::new(name_or_path);
        let looks_like_path = name_or_path.contains('/') || path.exists();
        if !looks_like_path {
            return Err(ProgramError::Unknown {
                name: name_or_path.into(),
                known: builtin_names(),
            });
        }
        let (mut file, len) = crate::files::open_regular(path, "guest file", MAX_GUEST_FILE)?;
        let mut bytes = Vec::with_capacity(len as usize);
        // Bounded even if the file grows after it was checked.
        std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut file, MAX_GUEST_FILE),
            &mut bytes,
        )
        .map_err(|source| ProgramError::Read {
            path: path.into(),
            source,
        })?;
        Ok(GuestProgram {
            origin: path.into(),
            bytes: bytes.into(),
            builtin: None,
        })
    }

    /// Whether this is one of the built-in guests (else a user's own file).
    pub fn is_builtin(&self) -> bool {
        self.builtin.is_some()
    }

    /// Checks `args` against a built-in guest's declaration: every key one it takes, given
    /// once, with a value it takes (`free_ram`: the bytes above the program, which bound RAM
    /// sizes). A user's own file takes any `KEY=VALUE`: there is nothing to check it against.
    pub fn check_args(
        &self,
        args: &[crate::config::GuestArg],
        free_ram: u64,
    ) -> Result<(), ProgramError> {
        let Some(guest) = self.builtin else {
            return Ok(());
        };
        for (i, a) in args.iter().enumerate() {
            if let Some(first) = args[..i].iter().find(|b| b.key == a.key) {
                return Err(ArgError::Twice {
                    key: a.key.clone(),
                    first: first.value.clone(),
                    second: a.value.clone(),
                }
                .into());
            }
            let Some(spec) = guest.find(a.key.as_bytes()) else {
                let names: Vec<&str> = guest.args.iter().map(|g| g.name).collect();
                return Err(ArgError::Unknown {
                    guest: guest.name,
                    key: a.key.clone(),
                    value: a.value.clone(),
                    hint: closest(&a.key, &names)
                        .map(|c| format!(" (did you mean {c}?)"))
                        .unwrap_or_default(),
                    takes: if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    },
                }
                .into());
            };
            if let Err(refused) = spec.parse(a.value.as_bytes(), free_ram) {
                let why = match (refused, spec.kind) {
                    (Refused::Malformed, Kind::Choice(choices)) => format!(
                        "{:?} is not one of its choices{}",
                        a.value,
                        closest(&a.value, choices)
                            .map(|c| format!(" (did you mean {c}?)"))
                            .unwrap_or_default()
                    ),
                    (Refused::Malformed, Kind::Number { .. }) => {
                        format!("{:?} is not a whole number", a.value)
                    }
                    (Refused::Malformed, _) => format!("{:?} is not a size", a.value),
                    (Refused::NotPages(n), _) => {
                        format!("{} is not a whole number of 4 KiB pages", ByteSize(n))
                    }
                    (Refused::OutOfRange(n), Kind::Number { .. }) => format!("{n} is out of range"),
                    (Refused::OutOfRange(n), Kind::RamSize) if n > free_ram => format!(
                        "{} is more than the {} of RAM free for the guest",
                        ByteSize(n),
                        ByteSize(free_ram)
                    ),
                    (Refused::OutOfRange(n), _) => format!("{} is out of range", ByteSize(n)),
                    (Refused::Unknown, _) => unreachable!("the key was found"),
                };
                return Err(ArgError::Bad {
                    key: a.key.clone(),
                    value: a.value.clone(),
                    why,
                    allowed: describe(spec, Some(free_ram)),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Checks the image for a guest with `ram_size` bytes of RAM.
    pub fn check(&self, ram_size: u64) -> Result<Executable, ProgramError> {
        parse_executable(&self.bytes, ram_size).map_err(|reason| ProgramError::Invalid {
            path: self.origin.clone(),
            reason,
        })
    }

    /// Copies the checked segments into guest memory; the bytes past each segment's file part
    /// are left as the zeroes fresh RAM already holds.
    pub fn load(&self, exe: &Executable, mem: &GuestMemoryMmap) -> Result<(), ProgramError> {
        for seg in &exe.segments {
            let data = &self.bytes[seg.offset as usize..(seg.offset + seg.file_size) as usize];
            mem.write_slice(data, GuestAddress(seg.addr))
                .map_err(|source| ProgramError::Load {
                    path: self.origin.clone(),
                    addr: seg.addr,
                    source,
                })?;
        }
        Ok(())
    }
}

/// What `spec` takes, with its default, in words (`free_ram`: the bound of RAM sizes, if
/// known).
pub fn describe(spec: &Arg, free_ram: Option<u64>) -> String {
    let values = match spec.kind {
        Kind::Choice(choices) => format!("one of {}", choices.join(", ")),
        Kind::Number {
            min: 0,
            max: u64::MAX,
        } => "any whole number".into(),
        Kind::Number { min, max } if max == u64::MAX => format!("a whole number from {min}"),
        Kind::Number { min, max } => format!("a whole number from {min} to {max}"),
        Kind::Size { min, max } => format!("a size from {} to {}", ByteSize(min), ByteSize(max)),
        Kind::RamSize => match free_ram {
            Some(free) => format!(
                "a size in whole 4 KiB pages, at most the {} of RAM free for the guest",
                ByteSize(free)
            ),
            None => "a size in whole 4 KiB pages, at most the RAM free for the guest".into(),
        },
    };
    let default = match (spec.default, spec.kind) {
        (Default::Value(v), Kind::Size { .. }) => ByteSize(v).to_string(),
        (Default::Value(v), _) => v.to_string(),
        (Default::First, Kind::Choice(c)) => c[0].to_string(),
        (Default::First, _) => "none".into(),
        (Default::Described(d), _) => d.to_string(),
    };
    format!("{values} (default {default})")
}

/// What a value of `spec` looks like in a usage line: `N`, `SIZE`, or the choices.
pub fn placeholder(spec: &Arg) -> String {
    match spec.kind {
        Kind::Number { .. } => "N".into(),
        Kind::Size { .. } | Kind::RamSize => "SIZE".into(),
        Kind::Choice(choices) => choices.join("|"),
    }
}

/// The candidates closest to `given` by edit distance, quoted and joined with "or", if they
/// are close enough to be a typo (at most two edits, and fewer than half the letters).
pub fn closest(given: &str, candidates: &[&str]) -> Option<String> {
    let near: Vec<(usize, &str)> = candidates
        .iter()
        .map(|c| (edit_distance(given, c), *c))
        .filter(|&(d, c)| d <= 2 && d * 2 < c.len().max(given.len()))
        .collect();
    let best = near.iter().map(|&(d, _)| d).min()?;
    let quoted: Vec<String> = near
        .iter()
        .filter(|&&(d, _)| d == best)
        .map(|(_, c)| format!("{c:?}"))
        .collect();
    Some(quoted.join(" or "))
}

/// Levenshtein distance, by bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j] + 1)
                .min(row[j + 1] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// The built-in names, comma-separated.
pub fn builtin_names() -> String {
    BUILTIN_IMAGES
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 64 << 20;

    /// A minimal ELF: one header, `phdrs` program headers right after it.
    fn elf(kind: u16, machine: u16, entry: u64, phdrs: &[(u32, u64, u64, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; EHDR_SIZE + phdrs.len() * PHDR_SIZE + 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&kind.to_le_bytes());
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for (i, &(ty, off, addr, filesz, memsz)) in phdrs.iter().enumerate() {
            let p = EHDR_SIZE + i * PHDR_SIZE;
            b[p..p + 4].copy_from_slice(&ty.to_le_bytes());
            b[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            b[p + 16..p + 24].copy_from_slice(&addr.to_le_bytes());
            b[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
            b[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        b
    }

    fn load_at(addr: u64, memsz: u64) -> Vec<u8> {
        elf(ET_EXEC, EM_X86_64, addr, &[(PT_LOAD, 0, addr, 16, memsz)])
    }

    #[test]
    fn accepts_a_static_executable() {
        let exe = parse_executable(&load_at(LOAD_BASE, 0x2000), RAM).expect("valid");
        assert_eq!(exe.entry, LOAD_BASE);
        assert_eq!(exe.end(), LOAD_BASE + 0x2000);
    }

    #[test]
    fn every_builtin_is_a_valid_executable() {
        for (name, bytes) in BUILTIN_IMAGES {
            parse_executable(bytes, 8 << 20).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                BUILTINS.iter().any(|b| b.name == *name),
                "{name} lacks a declaration in guest_abi::guests"
            );
        }
        assert_eq!(BUILTINS.len(), BUILTIN_IMAGES.len());
    }

    #[test]
    fn typos_find_the_key_meant() {
        assert_eq!(closest("mod", &["mode", "pattern"]).unwrap(), "\"mode\"");
        assert_eq!(
            closest("pases", &["pass", "passes", "seed"]).unwrap(),
            "\"pass\" or \"passes\""
        );
        assert_eq!(closest("strss", &["fill", "stress"]).unwrap(), "\"stress\"");
        assert_eq!(closest("x", &["mode", "seed"]), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn arguments_of_a_builtin_are_checked_before_it_runs() {
        let verify = GuestProgram::find("verify").unwrap();
        let args = |list: &[&str]| -> Vec<crate::config::GuestArg> {
            list.iter().map(|a| a.parse().unwrap()).collect()
        };
        let refused = |list: &[&str]| {
            verify
                .check_args(&args(list), 8 << 20)
                .unwrap_err()
                .to_string()
        };
        verify
            .check_args(&args(&["mode=stress", "passes=3", "size=4M"]), 8 << 20)
            .unwrap();
        let e = refused(&["mod=stress"]);
        assert!(
            e.contains("takes no argument \"mod\" (did you mean \"mode\"?)"),
            "{e}"
        );
        let e = refused(&["mode=strss"]);
        assert!(
            e.contains("did you mean \"stress\"") && e.contains("default fill-check"),
            "{e}"
        );
        let e = refused(&["passes=abc"]);
        assert!(
            e.contains("not a whole number") && e.contains("from 1 to"),
            "{e}"
        );
        let e = refused(&["size=16M"]);
        assert!(e.contains("16M is more than the 8M of RAM free"), "{e}");
        let e = refused(&["seed=1", "seed=2"]);
        assert!(e.contains("given twice"), "{e}");
        let own = GuestProgram {
            origin: "own.elf".into(),
            bytes: std::borrow::Cow::Borrowed(b""),
            builtin: None,
        };
        own.check_args(&args(&["anything=at all"]), 0).unwrap();
    }

    #[test]
    fn rejects_what_cannot_run() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"#!/bin/sh\n".to_vec(), "not an ELF"),
            (vec![0x7f, b'E', b'L', b'F'], "not an ELF"),
            (
                elf(ET_EXEC, 183, LOAD_BASE, &[(PT_LOAD, 0, LOAD_BASE, 16, 16)]),
                "not x86_64",
            ),
            (
                elf(
                    ET_DYN,
                    EM_X86_64,
                    LOAD_BASE,
                    &[(PT_LOAD, 0, LOAD_BASE, 16, 16)],
                ),
                "ET_DYN",
            ),
            (elf(1, EM_X86_64, LOAD_BASE, &[]), "not an executable"),
            (
                elf(
                    ET_EXEC,
                    EM_X86_64,
                    LOAD_BASE,
                    &[(PT_INTERP, 0, 0, 0, 0), (PT_LOAD, 0, LOAD_BASE, 16, 16)],
                ),
                "dynamically linked",
            ),
            (load_at(0x1000, 0x100), "does not fit"),
            (load_at(LOAD_BASE - 0x1000, 0x2000), "does not fit"),
            (load_at(RAM - 0x1000, 0x2000), "does not fit"),
            (load_at(u64::MAX - 8, 0x100), "does not fit"),
            (
                elf(
                    ET_EXEC,
                    EM_X86_64,
                    LOAD_BASE,
                    &[(PT_LOAD, 1 << 40, LOAD_BASE, 16, 16)],
                ),
                "past the end",
            ),
            (
                elf(
                    ET_EXEC,
                    EM_X86_64,
                    LOAD_BASE,
                    &[(PT_LOAD, 0, LOAD_BASE, 32, 16)],
                ),
                "more file bytes",
            ),
            (elf(ET_EXEC, EM_X86_64, LOAD_BASE, &[]), "no loadable"),
            (
                elf(
                    ET_EXEC,
                    EM_X86_64,
                    LOAD_BASE,
                    &[
                        (PT_LOAD, 0, LOAD_BASE, 16, 0x2000),
                        (PT_LOAD, 0, LOAD_BASE + 0x1000, 16, 0x1000),
                    ],
                ),
                "overlap",
            ),
            (
                elf(
                    ET_EXEC,
                    EM_X86_64,
                    0x1234,
                    &[(PT_LOAD, 0, LOAD_BASE, 16, 16)],
                ),
                "entry point",
            ),
        ];
        for (bytes, expected) in cases {
            let err = parse_executable(&bytes, RAM).expect_err(expected);
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
        let mut truncated = load_at(LOAD_BASE, 16);
        truncated.truncate(EHDR_SIZE + 10);
        assert!(
            parse_executable(&truncated, RAM)
                .unwrap_err()
                .contains("truncated")
        );
    }

    #[test]
    fn unknown_names_list_the_builtins() {
        let err = GuestProgram::find("nosuchguest").unwrap_err().to_string();
        assert!(err.contains("hello") && err.contains("verify"), "{err}");
    }
}
