//! The VM state file of a snapshot (`vm.state`): its format, its encoding and every check a
//! resume makes before it trusts one.
//!
//! The file is one header line and a JSON body:
//!
//! ```text
//! vmm-snapshot <version> <body length> <crc32 of the body, 8 hex digits>\n
//! {"build": ..., "guest": ..., "vcpus": ..., "memory": ..., "vcpu": [...], ...}
//! ```
//!
//! Each KVM structure (`kvm_regs`, `kvm_sregs`, `kvm_xsave`, ...) is stored as the hex of its
//! bytes, exactly as the kernel's ABI lays it out; a field of another length is refused, never
//! padded. The header makes a truncated file, a file of another version and a flipped bit
//! three different, named errors; the body's own checks (the counts agree, every vCPU is there
//! once) catch a tampered file whose checksum was recomputed. What a snapshot is tied to (this
//! build, the vCPU count, the memory size, the host's TSC frequency) is checked by
//! [`VmState::check_resumable`].

use std::fmt;
use std::marker::PhantomData;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_mp_state, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The first word of every state file.
pub const MAGIC: &str = "vmm-snapshot";
/// The version this build writes and reads.
pub const VERSION: u32 = 1;
/// The largest state file read (a 255-vCPU VM's state is about 5 MiB).
pub const MAX_STATE_LEN: u64 = 16 << 20;

/// The build a snapshot belongs to: the package version and the commit it was built from.
pub fn this_build() -> String {
    format!(
        "{}+{}",
        env!("CARGO_PKG_VERSION"),
        option_env!("VMM_BUILD_COMMIT").unwrap_or("unknown")
    )
}

/// A KVM structure stored as the hex of its bytes (`T`'s exact size, checked on reading).
pub struct Raw<T>(pub T);

impl<T: FromBytes + IntoBytes + Immutable> Clone for Raw<T> {
    fn clone(&self) -> Self {
        Raw(T::read_from_bytes(self.0.as_bytes()).expect("the same type's own bytes"))
    }
}

impl<T: IntoBytes + Immutable> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes = self.0.as_bytes();
        let mut hex = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            hex.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&hex)
    }
}

impl<'de, T: FromBytes> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct HexVisitor<T>(PhantomData<T>);
        impl<T: FromBytes> serde::de::Visitor<'_> for HexVisitor<T> {
            type Value = Raw<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{} hex digits", std::mem::size_of::<T>() * 2)
            }
            fn visit_str<E: serde::de::Error>(self, hex: &str) -> Result<Raw<T>, E> {
                let want = std::mem::size_of::<T>();
                if hex.len() != want * 2 {
                    return Err(E::custom(format!(
                        "a field of {} hex digits where {} were expected",
                        hex.len(),
                        want * 2
                    )));
                }
                let bytes = (0..want)
                    .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("x"), 16))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(|_| E::custom("a field that is not hex"))?;
                T::read_from_bytes(&bytes)
                    .map(Raw)
                    .map_err(|_| E::custom("a field of the wrong size"))
            }
        }
        d.deserialize_str(HexVisitor(PhantomData))
    }
}

impl<T> fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Raw<{}>", std::any::type_name::<T>())
    }
}

/// One vCPU, paused at an instruction boundary.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// Which vCPU.
    pub index: u32,
    /// The guest had ended this vCPU (done, with this code) before the snapshot: a resumed VM
    /// does not run it again.
    pub ended: Option<u64>,
    /// The CPUID it was given.
    pub cpuid: Vec<Raw<kvm_cpuid_entry2>>,
    /// General registers.
    pub regs: Raw<kvm_regs>,
    /// Segment, control and descriptor-table registers.
    pub sregs: Raw<kvm_sregs>,
    /// FPU, SSE and AVX state (`KVM_GET_XSAVE`).
    pub xsave: Raw<kvm_xsave>,
    /// Extended control registers.
    pub xcrs: Raw<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: Raw<kvm_debugregs>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: Raw<kvm_vcpu_events>,
    /// Runnable, halted...
    pub mp_state: Raw<kvm_mp_state>,
    /// Model-specific registers: `(index, value)`, the TSC among them.
    pub msrs: Vec<(u32, u64)>,
}

