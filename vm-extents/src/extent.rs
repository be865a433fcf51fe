//! The extent table: one entry per 2 MiB extent of guest RAM, behind the memory map lock
//! ([`crate::map`], which says who takes which side).
//!
//! Population happens under the *read* lock: many faults are served at once, each setting its
//! page's bit atomically. State changes that replace an extent's backing (`Small` → `Huge`)
//! happen only under the *write* lock. Every change, of either kind, bumps the extent's
//! generation, so a thread that dropped the lock and comes back can tell whether the extent
//! changed while it was not looking.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use crate::huge::page::PageKind;
use crate::{EXTENT_SIZE, PAGE_SIZE};

/// 4 KiB pages per 2 MiB extent.
pub const PAGES_PER_EXTENT: usize = (EXTENT_SIZE / PAGE_SIZE) as usize;
const WORDS: usize = PAGES_PER_EXTENT / 64;

/// Which extent of guest RAM: from a guest address
/// ([`GuestRam::extent_of`](crate::GuestRam::extent_of)), or handed out by the
/// [`ExtentTable`]'s iterator. Extents are numbered by offset in RAM (the regions laid end
/// to end), 2 MiB each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExtentIndex(pub(crate) usize);

impl ExtentIndex {
    /// The extent holding offset `gpa` in RAM (the manager's addresses are offsets).
    pub(crate) fn of(gpa: u64) -> Self {
        ExtentIndex((gpa / EXTENT_SIZE) as usize)
    }

    /// The offset in RAM of the extent's first byte.
    pub(crate) fn gpa(self) -> u64 {
        self.0 as u64 * EXTENT_SIZE
    }
}

/// What backs an extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentState {
    /// No page is populated.
    Unpopulated,
    /// Backed by 4 KiB pages, `populated` of them present (1..=512).
    Small {
        /// Populated 4 KiB pages.
        populated: u32,
    },
    /// Backed by one 2 MiB host page.
    Huge,
}

const KIND_SMALL: u8 = 0;
const KIND_THP: u8 = 1;
const KIND_HUGETLB: u8 = 2;

/// A bitmap of an extent's 4 KiB pages, bit `p` for page `p`.
pub type PageMask = [u64; WORDS];

/// Page `page`'s bit in a [`PageMask`].
pub(crate) fn mask_has(mask: &PageMask, page: usize) -> bool {
    mask[page / 64] & (1 << (page % 64)) != 0
}

/// One extent. Page bits and the generation are atomics so that faults, which hold only the
/// read lock, can record what they populated. They are sequentially consistent: the collapse
/// and the fault handler reason across several of them (a page's bit, then the tracking flag)
/// and must agree on one order.
#[derive(Debug, Default)]
pub struct Extent {
    pages: [AtomicU64; WORDS],
    kind: AtomicU8,
    generation: AtomicU64,
    /// Set while a collapse copies the extent outside the write lock; while it is set, the
    /// fault handler records in `dirty` every page the guest writes or populates.
    tracking: AtomicBool,
    /// Held by whoever installs a huge page over the extent with only the read side of the
    /// memory map (see [`ExtentClaim`]).
    claimed: AtomicBool,
    dirty: [AtomicU64; WORDS],
    /// Pages the guest gave back ([`crate::reclaim`]) and has not touched since: they read as
    /// zeroes whatever the page source holds, and a collapse must not bring them back.
    reclaimed: [AtomicU64; WORDS],
}

impl Extent {
    /// The extent's state.
    pub fn state(&self) -> ExtentState {
        if self.kind.load(Ordering::SeqCst) != KIND_SMALL {
            return ExtentState::Huge;
        }
        match self.populated() {
            0 => ExtentState::Unpopulated,
            n => ExtentState::Small { populated: n },
        }
    }

    /// The kind of huge page backing the extent; `None` unless it is huge.
    pub fn huge_kind(&self) -> Option<PageKind> {
        match self.kind.load(Ordering::SeqCst) {
            KIND_THP => Some(PageKind::Thp),
            KIND_HUGETLB => Some(PageKind::Hugetlb),
            _ => None,
        }
    }

