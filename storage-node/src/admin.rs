//! The local admin socket: segment assignments for a running node, until the metadata service does it.
//!
//! A unix stream socket (mode 0600, so only the node's own user may use it)
//! speaking one JSON object per line each way:
//!
//! ```text
//! -> {"op":"assign","volume":1,"segment":0,"segment_blocks":262144}
//! <- {"ok":true}
//! -> {"op":"release","volume":1,"segment":0}
//! -> {"op":"segments"}
//! <- {"ok":true,"segments":[{"volume":1,"segment":0,"segment_blocks":262144}]}
//! ```
//!
//! `slate-node admin ...` is the client. Assignments are durable in the engine,
//! so they survive a restart without touching the config file; the config's
//! static `[[assignments]]` are (idempotently) re-applied at every start.

use crate::config::StaticAssignment;
use crate::engine::EngineHandle;
use serde::{Deserialize, Serialize};
use slate_protocol::{SegmentIndex, VolumeId};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{info, warn};

/// Longest admin request line accepted.
const MAX_LINE_BYTES: usize = 4096;

/// One admin command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    Assign { volume: VolumeId, segment: SegmentIndex, segment_blocks: u64 },
    Release { volume: VolumeId, segment: SegmentIndex },
    Segments,
}

/// The answer to one admin command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AdminReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<StaticAssignment>>,
}

async fn handle(engine: &EngineHandle, req: AdminRequest) -> AdminReply {
    let r = match req {
        AdminRequest::Assign { volume, segment, segment_blocks } => {
            if segment_blocks == 0 {
                return AdminReply { error: Some("segment_blocks must be > 0".into()), ..AdminReply::default() };
            }
            engine.assign_segment(volume, segment, segment_blocks).await.map(|()| None)
        }
        AdminRequest::Release { volume, segment } => engine.release_segment(volume, segment).await.map(|_| None),
        AdminRequest::Segments => Ok(Some(
            engine
                .segments()
                .into_iter()
                .map(|(volume, segment, segment_blocks)| StaticAssignment { volume, segment, segment_blocks })
                .collect(),
        )),
    };
    match r {
        Ok(segments) => AdminReply { ok: true, error: None, segments },
        Err(e) => AdminReply { ok: false, error: Some(e.to_string()), segments: None },
    }
}

/// Binds the admin socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves admin commands until `shutdown`, then removes the socket file.
pub async fn serve(listener: UnixListener, path: PathBuf, engine: EngineHandle, mut shutdown: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = crate::server::stopping(&mut shutdown) => break,
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd);
            let mut line = String::new();
            loop {
                line.clear();
                match tokio::io::AsyncReadExt::take(&mut lines, MAX_LINE_BYTES as u64).read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let reply = match serde_json::from_str::<AdminRequest>(line.trim()) {
                    Ok(req) => {
                        info!(?req, "admin command");
                        handle(&engine, req).await
                    }
                    Err(e) => AdminReply { error: Some(format!("bad admin request: {e}")), ..AdminReply::default() },
                };
                let mut out = serde_json::to_string(&reply).unwrap_or_else(|_| "{\"ok\":false}".into());
                out.push('\n');
                if wr.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Sends one command to a running node's admin socket and returns its reply.
pub async fn call(path: &Path, req: &AdminRequest) -> std::io::Result<AdminReply> {
    let stream = UnixStream::connect(path).await?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    tokio::io::AsyncReadExt::take(BufReader::new(rd), 1 << 20).read_line(&mut answer).await?;
    serde_json::from_str(answer.trim()).map_err(std::io::Error::other)
}
