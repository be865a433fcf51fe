//! The built-in guests and the arguments each takes, declared once: the guest programs read
//! their defaults and choices from here, the VMM checks every `--arg` against it before the
//! guest runs, and `vmm guests` prints it.

/// What values an argument takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A whole number (decimal, or hex with `0x`), from `min` to `max`.
    Number {
        /// The smallest allowed.
        min: u64,
        /// The largest allowed.
        max: u64,
    },
    /// A byte count (`4096`, `64K`, `2M`, `1G`, `0x1000`), from `min` to `max`.
    Size {
        /// The smallest allowed.
        min: u64,
        /// The largest allowed.
        max: u64,
    },
    /// A byte count of guest RAM: whole 4 KiB pages, at least one, at most the RAM free for
    /// the guest's data (all of RAM above the program).
    RamSize,
    /// One of these words; the first is the default.
    Choice(&'static [&'static str]),
}

/// An argument's value when `--arg` does not give one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Default {
    /// This number or size.
    Value(u64),
    /// The first choice.
    First,
    /// Worked out by the guest at run time, as described.
    Described(&'static str),
}

/// One argument a guest takes: `--arg NAME=VALUE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arg {
    /// The key.
    pub name: &'static str,
    /// What values it takes.
    pub kind: Kind,
    /// Its value when not given.
    pub default: Default,
    /// One line on what it does.
    pub help: &'static str,
}

/// A built-in guest program and its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guest {
    /// The name `--guest` takes.
    pub name: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// Every argument it reads.
    pub args: &'static [Arg],
}

/// Why an argument was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The guest takes no argument of that name.
    Unknown,
    /// The value is not a number or size (or not one of the choices).
    Malformed,
    /// A number or size outside its range.
    OutOfRange(u64),
    /// A RAM size that is not whole pages.
    NotPages(u64),
}

impl Guest {
    /// The argument called `name`. Guest programs ask only for what they declare: a name
    /// missing here is a bug in the program, caught the first time it runs.
    pub const fn arg(&self, name: &str) -> &Arg {
        let mut i = 0;
        while i < self.args.len() {
            if eq(self.args[i].name.as_bytes(), name.as_bytes()) {
                return &self.args[i];
            }
            i += 1;
        }
        panic!("a guest asked for an argument it does not declare")
    }

    /// The argument called `name`, if the guest declares one.
    pub fn find(&self, name: &[u8]) -> Option<&Arg> {
        self.args.iter().find(|a| a.name.as_bytes() == name)
    }

    /// Checks `key=value`; `free_ram` bounds [`Kind::RamSize`] arguments.
    pub fn check(&self, key: &[u8], value: &[u8], free_ram: u64) -> Result<(), Refused> {
        self.find(key)
            .ok_or(Refused::Unknown)?
            .parse(value, free_ram)
            .map(|_| ())
    }
}

/// An argument's parsed value.
pub enum Value {
    /// A number or size.
    Number(u64),
    /// The index of the choice.
    Choice(usize),
}

impl Arg {
    /// Parses `value` as this argument takes it.
    pub fn parse(&self, value: &[u8], free_ram: u64) -> Result<Value, Refused> {
        match self.kind {
            Kind::Choice(choices) => choices
                .iter()
                .position(|c| c.as_bytes() == value)
                .map(Value::Choice)
                .ok_or(Refused::Malformed),
            Kind::Number { min, max } => {
                let n = parse_number(value).ok_or(Refused::Malformed)?;
                in_range(n, min, max)
            }
            Kind::Size { min, max } => {
                let n = crate::parse_size(value).ok_or(Refused::Malformed)?;
                in_range(n, min, max)
            }
            Kind::RamSize => {
                let n = crate::parse_size(value).ok_or(Refused::Malformed)?;
                if n % crate::layout::PAGE_SIZE != 0 {
                    return Err(Refused::NotPages(n));
                }
                in_range(n, crate::layout::PAGE_SIZE, free_ram)
            }
        }
    }
}

fn in_range(n: u64, min: u64, max: u64) -> Result<Value, Refused> {
    if (min..=max).contains(&n) {
        Ok(Value::Number(n))
    } else {
        Err(Refused::OutOfRange(n))
    }
}

/// A whole number: decimal, or hex with `0x` (no size suffix).
pub fn parse_number(s: &[u8]) -> Option<u64> {
    match s.last() {
        Some(b'0'..=b'9') | Some(b'a'..=b'f') | Some(b'A'..=b'F') => crate::parse_size(s),
        _ => None,
    }
}

