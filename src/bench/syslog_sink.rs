//! The benchmark's syslog drain: takes RFC 5424 messages framed by octet counting on plain TCP
//! or TLS, as Log Cache's syslog server does, and reads only each message's TIMESTAMP and
//! APP-NAME (the source id) to count it, measure its latency (the sink's clock minus the
//! timestamp) and notice messages out of order within their source, into a [`SinkStats`] of its
//! own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpListener;

use super::sink::SinkStats;
use super::BenchError;
use crate::config::TlsFiles;
use crate::syslog::rfc5424::MAX_MESSAGE_BYTES;
use crate::tls::{ServerConfig, TlsMaterial};

/// What one read may bring: several frames, and always room for the longest one.
const READ_BUFFER: usize = 256 * 1024;
/// Digits of the longest octet count the sink takes (`65536`).
const MAX_COUNT_DIGITS: usize = 5;

/// The sink's TLS. The development Doppler certificate names only `doppler`, which no resolver
/// knows, so the sink has a CA of its own and a certificate for `127.0.0.1` and `localhost`.
/// Clients must present a certificate of the development CA (the agent's, the emitter's), as
/// Log Cache's syslog server wants one from every agent.
pub struct SinkTls {
    /// What a drain verifies the sink against (the drain's `ca:`).
    pub ca: PathBuf,
    pub server: ServerConfig,
}

impl SinkTls {
    /// Issues the sink's CA and certificate into `dir`.
    ///
    /// # Errors
    /// When a key cannot be made or a file cannot be written or read.
    pub fn issue(dir: &Path, clients_ca: &Path) -> Result<Self, BenchError> {
        let failed = |e: &dyn std::fmt::Display| BenchError::Setup(format!("syslog sink TLS: {e}"));
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| failed(&e))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "metron bench syslog sink CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().map_err(|e| failed(&e))?;
        let ca_pem = ca_params
            .self_signed(&ca_key)
            .map_err(|e| failed(&e))?
            .pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .map_err(|e| failed(&e))?;
        let key = KeyPair::generate().map_err(|e| failed(&e))?;
        let cert = leaf.signed_by(&key, &issuer).map_err(|e| failed(&e))?;
        let ca = dir.join("syslog-sink-ca.pem");
        std::fs::write(&ca, ca_pem).map_err(|e| failed(&e))?;
        let material = TlsMaterial {
            ca_pem: std::fs::read(clients_ca).map_err(|e| failed(&e))?,
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
        };
        let server = material
            .server_config("syslog sink", &[])
            .map_err(|e| failed(&e))?;
        Ok(Self { ca, server })
    }

    /// A client of the sink presenting `identity` (a certificate of the development CA).
    ///
    /// # Errors
    /// When a file cannot be read or rustls refuses the material.
    pub fn client(&self, identity: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, BenchError> {
        let files = TlsFiles {
            ca: self.ca.clone(),
            ..identity.clone()
        };
        TlsMaterial::load(&files, "syslog sink client")
            .and_then(|m| m.rustls_client_config("syslog sink client"))
            .map_err(|e| BenchError::Setup(e.to_string()))
    }
}

/// A syslog sink serving on the runtime it was started on, until that runtime stops.
pub struct SyslogSink {
    pub addr: SocketAddr,
    pub stats: Arc<SinkStats>,
    tls: bool,
}

impl SyslogSink {
    /// Starts a sink on 127.0.0.1 (a free port) on `rt`; TLS with `tls`.
    ///
    /// # Errors
    /// When no port can be bound.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        tls: Option<ServerConfig>,
    ) -> Result<Self, BenchError> {
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .map_err(|e| BenchError::Setup(format!("syslog sink: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        let stats = Arc::new(SinkStats::default());
        let sink = Self {
            addr,
            stats: stats.clone(),
            tls: tls.is_some(),
        };
        rt.spawn(serve(listener, tls, stats));
        Ok(sink)
    }

    /// The URL of an aggregate drain to this sink that takes every kind of envelope.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "syslog-tls" } else { "syslog" };
        format!("{scheme}://{}?include-metrics-deprecated=true", self.addr)
    }
}

async fn serve(listener: TcpListener, tls: Option<ServerConfig>, stats: Arc<SinkStats>) {
    loop {
        // An accept error (e.g. out of file descriptors) passes; the next accept may succeed.
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (stats, tls) = (stats.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => read_frames(tcp, &stats).await,
                Some(config) => {
                    if let Ok(s) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
                        read_frames(s, &stats).await;
                    }
                }
            }
        });
    }
}

