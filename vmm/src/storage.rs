//! Slower storage than this host's, as a page source: [`SlowSource`] wraps another and adds a
//! fixed latency to every read that returns data (`vmm uffd-serve --image-latency`, and the
//! restore benchmark's image latency).

use std::sync::Arc;
use std::time::Duration;

use vm_extents::ram_image::RamImageError;
use vm_extents::{Fill, PageSource};

/// `inner`, each read that returns data `latency` late (holes cost nothing, as on a real
/// sparse file).
pub struct SlowSource {
    /// The source read.
    pub inner: Arc<dyn PageSource>,
    /// Added to each read.
    pub latency: Duration,
}

impl SlowSource {
    /// `inner` as it is when `latency` is zero, else wrapped.
    pub fn wrap(inner: Arc<dyn PageSource>, latency: Duration) -> Arc<dyn PageSource> {
        if latency.is_zero() {
            inner
        } else {
            Arc::new(SlowSource { inner, latency })
        }
    }
}

impl PageSource for SlowSource {
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<Fill, RamImageError> {
        let fill = self.inner.fill(offset, buf)?;
        if fill == Fill::Data {
            std::thread::sleep(self.latency);
        }
        Ok(fill)
    }
}
