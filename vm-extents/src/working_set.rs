//! A guest's working set: the order in which it first touched its RAM, recorded once by the
//! fault handlers and replayed by the restore prefetcher on later restores of the same image,
//! so that what the guest will want is fetched first, ahead of it (REAP's record and replay).
//!
//! Recording needs every first touch to be a fault the manager serves: a lazy restore with no
//! prefetcher (a prefetched extent is touched without a fault and would be missed).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::extent::PAGES_PER_EXTENT;
use crate::sync::lock;
use crate::{EXTENT_SIZE, PAGE_SIZE};

/// What a guest touched, in the order it first touched it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    /// Extent indexes (guest address / 2 MiB), each once, in first-touch order.
    pub extents: Vec<u32>,
    /// Page indexes (guest address / 4 KiB), each once, in first-touch order: the pages the
    /// guest faulted on one at a time, inside extents served at 4 KiB.
    pub pages: Vec<u32>,
}

impl WorkingSet {
    /// Checks the record against RAM of `size` bytes: every index inside it, none twice.
    pub fn check(&self, size: u64) -> Result<(), String> {
        let extents = size / EXTENT_SIZE;
        let pages = size / PAGE_SIZE;
        let mut seen = vec![false; pages as usize];
        for (what, list, n) in [
            ("extent", &self.extents, extents),
            ("page", &self.pages, pages),
        ] {
            seen[..n as usize].fill(false);
            for &i in list {
                if u64::from(i) >= n {
                    return Err(format!("{what} {i} is outside the RAM's {n} {what}s"));
                }
                if std::mem::replace(&mut seen[i as usize], true) {
                    return Err(format!("{what} {i} is listed twice"));
                }
            }
        }
        Ok(())
    }

    /// Bytes of the extents it names.
    pub fn extent_bytes(&self) -> u64 {
        self.extents.len() as u64 * EXTENT_SIZE
    }
}

/// Records first touches as the fault handlers serve them.
pub(crate) struct Recorder {
    extents_seen: Vec<AtomicU64>,
    pages_seen: Vec<AtomicU64>,
    order: Mutex<WorkingSet>,
}

/// Sets bit `i` of `bits`; whether it was clear.
fn first_time(bits: &[AtomicU64], i: usize) -> bool {
    let bit = 1u64 << (i % 64);
    bits[i / 64].fetch_or(bit, Ordering::Relaxed) & bit == 0
}

impl Recorder {
    /// A recorder for RAM of `size` bytes.
    pub(crate) fn new(size: u64) -> Self {
        let words = |n: u64| (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Recorder {
            extents_seen: words(size / EXTENT_SIZE),
            pages_seen: words(size / PAGE_SIZE),
            order: Mutex::default(),
        }
    }

    /// A fault at `gpa` is being served (`whole`: for its whole extent at once).
    pub(crate) fn touched(&self, gpa: u64, whole: bool) {
        let extent = (gpa / EXTENT_SIZE) as usize;
        let page = (gpa / PAGE_SIZE) as usize;
        let new_extent = first_time(&self.extents_seen, extent);
        let new_page = !whole && first_time(&self.pages_seen, page);
        if new_extent || new_page {
            let mut order = lock(&self.order);
            if new_extent {
                order.extents.push(extent as u32);
            }
            if new_page {
                order.pages.push(page as u32);
            }
        }
    }

    /// What was recorded so far.
    pub(crate) fn recorded(&self) -> WorkingSet {
        lock(&self.order).clone()
    }
}

const _: () = assert!(PAGES_PER_EXTENT == (EXTENT_SIZE / PAGE_SIZE) as usize);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_touches_are_recorded_once_in_order() {
        let r = Recorder::new(8 * EXTENT_SIZE);
        for gpa in [
            5 * EXTENT_SIZE + 3 * PAGE_SIZE,
            EXTENT_SIZE,
            5 * EXTENT_SIZE,
            5 * EXTENT_SIZE + 3 * PAGE_SIZE,
        ] {
            r.touched(gpa, false);
        }
        r.touched(7 * EXTENT_SIZE, true);
        let ws = r.recorded();
        assert_eq!(ws.extents, [5, 1, 7]);
        assert_eq!(ws.pages, [5 * 512 + 3, 512, 5 * 512]);
        assert_eq!(ws.check(8 * EXTENT_SIZE), Ok(()));
    }

