//! Firecracker's userfaultfd handoff, both ways.
//!
//! The page server binds and listens on an `AF_UNIX` stream socket; the VMM creates a
//! userfaultfd (non-blocking, kernel faults included, `UFFD_FEATURE_EVENT_REMOVE`), registers
//! guest RAM with it for missing faults, connects, and sends exactly one message: a JSON array
//! describing the regions of guest RAM, with the uffd attached as `SCM_RIGHTS`. It sends
//! nothing else and keeps its end open for its whole life: the server takes EOF as the VMM
//! gone. The server resolves faults with `UFFDIO_COPY` from a raw memory file (guest RAM with
//! no header; each region's contents at its `offset`). Every page of a region handed over is
//! missing (Firecracker's own handlers rely on it: its `fault_all` example copies each whole
//! region at the first fault), so a VMM hands over only memory nobody has populated yet.
//!
//! A region is `{"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}`; both
//! page size fields hold bytes. Firecracker before 1.7 sends neither page size (4 KiB pages),
//! 1.7 to 1.11 only `page_size_kib`, 1.12 on both ([`Schema`]). Fields this code does not
//! know are ignored: the top level is an array so that fields can be added.
//!
//! [`Memory`](crate::Memory) is the VMM side with an external page source ([`hand_over`]);
//! the `vmm` binary's `vmm uffd-serve` is a server side built on [`receive`].

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{EXTENT_SIZE, PAGE_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::units::ByteSize;

/// The largest handshake accepted (a few thousand regions).
pub const MAX_HANDSHAKE: usize = 1 << 20;
/// The most regions a handshake may describe (each is checked against every other).
pub const MAX_REGIONS: usize = 4096;
/// How long a server waits for the whole handshake once the VMM has connected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// One region of guest RAM, as the handshake describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Region {
    /// Where the region starts in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Its length in bytes.
    pub size: usize,
    /// Where its contents start in the memory file.
    pub offset: u64,
    /// Its page size in bytes (Firecracker 1.12 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<usize>,
    /// Its page size, in bytes despite the name (Firecracker 1.7 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<usize>,
}

/// The handshake's versions: which page size fields a region carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    /// Firecracker before 1.7: no page size (4 KiB).
    V1_0,
    /// Firecracker 1.7 to 1.11: `page_size_kib` only.
    V1_7,
    /// Firecracker 1.12 on: `page_size` and `page_size_kib`.
    V1_12,
}

crate::choice::choices!(Schema {
    V1_0 = "1.0": "Firecracker before 1.7: no page size (4 KiB)",
    V1_7 = "1.7": "Firecracker 1.7 to 1.11: page_size_kib only",
    V1_12 = "1.12": "Firecracker 1.12 on: page_size and page_size_kib",
});

impl Region {
    /// A region of `size` bytes at `base` with pages of `page_size` bytes, as `schema` writes it.
    pub fn new(base: u64, size: usize, offset: u64, page_size: usize, schema: Schema) -> Self {
        Region {
            base_host_virt_addr: base,
            size,
            offset,
            page_size: (schema == Schema::V1_12).then_some(page_size),
            page_size_kib: (schema != Schema::V1_0).then_some(page_size),
        }
    }

    /// The region's page size in bytes: the newest field present, else 4 KiB.
    pub fn page_bytes(&self) -> u64 {
        self.page_size
            .or(self.page_size_kib)
            .unwrap_or(PAGE_SIZE as usize) as u64
    }

    /// The host address one past the region.
    pub fn end(&self) -> u64 {
        self.base_host_virt_addr + self.size as u64
    }

    /// Whether host address `addr` lies in the region.
    pub fn contains(&self, addr: u64) -> bool {
        (self.base_host_virt_addr..self.end()).contains(&addr)
    }
}

