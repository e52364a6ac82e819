//! Shared by the `meta_*` tests: a cluster of real `slate-meta` processes on
//! 127.0.0.1 (made with `slate-meta init`), an HTTPS client that trusts the
//! generated CA, and a guard that stops every process it started by PID
//! (SIGTERM, then SIGKILL if it lingers) when dropped.

#![allow(dead_code, clippy::missing_panics_doc, clippy::many_single_char_names)]

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_slate-meta");

/// Ports that were free a moment ago (bound to port 0, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub api: Vec<SocketAddr>,
    children: Vec<Option<Child>>,
    pub client: reqwest::Client,
    pub token: String,
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}

fn sigkill(pid: u32) {
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
}

fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Cluster {
    /// Initializes and starts an `n`-node cluster and waits until it is bootstrapped.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, 10_000).await
    }

    pub async fn start_with(n: usize, snapshot_every: u64) -> Self {
        Self::start_edited(n, snapshot_every, str::to_string).await
    }

    /// Like [`Cluster::start_with`], with each node's `meta.toml` rewritten by `edit` before it starts.
    pub async fn start_edited(n: usize, snapshot_every: u64, edit: impl Fn(&str) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2 * n);
        let api: Vec<u16> = ports[..n].to_vec();
        let raft: Vec<u16> = ports[n..].to_vec();
        let join = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let out = Command::new(BIN)
            .args(["init", "--dir"])
            .arg(dir.path().join("c"))
            .args(["--nodes", &n.to_string(), "--api-ports", &join(&api), "--raft-ports", &join(&raft)])
            .args(["--tick-ms", "50", "--snapshot-every", &snapshot_every.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "init failed: {}", String::from_utf8_lossy(&out.stderr));
        let ca = std::fs::read(dir.path().join("c/ca.crt")).unwrap();
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let token = std::fs::read_to_string(dir.path().join("c/operator.token")).unwrap().trim().to_string();
        let mut c = Self {
            dir,
            api: api.iter().map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect(),
            children: (0..n).map(|_| None).collect(),
            client,
            token,
        };
        for i in 0..n {
            let path = c.node_dir(i).join("meta.toml");
            let edited = edit(&std::fs::read_to_string(&path).unwrap());
            std::fs::write(&path, edited).unwrap();
            c.spawn(i);
        }
        c.wait_ready().await;
        c
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("c")
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.root().join(format!("node-{}", i + 1))
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("data")
    }

    pub fn root_key_file(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("keys/root.key")
    }

    pub fn spawn(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "node {i} already running");
        let log = std::fs::File::create(self.node_dir(i).join("log.txt")).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(self.node_dir(i).join("meta.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[i] = Some(child);
    }

    pub fn running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    /// kill -9.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            sigkill(c.id());
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (asserts it exits by itself).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            sigterm(c.id());
            let exited = wait_exit(&mut c, Duration::from_secs(20));
            if !exited {
                sigkill(c.id());
                let _ = c.wait();
            }
            assert!(exited, "node {i} did not exit on SIGTERM");
            let status = c.wait().unwrap();
            assert!(status.success(), "node {i} exited with {status}");
        }
    }

    pub fn stop_all(&mut self) {
        for i in 0..self.children.len() {
            self.stop(i);
        }
    }

    /// Sends a request to node `i`; returns status and JSON body (Null when empty or not JSON).
    pub async fn req(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let url = format!("https://{}{path}", self.api[i]);
        let mut rb = self.client.request(method, url);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        match rb.send().await {
            Ok(resp) => {
                let status = resp.status();
                let bytes = resp.bytes().await.unwrap_or_default();
                (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
            }
            Err(e) => {
                (StatusCode::SERVICE_UNAVAILABLE, json!({"error": {"code": "transport", "message": e.to_string()}}))
            }
        }
    }

    /// As the operator, on node `i`.
    pub async fn op(&self, i: usize, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let t = self.token.clone();
        self.req(i, method, path, body, Some(&t)).await
    }

    /// As the operator, on any running node, retrying while the cluster is unavailable; panics on other errors.
    pub async fn op_ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let t = self.token.clone();
        self.ok_as(&t, method, path, body).await
    }

    pub async fn ok_as(&self, token: &str, method: Method, path: &str, body: Option<Value>) -> Value {
        let deadline = Instant::now() + Duration::from_mins(1);
        let mut i = 0;
        loop {
            i = (i + 1) % self.api.len();
            if !self.running(i) {
                continue;
            }
            let (st, v) = self.req(i, method.clone(), path, body.clone(), Some(token)).await;
            if st.is_success() {
                return v;
            }
            assert!(st == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline, "{method} {path} -> {st}: {v}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Status of node `i`, if it answers.
    pub async fn status(&self, i: usize) -> Option<Value> {
        let (st, v) = self.req(i, Method::GET, "/v1/status", None, None).await;
        st.is_success().then_some(v)
    }

    /// Waits until every running node answers and one of them is leader of a bootstrapped cluster;
    /// returns the leader's index.
    pub async fn wait_ready(&self) -> usize {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let mut leader = None;
            let mut all_up = true;
            for i in 0..self.api.len() {
                if !self.running(i) {
                    continue;
                }
                match self.status(i).await {
                    Some(s) if s["role"] == "leader" && s["bootstrapped"] == true => leader = Some(i),
                    Some(_) => {}
                    None => all_up = false,
                }
            }
            if let (Some(l), true) = (leader, all_up) {
                return l;
            }
            assert!(Instant::now() < deadline, "no bootstrapped leader within 60 s");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Waits until every running node has applied at least what node `i` has committed.
    pub async fn wait_caught_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut statuses = Vec::new();
            for i in 0..self.api.len() {
                if self.running(i) {
                    statuses.push(self.status(i).await);
                }
            }
            let commits: Vec<u64> = statuses.iter().flatten().map(|s| s["commit_index"].as_u64().unwrap()).collect();
            let applied: Vec<u64> = statuses.iter().flatten().map(|s| s["applied_index"].as_u64().unwrap()).collect();
            if statuses.iter().all(Option::is_some) {
                let max_commit = commits.iter().max().copied().unwrap_or(0);
                if applied.iter().all(|a| *a >= max_commit) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "nodes did not catch up");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    // ----- fixtures -----

    pub async fn tenant(&self, name: &str) -> u64 {
        self.op_ok(Method::POST, "/v1/tenants", Some(json!({"name": name}))).await["id"].as_u64().unwrap()
    }

    /// Registers a storage node in failure domain `domain`; returns its id.
    pub async fn storage_node(&self, name: &str, domain: &str) -> u64 {
        let port = free_ports(1)[0];
        self.op_ok(
            Method::POST,
            "/v1/nodes",
            Some(json!({"name": name, "addr": format!("127.0.0.1:{port}"), "failure_domain": domain,
                        "disks": [{"name": "d0", "capacity_bytes": 1u64 << 40}]})),
        )
        .await["id"]
            .as_u64()
            .unwrap()
    }

    /// Creates a principal; returns (id, token).
    pub async fn principal(&self, name: &str, role: &str, tenant: Option<u64>) -> (u64, String) {
        let v = self
            .op_ok(Method::POST, "/v1/principals", Some(json!({"name": name, "role": role, "tenant": tenant})))
            .await;
        (v["principal"]["id"].as_u64().unwrap(), v["token"].as_str().unwrap().to_string())
    }

    /// Creates storage node `node`'s own principal (role `node`); returns (id, token).
    pub async fn node_principal(&self, name: &str, node: u64) -> (u64, String) {
        let v =
            self.op_ok(Method::POST, "/v1/principals", Some(json!({"name": name, "role": "node", "node": node}))).await;
        (v["principal"]["id"].as_u64().unwrap(), v["token"].as_str().unwrap().to_string())
    }

    /// Every file under `dir`, recursively.
    pub fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out
    }

    /// Files under `dir` that contain `needle`.
    pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        Self::files_under(dir)
            .into_iter()
            .filter(|p| std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            sigterm(c.id());
        }
        for c in &mut self.children {
            if let Some(mut child) = c.take() {
                if !wait_exit(&mut child, Duration::from_secs(10)) {
                    sigkill(child.id());
                    let _ = child.wait();
                }
            }
        }
    }
}
