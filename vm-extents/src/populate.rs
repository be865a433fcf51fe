//! Bringing the extent table and guest RAM in line before and around the guest's run: an
//! image copied in (prepopulated RAM, an eager restore), the extents the kernel mapped huge
//! marked so, and one extent's pages learned from the kernel.

use crate::EXTENT_SIZE;
use vm_memory::{Bytes, GuestAddress};

use super::MemoryError;
use super::backing::Backing;
use super::extent::{ExtentIndex, ExtentState, ExtentTable};
use super::fault::source::{Fill, PageSource};
use super::host_view;
use super::map::MemoryMap;
use super::ram::GuestRam;
use crate::huge::page::PageKind;

/// Brings one extent's populated pages up to date with the host kernel.
pub(super) fn sync_extent(map: &MemoryMap, index: ExtentIndex) -> std::io::Result<()> {
    let table = map.read();
    let Some(extent) = table.get(index) else {
        return Ok(());
    };
    if extent.state() == ExtentState::Huge {
        return Ok(());
    }
    let present = host_view::present_pages(map.ram().host_at(index.gpa()), EXTENT_SIZE)?;
    extent.add_present(|p| present[p]);
    Ok(())
}

/// Fills RAM from an image's page source, 2 MiB at a time (no other thread exists yet);
/// holes and zeroes are left as they are (RAM is zero there already).
pub(super) fn copy_image_into(ram: &GuestRam, source: &dyn PageSource) -> Result<(), MemoryError> {
    let mut buf = vec![0u8; EXTENT_SIZE as usize];
    for gpa in (0..ram.size()).step_by(EXTENT_SIZE as usize) {
        if source.fill(gpa, &mut buf)? == Fill::Zero {
            continue;
        }
        ram.by_offset()
            .write_slice(&buf, GuestAddress(gpa))
            .expect("the extent lies inside guest RAM");
    }
    Ok(())
}

/// Marks every extent of prepopulated RAM: huge where the kernel maps it with one 2 MiB entry,
/// small (fully populated) where THP fell back to 4 KiB pages.
pub(super) fn mark_huge_extents(
    ram: &GuestRam,
    table: &mut ExtentTable,
    backing: Backing,
) -> Result<(), MemoryError> {
    let base = ram.host_base();
    let huge = match backing {
        Backing::Hugetlb => None,
        _ => host_view::scan(
            base.raw(),
            (base + ram.size()).raw(),
            host_view::PAGE_IS_HUGE,
        )
        .map_err(MemoryError::KernelView)?,
    };
    let indices: Vec<ExtentIndex> = table.iter().map(|(i, _)| i).collect();
    for index in indices {
        let start = (base + index.gpa()).raw();
        let is_huge = match &huge {
            None => true,
            Some(ranges) => ranges
                .iter()
                .any(|r| r.start <= start && start + EXTENT_SIZE <= r.end),
        };
        let extent = table.get_mut(index).expect("index from the table");
        if is_huge {
            extent.set_huge(match backing {
                Backing::Hugetlb => PageKind::Hugetlb,
                _ => PageKind::Thp,
            });
        } else {
            extent.add_present(|_| true);
        }
    }
    if let Some(ranges) = huge {
        let huge_bytes: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        if huge_bytes < ram.size() {
            log::warn!(
                "THP backing: the kernel gave {} of {} MiB as huge pages; the rest is 4 KiB",
                huge_bytes >> 20,
                ram.size() >> 20
            );
        }
    }
    Ok(())
}
