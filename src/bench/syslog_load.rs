//! The syslog sink's own ceiling: the workload as the agent writes it to a drain (RFC 5424,
//! octet-counted, with the agent's identity tags), formatted and framed once, then written
//! straight to the sink over TCP or TLS on a few connections, as fast as the sink reads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::load::LoadResult;
use super::run::IDENTITY;
use super::workload::templates;
use super::{now_ns, BenchError};
use crate::proto::EnvelopeBatch;
use crate::syslog::rfc5424::{format, frame, Options};

#[derive(Debug, Clone)]
pub struct SyslogLoadSpec {
    pub target: SocketAddr,
    /// TLS towards the sink (verified as the target's IP address); `None`: plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connections: usize,
    pub duration: Duration,
}

/// A TCP or TLS stream.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}
type Conn = Box<dyn Stream>;

/// Writes for `spec.duration` on every connection, then closes them. `sent` counts messages
/// handed to the kernel: what the sink received is the sink's to say.
///
/// # Errors
/// When a connection cannot be made or a write fails.
pub async fn run(spec: SyslogLoadSpec) -> Result<LoadResult, BenchError> {
    // Made before the clock starts: handshakes are not the sink's reading speed.
    let mut work = Vec::with_capacity(spec.connections);
    for i in 0..spec.connections {
        work.push((connect(&spec).await?, blocks(i, spec.connections)?));
    }
    let start = Instant::now();
    let deadline = start + spec.duration;
    let tasks: Vec<_> = work
        .into_iter()
        .map(|(mut conn, blocks)| {
            tokio::spawn(async move {
                let mut sent = 0u64;
                for (block, messages) in blocks.iter().cycle() {
                    if Instant::now() >= deadline {
                        break;
                    }
                    conn.write_all(block).await?;
                    sent += messages;
                }
                conn.shutdown().await?;
                // Read what the sink sent (TLS session tickets) until it closes too: a socket
                // closed with unread data resets the connection, and the sink loses what it
                // had not read yet.
                let mut unread = [0u8; 4096];
                while matches!(conn.read(&mut unread).await, Ok(n) if n > 0) {}
                Ok::<_, std::io::Error>(sent)
            })
        })
        .collect();
    let mut sent = 0;
    for t in tasks {
        sent += t
            .await
            .map_err(|e| BenchError::Load(e.to_string()))?
            .map_err(|e| BenchError::Load(format!("syslog load: {e}")))?;
    }
    Ok(LoadResult {
        sent,
        elapsed: start.elapsed().max(Duration::from_millis(1)),
    })
}

async fn connect(spec: &SyslogLoadSpec) -> Result<Conn, BenchError> {
    let failed = |e: std::io::Error| BenchError::Load(format!("syslog sink {}: {e}", spec.target));
    let tcp = TcpStream::connect(spec.target).await.map_err(failed)?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = &spec.tls else {
        return Ok(Box::new(tcp));
    };
    let name = rustls::pki_types::ServerName::IpAddress(spec.target.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(failed)?;
    Ok(Box::new(tls))
}

/// Connection `i` of `n`'s share of the workload as the agent writes it to a drain: each batch
/// template's envelopes formatted and framed into one block, with its number of messages. Every
/// message carries the same timestamp (one microsecond, the time of the call), so that cycling
/// through the blocks puts none out of order; the sink's latency means nothing in this run.
fn blocks(i: usize, n: usize) -> Result<Vec<(Vec<u8>, u64)>, BenchError> {
    // The envelopes are stamped `base`, `base + 1` ns, ...: all within this microsecond.
    let base = now_ns() / 1_000 * 1_000;
    let tags: Vec<(String, String)> = IDENTITY
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let opts = Options {
        hostname: "",
        metadata: true,
        metron_tag: false,
    };
    templates(i, n, &tags)
        .iter()
        .map(|t| {
            let batch = EnvelopeBatch::decode(&t.stamped(base)[..])
                .map_err(|e| BenchError::Setup(format!("workload: {e}")))?;
            let mut messages = Vec::new();
            for e in &batch.batch {
                format(e, &opts, &mut messages)
                    .map_err(|e| BenchError::Setup(format!("workload as syslog: {e}")))?;
            }
            let mut block = Vec::new();
            for m in &messages {
                frame(m, &mut block);
            }
            Ok((block, messages.len() as u64))
        })
        .collect()
}
