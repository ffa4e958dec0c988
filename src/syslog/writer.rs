//! One syslog drain connection (`syslog://`, `syslog-tls://`): messages framed by octet counting
//! (RFC 6587, as upstream), written over TCP or TLS with a dial and a write deadline.
//!
//! Reconnects *before* a receiver's idle timeout rather than after a failed write: Log Cache
//! closes a connection idle for 2 minutes without telling the sender, whose next write then
//! "succeeds" into a closed socket and is lost (reference `destinations.md` §1.5). A connection
//! idle for `idle_reconnect` (default 1 minute) is therefore closed and dialled afresh before the
//! next write. What a write hands the kernel counts as sent: a drain acknowledges nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsConnector;

use super::bindings::BlockedRanges;
use super::rfc5424::frame;

/// How a drain connection behaves.
#[derive(Clone)]
pub struct WriterSettings {
    /// `syslog-tls://`: the TLS client configuration and the name to verify; `None` for TCP.
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    pub dial_timeout: Duration,
    pub write_timeout: Duration,
    /// A connection idle this long is replaced before the next write.
    pub idle_reconnect: Duration,
    /// The socket's send buffer (`SO_SNDBUF`; the kernel doubles it): what a connection can hold
    /// outside the budget, and the most a connection that dies can lose after its writes were
    /// counted as sent.
    pub send_buffer: usize,
    /// Addresses never dialled (`syslog.blocked_ranges`), checked after DNS.
    pub blocked: Arc<BlockedRanges>,
}

impl std::fmt::Debug for WriterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterSettings")
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .field("dial_timeout", &self.dial_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("idle_reconnect", &self.idle_reconnect)
            .field("send_buffer", &self.send_buffer)
            .finish()
    }
}

/// Why a write failed; the connection is closed, and the next write dials again.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot connect: {0}")]
    Dial(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("write failed: {0}")]
    Write(std::io::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("the drain answered HTTP {0}")]
    Status(u16),
}

impl WriteError {
    /// Dialling or the TLS handshake failed (the app's "Failed to connect" notice).
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            WriteError::Dial(_)
                | WriteError::Tls(_)
                | WriteError::Timeout("connecting" | "in the TLS handshake")
        )
    }

    /// The drain refused the messages for good: an HTTP 4xx other than 408 (timeout) and 429
    /// (too many requests). Sending them again would be refused again.
    /// So is a drain whose every address is in `syslog.blocked_ranges`.
    pub fn is_refusal(&self) -> bool {
        match self {
            WriteError::Status(s) => (400..500).contains(s) && *s != 408 && *s != 429,
            WriteError::Dial(e) => e.get_ref().is_some_and(|inner| inner.is::<Blocked>()),
            _ => false,
        }
    }
}

/// A TCP or TLS stream.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
type Conn = Box<dyn Stream>;

/// One drain connection, dialled on demand.
pub struct SyslogWriter {
    /// `host:port`.
    addr: String,
    settings: WriterSettings,
    conn: Option<(Conn, Instant)>,
    /// Dials so far (the first one included).
    dials: u64,
    buf: Vec<u8>,
}

impl SyslogWriter {
    pub fn new(addr: String, settings: WriterSettings) -> Self {
        Self {
            addr,
            settings,
            conn: None,
            dials: 0,
            buf: Vec::new(),
        }
    }

    /// Dials now if there is no connection (at start, so a drain that is up counts as one
    /// before traffic flows).
    ///
    /// # Errors
    /// When the dial fails; the next write dials again.
    pub async fn connect(&mut self) -> Result<(), WriteError> {
        if self.conn.is_none() {
            let conn = self.dial().await?;
            self.conn = Some((conn, Instant::now()));
        }
        Ok(())
    }

    /// Connections dialled so far.
    pub fn dials(&self) -> u64 {
        self.dials
    }

