//! Guest RAM: the host mapping that backs guest-physical memory.
//!
//! `GuestRam` owns the host mapping for the whole life of the VM. It reserves an over-sized
//! `PROT_NONE` range, trims it so that the host address is 2 MiB aligned (and so congruent with
//! the guest-physical address modulo 2 MiB, which KVM needs to map 2 MiB at once), then maps the
//! memory over it with `MAP_FIXED`. Everything whose soundness depends on the mapping staying
//! alive (memslot registration, the vm-memory view devices use) is created here and nowhere else.
//! It must never unmap while a memslot still points at the range: the VM fd (and with it every
//! memslot) is dropped before `GuestRam`.

use std::io;
use std::ptr::NonNull;

use crate::EXTENT_SIZE;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::backing::Backing;

/// Errors from mapping guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The reservation could not be made.
    #[error("could not reserve {size} bytes of host address space for guest RAM")]
    Reserve {
        /// Bytes asked for.
        size: u64,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// The memory could not be mapped over the reservation.
    #[error("could not map {size} bytes of guest RAM")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// vm-memory refused the mapping.
    #[error("could not build the guest memory view")]
    ViewMapping(#[source] vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the region list.
    #[error("could not build the guest memory view")]
    ViewRegions(#[source] vm_memory::GuestRegionCollectionError),
}

/// A host virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostAddr(pub usize);

/// One region of guest RAM, starting at guest-physical 0.
#[derive(Debug)]
pub struct GuestRam {
    base: NonNull<u8>,
    size: u64,
    backing: Backing,
    view: GuestMemoryMmap,
}

// SAFETY: the mapping is plain memory owned by this value; all access through it goes through
// the vm-memory view (volatile accesses) or the raw pointers handed to KVM, both of which are
// safe to use from any thread.
unsafe impl Send for GuestRam {}
// SAFETY: as above; `GuestRam` exposes no interior mutability of its own.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `size` bytes (a multiple of 2 MiB) of anonymous private memory at a 2 MiB-aligned
    /// host address, backed as `backing` says.
    pub fn new(size: u64, backing: Backing) -> Result<Self, RamError> {
        let advice = backing.madvise();
        assert!(
            size > 0 && size.is_multiple_of(EXTENT_SIZE),
            "validated by VmConfig"
        );
        let len = size as usize;
        let align = EXTENT_SIZE as usize;
        // SAFETY: a fresh PROT_NONE reservation at a kernel-chosen address; it overlaps nothing.
        let reserved = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + align,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserved == libc::MAP_FAILED {
            return Err(RamError::Reserve {
                size,
                source: io::Error::last_os_error(),
            });
        }
        let start = reserved as usize;
        let aligned = start.next_multiple_of(align);
        // Give back the unaligned head and the unused tail of the reservation.
        // SAFETY: both ranges lie inside the reservation we just made and nothing uses them.
        unsafe {
            if aligned > start {
                libc::munmap(reserved, aligned - start);
            }
            let tail = aligned + len;
            let end = start + len + align;
            if end > tail {
                libc::munmap(tail as *mut libc::c_void, end - tail);
            }
        }
        // SAFETY: MAP_FIXED over our own reservation, which nothing else references yet.
        let mapped = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | backing.mmap_flags(),
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            let source = io::Error::last_os_error();
            // SAFETY: the reservation is ours and unused.
            unsafe { libc::munmap(aligned as *mut libc::c_void, len) };
            return Err(RamError::Map { size, source });
        }
        let base = NonNull::new(mapped.cast::<u8>()).expect("mmap never returns null on success");
        if let Some(advice) = advice {
            // SAFETY: advice on our own mapping; it changes no memory contents.
            if unsafe { libc::madvise(mapped, len, advice) } != 0 {
                log::warn!(
                    "madvise({advice}) on guest RAM failed: {}",
                    io::Error::last_os_error()
                );
            }
        }
        // SAFETY: the region lies within our mapping, which outlives the view because the view
        // is a field of `self` (dropped before `Drop::drop` unmaps) and the raw region does not
        // unmap on its own.
        let region = unsafe {
            MmapRegion::build_raw(
                base.as_ptr(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .map_err(RamError::ViewMapping)?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .expect("a region at guest-physical 0 of at most MAX_RAM cannot overflow");
        let view = GuestMemoryMmap::from_regions(vec![region]).map_err(RamError::ViewRegions)?;
        Ok(GuestRam {
            base,
            size,
            backing,
            view,
        })
    }

    /// Maps fresh memory (zeroes, RAM's flags and advice) over a hole at `[gpa, gpa + len)`:
    /// a failed `mremap` may have unmapped part of guest RAM.
    pub fn refill_hole(&self, gpa: u64, len: u64) -> io::Result<()> {
        assert!(
            gpa.checked_add(len).is_some_and(|end| end <= self.size),
            "inside RAM"
        );
        // SAFETY: the range lies inside our reservation and is unmapped (NOREPLACE fails
        // otherwise), so nothing is replaced and nothing else refers to it.
        let addr = unsafe { self.base.as_ptr().add(gpa as usize) };
        // SAFETY: as above.
        let mapped = unsafe {
            libc::mmap(
                addr.cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_FIXED_NOREPLACE
                    | self.backing.mmap_flags(),
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if let Some(advice) = self.backing.madvise() {
            // SAFETY: advice on the range just mapped; it changes no contents.
            unsafe { libc::madvise(mapped, len as usize, advice) };
        }
        Ok(())
    }

    /// Populates every page now (`MADV_POPULATE_WRITE`), so no fault happens later.
    pub fn populate(&self) -> io::Result<()> {
        self.populate_range(0, self.size)
    }

    /// Populates `[gpa, gpa + len)` now; contents already there are kept.
    pub fn populate_range(&self, gpa: u64, len: u64) -> io::Result<()> {
        assert!(
            gpa.checked_add(len).is_some_and(|end| end <= self.size),
            "inside RAM"
        );
        // SAFETY: populating part of our own mapping changes no contents (missing pages are
        // zero-filled, present ones are left as they are).
        let ret = unsafe {
            libc::madvise(
                self.base.as_ptr().add(gpa as usize).cast(),
                len as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Guest RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The host address of guest-physical 0.
    pub fn host_base(&self) -> HostAddr {
        HostAddr(self.base.as_ptr() as usize)
    }

    /// The bounds-checked view device code uses to reach guest memory.
    pub fn view(&self) -> &GuestMemoryMmap {
        &self.view
    }

    /// Registers the mapping as KVM memslot `slot` at guest-physical 0, without dirty logging
    /// (KVM maps 2 MiB at once only where dirty logging is off).
    ///
    /// # Safety
    ///
    /// KVM keeps using the mapping for as long as the memslot exists: the caller must drop
    /// `vm` (or delete the slot) before this `GuestRam` is dropped and its mapping unmapped.
    /// (`Vm` does, by dropping its VM fd before its memory.)
    pub unsafe fn register(
        &self,
        vm: &kvm_ioctls::VmFd,
        slot: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.base.as_ptr() as u64,
        };
        // SAFETY: the memslot points at our mapping, which stays mapped until `GuestRam` is
        // dropped; this function's caller promises the memslot is gone before then.
        unsafe { vm.set_user_memory_region(region) }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; the vm-memory view does not unmap raw regions, and the
        // memslot is gone (`register`'s contract).
        if unsafe { libc::munmap(self.base.as_ptr().cast(), self.size as usize) } != 0 {
            // The address space keeps the mapping: memory lost until the process ends.
            log::error!(
                "unmapping guest RAM ({} bytes) failed: {}",
                self.size,
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn host_base_is_extent_aligned_and_usable() {
        for extents in [1, 3, 8] {
            let ram = GuestRam::new(extents * EXTENT_SIZE, Backing::Small).expect("map");
            assert_eq!(ram.host_base().0 % EXTENT_SIZE as usize, 0);
            let last = GuestAddress(ram.size() - 8);
            ram.view().write_obj(0xdead_beef_u64, last).expect("write");
            assert_eq!(ram.view().read_obj::<u64>(last).expect("read"), 0xdead_beef);
            assert!(
                ram.view()
                    .read_obj::<u64>(GuestAddress(ram.size()))
                    .is_err()
            );
            assert_eq!(ram.view().last_addr(), GuestAddress(ram.size() - 1));
        }
    }
}
