//! The node's side of a disk decommission: stop serving, overwrite every byte
//! of the device, read every byte back, and report the measured result to
//! slate-meta, which turns it into a signed erase certificate.
//!
//! Progress is persisted in a state file beside the node's configuration
//! (`decommission.json`, 0600) after every chunk, so a node killed at any point
//! resumes where it was when it starts again, without opening the (by then
//! partly erased) disk as an engine. Once the disk is erased the node serves
//! nothing; it waits for SIGTERM or SIGINT.

use crate::erase::{erase_device, ErasePhase, EraseProgress, EraseReport};
use crate::heartbeat::MetaClient;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use slate_protocol::ops::{DecommissionReport, DecommissionTask, EraseSummary};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// Name of the state file in the node's configuration directory.
pub const STATE_FILE: &str = "decommission.json";

/// What survives a crash of the node mid-erase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecommissionState {
    pub disk: u64,
    pub device: PathBuf,
    /// When the first run started (Unix ms).
    pub started_ms: u64,
    /// The erase's resume point (see `erase.rs`).
    pub resume_from: u64,
    /// Totals over every run so far.
    pub bytes_written: u64,
    pub bytes_verified: u64,
    pub mismatched_bytes: u64,
    pub first_mismatch_offset: Option<u64>,
    /// Set once the erase finished: what is reported to slate-meta.
    pub result: Option<EraseSummary>,
    /// True once slate-meta accepted the result.
    pub reported: bool,
}

/// The state file's path for a node configured by `config`.
pub fn state_path(config: &Path) -> PathBuf {
    config.parent().unwrap_or_else(|| Path::new(".")).join(STATE_FILE)
}

/// The persisted state, if a decommission was started here.
pub fn load(path: &Path) -> Result<Option<DecommissionState>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is unreadable", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save(path: &Path, st: &DecommissionState) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(st)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn summary(st: &DecommissionState, last: &EraseReport) -> EraseSummary {
    let mut identity = std::collections::BTreeMap::new();
    if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(&last.identity) {
        for (k, v) in m {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            identity.insert(k, v);
        }
    }
    EraseSummary {
        device_path: last.device.display().to_string(),
        device_kind: serde_json::to_value(last.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        size_bytes: last.size_bytes,
        identity,
        method: last.method.clone(),
        technique: last.technique.clone(),
        bytes_written: st.bytes_written,
        bytes_verified: st.bytes_verified,
        mismatched_bytes: st.mismatched_bytes,
        first_mismatch_offset: st.first_mismatch_offset,
        started_ms: st.started_ms,
        finished_ms: last.finished_ms,
        tool: last.tool.clone(),
        tool_version: last.version.clone(),
    }
}