    /// Writes `messages`, each framed, in one go: dials first if there is no connection or it
    /// has been idle for `idle_reconnect`.
    ///
    /// # Errors
    /// When dialling or writing fails or times out; the connection is closed then, and none of
    /// `messages` may be taken as delivered.
    pub async fn write<M: AsRef<[u8]>>(
        &mut self,
        messages: impl IntoIterator<Item = M>,
    ) -> Result<(), WriteError> {
        self.buf.clear();
        for m in messages {
            frame(m.as_ref(), &mut self.buf);
        }
        let idle_limit = self.settings.idle_reconnect;
        if self
            .conn
            .as_ref()
            .is_some_and(|(_, last)| last.elapsed() >= idle_limit)
        {
            self.close().await;
        }
        if self.conn.is_none() {
            let conn = self.dial().await?;
            self.conn = Some((conn, Instant::now()));
        }
        let (conn, last) = self.conn.as_mut().expect("connected above");
        let written = timeout(self.settings.write_timeout, async {
            conn.write_all(&self.buf).await?;
            conn.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {
                *last = Instant::now();
                Ok(())
            }
            Ok(Err(e)) => {
                self.conn = None;
                Err(WriteError::Write(e))
            }
            Err(_) => {
                self.conn = None;
                Err(WriteError::Timeout("writing"))
            }
        }
    }

    async fn dial(&mut self) -> Result<Conn, WriteError> {
        self.dials += 1;
        let tcp = timeout(
            self.settings.dial_timeout,
            connect(
                &self.addr,
                self.settings.send_buffer,
                &self.settings.blocked,
            ),
        )
        .await
        .map_err(|_| WriteError::Timeout("connecting"))?
        .map_err(WriteError::Dial)?;
        let _ = tcp.set_nodelay(true);
        let Some((config, name)) = &self.settings.tls else {
            return Ok(Box::new(tcp));
        };
        let connector = TlsConnector::from(config.clone());
        let tls = timeout(
            self.settings.dial_timeout,
            connector.connect(name.clone(), tcp),
        )
        .await
        .map_err(|_| WriteError::Timeout("in the TLS handshake"))?
        .map_err(WriteError::Tls)?;
        Ok(Box::new(tls))
    }

    /// Closes the connection: a TLS close_notify and a FIN, then reads until the receiver closes
    /// too (at most a second). Reading matters: the agent never reads otherwise, and a socket
    /// closed with unread bytes in it (a TLS 1.3 server's session tickets) is reset, and a reset
    /// makes the receiver discard what it had not read yet.
    pub async fn close(&mut self) {
        if let Some((mut conn, _)) = self.conn.take() {
            let _ = timeout(Duration::from_millis(100), conn.shutdown()).await;
            let mut sink = [0u8; 4096];
            let _ = timeout(Duration::from_secs(1), async {
                while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
    }
}

/// Connects to `addr` (`host:port`, resolved; each address tried in turn) with a send buffer of
/// `send_buffer` bytes.
pub(super) async fn connect(
    addr: &str,
    send_buffer: usize,
    blocked: &BlockedRanges,
) -> std::io::Result<TcpStream> {
    let mut last = None;
    let mut blocked_ip = None;
    for a in tokio::net::lookup_host(addr).await? {
        if blocked.contains(a.ip()) {
            blocked_ip = Some(a.ip());
            continue;
        }
        let socket = if a.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_send_buffer_size(u32::try_from(send_buffer).unwrap_or(u32::MAX))?;
        match socket.connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    // Blocked only when no address was allowed: an allowed one that failed is worth a retry.
    Err(last.unwrap_or_else(|| match blocked_ip {
        Some(ip) => std::io::Error::other(Blocked(ip)),
        None => std::io::Error::other(format!("{addr} resolves to no address")),
    }))
}

/// Every address of a drain is in `syslog.blocked_ranges`.
#[derive(Debug, thiserror::Error)]
#[error("{0} is in syslog.blocked_ranges")]
pub struct Blocked(pub std::net::IpAddr);
