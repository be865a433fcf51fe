//! Memory images: guest RAM saved to a file, and served back from it.
//!
//! Format: a 4 KiB header (magic `VMMIMAGE`, version, RAM size, page size), then the RAM bytes
//! at file offset 4096 + guest-physical address. Zero or never-touched pages are holes in a
//! sparse file. An image is written atomically: to a temporary file in the same directory,
//! fsynced, renamed over the target, then the directory is fsynced; a crash at any point
//! leaves either the old image or the new one, never half of one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{EXTENT_SIZE, MAX_RAM, PAGE_SIZE};

use crate::files::{self, FileError};
use crate::units::ByteSize;

const MAGIC: &[u8; 8] = b"VMMIMAGE";
const VERSION: u32 = 1;
/// Bytes before the RAM contents.
pub const HEADER_SIZE: u64 = 4096;
/// The largest raw RAM file served or converted (1 TiB: any guest this host could run).
pub const MAX_RAW_LEN: u64 = 1 << 40;

/// Errors about memory image files.
#[derive(Debug, thiserror::Error)]
pub enum RamImageError {
    /// The file could not be opened, or is not a regular file of a sane size.
    #[error(transparent)]
    File(#[from] FileError),
    /// The file is not an image.
    #[error("{} is not a vmm memory image (no VMMIMAGE header)", path.display())]
    NotAnImage {
        /// The file named.
        path: PathBuf,
    },
    /// The image holds a different amount of RAM.
    #[error("memory image {} holds {} of guest RAM but this VM has {}: restore it into {} of RAM", path.display(), ByteSize(*image_ram), ByteSize(*ram), ByteSize(*image_ram))]
    SizeMismatch {
        /// The file named.
        path: PathBuf,
        /// RAM size recorded in the image.
        image_ram: u64,
        /// RAM size of this VM.
        ram: u64,
    },
    /// The file is shorter than its header says.
    #[error("memory image {} is truncated: {len} bytes, expected {expected} (a {HEADER_SIZE}-byte header and {} of RAM)", path.display(), ByteSize(*ram))]
    Truncated {
        /// The file named.
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
        /// The file named.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length it should have.
        expected: u64,
        /// RAM size recorded in the image.
        ram: u64,
    },
    /// A read ended at the end of the file: the image shrank while the VM used it.
    #[error(
        "memory image {} ended early: reading {len} bytes at file offset {offset} reached the \
         end of the file (was it truncated while the VM ran?)",
        path.display()
    )]
    ShortRead {
        /// The file named.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// Bytes asked for.
        len: u64,
    },
    /// The file changed under the VM: the pages served so far came from what it held before.
    #[error(
        "memory image {} changed while the VM ran ({what}); pages already served came from the \
         old contents, so the VM cannot go on", path.display()
    )]
    Changed {
        /// The file named.
        path: PathBuf,
        /// How it changed.
        what: String,
    },
    /// Reading or writing failed.
    #[error("I/O error on memory image {}", path.display())]
    Io {
        /// The file named.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The save was stopped by a signal before it replaced anything.
    #[error("saving guest memory to {} was interrupted by a signal; the file was left as it was", path.display())]
    Interrupted {
        /// The target.
        path: PathBuf,
    },
}

impl RamImageError {
    /// Whether the error is about the file the user named (bad input), as opposed to an I/O
    /// failure while the VM ran.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            RamImageError::Io { .. }
                | RamImageError::ShortRead { .. }
                | RamImageError::Interrupted { .. }
        )
    }
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

/// What an image header says, or why it is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A valid header for this many bytes of RAM.
    Ram(u64),
    /// Not a header this VMM writes.
    NotAnImage,
}

/// Decodes the first bytes of a file as an image header (pure: the fuzz target's entry).
pub fn parse_header(bytes: &[u8]) -> Header {
    if bytes.len() < 32 {
        return Header::NotAnImage;
    }
    let word32 = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let word64 = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let ram = word64(16);
    // Every image this VMM writes holds a whole number of extents of some VM's RAM.
    if &bytes[0..8] != MAGIC
        || word32(8) != VERSION
        || u64::from(word32(12)) != HEADER_SIZE
        || word64(24) != PAGE_SIZE
        || ram == 0
        || !ram.is_multiple_of(EXTENT_SIZE)
        || ram > MAX_RAM
    {
        return Header::NotAnImage;
    }
    Header::Ram(ram)
}