/// The serial port's registers and unread input (vm-superio's `SerialState`).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialRegs {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// A whole VM's state, beside its memory image.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The build that wrote it ([`this_build`]).
    pub build: String,
    /// The guest program it runs (`--guest`), for the resumed VM's messages.
    pub guest: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes (the image's size).
    pub memory: u64,
    /// The host TSC frequency the guest measured time with, in kHz.
    pub tsc_khz: u32,
    /// Whether the guest was told at boot that free reports are taken (`--reclaim`).
    pub reclaim: bool,
    /// The VM's clock (`KVM_GET_CLOCK`).
    pub clock: Raw<kvm_clock_data>,
    /// COM1.
    pub serial: SerialRegs,
    /// Per sync stage, how many vCPUs had reached it.
    pub stages: Vec<u32>,
    /// Every vCPU, by index.
    pub vcpu: Vec<VcpuState>,
}

/// Why a state file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Not a state file at all.
    #[error(
        "its first line is not \"<kind> <version> <length> <crc32>\" of its kind (\"{MAGIC}\" for a VM state)"
    )]
    NotState,
    /// Written by a format version this build does not read.
    #[error("it is format version {0}; this build reads version {VERSION} only")]
    Version(u32),
    /// Shorter (or longer) than its header says.
    #[error(
        "its body is {found} bytes where its header says {expected}: the file is truncated or has bytes appended"
    )]
    Length {
        /// From the header.
        expected: u64,
        /// In the file.
        found: u64,
    },
    /// The checksum does not match.
    #[error(
        "its checksum is {found:08x} where its header says {expected:08x}: the file is corrupt or was changed"
    )]
    Checksum {
        /// From the header.
        expected: u32,
        /// Of the body.
        found: u32,
    },
    /// The body is not the JSON of a VM state.
    #[error("its body is malformed: {0}")]
    Body(String),
    /// The body contradicts itself.
    #[error("it is inconsistent: {0}")]
    Inconsistent(String),
}

/// `body` behind the header line `MAGIC VERSION LENGTH CRC32`.
pub(crate) fn seal(magic: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{magic} {VERSION} {} {:08x}\n",
        body.len(),
        crc32fast::hash(body)
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The body behind a header line made by [`seal`] with `magic`, checked, and its checksum.
pub(crate) fn unseal<'a>(magic: &str, bytes: &'a [u8]) -> Result<(&'a [u8], u32), StateError> {
    let newline = bytes
        .iter()
        .take(128)
        .position(|&b| b == b'\n')
        .ok_or(StateError::NotState)?;
    let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| StateError::NotState)?;
    let words: Vec<&str> = header.split(' ').collect();
    let [found_magic, version, len, crc] = words[..] else {
        return Err(StateError::NotState);
    };
    if found_magic != magic {
        return Err(StateError::NotState);
    }
    let version: u32 = version.parse().map_err(|_| StateError::NotState)?;
    if version != VERSION {
        return Err(StateError::Version(version));
    }
    let expected: u64 = len.parse().map_err(|_| StateError::NotState)?;
    let crc = u32::from_str_radix(crc, 16).map_err(|_| StateError::NotState)?;
    let body = &bytes[newline + 1..];
    if body.len() as u64 != expected {
        return Err(StateError::Length {
            expected,
            found: body.len() as u64,
        });
    }
    let found = crc32fast::hash(body);
    if found != crc {
        return Err(StateError::Checksum {
            expected: crc,
            found,
        });
    }
    Ok((body, crc))
}

impl VmState {
    /// The file's bytes: the header line, then the body.
    pub fn encode(&self) -> Vec<u8> {
        seal(
            MAGIC,
            &serde_json::to_vec(self).expect("plain data serializes"),
        )
    }