/// Why a handshake failed or was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// No page server is listening on the socket.
    #[error(
        "cannot connect to the page server socket {}: {source}; start the page server first \
         (for example `vmm uffd-serve {} FILE`)", path.display(), path.display()
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The socket failed.
    #[error("{what} on the handoff socket")]
    Io {
        /// What was being done.
        what: &'static str,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection before the handshake was whole.
    #[error("the VMM closed the connection after {0} bytes, before a whole handshake")]
    Closed(usize),
    /// The server was told to stop (a signal) while waiting for the handshake.
    #[error("stopped while waiting for the handshake")]
    Interrupted,
    /// The handshake did not come in time.
    #[error("no whole handshake within {HANDSHAKE_TIMEOUT:?} ({0} bytes came)")]
    Timeout(usize),
    /// The handshake carried no file descriptor.
    #[error("the handshake carried no userfaultfd (it must come as SCM_RIGHTS with the JSON)")]
    NoFd,
    /// The handshake's file descriptor is something else.
    #[error("the handshake's file descriptor is {0}, not a userfaultfd")]
    NotUffd(String),
    /// The handshake is too long.
    #[error("the handshake is over {MAX_HANDSHAKE} bytes")]
    TooLong,
    /// The handshake is not the JSON expected.
    #[error(
        "malformed handshake: {why}; expected a JSON array of {{\"base_host_virt_addr\", \
         \"size\", \"offset\", \"page_size\", \"page_size_kib\"}} objects, got {text:?}"
    )]
    Malformed {
        /// What is wrong.
        why: String,
        /// The start of what came.
        text: String,
    },
    /// A region that cannot be served.
    #[error("handshake region {index} (at {base:#x}, {size} bytes): {why}")]
    BadRegion {
        /// Its position in the array.
        index: usize,
        /// Its base address.
        base: u64,
        /// Its size.
        size: usize,
        /// What is wrong, and what is allowed.
        why: String,
    },
    /// The regions reach past the end of the memory file.
    #[error(
        "the handshake's regions reach {} into the memory file but {} holds {}: it is not this \
         guest's memory", ByteSize(*total), path.display(), ByteSize(*len)
    )]
    FileSize {
        /// Where the furthest region ends in the file.
        total: u64,
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
}

impl HandoffError {
    fn malformed(why: impl Into<String>, bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
        HandoffError::Malformed {
            why: why.into(),
            text,
        }
    }
}

/// The handshake's text for `regions`.
pub fn encode(regions: &[Region]) -> String {
    serde_json::to_string(regions).expect("plain data")
}

/// Parses a handshake's JSON into regions (checked by [`check`], not here).
pub fn parse(bytes: &[u8]) -> Result<Vec<Region>, HandoffError> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| HandoffError::malformed(format!("not JSON ({e})"), bytes))?;
    if !value.is_array() {
        return Err(HandoffError::malformed(
            "the top level is not an array",
            bytes,
        ));
    }
    serde_json::from_value(value).map_err(|e| HandoffError::malformed(e.to_string(), bytes))
}

/// Checks that `regions` can be served from a file of `file_len` bytes: at least one; each a
/// whole number of 4 KiB or 2 MiB pages (the two page fields agreeing), page aligned, at a
/// page-aligned offset; no two overlapping, in the address space or in the file; and all of
/// them inside the file. (The file may hold more: the pages a VMM populated itself before the
/// handoff are in it but in no region.)
pub fn check(regions: &[Region], file: &Path, file_len: u64) -> Result<(), HandoffError> {
    if regions.is_empty() {
        return Err(HandoffError::malformed("no regions", b"[]"));
    }
    if regions.len() > MAX_REGIONS {
        return Err(HandoffError::malformed(
            format!(
                "{} regions, more than the {MAX_REGIONS} allowed",
                regions.len()
            ),
            b"",
        ));
    }
    let mut reach = 0u64;
    for (index, r) in regions.iter().enumerate() {
        let bad = |why: String| HandoffError::BadRegion {
            index,
            base: r.base_host_virt_addr,
            size: r.size,
            why,
        };
        if let (Some(a), Some(b)) = (r.page_size, r.page_size_kib)
            && a != b
        {
            return Err(bad(format!(
                "page_size {a} and page_size_kib {b} disagree (both are bytes)"
            )));
        }
        let page = r.page_bytes();
        if page != PAGE_SIZE && page != EXTENT_SIZE {
            return Err(bad(format!(
                "page size {page} is not 4096 or 2097152 (bytes: 4 KiB pages, or 2 MiB hugetlb)"
            )));
        }
        if r.size == 0 || !(r.size as u64).is_multiple_of(page) {
            return Err(bad(format!(
                "the size is not a whole number of {page}-byte pages"
            )));
        }
        if r.base_host_virt_addr.checked_add(r.size as u64).is_none() {
            return Err(bad("it ends past the top of the address space".into()));
        }
        if !r.base_host_virt_addr.is_multiple_of(page) {
            return Err(bad(format!(
                "the base is not aligned to its {page}-byte pages"
            )));
        }
        if !r.offset.is_multiple_of(page) {
            return Err(bad(format!(
                "offset {} in the memory file is not aligned to its {page}-byte pages",
                r.offset
            )));
        }
        let file_end = r
            .offset
            .checked_add(r.size as u64)
            .ok_or_else(|| bad("it ends past the largest file offset".into()))?;
        if let Some(other) = regions[..index]
            .iter()
            .position(|o| o.base_host_virt_addr < r.end() && r.base_host_virt_addr < o.end())
        {
            return Err(bad(format!("it overlaps region {other}")));
        }
        if let Some(other) = regions[..index]
            .iter()
            .position(|o| o.offset < file_end && r.offset < o.offset + o.size as u64)
        {
            return Err(bad(format!(
                "its contents overlap region {other}'s in the memory file"
            )));
        }
        reach = reach.max(file_end);
    }
    if reach > file_len {
        return Err(HandoffError::FileSize {
            total: reach,
            path: file.into(),
            len: file_len,
        });
    }
    Ok(())
}