/// An open, checked memory image.
#[derive(Debug)]
pub struct RamImage {
    file: File,
    path: PathBuf,
    /// Length and modification time when opened: a change means the file changed under us.
    opened: (u64, (i64, i64)),
    /// Guest-physical ranges that hold data in the file (the rest are holes, all zeroes).
    data: Vec<Range<u64>>,
    /// Bytes read from the file for guest RAM so far.
    bytes_read: crate::stats::Counter,
    /// Where guest-physical address 0 lies in the file: after the header, or 0 in a raw file.
    data_offset: u64,
    /// Bytes of RAM the file holds.
    ram_size: u64,
}

impl RamImage {
    /// Opens `path` and checks it is a complete image of exactly `ram_size` bytes of RAM.
    pub fn open(path: &Path, ram_size: u64) -> Result<RamImage, RamImageError> {
        let image = Self::open_saved(path)?;
        if image.ram_size != ram_size {
            return Err(RamImageError::SizeMismatch {
                path: path.into(),
                image_ram: image.ram_size,
                ram: ram_size,
            });
        }
        Ok(image)
    }

    /// Opens `path` and checks it is a complete image, of whatever size its header says.
    pub fn open_saved(path: &Path) -> Result<RamImage, RamImageError> {
        let p = || path.to_path_buf();
        let (file, len) = files::open_regular(path, "memory image", HEADER_SIZE + MAX_RAM)?;
        let mut h = [0u8; 32];
        if len < h.len() as u64 {
            return Err(RamImageError::NotAnImage { path: p() });
        }
        file.read_exact_at(&mut h, 0)
            .map_err(|source| RamImageError::Io { path: p(), source })?;
        let Header::Ram(image_ram) = parse_header(&h) else {
            return Err(RamImageError::NotAnImage { path: p() });
        };
        let expected = HEADER_SIZE.saturating_add(image_ram);
        if len < expected {
            return Err(RamImageError::Truncated {
                path: p(),
                len,
                expected,
                ram: image_ram,
            });
        }
        if len > expected {
            return Err(RamImageError::TooLong {
                path: p(),
                len,
                expected,
                ram: image_ram,
            });
        }
        Self::from_file(file, path, HEADER_SIZE, len)
    }

    /// Opens a raw file of guest RAM (no header; guest-physical address = file offset), as
    /// Firecracker's page servers read it. Its length is the caller's to check.
    pub fn open_raw(path: &Path, what: &'static str) -> Result<RamImage, RamImageError> {
        let (file, len) = files::open_regular(path, what, MAX_RAW_LEN)?;
        Self::from_file(file, path, 0, len)
    }

    fn from_file(
        file: File,
        path: &Path,
        data_offset: u64,
        len: u64,
    ) -> Result<RamImage, RamImageError> {
        let io = |source| RamImageError::Io {
            path: path.into(),
            source,
        };
        let data = data_ranges(&file, len)
            .map_err(io)?
            .into_iter()
            .filter_map(|r| {
                let start = r.start.max(data_offset) - data_offset;
                let end = r.end.min(len).saturating_sub(data_offset);
                (start < end).then_some(start..end)
            })
            .collect();
        let opened = (len, mtime(&file).map_err(io)?);
        Ok(RamImage {
            file,
            path: path.into(),
            opened,
            data,
            bytes_read: Default::default(),
            data_offset,
            ram_size: len - data_offset,
        })
    }

