//! Starting a real agent in-process for a test: certificates from the test's PKI, a signing key,
//! ephemeral ports, and Dopplers given as (address, az).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use metron::config::Config;
use metron::envelope::signing::encode_hex;
use metron::envelope::tag::{MetronTag, TAG};
use metron::proto::Envelope;
use metron::telemetry::{DropReason, MetricsSnapshot};
use metron::Agent;

use super::{CertFiles, Pki};

pub const KEY_ID: &str = "test-k";
pub const KEY: &[u8] = b"a signing key for tests";

/// Everything a test needs around one agent.
pub struct World {
    pub pki: Pki,
    pub agent_cert: CertFiles,
    pub client_cert: CertFiles,
    pub key_file: PathBuf,
}

impl World {
    pub fn new() -> World {
        super::install_crypto_provider();
        let pki = Pki::new();
        let agent_cert = pki.issue("metron", &["metron"]);
        let client_cert = pki.issue("emitter", &["emitter"]);
        let key_file = pki.dir.join("signing.key");
        // A trailing newline, as an operator's editor would leave it: not part of the key.
        std::fs::write(&key_file, [KEY, b"\n"].concat()).unwrap();
        World {
            pki,
            agent_cert,
            client_cert,
            key_file,
        }
    }

    /// The agent's YAML for these Dopplers; `extra` is appended under the top level (e.g.
    /// `pipeline: { max_buffered_bytes: 10485760 }`). Ports are ephemeral.
    pub fn yaml(&self, dopplers: &[(SocketAddr, &str)], extra: &str) -> String {
        let endpoints: String = dopplers
            .iter()
            .map(|(a, az)| format!("    - {{ addr: \"{a}\", az: {az} }}\n"))
            .collect();
        let tls = format!(
            "{{ ca: {}, cert: {}, key: {} }}",
            self.pki.ca_path.display(),
            self.agent_cert.cert_path.display(),
            self.agent_cert.key_path.display()
        );
        format!(
            r#"identity: {{ deployment: cf, job: diego-cell, index: "3", ip: 10.0.0.5, az: z1 }}
tags: {{ team: loggregator }}
ingress:
  grpc:
    listen: "127.0.0.1:0"
    tls: {tls}
  udp: {{ listen: "127.0.0.1:0" }}
dopplers:
  endpoints:
{endpoints}  tls: {tls}
  connections: 3
  backoff_initial_ms: 20
  backoff_max_ms: 200
  rebalance_interval_ms: 100
  progress_timeout_ms: 500
metrics:
  listen: "127.0.0.1:0"
health:
  listen: "127.0.0.1:0"
signing: {{ key_id: {KEY_ID}, key_file: {} }}
log: {{ level: warn }}
{extra}
"#,
            self.key_file.display()
        )
    }

    pub fn config(&self, dopplers: &[(SocketAddr, &str)], extra: &str) -> Config {
        let yaml = self.yaml(dopplers, extra);
        Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("test config: {e}\n{yaml}"))
    }

    pub fn start(&self, dopplers: &[(SocketAddr, &str)], extra: &str) -> Agent {
        metron::telemetry::init_logging("warn");
        Agent::start(self.config(dopplers, extra)).expect("agent starts")
    }
}

/// A loopback address with nothing listening (bound, then released): every dial to it fails until
/// a test starts a Doppler there.
pub fn unserved_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// The balance every test ends with: each envelope that entered was delivered or dropped.
pub fn assert_balanced(agent: &Agent) {
    let m = agent.metrics();
    let (buffered, _) = agent.buffered();
    assert_eq!(
        m.ingress_total(),
        m.egress + m.dropped_total() + buffered,
        "ingress == egress + dropped + buffered: {m:?}, buffered {buffered}"
    );
}

/// Waits until nothing is buffered in the agent.
pub fn wait_drained(agent: &Agent, timeout: Duration) -> bool {
    super::wait_until(timeout, || agent.buffered().0 == 0)
}

/// (stream, number) of an envelope, from its `metron` tag; the stream in hex.
pub fn seq_of(e: &Envelope) -> (String, u64) {
    let tag = e.tags.get(TAG).expect("a metron tag");
    let sequence = MetronTag::parse(tag)
        .expect("the metron tag reads")
        .sequence
        .expect("numbered");
    (encode_hex(&sequence.stream), sequence.seq)
}

/// What the Dopplers received (merged in send order: see
/// [`super::doppler::received_in_send_order`]) squares with the agent's counts:
/// - no envelope arrived twice, and every source's envelopes were sent in order;
/// - everything counted as `egress` (acknowledged) arrived;
/// - every missing sequence number is an envelope counted as dropped after sequencing that did
///   not arrive: gaps == (drops after sequencing) − (of those, the ones that arrived anyway).
///
/// Call it after a shutdown (or a drain), when nothing is in flight any more.
pub fn assert_losses_accounted(received: &[Envelope], m: &MetricsSnapshot) {
    for ((_, source), seqs) in sequences(received) {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert!(
            sorted.windows(2).all(|w| w[0] < w[1]),
            "{source} arrived twice: {seqs:?}"
        );
        assert_eq!(seqs, sorted, "{source} was sent out of order");
    }
    let arrived = received.len() as u64;
    assert!(
        arrived >= m.egress,
        "{arrived} arrived, fewer than the {} acknowledged",
        m.egress
    );
    let after_sequencing: u64 = [
        DropReason::SignerQueueFull,
        DropReason::ActorPanic,
        DropReason::ShutdownGraceExpired,
        DropReason::ConnectionLost,
    ]
    .into_iter()
    .map(|r| m.dropped_by(r))
    .sum();
    let arrived_anyway = arrived - m.egress;
    let gaps: u64 = sequences(received)
        .values()
        .map(|seqs| seqs.last().unwrap() - seqs.len() as u64)
        .sum();
    assert!(
        arrived_anyway <= after_sequencing,
        "{arrived_anyway} arrived beyond what was acknowledged, but only {after_sequencing} were counted as possibly lost"
    );
    // A source whose very last envelopes were lost shows no gap for them: `<=`, and the tests
    // keep every source sending after their last fault so that the tail is covered.
    assert!(
        gaps <= after_sequencing - arrived_anyway,
        "{gaps} gaps but only {} counted losses: {m:?}",
        after_sequencing - arrived_anyway
    );
}

/// Per (stream, source), the sequence numbers in the order a Doppler received them.
pub fn sequences(received: &[Envelope]) -> std::collections::BTreeMap<(String, String), Vec<u64>> {
    let mut out: std::collections::BTreeMap<(String, String), Vec<u64>> = Default::default();
    for e in received {
        let (stream, seq) = seq_of(e);
        out.entry((stream, e.source_id.clone()))
            .or_default()
            .push(seq);
    }
    out
}