    /// Parses and checks a state file's bytes. Returns the state and its checksum (which
    /// names this snapshot: a working-set record carries it).
    pub fn decode(bytes: &[u8]) -> Result<(VmState, u32), StateError> {
        let (body, crc) = unseal(MAGIC, bytes)?;
        let state: VmState =
            serde_json::from_slice(body).map_err(|e| StateError::Body(e.to_string()))?;
        state.check_consistent()?;
        Ok((state, crc))
    }

    /// The checks that need nothing but the state itself.
    fn check_consistent(&self) -> Result<(), StateError> {
        let bad = |what: String| Err(StateError::Inconsistent(what));
        if self.vcpus == 0 || self.vcpus as usize != self.vcpu.len() {
            return bad(format!(
                "it says {} vCPUs but holds the state of {}",
                self.vcpus,
                self.vcpu.len()
            ));
        }
        if let Some((i, v)) = self
            .vcpu
            .iter()
            .enumerate()
            .find(|(i, v)| v.index as usize != *i)
        {
            return bad(format!("vCPU state {i} is labelled vCPU {}", v.index));
        }
        if self.vcpu.iter().all(|v| v.ended.is_some()) {
            return bad("every vCPU had ended: there is nothing to resume".into());
        }
        let extent = guest_abi::layout::EXTENT_SIZE;
        if self.memory == 0 || !self.memory.is_multiple_of(extent) {
            return bad(format!(
                "its memory size {} is not a whole number of 2 MiB extents",
                self.memory
            ));
        }
        if self.serial.in_buffer.len() > 64 || self.stages.len() > 64 {
            return bad("its device state is larger than the devices hold".into());
        }
        if let Some(v) = self
            .vcpu
            .iter()
            .find(|v| v.cpuid.len() > 256 || v.msrs.len() > 256)
        {
            return bad(format!(
                "vCPU {} has more CPUID or MSR entries than KVM takes",
                v.index
            ));
        }
        Ok(())
    }

