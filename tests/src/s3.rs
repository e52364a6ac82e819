//! A real S3-compatible server for tests: moto's server mode (`moto_server`,
//! from PyPI's `moto[server]`, which `.ci/run` installs), started on a free
//! loopback port and stopped by its PID when dropped.

use crate::{free_addr, wait_for_port, ProcessGuard};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A running S3 server with one bucket.
#[derive(Debug)]
pub struct S3Server {
    guard: ProcessGuard,
    addr: SocketAddr,
    bucket: String,
}

/// Credentials the server accepts (any are accepted; the client needs some).
pub const ACCESS_KEY: &str = "slate-test";
pub const SECRET_KEY: &str = "slate-test-secret";

impl S3Server {
    /// Starts the server and creates `bucket`.
    pub fn start(bucket: &str) -> Self {
        let addr = free_addr();
        let mut cmd =
            if Command::new("moto_server").arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
                Command::new("moto_server")
            } else {
                let mut c = Command::new("python3");
                c.args(["-m", "moto.server"]);
                c
            };
        cmd.args(["-H", "127.0.0.1", "-p", &addr.port().to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        let guard = ProcessGuard::spawn("moto_server", &mut cmd)
            .expect("start moto_server (pip install 'moto[server]'; .ci/run does)");
        assert!(wait_for_port(addr, Duration::from_mins(1)), "moto_server did not listen on {addr}");
        let s = Self { guard, addr, bucket: bucket.to_owned() };
        let status = s.http("PUT", &format!("/{bucket}"));
        assert!(status / 100 == 2, "creating bucket {bucket}: HTTP {status}");
        s
    }

    /// A bare HTTP request; returns the status.
    fn http(&self, method: &str, path: &str) -> u16 {
        self.request(method, path).0
    }

    /// A bare HTTP request (moto needs no signature); returns the status and the body.
    fn request(&self, method: &str, path: &str) -> (u16, Vec<u8>) {
        let mut c = TcpStream::connect(self.addr).expect("connect to moto_server");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr
        );
        c.write_all(req.as_bytes()).expect("send");
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        let split = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |p| p + 4);
        let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, out[split..].to_vec())
    }

    /// How many objects the bucket holds, and the keys of those containing `needle`
    /// (read with boto3, which moto brings).
    pub fn objects_containing(&self, needle: &[u8]) -> (usize, Vec<String>) {
        let script = r#"
import boto3, json, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[3],
                  aws_secret_access_key="x", region_name="us-east-1")
needle = bytes.fromhex(sys.argv[4])
keys, hits = [], []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[2]):
    for o in page.get("Contents", []):
        keys.append(o["Key"])
        if needle in s3.get_object(Bucket=sys.argv[2], Key=o["Key"])["Body"].read():
            hits.append(o["Key"])
print(json.dumps({"count": len(keys), "hits": hits}))
"#;
        let out = Command::new("python3")
            .args(["-c", script, &self.endpoint(), &self.bucket, ACCESS_KEY, &hex::encode(needle)])
            .output()
            .expect("run python3 with boto3");
        assert!(out.status.success(), "scanning the bucket: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("scan output");
        let hits = v["hits"].as_array().into_iter().flatten().filter_map(|h| h.as_str().map(str::to_owned)).collect();
        (v["count"].as_u64().unwrap_or(0) as usize, hits)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn target(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Sets the endpoint and credentials on a `slate` command.
    pub fn configure(&self, cmd: &mut Command) {
        cmd.env("SLATE_S3_ENDPOINT", self.endpoint())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1");
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}
