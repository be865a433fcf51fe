//! Guest RAM: the host mapping that backs guest-physical memory.
//!
//! RAM is a list of regions keyed by guest address (so a VMM can leave, say, the x86 PCI
//! hole below 4 GiB unbacked), laid end to end in one host mapping, each its own KVM memslot.
//! The manager addresses RAM by *offset*, the position in that end-to-end layout (which is
//! also a memory image's layout); [`GuestRam::offset_of`] and [`GuestRam::address_of`]
//! translate, and the vm-memory [view](GuestRam::view) is keyed by guest address.
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
use super::extent::ExtentIndex;

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
    /// The regions are not 2 MiB aligned, not ascending, or overlap.
    #[error("guest RAM's regions cannot be mapped")]
    Regions(#[source] crate::ConfigError),
    /// vm-memory refused the region list.
    #[error("could not build the guest memory view")]
    ViewRegions(#[source] vm_memory::GuestRegionCollectionError),
}

/// A host virtual address: where a byte of guest RAM (or a huge page) lies in this process.
///
/// Guest addresses are vm-memory's [`GuestAddress`]; host addresses have this type of their own
/// so the two are never mixed up. Arithmetic is by byte counts (`addr + len`, `end - start`);
/// [`HostAddr::raw`] gives the number the kernel's interfaces (userfaultfd, madvise, pagemap)
/// take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostAddr(u64);

impl HostAddr {
    /// The host address `raw`.
    pub const fn new(raw: u64) -> Self {
        HostAddr(raw)
    }

    /// The address of `ptr`.
    pub fn of<T>(ptr: *const T) -> Self {
        HostAddr(ptr as usize as u64)
    }

    /// The address as a number, for the kernel's interfaces.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The address as a pointer (dereferencing it is the caller's business).
    pub const fn as_ptr<T>(self) -> *mut T {
        self.0 as usize as *mut T
    }

    /// `self + bytes`, or `None` on overflow.
    pub const fn checked_add(self, bytes: u64) -> Option<Self> {
        match self.0.checked_add(bytes) {
            Some(a) => Some(HostAddr(a)),
            None => None,
        }
    }

    /// Whether the address is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }
}

impl std::ops::Add<u64> for HostAddr {
    type Output = HostAddr;
    /// `self` moved on by `bytes` (panics on overflow, as integer arithmetic does in debug).
    fn add(self, bytes: u64) -> HostAddr {
        self.checked_add(bytes).expect("host address overflow")
    }
}

impl std::ops::AddAssign<u64> for HostAddr {
    fn add_assign(&mut self, bytes: u64) {
        *self = *self + bytes;
    }
}

impl std::ops::Sub for HostAddr {
    type Output = u64;
    /// The bytes from `start` to `self` (panics if `start` is past `self`).
    fn sub(self, start: HostAddr) -> u64 {
        self.0
            .checked_sub(start.0)
            .expect("host address range reversed")
    }
}

impl std::fmt::LowerHex for HostAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

/// One region of guest RAM: `size` bytes at guest address `guest`, at `offset` in RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Its first guest address (2 MiB aligned).
    pub guest: GuestAddress,
    /// Its size (a multiple of 2 MiB).
    pub size: u64,
    /// Where it starts in RAM laid end to end (the sum of the sizes before it).
    pub offset: u64,
}

/// Guest RAM: its regions, in one host mapping.
#[derive(Debug)]
pub struct GuestRam {
    base: NonNull<u8>,
    size: u64,
    regions: Vec<RamRegion>,
    backing: Backing,
    view: GuestMemoryMmap,
    /// The same memory as one region at "address" 0: RAM by offset, the manager's own view.
    by_offset: GuestMemoryMmap,
}