    /// Pages given back and not touched since.
    pub fn reclaimed(&self) -> u32 {
        self.reclaimed
            .iter()
            .map(|w| w.load(Ordering::SeqCst).count_ones())
            .sum()
    }

    /// Whether page `page` was given back and not touched since.
    pub fn is_reclaimed(&self, page: usize) -> bool {
        self.reclaimed[page / 64].load(Ordering::SeqCst) & (1 << (page % 64)) != 0
    }

    /// Whether any of pages `first..first + n` was given back and not touched since.
    pub fn any_reclaimed(&self, first: usize, n: usize) -> bool {
        (first..first + n).any(|p| self.is_reclaimed(p))
    }

    /// Populated 4 KiB pages (512 for a huge extent).
    pub fn populated(&self) -> u32 {
        self.pages
            .iter()
            .map(|w| w.load(Ordering::SeqCst).count_ones())
            .sum()
    }

    /// Whether page `page` (0..512) is populated.
    pub fn is_populated(&self, page: usize) -> bool {
        self.pages[page / 64].load(Ordering::SeqCst) & (1 << (page % 64)) != 0
    }

    /// The generation: bumped on every change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Records that page `page` is now populated. Returns false if it already was (a fault
    /// raced with another on the same page), in which case nothing changes.
    /// A page given back is the guest's again once populated.
    pub fn mark_populated(&self, page: usize) -> bool {
        let bit = 1 << (page % 64);
        self.reclaimed[page / 64].fetch_and(!bit, Ordering::SeqCst);
        let old = self.pages[page / 64].fetch_or(bit, Ordering::SeqCst);
        if old & bit != 0 {
            return false;
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Records the pages the host kernel reports present (`present(page)`), where the kernel,
    /// not the VMM, populates memory; bumps the generation if any page is new. Pages are only
    /// ever added: a page the kernel populated stays populated until the extent becomes huge,
    /// so a report taken before another one that was applied first cannot roll the table back.
    pub fn add_present(&self, present: impl Fn(usize) -> bool) {
        let mut changed = false;
        for (w, word) in self.pages.iter().enumerate() {
            let bits = (0..64).fold(0u64, |acc, b| acc | (u64::from(present(w * 64 + b)) << b));
            self.reclaimed[w].fetch_and(!bits, Ordering::SeqCst);
            changed |= word.fetch_or(bits, Ordering::SeqCst) & bits != bits;
        }
        if changed {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Forgets every page (tests that undo what they injected).
    #[cfg(test)]
    pub fn clear_pages(&self) {
        for word in &self.pages {
            word.store(0, Ordering::SeqCst);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Starts recording the pages the guest writes (a collapse is about to copy the extent
    /// while the guest runs).
    pub fn start_tracking(&self) {
        for w in &self.dirty {
            w.store(0, Ordering::SeqCst);
        }
        self.tracking.store(true, Ordering::SeqCst);
    }

    /// Stops recording writes.
    pub fn stop_tracking(&self) {
        self.tracking.store(false, Ordering::SeqCst);
    }

    /// Whether writes are being recorded.
    pub fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// Records that the guest wrote or populated page `page` while tracking.
    pub fn mark_dirty(&self, page: usize) {
        self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::SeqCst);
    }

    /// The pages recorded dirty since tracking started.
    pub fn dirty_pages(&self) -> impl Iterator<Item = usize> + '_ {
        (0..PAGES_PER_EXTENT)
            .filter(|&p| self.dirty[p / 64].load(Ordering::SeqCst) & (1 << (p % 64)) != 0)
    }

    /// Marks the extent as backed by one huge page. Needs `&mut`, which only the memory map's
    /// write side hands out: no fault can be looking at the extent while its backing is
    /// replaced (only the install path calls it, and the huge backings at
    /// start). An [`ExtentClaim`] does the same with the read side held.
    /// Returns how many pages given back (and not touched since) the huge page brings back.
    pub fn set_huge(&mut self, kind: PageKind) -> u32 {
        self.make_huge(kind)
    }

    fn make_huge(&self, kind: PageKind) -> u32 {
        for w in &self.pages {
            w.store(u64::MAX, Ordering::SeqCst);
        }
        let reinflated = self
            .reclaimed
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst).count_ones())
            .sum();
        let kind = match kind {
            PageKind::Thp => KIND_THP,
            PageKind::Hugetlb => KIND_HUGETLB,
        };
        self.kind.store(kind, Ordering::SeqCst);
        self.tracking.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        reinflated
    }

    /// Whether someone holds the extent's claim.
    pub fn is_claimed(&self) -> bool {
        self.claimed.load(Ordering::SeqCst)
    }
}

/// The exclusive right to replace one extent's backing while only the read side of the memory
/// map is held: what a 2 MiB fault needs to move a huge page into an unpopulated extent. Every
/// other reader that would act on the extent (the fault handler, for a fault in it) finds it
/// claimed and leaves it to the claimant, who wakes the extent's waiters once it lets go; the
/// write side (which a collapse commit takes) cannot be had while the claimant reads. Released
/// on drop.
pub struct ExtentClaim<'a> {
    extent: &'a Extent,
}

impl ExtentClaim<'_> {
    /// The extent.
    pub fn extent(&self) -> &Extent {
        self.extent
    }

    /// Marks the extent as backed by one huge page of `kind`; returns how many pages given
    /// back it brings back.
    pub fn set_huge(&self, kind: PageKind) -> u32 {
        self.extent.make_huge(kind)
    }

    /// Records that the pages in `freed` were given back: they are no longer populated (a huge
    /// extent becomes one of 4 KiB pages, those not freed populated), and read as zeroes until
    /// the guest touches them again. The caller has discarded them already.
    pub fn give_back(&self, freed: &PageMask) {
        let extent = self.extent;
        let was_huge = extent.kind.load(Ordering::SeqCst) != KIND_SMALL;
        for (w, &bits) in freed.iter().enumerate() {
            if was_huge {
                extent.pages[w].store(!bits, Ordering::SeqCst);
            } else {
                extent.pages[w].fetch_and(!bits, Ordering::SeqCst);
            }
            extent.reclaimed[w].fetch_or(bits, Ordering::SeqCst);
        }
        extent.kind.store(KIND_SMALL, Ordering::SeqCst);
        extent.tracking.store(false, Ordering::SeqCst);
        extent.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Records pages the kernel populated while the claim was held (the extent's mapping was
    /// replaced and not yet watched by a userfaultfd).
    pub fn add_present(&self, present: impl Fn(usize) -> bool) {
        self.extent.add_present(present);
    }
}

impl Drop for ExtentClaim<'_> {
    fn drop(&mut self) {
        self.extent.claimed.store(false, Ordering::SeqCst);
    }
}

/// A claim taken with the write side held, to be used once the write side is let go: taking
/// it under the write side means no fault handler is inside the extent (each one after sees
/// the claim). Redeem it with [`ExtentTable::redeem`] under the read side; it must not be
/// dropped otherwise (the extent would stay claimed, and its faults held, for good).
#[must_use = "a claim ticket must be redeemed, or the extent stays claimed"]
pub struct ClaimTicket {
    index: ExtentIndex,
}

impl Drop for ClaimTicket {
    fn drop(&mut self) {
        debug_assert!(
            std::thread::panicking(),
            "the claim ticket for extent {} was dropped unredeemed",
            self.index.0
        );
    }
}

/// Counts of extents by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExtentCounts {
    /// Extents with no page populated.
    pub unpopulated: u64,
    /// Extents backed by 4 KiB pages.
    pub small: u64,
    /// Extents backed by a 2 MiB page.
    pub huge: u64,
    /// Populated 4 KiB pages in small extents.
    pub small_pages: u64,
}

/// The table of every extent of guest RAM.
#[derive(Debug)]
pub struct ExtentTable {
    extents: Vec<Extent>,
}

impl ExtentTable {
    /// A table for `ram_size` bytes (a multiple of 2 MiB), every extent unpopulated.
    pub fn new(ram_size: u64) -> Self {
        let n = (ram_size / EXTENT_SIZE) as usize;
        ExtentTable {
            extents: (0..n).map(|_| Extent::default()).collect(),
        }
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// The extent at `index`, if in range.
    pub fn get(&self, index: ExtentIndex) -> Option<&Extent> {
        self.extents.get(index.0)
    }

    /// The extent at `index` for a state change (write lock held).
    pub fn get_mut(&mut self, index: ExtentIndex) -> Option<&mut Extent> {
        self.extents.get_mut(index.0)
    }

    /// Claims extent `index` (see [`ExtentClaim`]); `None` if someone else holds it.
    pub fn claim(&self, index: ExtentIndex) -> Option<ExtentClaim<'_>> {
        let extent = self.get(index)?;
        extent
            .claimed
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| ExtentClaim { extent })
    }

