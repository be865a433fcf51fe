//! How one fault is resolved, under the memory map's read side (2 MiB faults take the write
//! side briefly to move their page in, through the one install path).

use crate::worker::Failure;
use crate::{EXTENT_SIZE, PAGE_SIZE};

use super::Resolver;
use super::source::Fill;
use crate::extent::{ExtentIndex, ExtentState};
use crate::huge::install::{Contents, Exclusive, InstallError, Installed, Installer};
use crate::map::MapRead;
use crate::uffd::{Fault, Resolved};

/// The handler's own buffers: a granule of page-source contents, and a granule of zeroes.
pub struct Buffers {
    fill: Vec<u8>,
    zeroes: Vec<u8>,
}

impl Buffers {
    /// Buffers for `granularity` bytes.
    pub fn new(granularity: u64) -> Self {
        Buffers {
            fill: vec![0u8; granularity as usize],
            zeroes: vec![0u8; granularity as usize],
        }
    }
}

/// The index of the 4 KiB page holding `gpa` within its extent.
fn page_in_extent(gpa: u64) -> usize {
    ((gpa % EXTENT_SIZE) / PAGE_SIZE) as usize
}

/// Resolves a missing-page fault at `gpa` under the read lock.
pub fn serve_missing(
    r: &Resolver,
    fault: &Fault,
    gpa: u64,
    buffers: &mut Buffers,
) -> Result<(), Failure> {
    if let Some(hint) = &r.hint {
        hint.faulted(ExtentIndex::of(gpa));
    }
    let gran = r.granularity;
    if let Some(record) = &r.record {
        record.touched(gpa, gran == EXTENT_SIZE);
    }
    let first = gpa & !(gran - 1);
    let host_base = r.map.ram().host_base();
    let mut map = r.map.read();
    if let Some(installer) = r.huge.as_ref().filter(|_| gran == EXTENT_SIZE) {
        if map_whole_extent(r, installer, ExtentIndex::of(gpa), map)? {
            return Ok(());
        }
        map = r.map.read();
    }
    let extent = map.get(ExtentIndex::of(gpa)).expect("gpa is inside RAM");
    if extent.is_claimed() {
        // Someone is replacing the extent's backing; it wakes the extent's waiters when done.
        return Ok(());
    }
    if extent.state() == ExtentState::Huge {
        // A collapse committed while this fault waited for the lock: the page is there now,
        // in the huge page that replaced the extent. Let the thread retry its access.
        let _ = r.uffd.wake(host_base + gpa, PAGE_SIZE);
        return Ok(());
    }
    // Resolve the whole granule when none of it is populated yet; otherwise only the page
    // (a granule with some pages present cannot be filled in one copy).
    // (Nor one with pages given back: filling them would bring back memory the guest freed.)
    let (at, len) = if gran > PAGE_SIZE
        && (first..first + gran)
            .step_by(PAGE_SIZE as usize)
            .all(|p| !map.is_populated(p))
        && !extent.any_reclaimed(page_in_extent(first), (gran / PAGE_SIZE) as usize)
    {
        (first, gran)
    } else {
        (gpa, PAGE_SIZE)
    };
    let refault = extent.is_reclaimed(page_in_extent(gpa));
    let fill = crate::reclaim::fill(&*r.source, extent, at, &mut buffers.fill[..len as usize])
        .map_err(|e| format!("the page source failed for guest address {at:#x}: {e}"))?;
    let dst = host_base + at;
    let (data, zeroes) = (buffers.fill.as_ptr(), buffers.zeroes.as_ptr());
    // SAFETY: `dst..dst+len` is guest RAM (the caller checked `gpa` against its size),
    // registered with this uffd and mapped while `r.map` lives; the sources are the handler's
    // own buffers of at least `len` bytes.
    let resolved = unsafe {
        match fill {
            Fill::Data => r.uffd.copy(dst, data, len),
            Fill::Zero if fault.write || len > PAGE_SIZE => r.uffd.copy(dst, zeroes, len),
            // A page holding a uffd-wp marker (its extent is being collapsed) is no page:
            // ZEROPAGE refuses it with EEXIST, COPY fills it. A page that really is present
            // makes COPY say so too.
            Fill::Zero => match r.uffd.zeropage(dst, len) {
                Ok(Resolved::AlreadyPresent) => r.uffd.copy(dst, zeroes, len),
                other => other,
            },
        }
    }
    .map_err(|e| format!("resolving the fault at guest address {at:#x} failed: {e}"))?;
    match resolved {
        Resolved::Filled => {
            if refault {
                r.reclaim.refaults.inc();
            }
            for p in (at..at + len).step_by(PAGE_SIZE as usize) {
                map.mark_populated(p);
                if extent.is_tracking() {
                    extent.mark_dirty(page_in_extent(p));
                }
            }
            r.stats.served.inc();
        }
        Resolved::AlreadyPresent => {
            map.mark_populated(gpa);
            r.stats.already_present.inc();
            // Another resolution filled the page; make sure this waiter is woken too.
            let _ = r.uffd.wake(host_base + gpa, PAGE_SIZE);
        }
        Resolved::Retry => {
            r.stats.retried.inc();
            let _ = r.uffd.wake(host_base + gpa, PAGE_SIZE);
        }
    }
    Ok(())
}