    /// Bytes of guest RAM the file holds.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Reads the RAM bytes at offset `gpa` in RAM (its regions laid end to end) into `buf`.
    pub fn read_at(&self, buf: &mut [u8], gpa: u64) -> Result<(), RamImageError> {
        let offset = self.data_offset + gpa;
        self.bytes_read.add(buf.len() as u64);
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| match source.kind() {
                io::ErrorKind::UnexpectedEof => RamImageError::ShortRead {
                    path: self.path.clone(),
                    offset,
                    len: buf.len() as u64,
                },
                _ => RamImageError::Io {
                    path: self.path.clone(),
                    source,
                },
            })
    }

    /// Bytes read for guest RAM so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.get()
    }

    /// Fails if the file was truncated, extended or written since it was opened (an image
    /// replaced by a rename is not a change: the VM keeps the one it opened).
    pub fn check_unchanged(&self) -> Result<(), RamImageError> {
        let changed = |what: String| RamImageError::Changed {
            path: self.path.clone(),
            what,
        };
        let io = |source| RamImageError::Io {
            path: self.path.clone(),
            source,
        };
        let len = self.file.metadata().map_err(io)?.len();
        if len != self.opened.0 {
            return Err(changed(format!(
                "it is {len} bytes now, {} when it was opened",
                self.opened.0
            )));
        }
        if mtime(&self.file).map_err(io)? != self.opened.1 {
            return Err(changed("it was written to".into()));
        }
        Ok(())
    }

    /// Whether `[gpa, gpa + len)` is a hole in the file: all zeroes, nothing to read.
    pub fn is_hole(&self, gpa: u64, len: u64) -> bool {
        !self.data.iter().any(|r| r.start < gpa + len && gpa < r.end)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A file's modification time, to the nanosecond.
fn mtime(file: &File) -> io::Result<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    Ok((meta.mtime(), meta.mtime_nsec()))
}

/// The whole file as one data range.
fn whole(len: u64) -> Vec<Range<u64>> {
    std::iter::once(0..len).collect()
}

/// File offset ranges that hold data (`SEEK_DATA`/`SEEK_HOLE`); the whole file where the file
/// system cannot tell.
fn data_ranges(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    let mut out = Vec::new();
    let mut at = 0i64;
    let fd = file.as_raw_fd();
    while (at as u64) < len {
        // SAFETY: lseek on our own fd changes only its offset, which nothing else uses (every
        // read is positioned).
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(whole(len)),
                _ => Err(err),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Ok(whole(len));
        }
        out.push(data as u64..hole as u64);
        at = hole;
    }
    Ok(out)
}

/// What a save found at one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The buffer holds the page (written unless it is all zeroes).
    Read,
    /// The page is known to be zero without reading it (never populated, a hole in the
    /// image it came from): left as a hole.
    Hole,
}

/// Writes an image of `ram_size` bytes atomically to `path`, a target checked before the guest
/// started: to a temporary file in the same directory, fsynced, renamed over `path` only if
/// `path` is still missing or a regular file, then the directory is fsynced. `page(gpa, buf)`
/// fills the 4 KiB page at `gpa` or says it is a hole; all-zero pages become holes too.
/// `interrupted()` is asked now and then: when it says yes, the save stops and the temporary
/// is removed, leaving `path` as it was. `label` names the target in errors (a VMM's option).
pub fn save(
    path: &Path,
    label: &'static str,
    ram_size: u64,
    page: impl FnMut(u64, &mut [u8; PAGE_SIZE as usize]) -> Result<Page, RamImageError>,
    interrupted: &dyn Fn() -> bool,
) -> Result<SaveStats, RamImageError> {
    write_pages(path, label, true, ram_size, page, interrupted)
}

