//! The working-set record beside a snapshot (`working-set`): the order in which a VM resumed
//! from it first touched its RAM, for later resumes to fetch first.
//!
//! Same envelope as the VM state (`vmm-working-set <version> <length> <crc32>`, then JSON);
//! the body names the snapshot it was recorded from by its state's checksum, so a record never
//! steers the prefetcher of another snapshot.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_extents::WorkingSet;

use super::state::{StateError, seal, unseal};

/// The first word of every record.
pub const MAGIC: &str = "vmm-working-set";
/// The largest record read (a 64 GiB guest's every page: about 200 MiB of JSON at worst).
pub const MAX_RECORD_LEN: u64 = 256 << 20;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    /// The checksum of the snapshot's `vm.state` it was recorded from.
    snapshot: u32,
    #[serde(flatten)]
    set: WorkingSet,
}

/// The record's bytes.
pub fn encode(snapshot: u32, set: &WorkingSet) -> Vec<u8> {
    let record = Record {
        snapshot,
        set: set.clone(),
    };
    seal(MAGIC, &serde_json::to_vec(&record).expect("plain data"))
}

/// Parses a record and checks it belongs to snapshot `snapshot` of `memory` bytes of RAM.
pub fn decode(bytes: &[u8], snapshot: u32, memory: u64) -> Result<WorkingSet, StateError> {
    let (body, _) = unseal(MAGIC, bytes)?;
    let record: Record =
        serde_json::from_slice(body).map_err(|e| StateError::Body(e.to_string()))?;
    if record.snapshot != snapshot {
        return Err(StateError::Inconsistent(format!(
            "it was recorded from snapshot {:08x}, and this snapshot is {snapshot:08x}",
            record.snapshot
        )));
    }
    record.set.check(memory).map_err(StateError::Inconsistent)?;
    Ok(record.set)
}

/// Reads the record at `path` if there is one.
pub fn load(path: &Path, snapshot: u32, memory: u64) -> Result<Option<Arc<WorkingSet>>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let (mut file, _) = vm_extents::files::open_regular(path, "working-set record", MAX_RECORD_LEN)
        .map_err(|e| crate::error::chain(&e))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    decode(&bytes, snapshot, memory)
        .map(|set| Some(Arc::new(set)))
        .map_err(|e| format!("{} is refused: {e}", path.display()))
}

/// Writes the record to `path` atomically (a temporary renamed over it).
pub fn save(path: &Path, snapshot: u32, set: &WorkingSet) -> std::io::Result<()> {
    let tmp = vm_extents::files::temporary_for(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &encode(snapshot, set))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_names_its_snapshot() {
        let set = WorkingSet {
            extents: vec![3, 1, 2],
            pages: vec![1536, 512],
        };
        let bytes = encode(0xabcd, &set);
        assert_eq!(decode(&bytes, 0xabcd, 8 << 20).unwrap(), set);
        let e = decode(&bytes, 0x1234, 8 << 20).unwrap_err().to_string();
        assert!(e.contains("recorded from snapshot 0000abcd"), "{e}");
        let e = decode(&bytes, 0xabcd, 4 << 20).unwrap_err().to_string();
        assert!(e.contains("extent 3 is outside"), "{e}");
        let e = decode(&bytes[..bytes.len() - 1], 0xabcd, 8 << 20).unwrap_err();
        assert!(matches!(e, StateError::Length { .. }), "{e}");
    }
}
