//! Child processes of `slate up`: started with their output in log files,
//! tied to the parent's life, and stopped by PID with SIGTERM (then SIGKILL
//! after a grace period).
#![allow(unsafe_code)]

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A started child process and where its log goes.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`. The child gets
    /// SIGTERM if this process dies, so a `kill -9` of `slate up` leaves no orphans.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        // Logs name volumes, tenants and paths: owner only (0600), whatever the umask.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the forked child before exec and only
            // calls prctl(2), which is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self { name: name.to_owned(), child, log: log.to_owned() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited, pointing at its log.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status}); see {}", self.name, self.log.display());
        }
        Ok(())
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        signal(self.pid(), libc::SIGTERM);
    }

    /// Waits up to `grace` for exit after SIGTERM, then SIGKILLs. Returns true on a clean exit.
    pub fn wait_or_kill(&mut self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return false;
                }
            }
        }
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a pid we started; no memory is involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Stops processes in reverse start order: SIGTERM to all of one group, then wait.
pub fn stop_all(procs: &mut [Proc], grace: Duration) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for p in procs.iter().rev() {
        p.terminate();
    }
    for p in procs.iter_mut().rev() {
        let clean = p.wait_or_kill(grace);
        out.push((p.name.clone(), clean));
    }
    out
}

/// A free TCP port on 127.0.0.1 for a server, never handed out twice by this process.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`,
/// 32768.. by default), so that the source port of some outgoing connection
/// cannot take a server's port between this choice and the server's bind.
pub fn free_port() -> Result<u16> {
    use std::sync::Mutex;
    static ISSUED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let (low, high) = (20_000u16, ephemeral_low().saturating_sub(1).max(20_001));
    let span = u32::from(high - low) + 1;
    let mut issued = ISSUED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut x =
        (std::process::id() ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos()) | 1;
    for _ in 0..1000 {
        // xorshift: cheap, and different processes start from different seeds.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let port = low + u16::try_from(x % span).unwrap_or(0);
        if issued.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            issued.push(port);
            return Ok(port);
        }
    }
    bail!("no free TCP port between {low} and {high} on 127.0.0.1")
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(32768)
}

/// Waits until `addr` accepts TCP connections, or `timeout`.
pub fn wait_for_port(addr: &str, timeout: Duration, proc_: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        proc_.check_alive()?;
        if Instant::now() > deadline {
            bail!("{} did not start listening on {addr} within {timeout:?}; see {}", proc_.name, proc_.log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
