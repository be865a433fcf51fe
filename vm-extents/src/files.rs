//! Host files the manager reads and writes (guest files, memory images), checked before they
//! are used; a VMM may check its own outputs with the same rules.
//!
//! The rules, for every path a user names:
//! - a file the VMM reads (a guest program, a memory image) is opened without blocking, so a
//!   FIFO can never hang it, and must be a regular file no larger than a stated bound;
//! - a memory image is only ever written as a regular file the VMM creates or atomically
//!   replaces: it is never renamed over a device, a FIFO, a directory or a symbolic link;
//! - metrics may go to a FIFO or a character device the user names (as Firecracker's do),
//!   opened without blocking and never replaced; otherwise to a regular file, replaced
//!   atomically;
//! - every output target is checked (its type, that its directory is writable, that there is
//!   room) before the guest starts, so a run's result is never lost to a bad path at the end.

use std::fs::{File, FileType, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be opened.
    #[error("cannot open {what} {}", path.display())]
    Open {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The path names something that is not a regular file.
    #[error("{what} {} is {kind}, not a regular file", path.display())]
    NotRegular {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What it is instead ("a FIFO", "a directory"...).
        kind: &'static str,
    },
    /// The file is larger than the VMM reads.
    #[error("{what} {} is {len} bytes; at most {max} are allowed", path.display())]
    TooLarge {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// An output path names something the VMM will not write over.
    #[error("{flag} {}: {reason}", path.display())]
    Output {
        /// The option that named it.
        flag: &'static str,
        /// The path given.
        path: PathBuf,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// An output's directory is missing or not writable.
    #[error("{flag} {}: cannot create files in {}", path.display(), dir.display())]
    Unwritable {
        /// The option that named it.
        flag: &'static str,
        /// The path given.
        path: PathBuf,
        /// The directory.
        dir: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Not enough room for the output.
    #[error(
        "{flag} {}: the file system has {free} bytes free, but the output may need up to \
         {need}; free some space or name a path on another file system", path.display()
    )]
    NoSpace {
        /// The option that named it.
        flag: &'static str,
        /// The path given.
        path: PathBuf,
        /// Bytes the output may need.
        need: u64,
        /// Bytes free for this user.
        free: u64,
    },
}

/// "a directory", "a FIFO"...: what a non-regular file is, for messages.
pub fn kind_name(ft: FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a file"
    }
}

/// Opens `path` for reading without blocking and checks it is a regular file of at most
/// `max_len` bytes. Returns the file and its length.
pub fn open_regular(
    path: &Path,
    what: &'static str,
    max_len: u64,
) -> Result<(File, u64), FileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| FileError::Open {
            what,
            path: path.into(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| FileError::Open {
        what,
        path: path.into(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            what,
            path: path.into(),
            kind: kind_name(meta.file_type()),
        });
    }
    if meta.len() > max_len {
        return Err(FileError::TooLarge {
            what,
            path: path.into(),
            len: meta.len(),
            max: max_len,
        });
    }
    Ok((file, meta.len()))
}

/// The directory a path's file lives in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks that files can be created in `dir` by creating one and removing it: the only test
/// that answers for permissions, read-only mounts and quotas alike (root passes `access(2)`).
pub fn check_dir_writable(flag: &'static str, path: &Path, dir: &Path) -> Result<(), FileError> {
    let unwritable = |source| FileError::Unwritable {
        flag,
        path: path.into(),
        dir: dir.into(),
        source,
    };
    let meta = std::fs::metadata(dir).map_err(unwritable)?;
    if !meta.is_dir() {
        return Err(unwritable(io::Error::other(format!(
            "it is {}, not a directory",
            kind_name(meta.file_type())
        ))));
    }
    let probe = dir.join(format!(".vmm-probe-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .map_err(unwritable)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// In a sticky directory (such as `/tmp`) only a file's owner (or the directory's, or root)
/// may rename over it: the check `rename(2)` itself makes at the end, made up front.
pub fn check_sticky(flag: &'static str, path: &Path, dir: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::MetadataExt;
    let (Ok(file), Ok(d)) = (std::fs::symlink_metadata(path), std::fs::metadata(dir)) else {
        return Ok(());
    };
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    let sticky = d.mode() & libc::S_ISVTX != 0;
    if sticky && me != 0 && file.uid() != me && d.uid() != me {
        return Err(FileError::Output {
            flag,
            path: path.into(),
            reason: format!(
                "it belongs to user {} and {} is sticky, so this user may not replace it; \
                 name another file",
                file.uid(),
                dir.display()
            ),
        });
    }
    Ok(())
}

/// Bytes free for unprivileged use on the file system holding `dir`.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs writes one struct into our zeroed value and reads a NUL-ended path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `c` outlives the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A checked place to write a memory image: missing or a regular file (never a symbolic
/// link, a device, a FIFO or a directory), in a writable directory with room for `need` bytes.
#[derive(Debug, Clone)]
pub struct ImageTarget {
    path: PathBuf,
}

impl ImageTarget {
    /// Checks `path` for `flag`, for an image of at most `need` bytes.
    pub fn check(flag: &'static str, path: &Path, need: u64) -> Result<Self, FileError> {
        if path.file_name().is_none() {
            return Err(FileError::Output {
                flag,
                path: path.into(),
                reason: "the path names no file".into(),
            });
        }
        check_replaceable(flag, path)?;
        check_name_fits(flag, path)?;
        let dir = parent_dir(path);
        check_dir_writable(flag, path, &dir)?;
        check_sticky(flag, path, &dir)?;
        remove_stale_temporaries(path);
        let free = free_bytes(&dir).map_err(|source| FileError::Unwritable {
            flag,
            path: path.into(),
            dir: dir.clone(),
            source,
        })?;
        // Replacing an image frees its blocks only after the new one is complete.
        if free < need {
            return Err(FileError::NoSpace {
                flag,
                path: path.into(),
                need,
                free,
            });
        }
        Ok(ImageTarget { path: path.into() })
    }

    /// The path named.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Fails unless `path` is missing or a regular file (checked without following links).
pub fn check_replaceable(flag: &'static str, path: &Path) -> Result<(), FileError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FileError::Unwritable {
            flag,
            path: path.into(),
            dir: parent_dir(path),
            source,
        }),
        Ok(meta) if meta.file_type().is_file() => Ok(()),
        Ok(meta) => {
            let kind = kind_name(meta.file_type());
            let hint = if meta.file_type().is_symlink() {
                "; name the file it points to instead"
            } else {
                ""
            };
            Err(FileError::Output {
                flag,
                path: path.into(),
                reason: format!(
                    "it is {kind}; the VMM writes only regular files it creates or replaces \
                     whole{hint}"
                ),
            })
        }
    }
}

/// The longest file name the system takes (`NAME_MAX`).
pub const NAME_MAX: usize = 255;

/// The longest name [`temporary_for`] adds to a file's: `.` before it, `.tmp-` and a pid
/// after (pids have at most 7 digits: `pid_max` is at most 4194304).
const TEMPORARY_EXTRA: usize = ".".len() + ".tmp-".len() + 7;

/// Fails unless the temporary that an atomic write of `path` goes through has a name the file
/// system takes, so a long name is refused before anything runs, not when the output is
/// written.
pub fn check_name_fits(flag: &'static str, path: &Path) -> Result<(), FileError> {
    let len = path.file_name().map_or(0, |n| n.len());
    if len + TEMPORARY_EXTRA > NAME_MAX {
        return Err(FileError::Output {
            flag,
            path: path.into(),
            reason: format!(
                "its file name is {len} bytes; it is written as .NAME.tmp-PID first and then \
                 renamed, so a name may have at most {} bytes",
                NAME_MAX - TEMPORARY_EXTRA
            ),
        });
    }
    Ok(())
}

/// Fails if `a` and `b` name the same file (one path, or two names of one file), which an
/// output written while reading the input would destroy.
pub fn check_distinct(flag: &'static str, input: &Path, output: &Path) -> Result<(), FileError> {
    use std::os::unix::fs::MetadataExt;
    let same = match (std::fs::metadata(input), std::fs::metadata(output)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    if same {
        return Err(FileError::Output {
            flag,
            path: output.into(),
            reason: format!(
                "it is the file being read ({}); name a different output",
                input.display()
            ),
        });
    }
    Ok(())
}

/// The name of the temporary file an image is written to before it replaces `path`.
pub fn temporary_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned());
    parent_dir(path).join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Removes temporaries of earlier saves to `path` whose process is gone (killed mid-save).
fn remove_stale_temporaries(path: &Path) {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(parent_dir(path)) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if gone && regular {
            log::info!("removing {} left by an interrupted save", file);
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Renames the finished temporary `tmp` over `path`, checking again just before that `path`
/// is still missing or a regular file.
pub fn replace_with(tmp: &Path, path: &Path, flag: &'static str) -> Result<(), FileError> {
    check_replaceable(flag, path)?;
    std::fs::rename(tmp, path).map_err(|source| FileError::Unwritable {
        flag,
        path: path.into(),
        dir: parent_dir(path),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: creates a FIFO at a path in the test's own directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn inputs_must_be_regular_and_bounded() {
        let dir = tmpdir("inputs");
        let fifo = dir.join("f");
        mkfifo(&fifo);
        // Opening a FIFO without a writer would block forever without O_NONBLOCK.
        let e = open_regular(&fifo, "guest file", 100).unwrap_err();
        assert!(
            e.to_string().contains("is a FIFO, not a regular file"),
            "{e}"
        );
        let e = open_regular(&dir, "guest file", 100).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = open_regular(Path::new("/dev/zero"), "guest file", 100).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let big = dir.join("big");
        std::fs::write(&big, vec![1u8; 200]).unwrap();
        let e = open_regular(&big, "guest file", 100).unwrap_err();
        assert!(e.to_string().contains("200 bytes; at most 100"), "{e}");
        assert_eq!(open_regular(&big, "guest file", 200).unwrap().1, 200);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn image_targets_are_never_anything_but_regular_files() {
        let dir = tmpdir("targets");
        for bad in ["/dev/null", "/tmp"] {
            let e = ImageTarget::check("--save-memory", Path::new(bad), 1).unwrap_err();
            assert!(
                e.to_string().contains("not") || e.to_string().contains("it is"),
                "{e}"
            );
        }
        let link = dir.join("link");
        symlink("/dev/null", &link).unwrap();
        let e = ImageTarget::check("--save-memory", &link, 1).unwrap_err();
        assert!(e.to_string().contains("a symbolic link"), "{e}");
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        let e = ImageTarget::check("--save-memory", &fifo, 1).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = ImageTarget::check("--save-memory", &dir.join("x/y.img"), 1).unwrap_err();
        assert!(matches!(e, FileError::Unwritable { .. }), "{e}");
        let e = ImageTarget::check("--save-memory", &dir.join("a.img"), u64::MAX).unwrap_err();
        assert!(matches!(e, FileError::NoSpace { .. }), "{e}");
        ImageTarget::check("--save-memory", &dir.join("a.img"), 4096).unwrap();
        // Nothing left behind by the checks.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = tmpdir("stale");
        let path = dir.join("ram.img");
        // PIDs above the kernel's maximum never exist.
        let stale = dir.join(".ram.img.tmp-2147483600");
        let live = dir.join(format!(".ram.img.tmp-{}", std::process::id()));
        std::fs::write(&stale, b"x").unwrap();
        std::fs::write(&live, b"x").unwrap();
        ImageTarget::check("--save-memory", &path, 1).unwrap();
        assert!(!stale.exists());
        assert!(live.exists(), "a live process's temporary is left alone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