/// [`save`], with the header (`with_header`) or without: a raw file of guest RAM, as
/// Firecracker's page servers read (`vmm image export`). `flag` names the output in errors.
pub fn write_pages(
    path: &Path,
    flag: &'static str,
    with_header: bool,
    ram_size: u64,
    mut page: impl FnMut(u64, &mut [u8; PAGE_SIZE as usize]) -> Result<Page, RamImageError>,
    interrupted: &dyn Fn() -> bool,
) -> Result<SaveStats, RamImageError> {
    let data_offset = if with_header { HEADER_SIZE } else { 0 };
    let err = |source| RamImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.file_name().is_none() {
        return Err(err(io::Error::other("the path names no file")));
    }
    let tmp = files::temporary_for(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(err)?;
        if with_header {
            file.write_all(&header(ram_size)).map_err(err)?;
        }
        // Sets the length first: everything not written below stays a hole.
        file.set_len(data_offset + ram_size).map_err(err)?;
        fail::fail_point!("save-start");
        let mut stats = SaveStats::default();
        let mut buf = [0u8; PAGE_SIZE as usize];
        for gpa in (0..ram_size).step_by(PAGE_SIZE as usize) {
            if gpa % (64 << 20) == 0 && interrupted() {
                return Err(RamImageError::Interrupted { path: path.into() });
            }
            if page(gpa, &mut buf)? == Page::Hole {
                stats.unpopulated_pages += 1;
                continue;
            }
            if buf.iter().all(|&b| b == 0) {
                stats.zero_pages += 1;
                continue;
            }
            file.write_all_at(&buf, data_offset + gpa).map_err(err)?;
            stats.data_pages += 1;
        }
        file.sync_all().map_err(err)?;
        drop(file);
        if interrupted() {
            return Err(RamImageError::Interrupted { path: path.into() });
        }
        files::replace_with(&tmp, path, flag)?;
        File::open(files::parent_dir(path))
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(stats)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Converts between this VMM's memory images and raw RAM files (`vmm image export|import`):
/// reads `from` (an image if `to_raw`, else raw RAM of a whole number of 2 MiB extents) and
/// writes `to` atomically and sparsely in the other form.
pub fn convert(from: &Path, to: &Path, to_raw: bool) -> Result<SaveStats, RamImageError> {
    let (source, flag) = if to_raw {
        (RamImage::open_saved(from)?, "the raw file")
    } else {
        let raw = RamImage::open_raw(from, "raw memory file")?;
        let len = raw.ram_size();
        if len == 0 || !len.is_multiple_of(EXTENT_SIZE) || len > MAX_RAM {
            return Err(RamImageError::File(FileError::Output {
                flag: "the raw file",
                path: from.into(),
                reason: format!(
                    "it is {len} bytes; a raw RAM file to import holds a whole number of 2 MiB \
                     extents, at most {}",
                    ByteSize(MAX_RAM)
                ),
            }));
        }
        (raw, "the image")
    };
    files::check_distinct(flag, from, to)?;
    let size = source.ram_size();
    let need = size + if to_raw { 0 } else { HEADER_SIZE };
    files::ImageTarget::check(flag, to, need)?;
    write_pages(
        to,
        flag,
        !to_raw,
        size,
        |gpa, buf| {
            if source.is_hole(gpa, PAGE_SIZE) {
                return Ok(Page::Hole);
            }
            source.read_at(buf, gpa)?;
            Ok(Page::Read)
        },
        &|| false,
    )
}

/// What a save wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SaveStats {
    /// Pages written.
    pub data_pages: u64,
    /// Pages read that held only zeroes (left as holes).
    pub zero_pages: u64,
    /// Pages known to be zero without reading them (left as holes).
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

    fn never() -> bool {
        false
    }

    fn filled(value: u8) -> impl FnMut(u64, &mut [u8; 4096]) -> Result<Page, RamImageError> {
        move |_, b| {
            b.fill(value);
            Ok(Page::Read)
        }
    }

    #[test]
    fn save_then_open_round_trips_sparsely() {
        let dir = tmpdir("roundtrip");
        let path = dir.join("ram.img");
        let ram = 4 << 20;
        let stats = save(
            &path,
            "the image",
            ram,
            |gpa, buf| {
                buf.fill(0);
                Ok(match gpa / PAGE_SIZE {
                    0 => Page::Hole,
                    7 => {
                        buf[10] = 0xab;
                        Page::Read
                    }
                    _ => Page::Read,
                })
            },
            &never,
        )
        .unwrap();
        assert_eq!(
            stats,
            SaveStats {
                data_pages: 1,
                zero_pages: 1022,
                unpopulated_pages: 1
            }
        );
        let image = RamImage::open(&path, ram).unwrap();
        let mut page = [0u8; 4096];
        image.read_at(&mut page, 7 * 4096).unwrap();
        assert_eq!(page[10], 0xab);
        // The hole map knows where the data is.
        assert!(!image.is_hole(7 * 4096, 4096));
        assert!(!image.is_hole(0, 2 << 20));
        assert!(image.is_hole(2 << 20, 2 << 20));
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
    fn a_failed_or_interrupted_save_leaves_the_old_image_alone() {
        let dir = tmpdir("atomic");
        let path = dir.join("ram.img");
        save(&path, "the image", 2 << 20, filled(1), &never).unwrap();
        let before = std::fs::read(&path).unwrap();
        // A save into a directory that does not exist fails before touching anything.
        assert!(
            save(
                &dir.join("missing/ram.img"),
                "the image",
                2 << 20,
                filled(2),
                &never
            )
            .is_err()
        );
        // A signal during the save.
        let e = save(&path, "the image", 2 << 20, filled(3), &|| true).unwrap_err();
        assert!(matches!(e, RamImageError::Interrupted { .. }), "{e}");
        // A page that cannot be read.
        let e = save(
            &path,
            "the image",
            2 << 20,
            |gpa, _| {
                if gpa == 8192 {
                    Err(RamImageError::ShortRead {
                        path: "x".into(),
                        offset: 0,
                        len: 1,
                    })
                } else {
                    Ok(Page::Hole)
                }
            },
            &never,
        )
        .unwrap_err();
        assert!(matches!(e, RamImageError::ShortRead { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_save_never_renames_over_anything_but_a_regular_file() {
        let dir = tmpdir("no-replace");
        let path = dir.join("ram.img");
        std::fs::create_dir(&path).unwrap();
        let e = save(&path, "the image", 2 << 20, filled(1), &never).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        assert!(path.is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_images_are_refused_with_reasons() {
        let dir = tmpdir("bad");
        let path = dir.join("ram.img");
        assert!(matches!(
            RamImage::open(&path, 2 << 20),
            Err(RamImageError::File(FileError::Open { .. }))
        ));
        assert!(matches!(
            RamImage::open(&dir, 2 << 20),
            Err(RamImageError::File(FileError::NotRegular { .. }))
        ));
        std::fs::write(&path, b"hello, not an image at all, really no").unwrap();
        assert!(matches!(
            RamImage::open(&path, 2 << 20),
            Err(RamImageError::NotAnImage { .. })
        ));
        save(&path, "the image", 4 << 20, filled(0), &never).unwrap();
        let e = RamImage::open(&path, 2 << 20).unwrap_err().to_string();
        assert!(
            e.contains("holds 4M") && e.contains("this VM has 2M") && e.contains("into 4M"),
            "{e}"
        );
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER_SIZE + (3 << 20)).unwrap();
        let e = RamImage::open(&path, 4 << 20).unwrap_err();
        assert!(matches!(e, RamImageError::Truncated { .. }), "{e}");
        f.set_len(HEADER_SIZE + (5 << 20)).unwrap();
        assert!(matches!(
            RamImage::open(&path, 4 << 20),
            Err(RamImageError::TooLong { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_image_changed_while_open_is_noticed() {
        let dir = tmpdir("changed");
        let path = dir.join("ram.img");
        save(&path, "the image", 2 << 20, filled(7), &never).unwrap();
        let image = RamImage::open(&path, 2 << 20).unwrap();
        image.check_unchanged().unwrap();
        // Replacing the file by a rename is not a change: the open image is the old one.
        save(&path, "the image", 2 << 20, filled(8), &never).unwrap();
        image.check_unchanged().unwrap();
        let image = RamImage::open(&path, 2 << 20).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"x", 9000)
            .unwrap();
        let e = image.check_unchanged().unwrap_err().to_string();
        assert!(
            e.contains("changed while the VM ran") && e.contains("written"),
            "{e}"
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let e = image.check_unchanged().unwrap_err().to_string();
        assert!(e.contains("4096 bytes now"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_image_truncated_while_open_says_so() {
        let dir = tmpdir("shrunk");
        let path = dir.join("ram.img");
        save(&path, "the image", 2 << 20, filled(7), &never).unwrap();
        let image = RamImage::open(&path, 2 << 20).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(HEADER_SIZE + 4096)
            .unwrap();
        let mut buf = [0u8; 4096];
        let e = image.read_at(&mut buf, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("ended early") && e.contains("truncated"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn headers_parse_only_when_every_field_matches() {
        let h = header(6 << 20);
        assert_eq!(parse_header(&h), Header::Ram(6 << 20));
        for i in [0, 8, 12, 24] {
            let mut bad = h;
            bad[i] ^= 1;
            assert_eq!(parse_header(&bad), Header::NotAnImage, "byte {i}");
        }
        assert_eq!(parse_header(&h[..31]), Header::NotAnImage);
        for odd_ram in [0, 1, 4096, (2 << 20) + 4096, MAX_RAM + (2 << 20)] {
            assert_eq!(
                parse_header(&header(odd_ram)),
                Header::NotAnImage,
                "{odd_ram}"
            );
        }
    }
}