const fn eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

const SEED: Arg = Arg {
    name: "seed",
    kind: Kind::Number {
        min: 0,
        max: u64::MAX,
    },
    default: Default::Value(1),
    help: "seeds the data pattern and the random order",
};

const SIZE: Arg = Arg {
    name: "size",
    kind: Kind::RamSize,
    default: Default::Described("all free RAM"),
    help: "how much guest RAM to use, split among the vCPUs",
};

const TIMING: Arg = Arg {
    name: "timing",
    kind: Kind::Choice(&["off", "on"]),
    default: Default::First,
    help: "on: time every access (rdtsc) and report the longest and a log2 histogram",
};

const PATTERN: Arg = Arg {
    name: "pattern",
    kind: Kind::Choice(&["seq", "random"]),
    default: Default::First,
    help: "the order pages are visited in",
};

const SNAPSHOT: Arg = Arg {
    name: "snapshot",
    kind: Kind::Choice(&["off", "on"]),
    default: Default::First,
    help: "on: ask the VMM for a snapshot before the timed part (vCPU 0; needs --snapshot)",
};

/// The most passes a guest makes over its memory.
pub const MAX_PASSES: u64 = u32::MAX as u64;

/// `hello`.
pub const HELLO: Guest = Guest {
    name: "hello",
    summary: "prints a greeting from every vCPU on the serial console and ends with 0",
    args: &[],
};

/// `touch`.
pub const TOUCH: Guest = Guest {
    name: "touch",
    summary: "each vCPU touches its share of memory page by page; reports pages and cycles",
    args: &[
        PATTERN,
        Arg {
            name: "access",
            kind: Kind::Choice(&["write", "read"]),
            default: Default::First,
            help: "write or read each page",
        },
        Arg {
            name: "passes",
            kind: Kind::Number {
                min: 1,
                max: MAX_PASSES,
            },
            default: Default::Value(1),
            help: "how many times to touch every page",
        },
        SIZE,
        SEED,
        TIMING,
        Arg {
            name: "fill",
            kind: Kind::Choice(&["off", "on"]),
            default: Default::First,
            help: "on: first write every page of free RAM (its address in its first word), \
                   untimed, so that a snapshot holds data everywhere",
        },
        SNAPSHOT,
        Arg {
            name: "spread",
            kind: Kind::Choice(&["off", "on"]),
            default: Default::First,
            help: "on: size is whole extents picked from all of free RAM (pattern=random: \
                   at random, in random order; seq: the first ones), every page of each touched",
        },
    ],
};

/// `verify`.
pub const VERIFY: Guest = Guest {
    name: "verify",
    summary: "writes and checks a per-page pattern; a lost write ends the guest with code 1",
    args: &[
        Arg {
            name: "mode",
            kind: Kind::Choice(&["fill-check", "fill", "check", "stress"]),
            default: Default::First,
            help: "fill then check; fill only (to save); check only (a restore); stress: \
                   passes of check-and-rewrite",
        },
        PATTERN,
        SEED,
        Arg {
            name: "passes",
            kind: Kind::Number {
                min: 1,
                max: MAX_PASSES,
            },
            default: Default::Value(4),
            help: "mode=stress: how many passes of writes",
        },
        Arg {
            name: "pass",
            kind: Kind::Number {
                min: 0,
                max: MAX_PASSES,
            },
            default: Default::Value(0),
            help: "mode=check: the pass whose pattern memory holds",
        },
        SIZE,
        TIMING,
        Arg {
            name: "snapshot-at",
            kind: Kind::Number {
                min: 0,
                max: MAX_PASSES,
            },
            default: Default::Value(0),
            help: "mode=stress: vCPU 0 asks for a snapshot halfway through this pass (1 is the \
                   first check-and-rewrite pass; 0: never)",
        },
    ],
};

