//! A whole Slate cluster for end-to-end tests: `slate up` in a scratch
//! directory, driven the way a user drives it.
//!
//! [`Cluster`] starts `slate up` as a child process, waits for `cluster.json`
//! (which `slate up` writes only once the volume is served), parses it, and on
//! drop stops `slate up` with SIGTERM and checks that every process named in
//! `cluster.json` is gone. On any failure to come up it prints the tail of
//! every log under `DIR/logs`, since that is where the cause is.
//!
//! Next to it are small wrappers for the real clients the acceptance tests use
//! (`qemu-io`, the `slate` CLI, the management API through `curl`), so that a
//! test reads as a list of user actions and checks. Every wrapper returns or
//! prints what it ran, so a failure names the exact command to rerun by hand.
//!
//! The `slate` binary (which runs every role of `slate up` itself) is not built
//! by `cargo test -p slate-tests`: build it first (`cargo build --bin slate`, same
//! target dir), or the tests drive whatever binary was built last.

use crate::{find_binary, scratch_dir, ProcessGuard};
use rustix::process::Signal;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One process `slate up` started, as listed in `cluster.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct ProcessEntry {
    /// "meta", "node" or "client".
    pub role: String,
    pub id: u64,
    pub pid: u32,
    pub addr: String,
    #[serde(default)]
    pub failure_domain: String,
    pub data: PathBuf,
    /// The process's Prometheus endpoint (`host:port`), if it serves one.
    #[serde(default)]
    pub metrics: Option<String>,
}

impl ProcessEntry {
    /// One line per extent state of a storage node's disk (`slate_node_extents`), for diagnostics.
    pub fn extent_states(&self) -> String {
        let Some(m) = &self.metrics else { return "no metrics endpoint".into() };
        let out = Command::new("curl").args(["-s", &format!("http://{m}/metrics")]).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with("slate_node_extents{"))
            .map(|l| l.trim_start_matches("slate_node_extents"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// One served volume, as listed in `cluster.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct VolumeEntry {
    pub name: String,
    pub nbd_unix: String,
    /// A libnbd URI with TLS (`nbds://…?tls-certificates=DIR`); [`qemu_io_with`] turns it into qemu's options.
    pub nbd_tcp: String,
    #[serde(default)]
    pub tls_creds_dir: Option<PathBuf>,
}

/// The parts of `cluster.json` the tests use.
#[derive(Clone, Debug, Deserialize)]
pub struct ClusterJson {
    pub ready: bool,
    pub api: String,
    pub ca: PathBuf,
    pub token_file: PathBuf,
    pub processes: Vec<ProcessEntry>,
    pub volumes: Vec<VolumeEntry>,
}

impl ClusterJson {
    /// The processes of one role, by id.
    pub fn role(&self, role: &str) -> Vec<&ProcessEntry> {
        let mut v: Vec<&ProcessEntry> = self.processes.iter().filter(|p| p.role == role).collect();
        v.sort_by_key(|p| p.id);
        v
    }
}

/// Options for `slate up` (first start only; a restart reuses the directory's state).
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub volume_size_bytes: u64,
    pub disk_size_bytes: u64,
    /// Blocks per segment of the demo volume (`None`: slate's default, 1 GiB).
    pub segment_blocks: Option<u64>,
    /// How long to wait for `cluster.json`.
    pub ready_timeout: Duration,
}

impl Default for UpOptions {
    fn default() -> Self {
        Self {
            volume_size_bytes: 256 << 20,
            disk_size_bytes: 512 << 20,
            segment_blocks: None,
            ready_timeout: Duration::from_mins(4),
        }
    }
}

/// A running `slate up`, stopped with SIGTERM on drop.
/// A test's data-plane client certificate (self-signed, as a host's is).
#[derive(Debug, Clone)]
pub struct DataPlaneIdentity {
    pub cert: PathBuf,
    /// 0600.
    pub key: PathBuf,
    /// What capabilities for this certificate are bound to.
    pub holder: slate_protocol::Holder,
}

