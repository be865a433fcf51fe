//! Memory images: guest RAM saved to a file, and served back from it.
//!
//! Format: a 4 KiB header (magic `VMMIMAGE`, version, RAM size, page size), then the RAM bytes
//! at file offset 4096 + guest-physical address. Zero or never-touched pages are holes in a
//! sparse file. An image is written atomically: to a temporary file in the same directory,
//! fsynced, renamed over the target, then the directory is fsynced; a crash at any point
//! leaves either the old image or the new one, never half of one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use guest_abi::layout::PAGE_SIZE;

use crate::config::ByteSize;

const MAGIC: &[u8; 8] = b"VMMIMAGE";
const VERSION: u32 = 1;
/// Bytes before the RAM contents.
pub const HEADER_SIZE: u64 = 4096;

/// Errors about memory image files.
#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    /// The file could not be opened.
    #[error("cannot open memory image {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not an image.
    #[error("{} is not a vmm memory image (no VMMIMAGE header); images are written by --save-memory", path.display())]
    NotAnImage {
        /// The file.
        path: PathBuf,
    },
    /// The image holds a different amount of RAM.
    #[error("memory image {} holds {image_ram} of guest RAM but --memory is {ram}; run with --memory {image_ram}", path.display())]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// RAM size recorded in the image.
        image_ram: ByteSize,
        /// RAM size of this VM.
        ram: ByteSize,
    },
    /// The file is shorter than its header says.
    #[error("memory image {} is truncated: {len} bytes, expected {expected} (a {HEADER_SIZE}-byte header and {} of RAM)", path.display(), ByteSize(*ram))]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length it should have.
        expected: u64,
        /// RAM size recorded in the image.
        ram: u64,
    },
    /// The file is longer than an image of its size.
    #[error("memory image {} is {len} bytes, expected {expected}: it is not an image of {} of RAM", path.display(), ByteSize(*ram))]
    TooLong {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length it should have.
        expected: u64,
        /// RAM size recorded in the image.
        ram: u64,
    },
    /// Reading or writing failed.
    #[error("I/O error on memory image {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn header(ram_size: u64) -> [u8; HEADER_SIZE as usize] {
    let mut h = [0u8; HEADER_SIZE as usize];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    h[16..24].copy_from_slice(&ram_size.to_le_bytes());
    h[24..32].copy_from_slice(&PAGE_SIZE.to_le_bytes());
    h
}

/// An open, checked memory image.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    path: PathBuf,
}

impl ImageFile {
    /// Opens `path` and checks it is a complete image of exactly `ram_size` bytes of RAM.
    pub fn open(path: &Path, ram_size: u64) -> Result<ImageFile, ImageFileError> {
        let p = || path.to_path_buf();
        let file = File::open(path).map_err(|source| ImageFileError::Open { path: p(), source })?;
        let len = file
            .metadata()
            .map_err(|source| ImageFileError::Io { path: p(), source })?
            .len();
        let mut h = [0u8; 32];
        if len < h.len() as u64 {
            return Err(ImageFileError::NotAnImage { path: p() });
        }
        file.read_exact_at(&mut h, 0)
            .map_err(|source| ImageFileError::Io { path: p(), source })?;
        let word32 = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let word64 = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        if &h[0..8] != MAGIC
            || word32(8) != VERSION
            || u64::from(word32(12)) != HEADER_SIZE
            || word64(24) != PAGE_SIZE
        {
            return Err(ImageFileError::NotAnImage { path: p() });
        }
        let image_ram = word64(16);
        let expected = HEADER_SIZE + image_ram;
        if len < expected {
            return Err(ImageFileError::Truncated {
                path: p(),
                len,
                expected,
                ram: image_ram,
            });
        }
        if len > expected {
            return Err(ImageFileError::TooLong {
                path: p(),
                len,
                expected,
                ram: image_ram,
            });
        }
        if image_ram != ram_size {
            return Err(ImageFileError::SizeMismatch {
                path: p(),
                image_ram: ByteSize(image_ram),
                ram: ByteSize(ram_size),
            });
        }
        Ok(ImageFile { file, path: p() })
    }

