//! The memory map lock: this VMM's `mmap_sem`. One `RwLock` over the [`ExtentTable`], and the
//! only way to the table and to the memory manager's own view of guest memory.
//!
//! - The **read** side is for everyone who looks at extent state or copies guest pages out:
//!   the fault handler (it records the pages it fills with atomics), the collapse's scan and
//!   pre-copy, the kernel-view sync, the save, the metrics. Many at once.
//! - The **write** side is for whoever replaces an extent's backing: a collapse commit, and a
//!   2 MiB fault that maps a huge page over an unpopulated extent. Only it hands out
//!   `&mut ExtentTable`, which is what [`crate::huge::install`] and
//!   [`crate::extent::Extent::set_huge`] take.
//!
//! Guest memory is read through a guard ([`MapRead::view`], [`MapWrite::view`]), so "copies
//! guest memory only while holding the lock" is a fact the compiler checks. The one reader of
//! guest memory that must not hold the lock is a vCPU decoding a ucall on the guest's behalf
//! (see [`crate::vcpu::VcpuShared::ram`]): its read may fault, and no thread may hold the lock
//! across a fault the handler must serve.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use vm_memory::GuestMemoryMmap;

use super::extent::ExtentTable;
use super::ram::GuestRam;

/// The memory map lock and what it guards.
#[derive(Debug)]
pub struct MemoryMap {
    table: RwLock<ExtentTable>,
    ram: Arc<GuestRam>,
}

/// The read side, held.
pub struct MapRead<'a> {
    table: RwLockReadGuard<'a, ExtentTable>,
    ram: &'a GuestRam,
}

/// The write side, held.
pub struct MapWrite<'a> {
    table: RwLockWriteGuard<'a, ExtentTable>,
    ram: &'a GuestRam,
}

/// Who holds the lock, as far as a `try_` probe can tell (tests check lock orders with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Nobody.
    Free,
    /// Readers only.
    Read,
    /// A writer.
    Write,
}

impl MemoryMap {
    /// The lock over `table`, the extents of `ram`.
    pub fn new(table: ExtentTable, ram: Arc<GuestRam>) -> Self {
        MemoryMap {
            table: RwLock::new(table),
            ram,
        }
    }

    /// Takes the read side.
    pub fn read(&self) -> MapRead<'_> {
        MapRead {
            table: crate::sync::read(&self.table),
            ram: &self.ram,
        }
    }

    /// Takes the write side.
    pub fn write(&self) -> MapWrite<'_> {
        MapWrite {
            table: crate::sync::write(&self.table),
            ram: &self.ram,
        }
    }

    /// Who holds the lock now (without waiting).
    pub fn held(&self) -> Held {
        match self.table.try_write() {
            Ok(_) => Held::Free,
            Err(TryLockError::Poisoned(_)) => Held::Free,
            Err(TryLockError::WouldBlock) => match self.table.try_read() {
                Err(TryLockError::WouldBlock) => Held::Write,
                _ => Held::Read,
            },
        }
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
}

impl MapRead<'_> {
    /// Guest memory by offset, to copy pages out of while the lock is held.
    pub(crate) fn view(&self) -> &GuestMemoryMmap {
        self.ram.by_offset()
    }
}

impl MapWrite<'_> {
    /// Guest memory by offset, to copy pages out of while the lock is held.
    pub(crate) fn view(&self) -> &GuestMemoryMmap {
        self.ram.by_offset()
    }
}

impl Deref for MapRead<'_> {
    type Target = ExtentTable;
    fn deref(&self) -> &ExtentTable {
        &self.table
    }
}

impl Deref for MapWrite<'_> {
    type Target = ExtentTable;
    fn deref(&self) -> &ExtentTable {
        &self.table
    }
}

impl DerefMut for MapWrite<'_> {
    fn deref_mut(&mut self) -> &mut ExtentTable {
        &mut self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::Backing;

    #[test]
    fn the_probe_tells_readers_from_writers() {
        let ram = Arc::new(GuestRam::new(2 << 20, Backing::Small).unwrap());
        let map = MemoryMap::new(ExtentTable::new(2 << 20), ram);
        assert_eq!(map.held(), Held::Free);
        let r = map.read();
        assert_eq!(map.held(), Held::Read);
        drop(r);
        let w = map.write();
        assert_eq!(map.held(), Held::Write);
        drop(w);
        assert_eq!(map.held(), Held::Free);
    }
}