/// Reads one connection until it ends or a frame cannot be read (counted as malformed; the
/// connection is closed then, as Log Cache's server closes it).
async fn read_frames(mut s: impl AsyncRead + Unpin, stats: &SinkStats) {
    let mut buf = vec![0u8; READ_BUFFER];
    let mut filled = 0;
    loop {
        match s.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
        let mut seen = Vec::new();
        let read = frames(&buf[..filled], &mut seen);
        stats.record(&seen, read.bytes);
        if read.unparsable > 0 {
            stats
                .malformed
                .fetch_add(read.unparsable, Ordering::Relaxed);
        }
        if read.broken {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        buf.copy_within(read.used..filled, 0);
        filled -= read.used;
    }
}

/// What [`frames`] made of a buffer.
#[derive(Debug, Default, PartialEq, Eq)]
struct Frames {
    /// Bytes of whole frames, from the start.
    used: usize,
    /// Bytes of the messages in them.
    bytes: u64,
    /// Messages whose header could not be read (framing intact).
    unparsable: u64,
    /// A frame's octet count is unreadable: nothing after it can be read.
    broken: bool,
}

/// Reads the whole frames at the start of `buf` into `seen` (timestamp and APP-NAME of each).
fn frames<'a>(buf: &'a [u8], seen: &mut Vec<(i64, &'a [u8])>) -> Frames {
    let mut f = Frames::default();
    loop {
        let rest = &buf[f.used..];
        let Some(space) = rest
            .iter()
            .take(MAX_COUNT_DIGITS + 1)
            .position(|b| *b == b' ')
        else {
            f.broken = rest.len() > MAX_COUNT_DIGITS;
            return f;
        };
        let Some(len) = number(&rest[..space]).filter(|n| *n <= MAX_MESSAGE_BYTES) else {
            f.broken = true;
            return f;
        };
        let Some(message) = rest.get(space + 1..space + 1 + len) else {
            return f;
        };
        match header(message) {
            Some(h) => seen.push(h),
            None => f.unparsable += 1,
        }
        f.used += space + 1 + len;
        f.bytes += len as u64;
    }
}

/// The TIMESTAMP (ns since the epoch) and APP-NAME of `<PRI>1 TIMESTAMP HOSTNAME APP-NAME ...`.
fn header(message: &[u8]) -> Option<(i64, &[u8])> {
    let mut fields = message.splitn(5, |b| *b == b' ');
    fields.next()?;
    let ts = timestamp(fields.next()?)?;
    fields.next()?;
    Some((ts, fields.next()?))
}

/// The decimal number `digits` (`None` when empty or anything but digits).
fn number(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0usize, |n, b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(usize::from(b - b'0'))
    })
}

/// An RFC 3339 timestamp in UTC as the agent writes one (`2026-12-06T12:30:01.123456+00:00`,
/// the fraction optional), in ns since the epoch.
fn timestamp(t: &[u8]) -> Option<i64> {
    let field = |at: usize, len: usize| t.get(at..at + len).and_then(number).map(|n| n as i64);
    let (year, month, day) = (field(0, 4)?, field(5, 2)?, field(8, 2)?);
    let (hour, minute, second) = (field(11, 2)?, field(14, 2)?, field(17, 2)?);
    let mut rest = t.get(19..)?;
    let mut nanos = 0;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let digits = fraction.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = number(&fraction[..digits])? as i64 * 10i64.pow(9 - digits as u32);
        rest = &fraction[digits..];
    }
    if rest != b"+00:00" && rest != b"Z" {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second;
    Some(seconds * 1_000_000_000 + nanos)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{envelope::Message, Envelope, Log};
    use crate::syslog::rfc5424::{format, frame, Options};

    /// What the agent writes reads back: the formatter's timestamps (fraction trimmed or
    /// absent, before 1970, leap days) and APP-NAME.
    #[test]
    fn reads_what_the_formatter_writes() {
        let opts = Options {
            hostname: "",
            metadata: true,
            metron_tag: false,
        };
        let (mut framed, mut ends) = (Vec::new(), Vec::new());
        let stamps = [
            1_800_000_000_123_456_000,
            1_800_000_000_120_000_000,
            1_800_000_000_000_000_000,
            951_782_400_000_001_000,
            -1_000,
        ];
        for (i, ts) in stamps.iter().enumerate() {
            let e = Envelope {
                timestamp: *ts,
                source_id: format!("source-{i}"),
                message: Some(Message::Log(Log {
                    payload: b"hello".to_vec(),
                    r#type: 0,
                })),
                ..Default::default()
            };
            let mut messages = Vec::new();
            format(&e, &opts, &mut messages).unwrap();
            frame(&messages[0], &mut framed);
            ends.push(framed.len());
        }
        let mut seen = Vec::new();
        let f = frames(&framed, &mut seen);
        assert_eq!((f.used, f.unparsable, f.broken), (framed.len(), 0, false));
        let want: Vec<(i64, String)> = stamps
            .iter()
            .enumerate()
            .map(|(i, ts)| (*ts, format!("source-{i}")))
            .collect();
        let got: Vec<(i64, String)> = seen
            .iter()
            .map(|(ts, app)| (*ts, String::from_utf8_lossy(app).into_owned()))
            .collect();
        assert_eq!(got, want);
        // A frame cut anywhere is left whole for the next read.
        for cut in 0..framed.len() {
            let mut seen = Vec::new();
            let f = frames(&framed[..cut], &mut seen);
            let whole = ends.iter().filter(|end| **end <= cut).count();
            assert!(!f.broken, "cut at {cut}");
            assert_eq!(seen.len(), whole, "cut at {cut}");
            assert_eq!(f.used, whole.checked_sub(1).map_or(0, |i| ends[i]));
        }
    }

    #[test]
    fn refuses_unreadable_frames() {
        let mut seen = Vec::new();
        assert!(frames(b"12x4 <14>1 ...", &mut seen).broken);
        assert!(frames(b"123456 <14>1", &mut seen).broken);
        assert!(frames(b"65537 <14>1", &mut seen).broken);
        assert!(!frames(b"65536", &mut seen).broken);
        // A message without a header is counted; the frame after it waits for its last bytes.
        let f = frames(b"5 <14>112 <14>1 1970-", &mut seen);
        assert_eq!((f.used, f.unparsable, f.broken), (7, 1, false));
        assert!(seen.is_empty());
    }
}