    /// The checks against the VM it is to be resumed as: this build, the options the user
    /// gave (`vcpus`, `memory`, where given), this host's TSC frequency.
    pub fn check_resumable(
        &self,
        vcpus: Option<u32>,
        memory: Option<u64>,
        tsc_khz: Option<u32>,
    ) -> Result<(), String> {
        let build = this_build();
        if self.build != build {
            return Err(format!(
                "it was taken by build {} and this is build {build}; resume it with the build \
                 that took it",
                self.build
            ));
        }
        if let Some(n) = vcpus.filter(|&n| n != self.vcpus) {
            return Err(format!(
                "it has {} vCPUs and --vcpus asks for {n}; leave --vcpus out (a resumed VM has \
                 the snapshot's vCPUs)",
                self.vcpus
            ));
        }
        if let Some(m) = memory.filter(|&m| m != self.memory) {
            return Err(format!(
                "it has {} of RAM and --memory asks for {}; leave --memory out (a resumed VM \
                 has the snapshot's RAM)",
                crate::units::ByteSize(self.memory),
                crate::units::ByteSize(m)
            ));
        }
        if let Some(khz) = tsc_khz.filter(|&k| self.tsc_khz != 0 && k != self.tsc_khz) {
            return Err(format!(
                "it was taken on a host whose TSC runs at {} kHz and this one's runs at {khz} \
                 kHz; the guest's clock would jump",
                self.tsc_khz
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> VmState {
        let vcpu = |index| VcpuState {
            index,
            ended: None,
            cpuid: vec![Raw(kvm_cpuid_entry2::default())],
            regs: Raw(kvm_regs {
                rip: 0x40_1000 + u64::from(index),
                ..Default::default()
            }),
            sregs: Raw(kvm_sregs::default()),
            xsave: Raw(kvm_xsave::default()),
            xcrs: Raw(kvm_xcrs::default()),
            debugregs: Raw(kvm_debugregs::default()),
            events: Raw(kvm_vcpu_events::default()),
            mp_state: Raw(kvm_mp_state::default()),
            msrs: vec![(0x10, 12345)],
        };
        VmState {
            build: this_build(),
            guest: "verify".into(),
            vcpus: 2,
            memory: 32 << 20,
            tsc_khz: 2_000_000,
            reclaim: false,
            clock: Raw(kvm_clock_data::default()),
            serial: SerialRegs::default(),
            stages: vec![0; 16],
            vcpu: vec![vcpu(0), vcpu(1)],
        }
    }

    #[test]
    fn a_state_round_trips() {
        let bytes = sample().encode();
        let (back, crc) = VmState::decode(&bytes).unwrap();
        assert_eq!(back.vcpu[1].regs.0.rip, 0x40_1001);
        assert_eq!(back.vcpu[0].msrs, vec![(0x10, 12345)]);
        assert_eq!(crc, VmState::decode(&sample().encode()).unwrap().1);
    }

    #[test]
    fn truncated_corrupt_and_foreign_files_are_told_apart() {
        let bytes = sample().encode();
        let cut = &bytes[..bytes.len() - 10];
        assert!(matches!(
            VmState::decode(cut),
            Err(StateError::Length { .. })
        ));
        let mut flipped = bytes.clone();
        let at = flipped.len() - 40;
        flipped[at] ^= 1;
        assert!(matches!(
            VmState::decode(&flipped),
            Err(StateError::Checksum { .. })
        ));
        let v2 = String::from_utf8(bytes.clone()).unwrap().replacen(
            "vmm-snapshot 1 ",
            "vmm-snapshot 2 ",
            1,
        );
        assert_eq!(
            VmState::decode(v2.as_bytes()).unwrap_err(),
            StateError::Version(2)
        );
        assert_eq!(
            VmState::decode(b"VMMIMG01 whatever").unwrap_err(),
            StateError::NotState
        );
    }

    /// A body changed and its header recomputed: the checksum passes, the body's checks don't.
    fn reseal(state: &VmState, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v = serde_json::to_value(state).unwrap();
        edit(&mut v);
        seal(MAGIC, &serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn tampered_bodies_are_refused_by_their_own_checks() {
        let s = sample();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (reseal(&s, |v| v["vcpus"] = 3.into()), "says 3 vCPUs"),
            (
                reseal(&s, |v| v["vcpu"][1]["index"] = 0.into()),
                "labelled vCPU 0",
            ),
            (
                reseal(&s, |v| v["vcpu"][0]["regs"] = "00ff".into()),
                "hex digits where",
            ),
            (reseal(&s, |v| v["memory"] = 12345.into()), "2 MiB extents"),
            (reseal(&s, |v| v["surprise"] = 1.into()), "unknown field"),
            (
                reseal(&s, |v| {
                    v["vcpu"][0]["ended"] = 0.into();
                    v["vcpu"][1]["ended"] = 0.into();
                }),
                "nothing to resume",
            ),
        ];
        for (bytes, want) in cases {
            let e = VmState::decode(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn a_snapshot_is_tied_to_its_build_vcpus_memory_and_tsc() {
        let s = sample();
        assert_eq!(
            s.check_resumable(Some(2), Some(32 << 20), Some(2_000_000)),
            Ok(())
        );
        assert_eq!(s.check_resumable(None, None, None), Ok(()));
        let e = s.check_resumable(Some(1), None, None).unwrap_err();
        assert!(e.contains("2 vCPUs and --vcpus asks for 1"), "{e}");
        let e = s.check_resumable(None, Some(64 << 20), None).unwrap_err();
        assert!(e.contains("--memory asks for 64M"), "{e}");
        let e = s.check_resumable(None, None, Some(3_000_000)).unwrap_err();
        assert!(e.contains("2000000 kHz"), "{e}");
        let other = VmState {
            build: "0.0.1+abc".into(),
            ..sample()
        };
        let e = other.check_resumable(None, None, None).unwrap_err();
        assert!(e.contains("taken by build 0.0.1+abc"), "{e}");
    }
}