    /// A source that notes the extent of every read it serves (the prefetcher's reads, here).
    struct Noted {
        inner: Arc<dyn crate::PageSource>,
        reads: Arc<Mutex<Vec<u32>>>,
    }

    impl crate::PageSource for Noted {
        fn fill(
            &self,
            offset: u64,
            buf: &mut [u8],
        ) -> Result<crate::Fill, crate::ram_image::RamImageError> {
            lock(&self.reads).push((offset / EXTENT_SIZE) as u32);
            self.inner.fill(offset, buf)
        }
    }

    /// Real faults record the order of first touches; a replay of that record has the
    /// prefetcher (one thread) read the recorded extents first, in the recorded order, then
    /// the rest.
    #[test]
    fn the_prefetcher_replays_the_recorded_order() {
        use crate::{Memory, MemoryConfig, PageSourceKind};
        use vm_memory::{Bytes, GuestAddress};
        const SIZE: u64 = 16 * EXTENT_SIZE;
        let dir = std::env::temp_dir().join(format!("vm-extents-ws-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("ram.img");
        crate::ram_image::save(
            &image,
            "memory image",
            SIZE,
            |gpa, page| {
                page[..8].copy_from_slice(&(gpa | 1).to_le_bytes());
                Ok(crate::ram_image::Page::Read)
            },
            &|| false,
        )
        .unwrap();
        let source = PageSourceKind::Image(image.clone());
        // Recorded: the guest's touches, here the test's own reads of guest RAM, each a fault
        // the handler serves.
        let config = MemoryConfig::builder(SIZE)
            .source(source.clone())
            .record_working_set(true)
            .build()
            .unwrap();
        assert_eq!(
            config.prefetch_threads(),
            0,
            "recording turns the prefetcher off"
        );
        let mut memory = Memory::new(config).unwrap();
        if let Err(e) = memory.start(Arc::new(|what| panic!("{what}"))) {
            eprintln!("SKIP: {e}");
            return;
        }
        let order = [9u64, 3, 12, 5];
        for &e in &order {
            let gpa = e * EXTENT_SIZE + 7 * PAGE_SIZE;
            let v: u64 = memory.ram().view().read_obj(GuestAddress(gpa)).unwrap();
            assert_eq!(v, gpa | 1);
        }
        let recorded = memory.working_set().unwrap();
        assert_eq!(recorded.extents, [9, 3, 12, 5]);
        assert_eq!(recorded.pages, order.map(|e| (e * 512 + 7) as u32));
        drop(memory);

        let reads = Arc::new(Mutex::new(Vec::new()));
        let noted = reads.clone();
        let config = MemoryConfig::builder(SIZE)
            .source(source)
            .prefetch_threads(1)
            .replay_working_set(Arc::new(recorded))
            .image_source_layer(move |inner| {
                Arc::new(Noted {
                    inner,
                    reads: noted.clone(),
                })
            })
            .build()
            .unwrap();
        let mut memory = Memory::new(config).unwrap();
        memory.start(Arc::new(|what| panic!("{what}"))).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while memory.counts().unwrap().unpopulated > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the prefetch never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let reads = lock(&reads).clone();
        assert_eq!(reads[..4], [9, 3, 12, 5], "{reads:?}");
        let mut rest = reads[4..].to_vec();
        rest.sort_unstable();
        rest.dedup();
        assert_eq!(rest.len(), 12, "then every other extent: {reads:?}");
        let v: u64 = memory
            .ram()
            .view()
            .read_obj(GuestAddress(PAGE_SIZE))
            .unwrap();
        assert_eq!(v, PAGE_SIZE | 1);
        drop(memory);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_record_for_other_ram_is_refused() {
        let ws = WorkingSet {
            extents: vec![1, 9],
            pages: vec![],
        };
        assert!(ws.check(8 * EXTENT_SIZE).unwrap_err().contains("extent 9"));
        let twice = WorkingSet {
            extents: vec![1, 1],
            pages: vec![],
        };
        assert!(twice.check(8 * EXTENT_SIZE).unwrap_err().contains("twice"));
    }
}
