//! The one tag the agent adds, `metron`, as Dopplers receive it: one map entry within 56 bytes,
//! carrying each source's gapless numbers and a signature any receiver can verify; signing and
//! sequencing each turn off on their own, and with both off the agent adds nothing of its own.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::agent::{assert_balanced, sequences, World, KEY, KEY_ID};
use common::*;
use metron::envelope::tag::{self, MetronTag, TAG};
use metron::proto::Envelope;
use metron::VerifyError;
use prost::Message as _;

const WAIT: Duration = Duration::from_secs(15);
const PER_SOURCE: usize = 300;

/// The workload: every type from two sources, `PER_SOURCE` envelopes each.
fn workload() -> Vec<Envelope> {
    (0..PER_SOURCE / 5)
        .flat_map(|_| ["app-a", "app-b"].into_iter().flat_map(all_types))
        .collect()
}

/// Runs `sent` through an agent with `signing` and `sequencing` on or off; returns what
/// the Doppler received, by source in send order.
async fn run(sent: &[Envelope], signing: bool, sequencing: bool) -> Vec<Envelope> {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let configured = format!(
        "signing: {{ key_id: {KEY_ID}, key_file: {} }}",
        w.key_file.display()
    );
    let mut yaml = w.yaml(&[(doppler.addr(), "z1")], "");
    assert!(yaml.contains(&configured));
    if !signing {
        yaml = yaml.replace(&configured, "signing: { enabled: false }");
    }
    if !sequencing {
        yaml.push_str("sequencing: { enabled: false }\n");
    }
    metron::telemetry::init_logging("warn");
    let agent =
        metron::Agent::start(metron::config::Config::from_yaml(&yaml).unwrap()).expect("starts");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    send_all(&mut client, sent).await;
    assert!(doppler.wait_for_count_async(sent.len(), WAIT).await);
    assert_balanced(&agent);
    agent.shutdown();
    let mut received = doppler.received();
    received.sort_by_key(|e| e.source_id.clone());
    received
}

/// `e` without its `metron` tag.
fn untagged(e: &Envelope) -> Envelope {
    let mut e = e.clone();
    e.tags.remove(TAG);
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_entry_within_56_bytes_numbered_and_signed() {
    let sent = workload();
    let tagged = run(&sent, true, true).await;
    let plain = run(&sent, false, false).await;
    assert_eq!(tagged.len(), 2 * PER_SOURCE);
    assert_eq!(plain.len(), tagged.len());
    for (t, p) in tagged.iter().zip(&plain) {
        assert!(
            !p.tags.contains_key(TAG),
            "with both off the agent adds nothing: {p:?}"
        );
        assert_eq!(&untagged(t), p, "the tag is all that differs");
        assert_eq!(t.tags.len(), p.tags.len() + 1, "one map entry");
        // The key id is the longest allowed (6) and numbers are far below a million.
        let added = t.encoded_len() - p.encoded_len();
        assert_eq!(added, tag::wire_bytes(t.tags[TAG].len()));
        assert!(added <= 56, "{added} bytes: {}", t.tags[TAG]);
        let parsed = MetronTag::parse(&t.tags[TAG]).unwrap();
        assert_eq!(parsed.signature.unwrap().0, KEY_ID);
        metron::verify(t, KEY_ID, KEY).unwrap_or_else(|err| panic!("{err}: {t:?}"));
    }
    let seqs = sequences(&tagged);
    assert_eq!(seqs.len(), 2, "one stream, two sources: {:?}", seqs.keys());
    for ((_, source), numbers) in seqs {
        let want: Vec<u64> = (1..=PER_SOURCE as u64).collect();
        assert_eq!(numbers, want, "{source}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_and_sequencing_turn_off_each_on_its_own() {
    let sent = workload();
    let signed_only = run(&sent, true, false).await;
    for e in &signed_only {
        let t = MetronTag::parse(&e.tags[TAG]).unwrap();
        assert_eq!(t.sequence, None, "not numbered: {e:?}");
        metron::verify(e, KEY_ID, KEY).unwrap_or_else(|err| panic!("{err}: {e:?}"));
    }

    let numbered_only = run(&sent, false, true).await;
    let mut by_source: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in &numbered_only {
        let t = MetronTag::parse(&e.tags[TAG]).unwrap();
        assert_eq!(t.signature, None, "not signed: {e:?}");
        assert_eq!(metron::verify(e, KEY_ID, KEY), Err(VerifyError::Missing));
        by_source
            .entry(e.source_id.clone())
            .or_default()
            .push(t.sequence.unwrap().seq);
    }
    for (source, numbers) in by_source {
        let want: Vec<u64> = (1..=PER_SOURCE as u64).collect();
        assert_eq!(numbers, want, "{source}");
    }
}