impl DataPlaneIdentity {
    fn create(dir: &Path) -> Self {
        use std::os::unix::fs::OpenOptionsExt;
        let key = rcgen::KeyPair::generate().expect("a key pair");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("certificate params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "slate test client");
        let cert = params.self_signed(&key).expect("a self-signed certificate");
        let me = Self {
            cert: dir.join("test-client-cert.pem"),
            key: dir.join("test-client-key.pem"),
            holder: slate_protocol::Holder::of_certificate(cert.der()),
        };
        std::fs::write(&me.cert, cert.pem()).expect("write the test certificate");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&me.key)
            .expect("write the test key");
        std::io::Write::write_all(&mut f, key.serialize_pem().as_bytes()).expect("write the test key");
        me
    }
}

#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    scratch: Option<tempfile::TempDir>,
    up: Option<ProcessGuard>,
    info: Option<ClusterJson>,
    opts: UpOptions,
    /// The test's own data-plane identity (see [`Cluster::data_plane_identity`]).
    identity: std::sync::OnceLock<DataPlaneIdentity>,
}

impl Cluster {
    /// Starts `slate up` in a fresh scratch directory and waits until it serves the volume.
    pub fn start(prefix: &str, opts: UpOptions) -> Self {
        let scratch = scratch_dir(prefix);
        let dir = scratch.path().join("slate-data");
        let mut c =
            Self { dir, scratch: Some(scratch), up: None, info: None, opts, identity: std::sync::OnceLock::new() };
        c.launch();
        c
    }

    /// The `slate` binary under test.
    pub fn slate_bin() -> PathBuf {
        find_binary("slate")
    }