/// Whether `fd` is a userfaultfd (its `/proc/self/fd` link names the anonymous inode), or
/// what it is instead.
pub fn check_userfaultfd(fd: &impl AsRawFd) -> Result<(), HandoffError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("a descriptor that cannot be looked at ({e})"));
    if link == "anon_inode:[userfaultfd]" {
        Ok(())
    } else {
        Err(HandoffError::NotUffd(link))
    }
}

/// The VMM side: connects to the page server at `socket` and sends `regions` with `uffd`. The
/// stream is the VMM's to keep open for as long as guest RAM lives.
pub fn hand_over(
    socket: &Path,
    regions: &[Region],
    uffd: &impl AsRawFd,
) -> Result<UnixStream, HandoffError> {
    let stream = UnixStream::connect(socket).map_err(|source| HandoffError::Connect {
        path: socket.into(),
        source,
    })?;
    let text = encode(regions);
    let sent = stream
        .send_with_fd(text.as_bytes(), uffd.as_raw_fd())
        .map_err(|e| HandoffError::Io {
            what: "sending the handshake",
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
    if sent != text.len() {
        return Err(HandoffError::Io {
            what: "sending the handshake",
            source: io::Error::other(format!("only {sent} of {} bytes went", text.len())),
        });
    }
    Ok(stream)
}

/// The server side: reads one handshake (JSON with a file descriptor) from `stream`, reading on
/// until the JSON is whole, for at most [`HANDSHAKE_TIMEOUT`], or until a signal comes after
/// which `stopped` says true.
pub fn receive(
    stream: &UnixStream,
    stopped: &dyn Fn() -> bool,
) -> Result<(Vec<Region>, std::fs::File), HandoffError> {
    let io = |what| move |source| HandoffError::Io { what, source };
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut text = Vec::new();
    let mut fd = None;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandoffError::Timeout(text.len()));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(io("setting a timeout"))?;
        let (n, file) = match stream.recv_with_fd(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.errno(), libc::EAGAIN | libc::EINTR) => {
                if stopped() {
                    return Err(HandoffError::Interrupted);
                }
                continue;
            }
            Err(e) => {
                return Err(HandoffError::Io {
                    what: "reading the handshake",
                    source: io::Error::from_raw_os_error(e.errno()),
                });
            }
        };
        if file.is_some() {
            fd = file;
        }
        if n == 0 {
            if text.is_empty() {
                return Err(HandoffError::Closed(0));
            }
            // The VMM sent all it will: what came must be whole.
            return whole(&text, fd);
        }
        text.extend_from_slice(&buf[..n]);
        if text.len() > MAX_HANDSHAKE {
            return Err(HandoffError::TooLong);
        }
        match serde_json::from_slice::<serde_json::Value>(&text) {
            Err(e) if e.is_eof() => continue,
            _ => {
                stream
                    .set_read_timeout(None)
                    .map_err(io("clearing a timeout"))?;
                return whole(&text, fd);
            }
        }
    }
}