/// Resolves a fault in a wholly unpopulated extent with one huge page: prepared (allocated,
/// charged) and filled from the source under the read lock, the seed's order; put in under the
/// extent's claim with the read side still held (by `UFFDIO_MOVE`, or by `mremap` for a
/// hugetlb page), never the write side. Takes the read guard by value and returns with every
/// lock released.
/// `Ok(false)`: not done, resolve the fault page by page (the extent is partly populated, no
/// page or charge was to be had, or the extent changed meanwhile); nothing is left behind.
fn map_whole_extent(
    r: &Resolver,
    installer: &Installer,
    index: ExtentIndex,
    guard: MapRead<'_>,
) -> Result<bool, Failure> {
    let extent = guard.get(index).expect("the fault is inside RAM");
    // An extent the guest gave back is filled again page by page, as it touches it.
    if extent.state() != ExtentState::Unpopulated || extent.reclaimed() > 0 {
        return Ok(false);
    }
    // The extent is empty and every vCPU touching it waits for this fault: its claim, with
    // the read side held, is all the exclusion the install needs (no write side: a 2 MiB
    // fault stalls no other extent's faults, nor anyone reading the table).
    let Some(claim) = guard.claim(index) else {
        return Ok(false);
    };
    if claim.extent().state() != ExtentState::Unpopulated || claim.extent().reclaimed() > 0 {
        return Ok(false);
    }
    let Ok(mut page) = installer.prepare(Contents::Unpopulated) else {
        return Ok(false);
    };
    r.source.fill(index.gpa(), page.bytes_mut()).map_err(|e| {
        format!(
            "the page source failed for guest address {:#x}: {e}",
            index.gpa()
        )
    })?;
    fail::fail_point!("before-2m-install");
    let whole =
        match installer.install(Exclusive::Claim(&claim), index, page, Contents::Unpopulated) {
            // The extent is whole either way; only a huge one counts as mapped whole.
            Ok(installed) => matches!(installed, Installed::Huge(_)),
            Err(InstallError::Failed(failed)) => {
                log::warn!("{failed}: {}", failed.source);
                return Ok(false);
            }
            Err(InstallError::Lost(lost)) => return Err(lost.into()),
        };
    drop(claim);
    drop(guard);
    r.stats.served.inc();
    if whole {
        r.stats.extents_mapped.inc();
    }
    // Every thread waiting on a fault in the extent retries on the huge page.
    let _ = r.uffd.wake(r.map.ram().host_at(index.gpa()), EXTENT_SIZE);
    Ok(true)
}

/// Answers a write-protect fault. Taking the read lock waits for any collapse commit in
/// progress. Then either a collapse is copying the extent outside the lock (tracking): record
/// the page dirty, so the commit copies it again, and let the write through; or the commit is
/// done and the extent is a huge page now: wake the writer to retry on it.
pub fn answer_wp(r: &Resolver, gpa: u64) -> Result<(), Failure> {
    let map = r.map.read();
    r.stats.wp_faults.inc();
    let extent = map.get(ExtentIndex::of(gpa)).expect("gpa is inside RAM");
    let page = r.map.ram().host_at(gpa);
    if extent.is_claimed() {
        // As for a missing fault: the claimant wakes the extent.
        return Ok(());
    }
    let result = if extent.is_tracking() {
        extent.mark_dirty(page_in_extent(gpa));
        r.uffd.write_protect(page, PAGE_SIZE, false, true)
    } else {
        r.uffd.wake(page, PAGE_SIZE)
    };
    result
        .map_err(|e| format!("letting a write-protected writer at {gpa:#x} go failed: {e}").into())
}
