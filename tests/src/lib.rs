//! Helpers for tests that run Slate's real processes: spawn a binary with a
//! guard that stops it by PID, pick free ports, wait for a port, find built
//! binaries, and make scratch directories on a real filesystem.
//!
//! Tests use real processes and real disks-as-files, so these helpers keep
//! the fiddly parts (cleanup on panic, O_DIRECT-capable directories, locating
//! binaries across packages) in one place. No helper ever kills by name: a
//! guard signals exactly the PID it spawned.

pub mod acked;
pub mod cluster;
pub mod disk;
pub mod pcap;
pub mod s3;

use rustix::process::{kill_process, Pid, Signal};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const TMPFS_MAGIC: u64 = 0x0102_1994;

/// A child process that is stopped (SIGTERM, then SIGKILL after a grace period) when dropped.
#[derive(Debug)]
pub struct ProcessGuard {
    child: Option<Child>,
    name: String,
}

impl ProcessGuard {
    /// Spawns `cmd` with stdin closed; stdout/stderr are inherited (captured by the test harness).
    pub fn spawn(name: &str, cmd: &mut Command) -> std::io::Result<Self> {
        let child = cmd.stdin(Stdio::null()).spawn()?;
        Ok(Self { child: Some(child), name: name.to_owned() })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok()).and_then(Pid::from_raw) {
            let _ = kill_process(pid, sig);
        }
    }

    /// True while the process has not exited.
    pub fn is_alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGKILL and reaps the process (a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `sig` and waits up to `grace` for the exit; SIGKILL after that (and returns `None`).
    pub fn stop_with(&mut self, sig: Signal, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(status)) = c.try_wait() {
            return Some(status);
        }
        if let Some(pid) = i32::try_from(c.id()).ok().and_then(Pid::from_raw) {
            let _ = kill_process(pid, sig);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} (pid {}) did not exit within {grace:?} of {sig:?}; killing it", self.name, c.id());
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// SIGTERM, wait (up to 30 s) and return the exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.stop_with(Signal::TERM, Duration::from_secs(30))
    }

    /// SIGINT, wait (up to 30 s) and return the exit status.
    pub fn interrupt(&mut self) -> Option<ExitStatus> {
        self.stop_with(Signal::INT, Duration::from_secs(30))
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(Signal::TERM);
            let _ = self.stop_with(Signal::TERM, Duration::from_secs(10));
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Waits until something accepts TCP connections on `addr`; false on timeout.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// The target directory (`.../target`) of the running test binary.
fn target_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(d));
    }
    // .../target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().ok()?;
    exe.parent()?.parent()?.parent().map(Path::to_path_buf)
}

/// Finds a built binary of this workspace (e.g. `slate-node`): the `CARGO_BIN_EXE_<name>`
/// variable if set, else next to the test binary (`target/<profile>/<name>`).
pub fn find_binary(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return candidate;
        }
        dir = d.parent();
    }
    panic!("binary {name} not found near {}; build it first (cargo build --bins)", exe.display())
}

/// A fresh scratch directory on a real filesystem (O_DIRECT works there; tmpfs does not).
/// Uses `SLATE_TEST_DIR` if set, else the system temp dir unless it is tmpfs, else the target dir.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let base = std::env::var_os("SLATE_TEST_DIR").map_or_else(
        || {
            let tmp = std::env::temp_dir();
            if is_tmpfs(&tmp) {
                target_dir().map_or(tmp, |t| t.join("slate-test-tmp"))
            } else {
                tmp
            }
        },
        PathBuf::from,
    );
    std::fs::create_dir_all(&base).expect("create scratch base");
    tempfile::Builder::new().prefix(prefix).tempdir_in(&base).expect("create scratch dir")
}

/// True when `path` is on tmpfs.
pub fn is_tmpfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| u64::try_from(s.f_type).unwrap_or(0) == TMPFS_MAGIC)
}

/// Creates a preallocated (fallocate) file of `size_bytes` to serve as a disk.
pub fn disk_file(path: &Path, size_bytes: u64) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    if rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size_bytes).is_err() {
        f.set_len(size_bytes)?;
    }
    f.sync_all()
}

/// A seed for a randomized test: `var` from the environment if set (to replay), else random.
/// Prints it so that a failure can be replayed.
pub fn seed_from_env(var: &str) -> u64 {
    let seed = std::env::var(var).ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("seed: {seed} (replay with {var}={seed})");
    seed
}