// SAFETY: the mapping is plain memory owned by this value; all access through it goes through
// the vm-memory view (volatile accesses) or the raw pointers handed to KVM, both of which are
// safe to use from any thread.
unsafe impl Send for GuestRam {}
// SAFETY: as above; `GuestRam` exposes no interior mutability of its own.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `size` bytes (a multiple of 2 MiB) of anonymous private memory at a 2 MiB-aligned
    /// host address, backed as `backing` says: one region at guest address 0.
    pub fn new(size: u64, backing: Backing) -> Result<Self, RamError> {
        Self::with_regions(&[(GuestAddress(0), size)], backing)
    }

    /// Maps the `(guest address, size)` regions (2 MiB aligned, in ascending order, not
    /// overlapping, as [`MemoryBuilder`](crate::MemoryBuilder) checks; refused otherwise) end
    /// to end in one
    /// anonymous private mapping at a 2 MiB-aligned host address, backed as `backing` says.
    pub fn with_regions(
        regions: &[(GuestAddress, u64)],
        backing: Backing,
    ) -> Result<Self, RamError> {
        let advice = backing.madvise();
        crate::config::check_regions(regions).map_err(RamError::Regions)?;
        let mut offset = 0;
        let regions: Vec<RamRegion> = regions
            .iter()
            .map(|&(guest, size)| {
                let region = RamRegion {
                    guest,
                    size,
                    offset,
                };
                offset += size;
                region
            })
            .collect();
        let size = offset;
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
        let mut view_regions = Vec::with_capacity(regions.len());
        for r in &regions {
            // SAFETY: the region lies within our mapping (its offset and size are inside
            // `size`), which outlives the view because the view is a field of `self` (dropped
            // before `Drop::drop` unmaps) and a raw region does not unmap on its own.
            let raw = unsafe {
                MmapRegion::build_raw(
                    base.as_ptr().add(r.offset as usize),
                    r.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .map_err(RamError::ViewMapping)?;
            view_regions.push(
                GuestRegionMmap::new(raw, r.guest)
                    .expect("checked regions end below 2^64 (check_regions)"),
            );
        }
        let view = GuestMemoryMmap::from_regions(view_regions).map_err(RamError::ViewRegions)?;
        // SAFETY: the whole mapping, under the same terms as the regions above.
        let whole = unsafe {
            MmapRegion::build_raw(
                base.as_ptr(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .map_err(RamError::ViewMapping)?;
        let whole = GuestRegionMmap::new(whole, GuestAddress(0))
            .expect("a region at 0 of at most the address space's size");
        let by_offset =
            GuestMemoryMmap::from_regions(vec![whole]).map_err(RamError::ViewRegions)?;
        Ok(GuestRam {
            base,
            size,
            regions,
            backing,
            view,
            by_offset,
        })
    }

    /// Maps memory with RAM's flags and advice over a hole at offsets `[gpa, gpa + len)` (a
    /// failed `mremap` may have unmapped part of guest RAM). No thread ever sees the range
    /// mapped but not yet what it must be (an access in between faults, as in the hole):
    /// - with `contents`, a `PROT_NONE` placeholder holds the range while the contents are
    ///   prepared off to the side, then they are moved over it whole; if that move fails the
    ///   placeholder stays, and the range stays inaccessible rather than wrong;
    /// - without, fresh memory is mapped `PROT_NONE`, for the caller to register with its
    ///   userfaultfd before [`Self::open_refilled`] makes it accessible (unpopulated memory
    ///   read before that would be the kernel's zeroes, not the page source's).
    pub(crate) fn refill_hole(
        &self,
        gpa: u64,
        len: u64,
        contents: Option<&[u8]>,
    ) -> io::Result<()> {
        assert!(
            gpa.checked_add(len).is_some_and(|end| end <= self.size),
            "inside RAM"
        );
        assert!(contents.is_none_or(|c| c.len() as u64 == len));
        // SAFETY: the offset lies inside our mapping.
        let addr = unsafe { self.base.as_ptr().add(gpa as usize) }.cast::<libc::c_void>();
        let len = len as usize;
        let Some(contents) = contents else {
            // SAFETY: the range lies inside our reservation and is unmapped (NOREPLACE fails
            // otherwise), so nothing is replaced and nothing else refers to it.
            let mapped =
                unsafe { self.map_fresh(addr, len, libc::MAP_FIXED_NOREPLACE, libc::PROT_NONE) }?;
            debug_assert_eq!(mapped, addr);
            return Ok(());
        };
        // SAFETY: as above; the placeholder is ours, inaccessible, and replaced below.
        let placeholder = unsafe {
            libc::mmap(
                addr,
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_NORESERVE
                    | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if placeholder == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh mapping at an address the kernel chooses; it overlaps nothing.
        let staging = unsafe {
            self.map_fresh(
                std::ptr::null_mut(),
                len,
                0,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        }?;
        // SAFETY: `staging` is our own fresh `len`-byte writable mapping, `contents` is `len`
        // bytes elsewhere.
        unsafe { std::ptr::copy_nonoverlapping(contents.as_ptr(), staging.cast::<u8>(), len) };
        // SAFETY: moves our staging mapping over our own placeholder (MREMAP_FIXED unmaps
        // it); nothing else refers to either.
        let moved = unsafe {
            libc::mremap(
                staging,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                addr,
            )
        };
        if moved == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: the staging mapping is ours and unused.
            unsafe { libc::munmap(staging, len) };
            return Err(e);
        }
        Ok(())
    }

    /// Makes a range [`Self::refill_hole`] mapped fresh accessible.
    pub(crate) fn open_refilled(&self, gpa: u64, len: u64) -> io::Result<()> {
        assert!(
            gpa.checked_add(len).is_some_and(|end| end <= self.size),
            "inside RAM"
        );
        // SAFETY: the range lies inside our mapping; making it accessible changes no contents.
        let r = unsafe {
            libc::mprotect(
                self.base.as_ptr().add(gpa as usize).cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Gives offsets `[gpa, gpa + len)` RAM's advice again (a page moved in by `mremap` brought
    /// the pool's: with 4 KiB backing, the kernel must not fault huge pages in behind the
    /// VMM's back once the extent holds 4 KiB pages again).
    pub(crate) fn advise(&self, gpa: u64, len: u64) -> io::Result<()> {
        let Some(advice) = self.backing.madvise() else {
            return Ok(());
        };
        // SAFETY: advice on a range of our own mapping; it changes no contents.
        if unsafe { libc::madvise(self.host_at(gpa).as_ptr(), len as usize, advice) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Maps `len` bytes of fresh memory of RAM's kind somewhere outside RAM, readable and
    /// writable, for contents prepared off to the side before they are moved into RAM; the
    /// caller unmaps it, or moves it in.
    pub(crate) fn map_staging(&self, len: u64) -> io::Result<HostAddr> {
        // SAFETY: a new mapping wherever the kernel puts it: nothing is replaced.
        let mapped = unsafe {
            self.map_fresh(
                std::ptr::null_mut(),
                len as usize,
                0,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        }?;
        Ok(HostAddr::of(mapped))
    }

    /// Replaces offsets `[gpa, gpa + len)` with fresh, unpopulated memory of RAM's kind, in one
    /// `mmap` over what was there (whatever backed the range is unmapped and freed; no access
    /// ever finds a hole). The caller registers it with its userfaultfd.
    pub(crate) fn replace_with_fresh(&self, gpa: u64, len: u64) -> io::Result<()> {
        assert!(
            gpa.checked_add(len).is_some_and(|end| end <= self.size),
            "inside RAM"
        );
        let addr = self.host_at(gpa).as_ptr();
        // SAFETY: the range lies inside our mapping; the caller holds the extent exclusively
        // and gave its contents up.
        let mapped = unsafe {
            self.map_fresh(
                addr,
                len as usize,
                libc::MAP_FIXED,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        }?;
        debug_assert_eq!(mapped, addr);
        Ok(())
    }

    /// Maps `len` bytes of fresh memory with RAM's flags and advice and protection `prot`, at
    /// `addr` with `fixed` (0: anywhere).
    ///
    /// # Safety
    /// With `fixed`, `addr` must be a range the caller owns, unused.
    unsafe fn map_fresh(
        &self,
        addr: *mut libc::c_void,
        len: usize,
        fixed: libc::c_int,
        prot: libc::c_int,
    ) -> io::Result<*mut libc::c_void> {
        // SAFETY: the caller's promise.
        let mapped = unsafe {
            libc::mmap(
                addr,
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed | self.backing.mmap_flags(),
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if let Some(advice) = self.backing.madvise() {
            // SAFETY: advice on the range just mapped; it changes no contents.
            unsafe { libc::madvise(mapped, len, advice) };
        }
        Ok(mapped)
    }

    /// Populates every page now (`MADV_POPULATE_WRITE`), so no fault happens later.
    pub fn populate(&self) -> io::Result<()> {
        self.populate_offsets(0, self.size)
    }

    /// Populates the `len` bytes at guest address `addr` now (one region's); contents already
    /// there are kept.
    pub fn populate_range(&self, addr: GuestAddress, len: u64) -> io::Result<()> {
        let offset = self
            .offset_of(addr)
            .filter(|&o| self.address_of(o + len.max(1) - 1).0 == addr.0 + len.max(1) - 1)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{len} bytes at {:#x} are not inside one region of guest RAM",
                        addr.0
                    ),
                )
            })?;
        self.populate_offsets(offset, len)
    }

    /// Populates RAM at offsets `[gpa, gpa + len)`.
    pub(crate) fn populate_offsets(&self, gpa: u64, len: u64) -> io::Result<()> {
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

    /// Its regions, in guest address (and offset) order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The offset in RAM of guest address `addr`, if RAM backs it.
    pub fn offset_of(&self, addr: GuestAddress) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| addr.0 >= r.guest.0 && addr.0 - r.guest.0 < r.size)
            .map(|r| r.offset + (addr.0 - r.guest.0))
    }

    /// The guest address of offset `offset` in RAM (below [`Self::size`]).
    pub fn address_of(&self, offset: u64) -> GuestAddress {
        let r = self
            .regions
            .iter()
            .rev()
            .find(|r| r.offset <= offset)
            .expect("the first region starts at offset 0");
        GuestAddress(r.guest.0 + (offset - r.offset))
    }

    /// The extent holding guest address `addr`, if RAM backs it.
    pub fn extent_of(&self, addr: GuestAddress) -> Option<ExtentIndex> {
        self.offset_of(addr).map(ExtentIndex::of)
    }

    /// The guest address of extent `index`'s first byte.
    pub fn extent_address(&self, index: ExtentIndex) -> GuestAddress {
        self.address_of(index.gpa())
    }

    /// The host address of offset 0 (RAM's first byte).
    pub fn host_base(&self) -> HostAddr {
        HostAddr::of(self.base.as_ptr())
    }

    /// The host address of offset `offset` in RAM (at most [`Self::size`]: one past the end is
    /// a range's end).
    pub fn host_at(&self, offset: u64) -> HostAddr {
        assert!(
            offset <= self.size,
            "offset {offset:#x} past guest RAM's {:#x}",
            self.size
        );
        self.host_base() + offset
    }

    /// The bounds-checked view device code uses to reach guest memory, by guest address.
    pub fn view(&self) -> &GuestMemoryMmap {
        &self.view
    }

    /// RAM by offset (`GuestAddress(offset)`): how the manager itself reads and writes it.
    pub(crate) fn by_offset(&self) -> &GuestMemoryMmap {
        &self.by_offset
    }

    /// Registers each region as a KVM memslot, `slot` for the first and the next numbers for
    /// the others, without dirty logging (KVM maps 2 MiB at once only where dirty logging is
    /// off). Regions and host addresses are 2 MiB aligned, so guest and host addresses are
    /// congruent modulo 2 MiB, as KVM needs to map a huge page at once.
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
        for (r, slot) in self.regions.iter().zip(slot..) {
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: r.guest.0,
                memory_size: r.size,
                userspace_addr: self.base.as_ptr() as u64 + r.offset,
            };
            // SAFETY: the memslot points into our mapping, which stays mapped until `GuestRam`
            // is dropped; this function's caller promises the memslots are gone before then.
            unsafe { vm.set_user_memory_region(region) }?;
        }
        Ok(())
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
            assert_eq!(ram.host_base().raw() % EXTENT_SIZE, 0);
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

    #[test]
    fn regions_lie_end_to_end_and_the_gaps_are_unbacked() {
        const MIB: u64 = 1 << 20;
        let high = GuestAddress(1 << 30);
        let ram = GuestRam::with_regions(
            &[(GuestAddress(0), 4 * MIB), (high, 2 * MIB)],
            Backing::Small,
        )
        .expect("map");
        assert_eq!(ram.size(), 6 * MIB);
        assert_eq!(
            ram.regions()[1],
            RamRegion {
                guest: high,
                size: 2 * MIB,
                offset: 4 * MIB
            }
        );
        // Guest addresses and offsets translate both ways, and the gap has no offset.
        assert_eq!(ram.offset_of(GuestAddress(0x1000)), Some(0x1000));
        assert_eq!(
            ram.offset_of(GuestAddress(high.0 + 0x2000)),
            Some(4 * MIB + 0x2000)
        );
        assert_eq!(ram.offset_of(GuestAddress(4 * MIB)), None);
        assert_eq!(ram.offset_of(GuestAddress(high.0 + 2 * MIB)), None);
        assert_eq!(
            ram.address_of(4 * MIB + 0x2000),
            GuestAddress(high.0 + 0x2000)
        );
        assert_eq!(ram.address_of(4 * MIB - 1), GuestAddress(4 * MIB - 1));
        let extent = ram.extent_of(high).expect("backed");
        assert_eq!(ram.extent_address(extent), high);
        // A write through the guest view lands at the region's offset in the mapping.
        ram.view()
            .write_obj(0x5eed_u64, GuestAddress(high.0 + 8))
            .expect("write");
        assert_eq!(
            ram.by_offset()
                .read_obj::<u64>(GuestAddress(4 * MIB + 8))
                .expect("read"),
            0x5eed
        );
        assert!(
            ram.view().read_obj::<u64>(GuestAddress(5 * MIB)).is_err(),
            "the gap"
        );
        // Populating is by guest address, inside one region.
        ram.populate_range(high, 2 * MIB).expect("populate");
        assert!(ram.populate_range(GuestAddress(2 * MIB), 4 * MIB).is_err());
    }

    #[test]
    fn a_refilled_hole_is_never_mapped_with_the_wrong_contents() {
        let ram = GuestRam::new(3 * EXTENT_SIZE, Backing::Small).expect("map");
        let extent = |i: u64| (ram.host_at(i * EXTENT_SIZE)).as_ptr::<libc::c_void>();
        let hole = |i: u64| {
            // SAFETY: an extent of our own mapping, unused by anything else in this test.
            assert_eq!(unsafe { libc::munmap(extent(i), EXTENT_SIZE as usize) }, 0);
        };
        // Another test's thread may map something into a hole before it is refilled; the
        // refill then refuses it (EEXIST), as it must, and there is nothing to check here.
        let taken = |r: io::Result<()>| match r {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                eprintln!("SKIP: another mapping took the hole first");
                true
            }
            r => {
                r.expect("refill");
                false
            }
        };
        // With contents: they are there, whole, the moment the range is accessible again.
        hole(1);
        let contents = vec![0x5au8; EXTENT_SIZE as usize];
        if taken(ram.refill_hole(EXTENT_SIZE, EXTENT_SIZE, Some(&contents))) {
            return;
        }
        let view = ram.by_offset();
        assert_eq!(
            view.read_obj::<u64>(GuestAddress(EXTENT_SIZE + 4096))
                .unwrap(),
            0x5a5a_5a5a_5a5a_5a5a
        );
        assert_eq!(
            view.read_obj::<u8>(GuestAddress(2 * EXTENT_SIZE - 1))
                .unwrap(),
            0x5a
        );
        // Without: fresh memory, inaccessible until opened.
        hole(2);
        if taken(ram.refill_hole(2 * EXTENT_SIZE, EXTENT_SIZE, None)) {
            return;
        }
        let mut vec = 0u8;
        // SAFETY: mincore only reports on the range and writes one byte.
        let mapped = unsafe { libc::mincore(extent(2), 4096, &mut vec) };
        assert_eq!(mapped, 0, "mapped");
        let prot = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = format!("{:x}-", extent(2) as u64);
        let line = prot
            .lines()
            .find(|l| l.starts_with(&start))
            .expect("its mapping");
        assert!(line.contains(" ---p "), "{line}");
        ram.open_refilled(2 * EXTENT_SIZE, EXTENT_SIZE)
            .expect("open");
        assert_eq!(
            view.read_obj::<u64>(GuestAddress(2 * EXTENT_SIZE)).unwrap(),
            0
        );
        // A hole that is not one (still mapped) is refused, not replaced.
        assert!(ram.refill_hole(0, EXTENT_SIZE, Some(&contents)).is_err());
        assert!(ram.refill_hole(0, EXTENT_SIZE, None).is_err());
    }

    #[test]
    fn bad_regions_are_refused_not_mapped() {
        let mib = 1 << 20;
        for bad in [
            vec![],
            vec![(GuestAddress(mib), 2 * mib)],
            vec![(GuestAddress(0), 4 * mib), (GuestAddress(2 * mib), 2 * mib)],
        ] {
            assert!(matches!(
                GuestRam::with_regions(&bad, Backing::Small),
                Err(RamError::Regions(_))
            ));
        }
    }
}
