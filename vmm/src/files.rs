//! Where the metrics go: a regular file replaced atomically, or a FIFO or character device
//! written line by line. The rules for every other file are `vm_extents::files`'.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use vm_extents::files::*;

/// Where the metrics go.
#[derive(Debug)]
pub enum MetricsTarget {
    /// A regular file (missing or existing), replaced atomically when written; interval lines
    /// go to `<path>.jsonl`.
    File(PathBuf),
    /// A FIFO or character device, opened without blocking at start and written line by line,
    /// summary included; never replaced.
    Stream {
        /// The path given.
        path: PathBuf,
        /// The open stream.
        file: File,
    },
}

impl MetricsTarget {
    /// Checks (and for a stream, opens) `path` for `flag`.
    pub fn open(flag: &'static str, path: &Path) -> Result<Self, FileError> {
        match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_fifo() || meta.file_type().is_char_device() => {
                let file = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                    .open(path)
                    .map_err(|source| {
                        let reason = if source.raw_os_error() == Some(libc::ENXIO) {
                            "it is a FIFO that no process has open for reading; start the \
                             reader first"
                                .to_string()
                        } else {
                            format!("cannot open it for writing: {source}")
                        };
                        FileError::Output {
                            flag,
                            path: path.into(),
                            reason,
                        }
                    })?;
                Ok(MetricsTarget::Stream {
                    path: path.into(),
                    file,
                })
            }
            Ok(meta) if !meta.file_type().is_file() => Err(FileError::Output {
                flag,
                path: path.into(),
                reason: format!(
                    "it is {}; metrics go to a regular file, a FIFO or a character device",
                    kind_name(meta.file_type())
                ),
            }),
            // A regular file, perhaps through a symbolic link: write the file itself.
            Ok(_) => {
                let real = std::fs::canonicalize(path).map_err(|source| FileError::Open {
                    what: "metrics file",
                    path: path.into(),
                    source,
                })?;
                check_name_fits(flag, &real)?;
                check_dir_writable(flag, path, &parent_dir(&real))?;
                check_sticky(flag, &real, &parent_dir(&real))?;
                Self::check_lines(flag, &real)?;
                Ok(MetricsTarget::File(real))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                check_name_fits(flag, path)?;
                check_dir_writable(flag, path, &parent_dir(path))?;
                Self::check_lines(flag, path)?;
                Ok(MetricsTarget::File(path.into()))
            }
            Err(source) => Err(FileError::Open {
                what: "metrics file",
                path: path.into(),
                source,
            }),
        }
    }

    /// The interval lines' file must be a regular file (or missing) too, not a symbolic
    /// link (it is opened with `O_NOFOLLOW`), with a name the file system takes.
    fn check_lines(flag: &'static str, path: &Path) -> Result<(), FileError> {
        let lines = lines_path(path);
        let len = lines.file_name().map_or(0, |n| n.len());
        if len > NAME_MAX {
            return Err(FileError::Output {
                flag,
                path: path.into(),
                reason: format!(
                    "interval lines go to NAME.jsonl, whose name would be {len} bytes, more \
                     than the {NAME_MAX} a file name may have"
                ),
            });
        }
        match std::fs::symlink_metadata(&lines) {
            Ok(meta) if !meta.file_type().is_file() => Err(FileError::Output {
                flag,
                path: lines,
                reason: format!(
                    "it is {}; interval lines go to a regular file{}",
                    kind_name(meta.file_type()),
                    if meta.file_type().is_symlink() {
                        ", never through a symbolic link"
                    } else {
                        ""
                    }
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// Where `--metrics-interval` lines go for a regular metrics file: `<metrics path>.jsonl`.
pub fn lines_path(metrics: &Path) -> PathBuf {
    let mut name = metrics.as_os_str().to_owned();
    name.push(".jsonl");
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mkfifo(path: &Path) {
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(made.success());
    }

    #[test]
    fn metrics_may_go_to_streams_but_not_directories() {
        let dir = tmpdir("metrics");
        assert!(matches!(
            MetricsTarget::open("--metrics", Path::new("/dev/null")).unwrap(),
            MetricsTarget::Stream { .. }
        ));
        let fifo = dir.join("fifo");
        mkfifo(&fifo);
        let e = MetricsTarget::open("--metrics", &fifo).unwrap_err();
        assert!(
            e.to_string().contains("no process has open for reading"),
            "{e}"
        );
        let e = MetricsTarget::open("--metrics", &dir).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        assert!(matches!(
            MetricsTarget::open("--metrics", &dir.join("m.json")).unwrap(),
            MetricsTarget::File(_)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
