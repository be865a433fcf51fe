//! Host side of ucalls: read the struct the guest points at, validate it, act on it.
//!
//! The guest supplies the address and every length; nothing it writes is trusted. An address
//! outside RAM, a struct that crosses the end of RAM, or a malformed struct ends the VM with a
//! clear error naming the vCPU and the address.

use guest_abi::{Command, FREE_RANGE_SIZE, UCALL_SIZE, Ucall};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::Devices;
use crate::metrics::VcpuStats;

/// What a ucall asks of the vCPU loop.
#[derive(Debug, PartialEq, Eq)]
pub enum UcallResult {
    /// Keep running.
    Continue,
    /// The vCPU is done with this code.
    Done(u64),
    /// The guest aborted.
    Abort {
        /// `file:line: message`.
        what: String,
    },
    /// The guest reports free memory: `count` ranges at guest address `ranges`.
    Free {
        /// Guest address of the ranges.
        ranges: u64,
        /// How many.
        count: u64,
    },
    /// The guest asks for a snapshot now.
    Snapshot,
    /// The ucall itself was invalid.
    Invalid(String),
}

/// Text a guest wrote, as the host shows it: invalid UTF-8 replaced, and C1 control
/// characters (which some terminals obey as escapes) shown as `<U+009B>`; C0 controls are
/// made visible on the way out (see [`crate::devices::serial::sanitize`]).
pub fn guest_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| match c {
            '\u{80}'..='\u{9f}' => format!("<U+{:04X}>", c as u32),
            c => c.to_string(),
        })
        .collect()
}

/// Handles the ucall at guest address `addr` from vCPU `stats.index`.
pub fn handle(
    mem: &GuestMemoryMmap,
    devices: &Devices,
    addr: u64,
    stats: &mut VcpuStats,
) -> UcallResult {
    match read(mem, addr) {
        Ok(bytes) => dispatch(&bytes, devices, addr, stats),
        Err(invalid) => invalid,
    }
}

/// Reads the ucall struct at `addr`, checking it lies wholly inside guest RAM.
pub fn read(mem: &GuestMemoryMmap, addr: u64) -> Result<[u8; UCALL_SIZE], UcallResult> {
    let mut bytes = [0u8; UCALL_SIZE];
    mem.read_slice(&mut bytes, GuestAddress(addr))
        .map_err(|e| {
            UcallResult::Invalid(format!(
                "ucall address {addr:#x} is not {UCALL_SIZE} bytes of guest RAM ({e})"
            ))
        })?;
    Ok(bytes)
}

/// Reads the `count` ranges of a free report at guest address `at`, checking they lie wholly
/// inside guest RAM (each range itself is checked by the reclaimer).
pub fn read_free_ranges(
    mem: &GuestMemoryMmap,
    at: u64,
    count: u64,
) -> Result<Vec<(GuestAddress, u64)>, String> {
    let len = count * FREE_RANGE_SIZE;
    let mut bytes = vec![0u8; len as usize];
    mem.read_slice(&mut bytes, GuestAddress(at)).map_err(|e| {
        format!("a free report's {count} ranges at {at:#x} are not {len} bytes of guest RAM ({e})")
    })?;
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    Ok(bytes
        .chunks_exact(FREE_RANGE_SIZE as usize)
        .map(|r| (GuestAddress(word(&r[..8])), word(&r[8..])))
        .collect())
}

/// Decodes and acts on a ucall read from `addr`.
pub fn dispatch(
    bytes: &[u8; UCALL_SIZE],
    devices: &Devices,
    addr: u64,
    stats: &mut VcpuStats,
) -> UcallResult {
    let index = stats.index;
    match Ucall::decode(bytes) {
        Err(e) => UcallResult::Invalid(format!("malformed ucall at {addr:#x}: {e}")),
        Ok(Command::Print(text)) => {
            devices.print_line(&format!("[vcpu{index}] {}", guest_text(text)));
            UcallResult::Continue
        }
        Ok(Command::Sync(stage)) => {
            log::debug!("vcpu{index} reached stage {stage}");
            stats.syncs += 1;
            devices.stages.reached(stage);
            UcallResult::Continue
        }
        Ok(Command::Report { key, value }) => {
            let key = guest_text(key);
            devices.print_line(&format!("[vcpu{index}] {key} = {value}"));
            stats.add_report(key, value);
            UcallResult::Continue
        }
        Ok(Command::Done(code)) => UcallResult::Done(code),
        Ok(Command::Free { ranges, count }) => UcallResult::Free { ranges, count },
        Ok(Command::Snapshot) => UcallResult::Snapshot,
        Ok(Command::Abort {
            file,
            line,
            message,
        }) => UcallResult::Abort {
            what: format!("{}:{line}: {}", guest_text(file), guest_text(message)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn setup() -> (GuestMemoryMmap, Devices, VcpuStats) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let devices = Devices::new(Box::new(Vec::new()), Box::new(Vec::new()));
        (mem, devices, VcpuStats::new(0))
    }

    #[test]
    fn decodes_from_guest_memory() {
        let (mem, devices, mut stats) = setup();
        mem.write_slice(&Ucall::report(b"pages", 9).to_bytes(), GuestAddress(0x100))
            .unwrap();
        assert_eq!(
            handle(&mem, &devices, 0x100, &mut stats),
            UcallResult::Continue
        );
        assert_eq!(stats.reports, vec![("pages".to_string(), 9)]);
        mem.write_slice(&Ucall::done(4).to_bytes(), GuestAddress(0x800))
            .unwrap();
        assert_eq!(
            handle(&mem, &devices, 0x800, &mut stats),
            UcallResult::Done(4)
        );
        let mut abort = Ucall::abort(b"g.rs", 3);
        abort.push_text(b"bad");
        mem.write_slice(&abort.to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            handle(&mem, &devices, 0x1000, &mut stats),
            UcallResult::Abort {
                what: "g.rs:3: bad".into()
            }
        );
    }

    #[test]
    fn rejects_addresses_outside_ram() {
        let (mem, devices, mut stats) = setup();
        for addr in [1 << 50, 0x10000, 0x10000 - 8, u64::MAX - 4] {
            let r = handle(&mem, &devices, addr, &mut stats);
            assert!(
                matches!(r, UcallResult::Invalid(ref m) if m.contains("not")),
                "{addr:#x}: {r:?}"
            );
        }
        let mut bad = Ucall::print(b"x").to_bytes();
        bad[0] = 77;
        mem.write_slice(&bad, GuestAddress(0)).unwrap();
        assert!(
            matches!(handle(&mem, &devices, 0, &mut stats), UcallResult::Invalid(m) if m.contains("unknown ucall command 77"))
        );
    }
}
