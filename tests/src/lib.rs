//! Helpers for the end-to-end tests: find and run the `vmm` binary, skip or fail without KVM.
//!
//! As in the KVM selftests, raw helpers (`vmm`) return what happened and asserting helpers
//! (`vmm_ok`, `vmm_fails`) check it and say what they saw when it is not what they expected.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Longest any single VMM invocation in a test may take before the test kills it.
pub const RUN_LIMIT: Duration = Duration::from_secs(300);

/// Whether KVM tests can run. Without `/dev/kvm` they print `SKIP` and pass, unless
/// `VMM_REQUIRE_KVM=1`, in which case they fail.
pub fn kvm_available(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm is not usable and VMM_REQUIRE_KVM=1");
        }
        eprintln!("SKIP: no /dev/kvm ({test})");
    }
    usable
}

/// Returns early from a test when KVM is not there (see [`kvm_available`]).
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available(module_path!()) {
            return;
        }
    };
}

/// The `vmm` binary next to the test executable (`target/<profile>/vmm`).
pub fn vmm_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let bin = dir.join("vmm");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --bins`; `make test` does)",
        bin.display()
    );
    bin
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    fn from_output(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tail = |s: &str| {
            s.chars()
                .rev()
                .take(3000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        };
        write!(
            f,
            "exit code {:?}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            self.code,
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

/// Starts `vmm ARGS...` with piped output.
pub fn spawn(args: &[&str]) -> Child {
    Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm")
}

/// Waits until a `vmm uffd-serve` listens on `socket`, by connecting: its socket's file
/// appears at `bind`, before it listens, and a VMM that connects in between is refused. A
/// connection that closes without a handshake is not a VMM, and the server listens on after
/// it. Panics after a minute (a host that slow has other trouble).
pub fn wait_listening(socket: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "uffd-serve never listened on {socket}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for a child, killing it after [`RUN_LIMIT`], and collects its output.
pub fn wait(mut child: Child) -> Run {
    // Drain both pipes on threads so a chatty guest cannot block on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for vmm") {
            break status;
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            panic!("vmm ran longer than {RUN_LIMIT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run::from_output(Output {
        status,
        stdout: out_thread.join().expect("stdout reader"),
        stderr: err_thread.join().expect("stderr reader"),
    })
}

/// Runs `vmm ARGS...` to completion.
pub fn vmm(args: &[&str]) -> Run {
    wait(spawn(args))
}

/// Runs `vmm ARGS...` and asserts it exits 0.
#[track_caller]
pub fn vmm_ok(args: &[&str]) -> Run {
    let run = vmm(args);
    assert_eq!(run.code, Some(0), "vmm {args:?} should succeed\n{run}");
    run
}

/// Runs `vmm ARGS...` and asserts it exits with `code` and says each of `needles` on stderr.
#[track_caller]
pub fn vmm_fails(args: &[&str], code: u8, needles: &[&str]) -> Run {
    let run = vmm(args);
    assert_eq!(
        run.code,
        Some(i32::from(code)),
        "vmm {args:?}: wrong exit code\n{run}"
    );
    for needle in needles {
        assert!(
            run.stderr.contains(needle),
            "vmm {args:?}: stderr lacks {needle:?}\n{run}"
        );
    }
    assert!(
        !run.stderr.contains("panicked"),
        "vmm {args:?} panicked\n{run}"
    );
    run
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/vmm-test-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmm-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// A path inside the directory, as a string for command lines.
    pub fn path(&self, file: &str) -> String {
        self.0.join(file).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads a JSON file written by `--metrics`.
pub fn read_json(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {path}: {e}\n{text}"))
}

/// The values reported under `key` on stdout (`[vcpuN] key = value` lines), by vCPU.
pub fn reports(stdout: &str, key: &str) -> Vec<(u32, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("[vcpu")?;
            let (vcpu, rest) = rest.split_once("] ")?;
            let (k, v) = rest.split_once(" = ")?;
            (k == key).then(|| Some((vcpu.parse().ok()?, v.trim().parse().ok()?)))?
        })
        .collect()
}

/// The 2 MiB hugetlb pool: `(total, free)` pages.
pub fn hugetlb_pool() -> (u64, u64) {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (
        read("nr_hugepages"),
        read("free_hugepages").saturating_sub(read("resv_hugepages")),
    )
}

/// Whether `pages` free hugetlb pages are there. Without them a test prints `SKIP` and passes,
/// unless `VMM_REQUIRE_HUGETLB=1` (CI reserves a pool and sets it), in which case it fails.
pub fn hugetlb_available(test: &str, pages: u64) -> bool {
    let (total, free) = hugetlb_pool();
    if free >= pages {
        return true;
    }
    let why = format!(
        "{test}: needs {pages} free 2 MiB hugetlb pages, the pool has {free} free of {total} \
         (reserve them as root: echo N > /proc/sys/vm/nr_hugepages)"
    );
    if std::env::var("VMM_REQUIRE_HUGETLB").as_deref() == Ok("1") {
        panic!("{why}; VMM_REQUIRE_HUGETLB=1");
    }
    eprintln!("SKIP: {why}");
    false
}

/// Sums the values reported under `key` across vCPUs.
pub fn report_sum(stdout: &str, key: &str) -> u64 {
    reports(stdout, key).iter().map(|(_, v)| v).sum()
}

/// Splits a command line written as one string (no quoting: test paths have no spaces).
pub fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Serializes tests that use the hugetlb pool, so one test's pages do not starve another's.
pub fn hugetlb_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holds `pages` hugetlb pages (mapped and touched) until dropped, to shrink the free pool.
pub struct HugetlbHog {
    addr: *mut libc::c_void,
    len: usize,
}

impl HugetlbHog {
    /// Takes `pages` free pages, or `None` if the pool has fewer.
    pub fn take(pages: u64) -> Option<HugetlbHog> {
        if pages == 0 {
            return Some(HugetlbHog {
                addr: std::ptr::null_mut(),
                len: 0,
            });
        }
        let len = (pages << 21) as usize;
        // SAFETY: a fresh private hugetlb mapping owned by the returned value.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        (addr != libc::MAP_FAILED).then_some(HugetlbHog { addr, len })
    }
}

impl Drop for HugetlbHog {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: our own mapping.
            unsafe { libc::munmap(self.addr, self.len) };
        }
    }
}

/// Runs `vmm ARGS...` with extra environment variables, killing it after `limit`; returns what
/// it did and how long it took (`None` as the code if it had to be killed).
pub fn vmm_within(args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Run, Duration) {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("start vmm");
    loop {
        if child.try_wait().expect("wait for vmm").is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = start.elapsed();
    let mut run = Run::from_output(child.wait_with_output().expect("collect vmm output"));
    if took > limit {
        run.code = None;
    }
    (run, took)
}

/// Whether the tests run as root (some make device nodes or run the VMM as another user).
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// An unprivileged user with KVM: `nobody`, given a KVM device node of its own in a private
/// directory (the system's `/dev/kvm` is left as it is) and its own copy of the binary.
pub struct Nobody {
    /// A directory `nobody` may write in.
    pub dir: TempDir,
    kvm: String,
    bin: String,
}

impl Nobody {
    /// Sets it up; `None` (with `SKIP`) where the tests do not run as root.
    pub fn new(test: &str) -> Option<Nobody> {
        if !is_root() {
            eprintln!("SKIP: {test} runs the VMM as nobody, which needs root");
            return None;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("nobody");
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
        let kvm = dir.path("kvm");
        let status = Command::new("mknod")
            .args([&kvm, "c", "10", "232"])
            .status()
            .expect("mknod");
        assert!(status.success());
        let status = Command::new("chown")
            .args(["nobody", &kvm])
            .status()
            .expect("chown");
        assert!(status.success());
        let bin = dir.path("vmm");
        std::fs::copy(vmm_bin(), &bin).expect("copy the binary");
        Some(Nobody { dir, kvm, bin })
    }

    /// Runs `vmm ARGS...` as `nobody` with its KVM device, from its directory.
    pub fn vmm(&self, args: &[&str]) -> Run {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                &self.bin,
            ])
            .args(args)
            .args(["--kvm-device", &self.kvm])
            .current_dir(&self.dir.0)
            .stdin(Stdio::null())
            .output()
            .expect("run setpriv");
        Run::from_output(out)
    }
}

/// Runs `vmm ARGS...` as a user at a terminal would: standard output and error both on one
/// pseudo-terminal (standard input from nothing), with extra environment variables, killed
/// after `limit`. The terminal's output (CR LF turned back into LF) is in both `stdout` and
/// `stderr` of the result, since a terminal merges them.
pub fn vmm_on_terminal(args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Run, Duration) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, slave) = {
        let (mut m, mut s) = (-1, -1);
        // SAFETY: openpty writes two fresh descriptors; the optional arguments are null.
        let r = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both are fresh descriptors we own.
        unsafe {
            (
                std::fs::File::from(OwnedFd::from_raw_fd(m)),
                OwnedFd::from_raw_fd(s),
            )
        }
    };
    let mut cmd = Command::new(vmm_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(slave.try_clone().expect("dup the terminal"))
        .stderr(slave);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("start vmm");
    // Our copies of the terminal's side go, so the reader sees the end once the VMM exits.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let mut buf = [0u8; 64 << 10];
        // Reading stops with EIO once no process holds the terminal's side open.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            v.extend_from_slice(&buf[..n]);
        }
        v
    });
    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for vmm") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    let text =
        String::from_utf8_lossy(&reader.join().expect("terminal reader")).replace("\r\n", "\n");
    let run = Run {
        code: if killed { None } else { status.code() },
        stdout: text.clone(),
        stderr: text,
    };
    (run, took)
}

/// Asserts that no VMM thread in `run` was stopped by its seccomp filter.
#[track_caller]
pub fn assert_no_seccomp_stop(what: &str, run: &Run) {
    assert!(
        !run.stderr.contains("vmm: seccomp:"),
        "{what}: a thread made a system call outside its filter\n{run}"
    );
}

/// A system-wide setting (a file under `/proc/sys` or `/sys`) changed for as long as this
/// lives: the old value is written back on drop, also when the test panics, and from a
/// signal handler when the test binary gets SIGINT or SIGTERM (then the signal goes on to
/// end the process as it would have). Only SIGKILL leaves the setting changed. One setting is
/// changed at a time per test binary: the others wait, so a test never runs beside another
/// binary's-worth of tests that this setting could break (cargo runs test binaries one at a
/// time).
pub struct SystemSetting {
    path: PathBuf,
    old: String,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

mod restore_on_signal {
    use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

    /// The setting's path and old value, NUL-terminated, readable from a signal handler.
    static PATH: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];
    static OLD: [AtomicU8; 64] = [const { AtomicU8::new(0) }; 64];
    static OLD_LEN: AtomicUsize = AtomicUsize::new(0);
    static ARMED: AtomicBool = AtomicBool::new(false);

    /// Remembers what to write back if a signal comes; false if it does not fit.
    pub fn arm(path: &[u8], old: &[u8]) -> bool {
        if path.len() >= PATH.len() || old.len() > OLD.len() {
            return false;
        }
        for (slot, &b) in PATH.iter().zip(path.iter().chain([&0u8])) {
            slot.store(b, Ordering::Relaxed);
        }
        for (slot, &b) in OLD.iter().zip(old) {
            slot.store(b, Ordering::Relaxed);
        }
        OLD_LEN.store(old.len(), Ordering::Relaxed);
        ARMED.store(true, Ordering::SeqCst);
        static HANDLERS: std::sync::Once = std::sync::Once::new();
        HANDLERS.call_once(|| {
            for sig in [libc::SIGINT, libc::SIGTERM] {
                // SAFETY: installs a handler that makes only async-signal-safe calls.
                unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
            }
        });
        true
    }

    pub fn disarm() {
        ARMED.store(false, Ordering::SeqCst);
    }

    extern "C" fn on_signal(sig: libc::c_int) {
        if ARMED.swap(false, Ordering::SeqCst) {
            let path: [u8; 256] = std::array::from_fn(|i| PATH[i].load(Ordering::Relaxed));
            let old: [u8; 64] = std::array::from_fn(|i| OLD[i].load(Ordering::Relaxed));
            let len = OLD_LEN.load(Ordering::Relaxed);
            // SAFETY: open, write and close are async-signal-safe; both buffers are ours.
            unsafe {
                let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, old.as_ptr().cast(), len);
                    libc::close(fd);
                }
            }
        }
        // SAFETY: back to the default action, then the signal again: the process ends as it
        // would have without us.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

impl SystemSetting {
    /// Sets `path` to `value`; `None` (with `SKIP`) where the tests do not run as root.
    pub fn set(path: &str, value: &str) -> Option<SystemSetting> {
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        if !is_root() {
            eprintln!("SKIP: setting {path} needs root");
            return None;
        }
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let old = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {path}: {e}"))
            .trim()
            .to_string();
        assert!(
            restore_on_signal::arm(path.as_bytes(), old.as_bytes()),
            "{path}: too long to restore from a signal handler"
        );
        std::fs::write(path, value).unwrap_or_else(|e| panic!("write {value} to {path}: {e}"));
        Some(SystemSetting {
            path: path.into(),
            old,
            _one_at_a_time: guard,
        })
    }
}

impl Drop for SystemSetting {
    fn drop(&mut self) {
        restore_on_signal::disarm();
        if let Err(e) = std::fs::write(&self.path, &self.old) {
            eprintln!(
                "could not restore {} to {}: {e}",
                self.path.display(),
                self.old
            );
        }
    }
}

/// Writes built-in guest `name`'s executable into `dir` and returns its path: a guest file of
/// the user's own, which the VMM does not check arguments for.
pub fn builtin_as_file(dir: &TempDir, name: &str) -> String {
    let path = dir.path(&format!("{name}.elf"));
    let (_, bytes) = vmm::loader::BUILTIN_IMAGES
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no built-in guest {name}"));
    std::fs::write(&path, bytes).expect("write the guest file");
    path
}