/// `churn`.
pub const CHURN: Guest = Guest {
    name: "churn",
    summary: "fills memory with the verify pattern, frees part of it (reported to the VMM, or \
              zeroed), keeps checking and rewriting what it kept, re-touches part of what it \
              freed and checks it reads zero",
    args: &[
        Arg {
            name: "shape",
            kind: Kind::Choice(&["extents", "pages", "halves"]),
            default: Default::First,
            help: "what is freed: whole 2 MiB extents, scattered 4 KiB pages of every extent, \
                   or the upper half of extents",
        },
        Arg {
            name: "free",
            kind: Kind::Number { min: 0, max: 100 },
            default: Default::Value(50),
            help: "percent freed: of the extents (extents, halves) or of each extent's pages \
                   (pages)",
        },
        Arg {
            name: "report",
            kind: Kind::Choice(&["on", "off"]),
            default: Default::First,
            help: "on: report freed memory to the VMM (where it offers it, else zero it); \
                   off: zero it",
        },
        Arg {
            name: "passes",
            kind: Kind::Number {
                min: 1,
                max: MAX_PASSES,
            },
            default: Default::Value(2),
            help: "passes of check-and-rewrite over what was kept, after the free",
        },
        Arg {
            name: "retouch",
            kind: Kind::Number { min: 0, max: 100 },
            default: Default::Value(25),
            help: "percent of the freed pages touched again (checked to read zero, then written)",
        },
        Arg {
            name: "hold",
            kind: Kind::Number {
                min: 0,
                max: 600_000,
            },
            default: Default::Value(0),
            help: "milliseconds to wait after the free, before the passes (time for a VMM's \
                   zero-page shrinker to find what was zeroed; needs the TSC frequency)",
        },
        SEED,
        SIZE,
        TIMING,
    ],
};

/// `misbehave`.
pub const MISBEHAVE: Guest = Guest {
    name: "misbehave",
    summary: "does something a VMM must survive, for tests",
    args: &[
        Arg {
            name: "kind",
            kind: Kind::Choice(&[
                "triple-fault",
                "bad-ucall",
                "unknown-port",
                "serial-flood",
                "untouched-ucall",
                "print-flood",
                "report-flood",
                "escapes",
                "bad-free",
            ]),
            default: Default::First,
            help: "what to do",
        },
        Arg {
            name: "bytes",
            kind: Kind::Size {
                min: 1,
                max: 1 << 30,
            },
            default: Default::Value(256 << 10),
            help: "kind=serial-flood: how much to write",
        },
        Arg {
            name: "count",
            kind: Kind::Number {
                min: 1,
                max: 100_000_000,
            },
            default: Default::Value(100_000),
            help: "kind=print-flood|report-flood: how many ucalls",
        },
    ],
};

/// Every built-in guest, in the order `vmm guests` lists them.
pub const ALL: &[Guest] = &[HELLO, TOUCH, VERIFY, CHURN, MISBEHAVE];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked_by_kind() {
        assert_eq!(VERIFY.check(b"mode", b"stress", 0), Ok(()));
        assert_eq!(VERIFY.check(b"mode", b"strss", 0), Err(Refused::Malformed));
        assert_eq!(VERIFY.check(b"mod", b"stress", 0), Err(Refused::Unknown));
        assert_eq!(VERIFY.check(b"passes", b"abc", 0), Err(Refused::Malformed));
        assert_eq!(VERIFY.check(b"passes", b"4K", 0), Err(Refused::Malformed));
        assert_eq!(
            VERIFY.check(b"passes", b"0", 0),
            Err(Refused::OutOfRange(0))
        );
        assert_eq!(VERIFY.check(b"passes", b"0x10", 0), Ok(()));
        assert_eq!(VERIFY.check(b"size", b"4M", 8 << 20), Ok(()));
        assert_eq!(
            VERIFY.check(b"size", b"5000", 8 << 20),
            Err(Refused::NotPages(5000))
        );
        assert_eq!(
            VERIFY.check(b"size", b"16M", 8 << 20),
            Err(Refused::OutOfRange(16 << 20))
        );
        assert_eq!(MISBEHAVE.check(b"bytes", b"64K", 0), Ok(()));
        assert_eq!(HELLO.check(b"x", b"1", 0), Err(Refused::Unknown));
    }

    #[test]
    fn every_guest_declares_each_name_once_with_a_valid_default() {
        for g in ALL {
            for (i, a) in g.args.iter().enumerate() {
                assert!(g.args[..i].iter().all(|b| b.name != a.name), "{}", a.name);
                match (a.kind, a.default) {
                    (Kind::Choice(c), Default::First) => assert!(!c.is_empty()),
                    (Kind::Number { min, max } | Kind::Size { min, max }, Default::Value(v)) => {
                        assert!((min..=max).contains(&v), "{}", a.name)
                    }
                    (Kind::RamSize, Default::Described(_)) => {}
                    other => panic!("{}: {other:?}", a.name),
                }
            }
        }
    }
}
