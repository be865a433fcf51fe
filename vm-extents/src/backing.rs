//! How guest RAM is backed and populated: the `--backing` and `--page-source` choices.

use std::path::PathBuf;
use std::str::FromStr;

/// What host pages back guest RAM from the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// 4 KiB pages, populated on demand (the collapse thread may promote extents later).
    #[default]
    Small,
    /// Transparent huge pages for all RAM, populated up front.
    Thp,
    /// hugetlb pages for all RAM, reserved and populated up front.
    Hugetlb,
}

crate::choice::choices!(Backing {
    Small = "small": "4 KiB pages, populated on demand (the collapse thread may promote extents later)",
    Thp = "thp": "Transparent huge pages for all RAM, populated up front",
    Hugetlb = "hugetlb": "hugetlb pages for all RAM, reserved and populated up front",
});

impl Backing {
    /// Extra `mmap` flags for the RAM mapping.
    pub fn mmap_flags(self) -> libc::c_int {
        match self {
            // NORESERVE: memory is committed as the guest touches it, not all at once.
            Backing::Small | Backing::Thp => libc::MAP_NORESERVE,
            // No NORESERVE: the kernel reserves every huge page at mmap time, so a short pool
            // fails here, with a clear error, instead of a SIGBUS in the middle of a run.
            Backing::Hugetlb => libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
        }
    }

    /// `madvise` advice applied to the whole mapping.
    pub fn madvise(self) -> Option<libc::c_int> {
        match self {
            // Keep the kernel (and khugepaged) from making huge pages behind the VMM's back:
            // promotion is the collapse thread's job, and the extent table must stay exact.
            Backing::Small => Some(libc::MADV_NOHUGEPAGE),
            Backing::Thp => Some(libc::MADV_HUGEPAGE),
            Backing::Hugetlb => None,
        }
    }

    /// Whether this backing populates all of RAM when it is mapped (unless a benchmark asks
    /// it not to, to measure faulting).
    pub fn prepopulated(self) -> bool {
        self != Backing::Small
    }
}

/// Where the contents of a page come from when it is first touched (`--page-source`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PageSourceKind {
    /// The host kernel fills faults (zeroes); the VMM asks the kernel what is populated.
    #[default]
    Kernel,
    /// The VMM's fault handler fills faults with zeroes.
    Zero,
    /// The VMM's fault handler fills faults from a memory image file.
    Image(PathBuf),
    /// A page server listening on this socket fills faults: guest RAM is handed to it over
    /// Firecracker's userfaultfd handoff ([`crate::handoff`]).
    External(PathBuf),
}

impl PageSourceKind {
    /// Whether the VMM's own userfaultfd handler serves faults for this source (with 4 KiB
    /// backing).
    pub fn uses_uffd(&self) -> bool {
        matches!(self, PageSourceKind::Zero | PageSourceKind::Image(_))
    }

    /// The name used in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            PageSourceKind::Kernel => "kernel",
            PageSourceKind::Zero => "zero",
            PageSourceKind::Image(_) => "image",
            PageSourceKind::External(_) => "external",
        }
    }
}

/// A page source written as none of `kernel`, `zero`, `image:PATH` or `external:SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid page source {0:?}: expected kernel, zero, image:PATH or external:SOCKET")]
pub struct UnknownPageSource(pub String);

impl FromStr for PageSourceKind {
    type Err = UnknownPageSource;
    fn from_str(s: &str) -> Result<Self, UnknownPageSource> {
        match s {
            "kernel" => Ok(PageSourceKind::Kernel),
            "zero" => Ok(PageSourceKind::Zero),
            _ => match s.split_once(':') {
                Some(("image", path)) if !path.is_empty() => Ok(PageSourceKind::Image(path.into())),
                Some(("external", path)) if !path.is_empty() => {
                    Ok(PageSourceKind::External(path.into()))
                }
                _ => Err(UnknownPageSource(s.into())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_name_bad_values() {
        assert_eq!(
            "image:/a/b".parse(),
            Ok(PageSourceKind::Image("/a/b".into()))
        );
        assert_eq!("zero".parse(), Ok(PageSourceKind::Zero));
        assert_eq!(
            "external:/run/s".parse(),
            Ok(PageSourceKind::External("/run/s".into()))
        );
        for bad in ["image:", "external:", "disk", "", "disk:/x"] {
            assert!(
                bad.parse::<PageSourceKind>()
                    .unwrap_err()
                    .to_string()
                    .contains("image:PATH")
            );
        }
        assert_eq!(Backing::Hugetlb.mmap_flags() & libc::MAP_NORESERVE, 0);
    }
}
