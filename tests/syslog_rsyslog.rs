//! The syslog formatter and drain writer against a real syslog server: rsyslog receives 10,000
//! envelopes from 10 apps over `syslog://` and over `syslog-tls://` with client certificates,
//! octet-counted; the fields it parsed equal, for every message, the fields expected from
//! upstream's rules (reference `destinations.md` §1.3), computed here from the envelope rather
//! than by metron's formatter.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::rsyslog::Rsyslog;
use common::*;
use metron::proto::envelope::Message;
use metron::proto::{Counter, Envelope, Log};
use metron::syslog::rfc5424::{format, Options};
use metron::syslog::writer::{SyslogWriter, WriterSettings};
use metron::tls::TlsMaterial;

const APPS: usize = 10;
const PER_APP: usize = 1_000;
const WAIT: Duration = Duration::from_secs(30);

/// 2026-12-06T12:30:01Z, plus `i` microseconds.
fn timestamp(i: usize) -> i64 {
    1_796_560_201_000_000_000 + i as i64 * 1_000
}

/// App `a`'s `i`th envelope: mostly logs (OUT and ERR, payloads needing nothing special), every
/// tenth a counter. Tags as the Diego cell's agent sets them, one needing escapes.
fn envelope(a: usize, i: usize) -> Envelope {
    let tags: BTreeMap<String, String> = [
        ("source_type", "APP/PROC/WEB".to_string()),
        ("organization_name", "my org".to_string()),
        ("space_name", "dev".to_string()),
        ("app_name", format!("app_{a}")),
        ("quote", "say \"hi\" [x] \\ ok".to_string()),
        ("metron", "2k.abc".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let message = if i % 10 == 9 {
        Message::Counter(Counter {
            name: "requests".into(),
            delta: 1,
            total: i as u64,
        })
    } else {
        Message::Log(Log {
            payload: format!("line {i} of app {a}").into_bytes(),
            r#type: (i % 2) as i32,
        })
    };
    Envelope {
        timestamp: timestamp(i),
        source_id: format!("app-guid-{a}"),
        instance_id: (i % 3).to_string(),
        tags,
        message: Some(message),
        ..Default::default()
    }
}

/// What rsyslog should report for `e`, from upstream's rules: PRI, timestamp, hostname,
/// app-name, procid, msgid, structured data, message.
fn expected(e: &Envelope) -> Vec<String> {
    let escape = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace(']', "\\]")
    };
    let tags: String = e
        .tags
        .iter()
        .filter(|(k, _)| k.as_str() != "metron")
        .map(|(k, v)| format!(" {k}=\"{}\"", escape(v)))
        .collect();
    let tags = format!("[tags@47450{tags}]");
    // Go's layout `.999999`: microseconds, trailing zeros dropped, no point when they are zero.
    let micros = (e.timestamp / 1_000) % 1_000_000;
    let fraction = format!(".{micros:06}");
    let fraction = fraction.trim_end_matches('0').trim_end_matches('.');
    let ts = format!("2026-12-06T12:30:01{fraction}+00:00");
    let host = format!("my-org.dev.app{}", &e.tags["app_name"][4..]);
    let (pri, procid, sd, msg) = match e.message.as_ref().unwrap() {
        Message::Log(l) => (
            if l.r#type == 1 { "11" } else { "14" },
            format!("[APP/PROC/WEB/{}]", e.instance_id),
            tags,
            String::from_utf8(l.payload.clone()).unwrap(),
        ),
        Message::Counter(c) => (
            "14",
            format!("[{}]", e.instance_id),
            format!(
                "[counter@47450 name=\"{}\" total=\"{}\" delta=\"{}\"]{tags}",
                c.name, c.total, c.delta
            ),
            String::new(),
        ),
        _ => unreachable!(),
    };
    vec![
        pri.to_string(),
        ts,
        host,
        e.source_id.clone(),
        procid,
        "-".to_string(),
        sd,
        msg,
    ]
}

async fn send_all(server: &Rsyslog, settings: WriterSettings) -> SyslogWriter {
    let opts = Options {
        hostname: "ignored",
        metadata: true,
        metron_tag: false,
    };
    let mut writer = SyslogWriter::new(server.addr.to_string(), settings);
    for i in 0..PER_APP {
        for a in 0..APPS {
            let mut messages = Vec::new();
            format(&envelope(a, i), &opts, &mut messages).expect("formats");
            writer.write(&messages).await.expect("written");
        }
    }
    writer
}

fn check(server: &Rsyslog) {
    assert!(
        server.wait_for(APPS * PER_APP, WAIT),
        "rsyslog wrote {} of {}",
        server.messages().len(),
        APPS * PER_APP
    );
    let got = server.messages();
    assert_eq!(got.len(), APPS * PER_APP);
    let mut want: Vec<Vec<String>> = (0..PER_APP)
        .flat_map(|i| (0..APPS).map(move |a| expected(&envelope(a, i))))
        .collect();
    // One connection, in order.
    for (n, (g, w)) in got.iter().zip(want.drain(..)).enumerate() {
        assert_eq!(g, &w, "message {n}");
    }
}

fn settings(tls: Option<(Arc<rustls::ClientConfig>, &'static str)>) -> WriterSettings {
    WriterSettings {
        tls: tls.map(|(c, name)| (c, name.try_into().expect("a server name"))),
        dial_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
        idle_reconnect: Duration::from_secs(60),
        send_buffer: 1 << 20,
        blocked: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsyslog_reads_every_field_over_tcp() {
    let pki = Pki::new();
    let server = Rsyslog::start(&pki);
    let writer = send_all(&server, settings(None)).await;
    assert_eq!(writer.dials(), 1);
    check(&server);
}

/// Also: a writer without a client certificate gets nothing through (had it, `check` would
/// find one message too many).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsyslog_reads_every_field_over_mutual_tls() {
    install_crypto_provider();
    let pki = Pki::new();
    let server_cert = pki.issue("rsyslog", &["rsyslog.test", "localhost"]);
    let client = pki.issue("drain-client", &["metron"]);
    let server = Rsyslog::start_tls(&pki, &server_cert);
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for ca in rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let anonymous = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let mut stranger = SyslogWriter::new(
        server.addr.to_string(),
        settings(Some((anonymous, "rsyslog.test"))),
    );
    // Refused during or after the handshake: whether the write errs does not matter.
    let _ = stranger
        .write(&[b"<14>1 - - - - - - no client certificate\n".to_vec()])
        .await;
    stranger.close().await;
    let material = TlsMaterial {
        ca_pem: pki.ca_pem.clone().into_bytes(),
        cert_pem: client.cert_pem.clone().into_bytes(),
        key_pem: client.key_pem.clone().into_bytes(),
    };
    let config = material
        .rustls_client_config("syslog.aggregate_drains[0]")
        .unwrap();
    let writer = send_all(&server, settings(Some((config, "rsyslog.test")))).await;
    assert_eq!(writer.dials(), 1);
    check(&server);
}

/// A receiver that closes a connection idle for 300 ms without a word, as Log Cache does after
/// 2 minutes: a writer that reconnects after 100 ms idle never writes into the closed socket,
/// so nothing is lost; every message arrives, over two connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_replaced_before_the_receiver_drops_it() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        // Bounded: this test makes two connections.
        for _ in 0..2 {
            let (mut s, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                        // Idle, or closed by the writer: close without a word.
                        _ => break,
                    }
                }
                let _ = tx.send(got);
            });
        }
    });
    let mut writer = SyslogWriter::new(
        addr.to_string(),
        WriterSettings {
            idle_reconnect: Duration::from_millis(100),
            send_buffer: 1 << 20,
            ..settings(None)
        },
    );
    writer.write(&[b"<14>1 first\n".to_vec()]).await.unwrap();
    // The scenario: the connection stays idle past the writer's limit and the receiver's, which
    // has dropped it by then (not a synchronisation).
    tokio::time::sleep(Duration::from_millis(400)).await;
    writer.write(&[b"<14>1 second\n".to_vec()]).await.unwrap();
    writer.close().await;
    assert_eq!(writer.dials(), 2, "the idle connection was replaced");
    let mut all = Vec::new();
    for _ in 0..2 {
        all.push(
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .expect("the receiver reports")
                .unwrap(),
        );
    }
    all.sort();
    assert_eq!(
        all,
        [b"12 <14>1 first\n".to_vec(), b"13 <14>1 second\n".to_vec()]
    );
}