/// A whole handshake's regions and its descriptor, which must be a userfaultfd.
fn whole(
    text: &[u8],
    fd: Option<std::fs::File>,
) -> Result<(Vec<Region>, std::fs::File), HandoffError> {
    let regions = parse(text)?;
    let fd = fd.ok_or(HandoffError::NoFd)?;
    check_userfaultfd(&fd)?;
    Ok((regions, fd))
}

/// The process at the other end of `stream` (`SO_PEERCRED`).
pub fn peer_pid(stream: &UnixStream) -> io::Result<libc::pid_t> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into our `ucred`.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// A pidfd for the process at the other end of `stream`: `SO_PEERPIDFD` (Linux 6.5+), which
/// names the very process that connected, else `pidfd_open` of its `SO_PEERCRED` pid (taken
/// while it is still connected, so while that pid is still its own).
pub fn peer_pidfd(stream: &UnixStream) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut raw: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_PEERPIDFD writes one int (a new descriptor) into `raw`.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut raw).cast(),
            &mut len,
        )
    };
    if ret < 0 || raw < 0 {
        let pid = peer_pid(stream)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// Whether the other end of `stream` has closed it (or the socket failed), without waiting.
pub fn hung_up(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN: [(&str, Schema); 3] = [
        (
            r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0}]"#,
            Schema::V1_0,
        ),
        (
            r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]"#,
            Schema::V1_7,
        ),
        (
            r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#,
            Schema::V1_12,
        ),
    ];

    #[test]
    fn every_schema_round_trips_byte_for_byte() {
        for (text, schema) in GOLDEN {
            let region = Region::new(4096, 8192, 0, 4096, schema);
            assert_eq!(encode(std::slice::from_ref(&region)), text);
            let parsed = parse(text.as_bytes()).unwrap();
            assert_eq!(parsed, vec![region]);
            assert_eq!(parsed[0].page_bytes(), 4096);
            check(&parsed, Path::new("f"), 8192).unwrap();
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let text = r#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"later":1}]"#;
        assert_eq!(parse(text.as_bytes()).unwrap()[0].size, 4096);
    }

    #[test]
    fn bad_handshakes_say_what_is_wrong() {
        let region = |base: u64, size: usize, offset: u64, page: Option<usize>| Region {
            base_host_virt_addr: base,
            size,
            offset,
            page_size: page,
            page_size_kib: page,
        };
        let refused = |regions: &[Region], len: u64| {
            check(regions, Path::new("mem"), len)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&[], 0).contains("no regions"));
        let many = vec![region(0, 4096, 0, None); MAX_REGIONS + 1];
        assert!(refused(&many, 0).contains("more than the 4096 allowed"));
        assert!(refused(&[region(0, 4096, 0, Some(8192))], 4096).contains("not 4096 or 2097152"));
        assert!(refused(&[region(0, 6000, 0, None)], 6000).contains("whole number"));
        assert!(refused(&[region(4096, 2 << 20, 0, Some(2 << 20))], 2 << 20).contains("aligned"));
        assert!(refused(&[region(0, 4096, 100, None)], 8192).contains("offset 100"));
        let gap = [region(0, 4096, 0, None), region(8192, 4096, 8192, None)];
        check(&gap, Path::new("mem"), 12288).unwrap();
        let overlap = [region(0, 8192, 0, None), region(4096, 4096, 8192, None)];
        assert!(refused(&overlap, 12288).contains("overlaps region 0"));
        let same_file = [region(0, 8192, 0, None), region(8192, 4096, 4096, None)];
        assert!(refused(&same_file, 12288).contains("overlap region 0's in the memory file"));
        assert!(refused(&[region(0, 8192, 0, None)], 4096).contains("reach 8K"));
        assert!(refused(&[region(0, 4096, 4096, None)], 4096).contains("holds 4K"));
        let mut disagree = region(0, 4096, 0, Some(4096));
        disagree.page_size_kib = Some(4);
        assert!(refused(&[disagree], 4096).contains("disagree"));
        for bad in [&b"{}"[..], b"[{\"size\":1}]", b"not json", b"[1]"] {
            assert!(parse(bad).unwrap_err().to_string().contains("malformed"));
        }
    }
}