    /// Claims extent `index` with the write side held (`&mut`), for use after it is let go
    /// (see [`ClaimTicket`]); `None` if someone else holds the claim.
    pub fn claim_for_later(&mut self, index: ExtentIndex) -> Option<ClaimTicket> {
        std::mem::forget(self.claim(index)?);
        Some(ClaimTicket { index })
    }

    /// The claim a ticket stands for.
    pub fn redeem(&self, ticket: ClaimTicket) -> ExtentClaim<'_> {
        let extent = self
            .get(ticket.index)
            .expect("a ticket's extent is in the table");
        debug_assert!(extent.is_claimed());
        std::mem::forget(ticket);
        ExtentClaim { extent }
    }

    /// Records that the page holding `gpa` is populated; false if it already was or `gpa` is
    /// outside RAM.
    pub fn mark_populated(&self, gpa: u64) -> bool {
        let page = ((gpa % EXTENT_SIZE) / PAGE_SIZE) as usize;
        self.get(ExtentIndex::of(gpa))
            .is_some_and(|e| e.mark_populated(page))
    }

    /// Whether the page holding `gpa` is populated.
    pub fn is_populated(&self, gpa: u64) -> bool {
        let page = ((gpa % EXTENT_SIZE) / PAGE_SIZE) as usize;
        self.get(ExtentIndex::of(gpa))
            .is_some_and(|e| e.is_populated(page))
    }

    /// Every extent with its index.
    pub fn iter(&self) -> impl Iterator<Item = (ExtentIndex, &Extent)> {
        self.extents
            .iter()
            .enumerate()
            .map(|(i, e)| (ExtentIndex(i), e))
    }

    /// Extents by state.
    pub fn counts(&self) -> ExtentCounts {
        let mut c = ExtentCounts::default();
        for (_, e) in self.iter() {
            match e.state() {
                ExtentState::Unpopulated => c.unpopulated += 1,
                ExtentState::Small { populated } => {
                    c.small += 1;
                    c.small_pages += u64::from(populated);
                }
                ExtentState::Huge => c.huge += 1,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Populate(u64),
        Sync(usize, Vec<bool>),
        Huge(usize),
    }

    fn op(extents: usize) -> impl Strategy<Value = Op> {
        let ram = extents as u64 * EXTENT_SIZE;
        prop_oneof![
            4 => (0..ram).prop_map(Op::Populate),
            1 => (0..extents, proptest::collection::vec(any::<bool>(), PAGES_PER_EXTENT))
                .prop_map(|(e, v)| Op::Sync(e, v)),
            1 => (0..extents).prop_map(Op::Huge),
        ]
    }

    /// The naive model: a set of populated pages per extent, a huge flag, a change counter.
    #[derive(Clone, Default)]
    struct Model {
        pages: Vec<Vec<bool>>,
        huge: Vec<bool>,
        changes: Vec<u64>,
    }

    proptest! {
        #[test]
        fn table_matches_naive_model(extents in 1usize..6, ops in proptest::collection::vec(op(5), 0..200)) {
            let ram = extents as u64 * EXTENT_SIZE;
            let mut table = ExtentTable::new(ram);
            let mut model = Model {
                pages: vec![vec![false; PAGES_PER_EXTENT]; extents],
                huge: vec![false; extents],
                changes: vec![0; extents],
            };
            for op in ops {
                match op {
                    Op::Populate(gpa) => {
                        let (e, p) = ((gpa / EXTENT_SIZE) as usize, ((gpa % EXTENT_SIZE) / PAGE_SIZE) as usize);
                        let expected = e < extents && !model.pages[e][p];
                        prop_assert_eq!(table.mark_populated(gpa), expected);
                        if expected {
                            model.pages[e][p] = true;
                            model.changes[e] += 1;
                        }
                    }
                    Op::Sync(e, present) => {
                        if e >= extents || model.huge[e] { continue; }
                        table.get(ExtentIndex(e)).unwrap().add_present(|p| present[p]);
                        let merged: Vec<bool> =
                            model.pages[e].iter().zip(&present).map(|(a, b)| *a || *b).collect();
                        if model.pages[e] != merged {
                            model.changes[e] += 1;
                            model.pages[e] = merged;
                        }
                    }
                    Op::Huge(e) => {
                        if e >= extents { continue; }
                        table.get_mut(ExtentIndex(e)).unwrap().set_huge(PageKind::Thp);
                        model.huge[e] = true;
                        model.pages[e] = vec![true; PAGES_PER_EXTENT];
                        model.changes[e] += 1;
                    }
                }
            }
            let mut counts = ExtentCounts::default();
            for (i, extent) in table.iter() {
                let n = model.pages[i.0].iter().filter(|&&b| b).count() as u32;
                let expected = if model.huge[i.0] {
                    counts.huge += 1;
                    ExtentState::Huge
                } else if n == 0 {
                    counts.unpopulated += 1;
                    ExtentState::Unpopulated
                } else {
                    counts.small += 1;
                    counts.small_pages += u64::from(n);
                    ExtentState::Small { populated: n }
                };
                prop_assert_eq!(extent.state(), expected);
                prop_assert_eq!(extent.generation(), model.changes[i.0]);
                for p in 0..PAGES_PER_EXTENT {
                    prop_assert_eq!(extent.is_populated(p), model.pages[i.0][p]);
                }
            }
            prop_assert_eq!(table.counts(), counts);
        }
    }

    #[test]
    fn a_claim_is_exclusive_and_let_go_on_drop() {
        let table = ExtentTable::new(2 * EXTENT_SIZE);
        let claim = table.claim(ExtentIndex(1)).unwrap();
        assert!(table.claim(ExtentIndex(1)).is_none());
        assert!(table.claim(ExtentIndex(0)).is_some());
        claim.set_huge(PageKind::Hugetlb);
        drop(claim);
        assert!(!table.get(ExtentIndex(1)).unwrap().is_claimed());
        assert_eq!(
            table.get(ExtentIndex(1)).unwrap().state(),
            ExtentState::Huge
        );
        assert!(table.claim(ExtentIndex(1)).is_some());
        assert!(table.claim(ExtentIndex(2)).is_none());
        // A claim taken for later holds until it is redeemed and dropped.
        let mut table = ExtentTable::new(4 * EXTENT_SIZE);
        let ticket = table.claim_for_later(ExtentIndex(3)).unwrap();
        assert!(table.claim(ExtentIndex(3)).is_none());
        assert!(table.claim_for_later(ExtentIndex(3)).is_none());
        drop(table.redeem(ticket));
        assert!(table.claim(ExtentIndex(3)).is_some());
    }

    #[test]
    fn concurrent_faults_count_each_page_once() {
        let table = std::sync::Arc::new(std::sync::RwLock::new(ExtentTable::new(4 * EXTENT_SIZE)));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let table = table.clone();
                std::thread::spawn(move || {
                    let t = table.read().unwrap();
                    (0..4 * EXTENT_SIZE / PAGE_SIZE)
                        .filter(|p| t.mark_populated(p * PAGE_SIZE))
                        .count()
                })
            })
            .collect();
        let served: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(served as u64, 4 * EXTENT_SIZE / PAGE_SIZE);
        let t = table.read().unwrap();
        assert_eq!(t.counts().small, 4);
        assert!(
            t.iter()
                .all(|(_, e)| e.generation() == PAGES_PER_EXTENT as u64)
        );
    }
}