/// Reports until slate-meta answers (it may be electing a leader).
async fn report(meta: &MetaClient, disk: u64, r: &DecommissionReport) -> Result<()> {
    let path = format!("/v1/disks/{disk}/decommission-report");
    let body = serde_json::to_value(r)?;
    let mut delay = Duration::from_millis(500);
    for attempt in 0.. {
        match meta.post(&path, Some(&body)).await {
            Ok(_) => return Ok(()),
            Err(e) if e.downcast_ref::<crate::heartbeat::Refused>().is_some() => return Err(e),
            Err(e) if attempt >= 40 => return Err(e),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "decommission report not delivered; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    unreachable!("the loop returns")
}

/// Runs (or resumes) the erase of `device` for `task`, persisting progress in `state_file`
/// and reporting it; returns once slate-meta has the result.
pub async fn run(meta: &MetaClient, task: &DecommissionTask, device: &Path, state_file: &Path) -> Result<()> {
    let mut st = match load(state_file)? {
        Some(st) if st.disk == task.disk => st,
        _ => DecommissionState {
            disk: task.disk,
            device: device.to_owned(),
            started_ms: now_ms(),
            resume_from: 0,
            bytes_written: 0,
            bytes_verified: 0,
            mismatched_bytes: 0,
            first_mismatch_offset: None,
            result: None,
            reported: false,
        },
    };
    save(state_file, &st)?;
    if st.result.is_none() {
        info!(disk = task.disk, device = %device.display(), resume_from = st.resume_from, "decommission: erasing the disk");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<EraseProgress>();
        let (dev, path, start) = (device.to_owned(), state_file.to_owned(), st.clone());
        let job = tokio::task::spawn_blocking(move || -> Result<(DecommissionState, EraseReport)> {
            let mut st = start;
            let base = st.clone();
            let mut save_err = None;
            let report = erase_device(&dev, st.resume_from, &mut |p| {
                st.resume_from = p.resume_from;
                match p.phase {
                    ErasePhase::Overwrite => st.bytes_written = p.done_bytes,
                    ErasePhase::Verify => {
                        st.bytes_written = p.size_bytes;
                        st.bytes_verified = p.done_bytes;
                        st.mismatched_bytes = base.mismatched_bytes + p.mismatched_bytes;
                        st.first_mismatch_offset = base.first_mismatch_offset.or(p.first_mismatch_offset);
                    }
                }
                if let Err(e) = save(&path, &st) {
                    save_err = Some(e);
                    return false;
                }
                let _ = tx.send(p.clone());
                true
            });
            if let Some(e) = save_err {
                return Err(e.context("persisting the erase progress"));
            }
            let report = report.context("erasing the disk")?;
            st.bytes_written = st.bytes_written.max(report.size_bytes);
            st.bytes_verified = report.size_bytes;
            st.mismatched_bytes = base.mismatched_bytes + report.mismatched_bytes;
            st.first_mismatch_offset = base.first_mismatch_offset.or(report.first_mismatch_offset);
            Ok((st, report))
        });
        let progress = async {
            let mut last: Option<std::time::Instant> = None;
            while let Some(p) = rx.recv().await {
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last = Some(std::time::Instant::now());
                    let stage = match p.phase {
                        ErasePhase::Overwrite => "overwrite",
                        ErasePhase::Verify => "verify",
                    };
                    // Progress is best effort; the result is not.
                    let r = DecommissionReport::Progress {
                        stage: stage.into(),
                        bytes_done: p.done_bytes,
                        bytes_total: p.size_bytes,
                    };
                    let body = serde_json::to_value(&r).unwrap_or_default();
                    let _ = meta.post(&format!("/v1/disks/{}/decommission-report", task.disk), Some(&body)).await;
                    info!(stage, done = p.done_bytes, total = p.size_bytes, "decommission progress");
                }
            }
        };
        let (res, ()) = tokio::join!(job, progress);
        let (mut done, last) = match res.context("erase task")? {
            Ok(x) => x,
            Err(e) => {
                let msg = format!("{e:#}");
                let _ = report(meta, task.disk, &DecommissionReport::Failed { message: msg.clone() }).await;
                return Err(e);
            }
        };
        done.result = Some(summary(&done, &last));
        save(state_file, &done)?;
        st = done;
    }
    if !st.reported {
        let erase = st.result.clone().expect("set above");
        info!(
            disk = task.disk,
            verified = erase.bytes_verified,
            mismatched = erase.mismatched_bytes,
            "decommission: reporting the result"
        );
        match report(meta, task.disk, &DecommissionReport::Done { erase }).await {
            Ok(()) => {}
            // Already recorded (a report that was delivered before a crash).
            Err(e) if e.downcast_ref::<crate::heartbeat::Refused>().is_some_and(|r| r.status == 409) => {
                warn!(error = %format!("{e:#}"), "slate-meta already has this decommission's result");
            }
            Err(e) => return Err(e),
        }
        st.reported = true;
        save(state_file, &st)?;
    }
    info!(disk = task.disk, "decommission complete: the disk is erased and verified; this node serves nothing more");
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