    /// Reads the RAM bytes at guest-physical `gpa` into `buf`.
    pub fn read_at(&self, buf: &mut [u8], gpa: u64) -> Result<(), ImageFileError> {
        self.file
            .read_exact_at(buf, HEADER_SIZE + gpa)
            .map_err(|source| ImageFileError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes an image of `ram_size` bytes atomically to `path`. `page(gpa)` returns the 4 KiB
/// page at `gpa`, or `None` for a page that is known to be unpopulated (a hole). All-zero pages
/// become holes too.
pub fn save(
    path: &Path,
    ram_size: u64,
    mut page: impl FnMut(u64, &mut [u8; PAGE_SIZE as usize]) -> bool,
) -> Result<SaveStats, ImageFileError> {
    let err = |source| ImageFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| err(io::Error::other("the path names no file")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(&header(ram_size))?;
        // Sets the length first: everything not written below stays a hole.
        file.set_len(HEADER_SIZE + ram_size)?;
        let mut stats = SaveStats::default();
        let mut buf = [0u8; PAGE_SIZE as usize];
        for gpa in (0..ram_size).step_by(PAGE_SIZE as usize) {
            if !page(gpa, &mut buf) {
                stats.unpopulated_pages += 1;
                continue;
            }
            if buf.iter().all(|&b| b == 0) {
                stats.zero_pages += 1;
                continue;
            }
            file.write_all_at(&buf, HEADER_SIZE + gpa)?;
            stats.data_pages += 1;
        }
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()?;
        Ok(stats)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// What a save wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SaveStats {
    /// Pages written.
    pub data_pages: u64,
    /// Populated pages that held only zeroes (left as holes).
    pub zero_pages: u64,
    /// Pages never populated (left as holes without being read).
    pub unpopulated_pages: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn save_then_open_round_trips_sparsely() {
        let dir = tmpdir("roundtrip");
        let path = dir.join("ram.img");
        let ram = 4 << 20;
        let stats = save(&path, ram, |gpa, buf| {
            buf.fill(0);
            match gpa / PAGE_SIZE {
                0 => false,
                7 => {
                    buf[10] = 0xab;
                    true
                }
                _ => true,
            }
        })
        .unwrap();
        assert_eq!(
            stats,
            SaveStats {
                data_pages: 1,
                zero_pages: 1022,
                unpopulated_pages: 1
            }
        );
        let image = ImageFile::open(&path, ram).unwrap();
        let mut page = [0u8; 4096];
        image.read_at(&mut page, 7 * 4096).unwrap();
        assert_eq!(page[10], 0xab);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), HEADER_SIZE + ram);
        assert!(
            meta.blocks() * 512 < 64 << 10,
            "sparse: {} blocks",
            meta.blocks()
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_save_leaves_the_old_image_alone() {
        let dir = tmpdir("atomic");
        let path = dir.join("ram.img");
        save(&path, 2 << 20, |_, b| {
            b.fill(1);
            true
        })
        .unwrap();
        let before = std::fs::read(&path).unwrap();
        // A save into a directory that does not exist fails before touching anything.
        assert!(save(&dir.join("missing/ram.img"), 2 << 20, |_, _| true).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_images_are_refused_with_reasons() {
        let dir = tmpdir("bad");
        let path = dir.join("ram.img");
        assert!(matches!(
            ImageFile::open(&path, 2 << 20),
            Err(ImageFileError::Open { .. })
        ));
        std::fs::write(&path, b"hello, not an image at all, really no").unwrap();
        assert!(matches!(
            ImageFile::open(&path, 2 << 20),
            Err(ImageFileError::NotAnImage { .. })
        ));
        save(&path, 4 << 20, |_, b| {
            b.fill(0);
            true
        })
        .unwrap();
        let e = ImageFile::open(&path, 2 << 20).unwrap_err().to_string();
        assert!(
            e.contains("holds 4M") && e.contains("--memory is 2M") && e.contains("--memory 4M"),
            "{e}"
        );
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER_SIZE + (3 << 20)).unwrap();
        let e = ImageFile::open(&path, 4 << 20).unwrap_err();
        assert!(matches!(e, ImageFileError::Truncated { .. }), "{e}");
        f.set_len(HEADER_SIZE + (5 << 20)).unwrap();
        assert!(matches!(
            ImageFile::open(&path, 4 << 20),
            Err(ImageFileError::TooLong { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
