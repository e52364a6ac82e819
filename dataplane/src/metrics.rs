//! The tiny HTTP endpoint that serves a process's Prometheus metrics, and the
//! data-path stage histograms every side appends to them.
//!
//! The endpoint is a deliberately minimal HTTP/1.1 responder on tokio (one
//! `GET /metrics` per connection): a full web framework would cost more to build
//! than everything else in a node. The storage node serves its registry with it;
//! a host serves its client-side stages.

use slate_protocol::stages::Side;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Appends `side`'s data-path stage histograms to an OpenMetrics text (before its `# EOF`).
pub fn with_stages(mut text: String, side: Side, prefix: &str) -> String {
    let eof = text.ends_with("# EOF\n");
    if eof {
        text.truncate(text.len() - "# EOF\n".len());
    }
    slate_protocol::stages::render(side, prefix, &mut text);
    if eof {
        text.push_str("# EOF\n");
    }
    text
}

/// Counter of scrapes, to make the endpoint's own liveness visible in logs at debug level.
static SCRAPES: AtomicU64 = AtomicU64::new(0);

/// Serves `GET /metrics` (whatever `render` returns, in the OpenMetrics text format)
/// and `GET /health` on `listener` until `shutdown` fires.
pub async fn serve_text(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (mut stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stopping(&mut shutdown) => return,
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let answer = tokio::time::timeout(Duration::from_secs(10), async {
                let mut req = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                // Read the request head (bounded); the body of a GET is ignored.
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&chunk[..n]);
                }
                let line = req.split(|b| *b == b'\r' || *b == b'\n').next().unwrap_or_default();
                let line = String::from_utf8_lossy(line);
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, ctype, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?"))
                {
                    SCRAPES.fetch_add(1, Ordering::Relaxed);
                    ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", render())
                } else if method == "GET" && path == "/health" {
                    ("200 OK", "text/plain", "ok\n".to_owned())
                } else {
                    ("404 Not Found", "text/plain", "not found: try /metrics\n".to_owned())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(body.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
            if let Ok(Err(e)) = answer {
                tracing::debug!(%peer, error = %e, "metrics request failed");
            }
        });
    }
}

/// How many times `/metrics` was served since start.
pub fn scrapes() -> u64 {
    SCRAPES.load(Ordering::Relaxed)
}

/// Resolves once `rx` reads true (the process is stopping).
async fn stopping(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, never held across an await.
    let _ = rx.wait_for(|s| *s).await;
}