    fn launch(&mut self) {
        assert!(self.up.is_none(), "slate up is already running");
        std::fs::create_dir_all(&self.dir).expect("create the cluster dir");
        let log = self.dir.join("up.log");
        // Inside the cluster directory, so owner-only like everything `slate up` writes there.
        let out = std::os::unix::fs::OpenOptionsExt::mode(std::fs::OpenOptions::new().create(true).append(true), 0o600)
            .open(&log)
            .expect("open up.log");
        let err = out.try_clone().expect("dup up.log");
        let mut cmd = Command::new(Self::slate_bin());
        cmd.arg("up")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--volume-size")
            .arg(self.opts.volume_size_bytes.to_string())
            .arg("--disk-size")
            .arg(self.opts.disk_size_bytes.to_string());
        if let Some(sb) = self.opts.segment_blocks {
            cmd.arg("--segment-blocks").arg(sb.to_string());
        }
        cmd.stdout(out).stderr(err);
        let started = Instant::now();
        let guard = ProcessGuard::spawn("slate up", &mut cmd).expect("spawn slate up");
        eprintln!("[cluster] started slate up (pid {}) in {}", guard.pid(), self.dir.display());
        self.up = Some(guard);
        let path = self.cluster_json_path();
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Ok(info) = serde_json::from_str::<ClusterJson>(&text) {
                    if info.ready {
                        eprintln!("[cluster] ready after {:.1} s", started.elapsed().as_secs_f64());
                        self.info = Some(info);
                        return;
                    }
                }
            }
            let alive = self.up.as_mut().is_some_and(ProcessGuard::is_alive);
            if !alive || started.elapsed() > self.opts.ready_timeout {
                self.dump_logs();
                panic!(
                    "slate up {} within {:?} (no ready {}); logs above",
                    if alive { "was not ready" } else { "exited" },
                    self.opts.ready_timeout,
                    path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The directory given to `slate up --dir`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where scratch files of the test (outside the cluster's directory) may go.
    pub fn scratch(&self) -> &Path {
        self.dir.parent().unwrap_or(&self.dir)
    }

    /// `DIR/cluster.json`.
    pub fn cluster_json_path(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }

    /// The parsed `cluster.json` of the current run.
    pub fn info(&self) -> &ClusterJson {
        self.info.as_ref().expect("the cluster is not running")
    }

    /// The demo volume's entry.
    pub fn volume(&self) -> &VolumeEntry {
        &self.info().volumes[0]
    }

    /// The demo volume's NBD URI over the unix socket.
    pub fn nbd_unix(&self) -> String {
        self.volume().nbd_unix.clone()
    }

    /// The demo volume's NBD URI over TCP.
    pub fn nbd_tcp(&self) -> String {
        self.volume().nbd_tcp.clone()
    }

    /// The path of the demo volume's NBD unix socket (from its URI).
    pub fn nbd_socket(&self) -> PathBuf {
        let uri = &self.volume().nbd_unix;
        let p = uri.split("socket=").nth(1).expect("nbd_unix URI without socket=");
        PathBuf::from(p.split('&').next().unwrap_or(p))
    }

    /// The host token file `slate up` wrote for its demo host principal.
    pub fn host_token_file(&self) -> PathBuf {
        self.dir.join("meta").join("host.token")
    }

    /// The storage node processes.
    pub fn nodes(&self) -> Vec<ProcessEntry> {
        self.info().role("node").into_iter().cloned().collect()
    }

    /// Starts a storage node of this cluster again (after the test killed it), as `slate up`
    /// runs it: `slate run-node serve --config <its dir>/node.toml`, logging to
    /// `node-<id>.restart.log` in the scratch directory. The guard stops it by PID.
    pub fn restart_node(&self, node: &ProcessEntry) -> ProcessGuard {
        let config = node.data.parent().expect("node dir").join("node.toml");
        let log_path = self.scratch().join(format!("node-{}.restart.log", node.id));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("node log");
        let mut cmd = Command::new(Self::slate_bin());
        cmd.args(["run-node", "serve", "--config"]).arg(&config).stdout(log.try_clone().expect("dup log")).stderr(log);
        let guard = ProcessGuard::spawn(&format!("slate-node {}", node.id), &mut cmd).expect("spawn slate-node");
        eprintln!("[cluster] restarted node {} (pid {}), log {}", node.id, guard.pid(), log_path.display());
        guard
    }

    /// `GET /v1/status` on one metadata node (no token needed); `None` if it does not answer.
    pub fn meta_status(&self, addr: &str) -> Option<Value> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(&self.info().ca)
            .arg(format!("https://{addr}/v1/status"))
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The metadata leader's process, asked of every live metadata node (waits out an election).
    pub fn meta_leader(&self) -> ProcessEntry {
        let metas: Vec<ProcessEntry> = self.info().role("meta").into_iter().cloned().collect();
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            for m in metas.iter().filter(|m| pid_alive(m.pid)) {
                let Some(st) = self.meta_status(&m.addr) else { continue };
                if let Some(api) = st["leader_api"].as_str() {
                    if let Some(l) = metas.iter().find(|p| p.addr == api || api.ends_with(&p.addr)) {
                        return l.clone();
                    }
                }
            }
            assert!(Instant::now() < deadline, "no metadata leader found");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// A `slate` command pointed at this cluster (`--cluster DIR/cluster.json`).
    pub fn slate(&self) -> Command {
        let mut c = Command::new(Self::slate_bin());
        c.arg("--cluster").arg(self.cluster_json_path()).stdin(Stdio::null());
        c
    }

    /// Runs `slate --json ARGS` (operator token) and parses its output; panics on failure.
    pub fn slate_json(&self, args: &[&str]) -> Value {
        let out = self.slate().arg("--json").args(args).output().expect("run slate");
        assert!(
            out.status.success(),
            "slate {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("slate {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Runs `slate ARGS` against this cluster and returns its output, success or not.
    pub fn run_slate(&self, args: &[&str]) -> Output {
        self.slate().args(args).output().expect("run slate")
    }

    /// Runs `slate ARGS`, panics unless it succeeds, and returns its stdout.
    pub fn slate_ok(&self, args: &[&str]) -> String {
        let out = self.run_slate(args);
        assert!(out.status.success(), "slate {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `slate ARGS`, panics unless it fails with `why` in its error; returns the error text.
    pub fn slate_refused(&self, args: &[&str], why: &str) -> String {
        let out = self.run_slate(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "slate {args:?} should have been refused");
        assert!(err.contains(why), "slate {args:?}: expected {why:?} in: {err}");
        eprintln!("refused as expected: slate {}: {}", args.join(" "), err.trim());
        err
    }

    /// Starts `slate attach SPEC EXTRA... --export-name EXPORT --nbd-unix SOCK` (log in the scratch
    /// directory) and waits until it serves. Returns its guard and the socket; the NBD URI is
    /// [`nbd_unix_uri`]`(EXPORT, SOCK)`.
    pub fn attach_unix(&self, spec: &str, extra: &[&str], export: &str) -> (ProcessGuard, PathBuf) {
        let sock = self.scratch().join(format!("{export}.sock"));
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.scratch().join(format!("attach-{export}.log")))
            .expect("attach log");
        let mut cmd = self.slate();
        cmd.arg("attach")
            .arg(spec)
            .args(extra)
            .args(["--export-name", export, "--nbd-unix"])
            .arg(&sock)
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        let mut p = ProcessGuard::spawn("slate attach", &mut cmd).expect("spawn slate attach");
        assert!(
            wait_for_unix_socket(&sock, Duration::from_mins(2)) && p.is_alive(),
            "slate attach {spec} did not come up"
        );
        (p, sock)
    }

    /// `slate volume show NAME --json`.
    pub fn volume_show(&self, name: &str) -> Value {
        self.slate_json(&["volume", "show", name])
    }

    /// The test's own data-plane certificate and key (PEM files, made once): the
    /// capabilities [`Cluster::api`] hands the test are bound to it, so a test
    /// reaches storage nodes with `slate_dataplane::tls::Connector::tls(ca, identity)`.
    pub fn data_plane_identity(&self) -> &DataPlaneIdentity {
        self.identity.get_or_init(|| DataPlaneIdentity::create(self.scratch()))
    }

    /// Calls the management API with `curl` (the token is passed in a header file, never on the command line).
    /// Capabilities in the reply are bound to the test's data-plane certificate ([`Cluster::data_plane`]).
    /// Returns the HTTP status and the parsed body (`Value::Null` if empty or not JSON).
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>, token_file: &Path) -> (u16, Value) {
        let info = self.info();
        let token = std::fs::read_to_string(token_file).expect("read token file");
        let header = self.scratch().join(format!("auth-{}.hdr", std::process::id()));
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&header)
                .expect("write header file");
            std::io::Write::write_all(&mut f, format!("Authorization: Bearer {}\n", token.trim()).as_bytes())
                .expect("write header file");
        }
        let mut cmd = Command::new("curl");
        cmd.arg("-sS")
            .arg("--max-time")
            .arg("20")
            .arg("--cacert")
            .arg(&info.ca)
            .arg("-H")
            .arg(format!("@{}", header.display()))
            .arg("-H")
            .arg(format!("{}: {}", slate_protocol::capability::HOLDER_HEADER, self.data_plane_identity().holder))
            .arg("-X")
            .arg(method)
            .arg("-w")
            .arg("\n%{http_code}");
        if let Some(b) = body {
            cmd.arg("-H").arg("Content-Type: application/json").arg("--data-binary").arg(b.to_string());
        }
        cmd.arg(format!("{}{path}", info.api));
        let out = cmd.output().expect("run curl");
        let _ = std::fs::remove_file(&header);
        assert!(out.status.success(), "curl {method} {path} failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        let status: u16 = code.trim().parse().unwrap_or(0);
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// Creates a host principal of `tenant` (`slate token create NAME --role host`) and
    /// writes its token to a 0600 file in the scratch directory; returns (principal id, token file).
    pub fn host_principal(&self, name: &str, tenant: u64) -> (u64, PathBuf) {
        use std::os::unix::fs::OpenOptionsExt;
        let v = self.slate_json(&["token", "create", name, "--role", "host", "--tenant", &tenant.to_string()]);
        let id = v["principal"]["id"].as_u64().expect("principal id");
        let path = self.scratch().join(format!("{name}.token"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("create token file");
        let token = v["token"].as_str().expect("token");
        std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes()).expect("write token file");
        (id, path)
    }

    /// The sum over every metadata node of the Prometheus sample `series` (exact text
    /// before the value, e.g. `slate_meta_security_events_total{kind="lockout",source="127.0.0.1"}`).
    pub fn meta_metric_sum(&self, series: &str) -> f64 {
        let ca = self.info().ca.clone();
        self.info()
            .processes
            .iter()
            .filter(|p| p.role == "meta")
            .map(|p| {
                scrape_sum(
                    &[std::ffi::OsStr::new("--cacert"), ca.as_os_str()],
                    &format!("https://{}/metrics", p.addr),
                    series,
                )
            })
            .sum()
    }

    /// The sum over every process of `role` ("node" or "client") of the Prometheus sample
    /// `series` on its plain-HTTP metrics endpoint (exact text before the value).
    pub fn process_metric_sum(&self, role: &str, series: &str) -> f64 {
        let mut total = 0.0;
        for p in self.info().processes.iter().filter(|p| p.role == role) {
            let addr = p.metrics.as_deref().unwrap_or_else(|| panic!("{role} {} serves no metrics", p.id));
            total += scrape_sum(&[], &format!("http://{addr}/metrics"), series);
        }
        total
    }

    /// Waits (up to `within`) until `slate audit list --security` shows a record of
    /// `action` (e.g. `security.capability-key-mismatch`) whose source starts with
    /// `source`; returns it. The audit aggregates events every few seconds.
    pub fn wait_for_security_event(&self, action: &str, source: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.slate_json(&["audit", "list", "--security"]);
            let found = v
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["action"] == action && r["client"].as_str().is_some_and(|s| s.starts_with(source)));
            if let Some(r) = found {
                return r.clone();
            }
            assert!(Instant::now() < deadline, "no {action} from {source} in `slate audit list --security`: {v}");
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Attaches `volume_id` read-only through the API (operator token) and returns
    /// (attachment id, capability token). The reply's key is dropped unread.
    pub fn read_only_capability(&self, volume_id: u64) -> (u64, String) {
        let token = self.info().token_file.clone();
        let body = serde_json::json!({"mode": "read_only", "host": "e2e-checker", "force": false});
        let (status, reply) = self.api("POST", &format!("/v1/volumes/{volume_id}/attach"), Some(&body), &token);
        assert_eq!(status, 200, "read-only attach of vol-{volume_id} refused: {}", reply["error"]);
        let aid = reply["attachment"]["id"].as_u64().expect("attachment id");
        let cap = reply["capability"]["token"].as_str().expect("capability token").to_owned();
        (aid, cap)
    }

    /// Detaches an attachment through the API (operator token).
    pub fn detach(&self, volume_id: u64, attachment: u64) {
        let token = self.info().token_file.clone();
        let body = serde_json::json!({"attachment": attachment});
        let (status, reply) = self.api("POST", &format!("/v1/volumes/{volume_id}/detach"), Some(&body), &token);
        assert_eq!(status, 200, "detach of attachment {attachment} refused: {}", reply["error"]);
    }

    /// Stops `slate up` with SIGTERM, checks it exited cleanly and that every process it listed is gone.
    pub fn stop(&mut self) {
        self.stop_with(Signal::TERM);
    }

    /// The pid of `slate up` itself.
    pub fn up_pid(&self) -> u32 {
        self.up.as_ref().map_or(0, ProcessGuard::pid)
    }

    /// Stops `slate up` with `sig` (SIGTERM or SIGINT), checks it exited cleanly and that every process it
    /// listed is gone.
    pub fn stop_with(&mut self, sig: Signal) {
        let Some(mut up) = self.up.take() else { return };
        let pids: Vec<(String, u32)> = self
            .info
            .as_ref()
            .map(|i| i.processes.iter().map(|p| (format!("{} {}", p.role, p.id), p.pid)).collect())
            .unwrap_or_default();
        let started = Instant::now();
        let status = up.stop_with(sig, Duration::from_mins(1) + Duration::from_secs(30));
        eprintln!("[cluster] slate up stopped in {:.1} s: {status:?}", started.elapsed().as_secs_f64());
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut left: Vec<(String, u32)> = pids;
        while !left.is_empty() && Instant::now() < deadline {
            left.retain(|(_, pid)| pid_alive(*pid));
            std::thread::sleep(Duration::from_millis(50));
        }
        self.info = None;
        let ok = status.is_some_and(|s| s.success());
        if (!ok || !left.is_empty()) && !std::thread::panicking() {
            self.dump_logs();
            assert!(ok, "slate up did not exit cleanly on {sig:?}: {status:?}");
            panic!("processes still alive after slate up stopped: {left:?}");
        }
        assert!(!self.cluster_json_path().exists() || std::thread::panicking(), "cluster.json left behind");
    }

    /// Stops `slate up` and starts it again on the same directory.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Prints the tail of `up.log` and of every log under `DIR/logs`.
    pub fn dump_logs(&self) {
        let mut files = vec![self.dir.join("up.log")];
        if let Ok(rd) = std::fs::read_dir(self.dir.join("logs")) {
            let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            more.sort();
            files.extend(more);
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            eprintln!("===== {} (last {} lines) =====", f.display(), lines.len() - from);
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() && self.up.is_some() {
            self.dump_logs();
        }
        if self.up.is_some() {
            self.stop();
        }
        if std::thread::panicking() && std::env::var_os("SLATE_TEST_KEEP").is_some() {
            if let Some(s) = self.scratch.take() {
                eprintln!("[cluster] keeping {}", s.keep().display());
            }
        }
    }
}

/// True while `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|st| st != "Z"),
        Err(_) => false,
    }
}

/// Sends SIGKILL to `pid` (a process `slate up` started for this test; never by name).
pub fn kill9(pid: u32) {
    let pid = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw).expect("a valid pid");
    rustix::process::kill_process(pid, Signal::KILL).expect("kill -9");
}

/// Runs `qemu-io -f raw` with `-c` commands against `uri`.
pub fn qemu_io(uri: &str, cmds: &[String]) -> Output {
    qemu_io_with(&[], uri, cmds)
}

/// Runs `qemu-io -f raw EXTRA...` (e.g. `-r` for a read-only export) with `-c` commands against `uri`,
/// killed after 5 minutes (exit status 124).
pub fn qemu_io_with(extra: &[&str], uri: &str, cmds: &[String]) -> Output {
    // Under `timeout`, so that a server that stops answering fails the test instead of hanging it.
    let mut c = Command::new("timeout");
    c.args(["--kill-after=10", "300", "qemu-io"]).args(extra);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    match qemu_tls_image_opts(uri) {
        // qemu takes no TLS in a URI: a libnbd `nbds://…?tls-certificates=DIR` becomes
        // a tls-creds-x509 object and image options.
        Some((object, opts)) => c.args(["--object", &object, "--image-opts", &opts]),
        None => c.args(["-f", "raw", uri]),
    };
    c.stdin(Stdio::null()).output().expect("run qemu-io")
}

/// For a libnbd URI `nbds://HOST:PORT/EXPORT?tls-certificates=DIR`, qemu's
/// `--object` and `--image-opts` arguments; `None` for any other URI.
pub fn qemu_tls_image_opts(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix("nbds://")?;
    let (addr_export, query) = rest.split_once('?')?;
    let dir = query.split('&').find_map(|kv| kv.strip_prefix("tls-certificates="))?;
    let (addr, export) = addr_export.split_once('/')?;
    let (host, port) = addr.rsplit_once(':')?;
    Some((
        format!("tls-creds-x509,id=tls0,dir={dir},endpoint=client"),
        format!(
            "driver=raw,file.driver=nbd,file.server.type=inet,file.server.host={host},file.server.port={port},file.export={export},file.tls-creds=tls0"
        ),
    ))
}

/// Runs qemu-io and asserts that every command succeeded (exit 0, no failure or mismatch in its output).
pub fn qemu_io_ok(uri: &str, cmds: &[String]) -> String {
    qemu_io_ok_with(&[], uri, cmds)
}

/// [`qemu_io_ok`] with extra qemu-io options.
pub fn qemu_io_ok_with(extra: &[&str], uri: &str, cmds: &[String]) -> String {
    let out = qemu_io_with(extra, uri, cmds);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let bad = text.lines().find(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("failed") || l.contains("error") || l.contains("mismatch")
    });
    assert!(
        out.status.success() && bad.is_none(),
        "qemu-io {extra:?} {cmds:?} on {uri} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Runs a command, asserts it succeeded, returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// SHA-256 (hex) of everything an NBD export holds, read with `nbdcopy URI -`.
pub fn nbd_sha256(uri: &str) -> String {
    use sha2::Digest;
    use std::io::Read;
    let mut child = Command::new("nbdcopy")
        .args([uri, "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nbdcopy (libnbd-bin)");
    let mut h = sha2::Sha256::new();
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = out.read(&mut buf).expect("read nbdcopy's output");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let o = child.wait_with_output().expect("wait for nbdcopy");
    assert!(o.status.success(), "nbdcopy {uri}: {}", String::from_utf8_lossy(&o.stderr));
    hex::encode(h.finalize())
}

/// The NBD URI of export `export` on unix socket `sock`.
pub fn nbd_unix_uri(export: &str, sock: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Waits until `path` is a unix socket that accepts connections.
pub fn wait_for_unix_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A deterministic byte stream (splitmix64) for test data that a seed reproduces.
#[derive(Debug, Clone)]
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The sha256 of a file or NBD-exported image, by `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// The sum of the Prometheus samples `series` (exact text before the value) that `url`
/// serves, fetched with curl and `extra` arguments (e.g. a CA).
fn scrape_sum(extra: &[&std::ffi::OsStr], url: &str, series: &str) -> f64 {
    let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(extra).arg(url).output().expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.trim().parse::<f64>().ok())
        .sum()
}
