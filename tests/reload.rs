//! `Agent::reload` (what SIGHUP does): certificates rotated to a new CA on both sides while
//! envelopes flow, the signing key rotated with the old one kept for receivers, default tags
//! changed live, keys that need a restart named and kept, and an invalid reload kept out.

mod common;

use std::time::Duration;

use common::agent::{assert_balanced, assert_losses_accounted, World, KEY, KEY_ID};
use common::load::Load;
use common::*;
use metron::config::Config;
use metron::proto::EnvelopeBatch;
use metron::telemetry::DropReason;
use metron::{KeyRing, ReloadError};

const STEP: Duration = Duration::from_secs(15);

fn copy(from: &std::path::Path, to: &std::path::Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_to_a_new_ca_on_both_sides_while_envelopes_flow() {
    let w = World::new();
    let old_doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(old_doppler.addr(), "z1")], "");
    assert!(old_doppler.wait_for_streams_async(3, STEP).await);
    // Emitters connected before the rotation, with the old CA's certificates.
    let load = Load::start(&agent, &w, 2, Some(Duration::from_millis(2))).await;
    assert!(old_doppler.wait_for_count_async(400, STEP).await);

    // A new CA. The agent's files are rewritten in place, as rotation tooling does; a new
    // Doppler trusts only the new CA and presents a certificate from it.
    let pki2 = Pki::new();
    let new_doppler = FakeDoppler::start(&pki2);
    let agent2 = pki2.issue("metron", &["metron"]);
    let emitter2 = pki2.issue("emitter", &["emitter"]);
    copy(&pki2.ca_path, &w.pki.ca_path);
    copy(&agent2.cert_path, &w.agent_cert.cert_path);
    copy(&agent2.key_path, &w.agent_cert.key_path);
    let outcome = agent
        .reload(w.config(&[(new_doppler.addr(), "z1")], ""))
        .await
        .expect("the reload applies");
    assert_eq!(
        outcome.applied,
        vec!["ingress.grpc.tls", "dopplers.endpoints", "dopplers.tls"]
    );
    assert!(outcome.needs_restart.is_empty(), "{outcome:?}");

    // Every slot moves off the retired Doppler, gracefully, to the new one: a handshake that
    // only the new client certificate and the new CA can make.
    assert!(
        new_doppler.wait_for_streams_async(3, STEP).await,
        "new Doppler: {:?}",
        new_doppler.counts()
    );
    assert!(
        wait_until_async(STEP, || agent.metrics().doppler_v2_streams == 3).await,
        "{:?}",
        agent.metrics()
    );
    // The emitters connected before the rotation keep sending on their connections.
    let moved = new_doppler.count();
    assert!(
        new_doppler.wait_for_count_async(moved + 400, STEP).await,
        "old emitters' envelopes stopped arriving: {}",
        new_doppler.count()
    );
    // A new emitter with the old CA's credentials is refused now; one with the new CA's is in.
    let refused = async {
        let client = connect_ingress(
            agent.ingress_addr(),
            "metron",
            &w.pki.ca_pem,
            &w.client_cert,
        );
        match client.await {
            Err(_) => true,
            Ok(mut c) => c.send(EnvelopeBatch::default()).await.is_err(),
        }
    };
    assert!(refused.await, "an emitter with the old CA got in");
    let mut client2 = connect_ingress(agent.ingress_addr(), "metron", &pki2.ca_pem, &emitter2)
        .await
        .expect("an emitter with the new CA connects");
    client2
        .send(EnvelopeBatch {
            batch: vec![log_envelope("after-rotation", "hello")],
        })
        .await
        .expect("and sends");
    assert!(
        wait_until_async(STEP, || new_doppler
            .received()
            .iter()
            .any(|e| e.source_id == "after-rotation"))
        .await
    );

    let sent = load.stop().await;
    assert!(sent > 0);
    let report = agent.shutdown();
    assert!(report.flushed, "{:?}", report.metrics);
    let m = report.metrics;
    assert_eq!(m.ingress, sent + 1, "{m:?}");
    assert_eq!(m.ingress, m.egress + m.dropped_total(), "{m:?}");
    let received = common::doppler::received_in_send_order(&[&old_doppler, &new_doppler]);
    assert_losses_accounted(&received, &m);
    // Graceful moves: nothing accepted was lost. (Should every stream be down at one instant, the
    // edge refuses what arrives then, counted: allowed, but nothing after admission.)
    let refused = m.dropped_by(DropReason::NoDoppler) + m.dropped_by(DropReason::PipelineFull);
    assert_eq!(m.dropped_total(), refused, "{m:?}");
    assert_eq!(received.len() as u64, m.egress);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signing_key_and_default_tags_change_live_and_the_old_key_stays_verifiable() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let send = |source: &str| EnvelopeBatch {
        batch: (0..5)
            .map(|i| log_envelope(source, &format!("{i}")))
            .collect(),
    };
    client.send(send("before")).await.unwrap();
    assert!(doppler.wait_for_count_async(5, STEP).await);

    let new_key = w.pki.dir.join("signing-2.key");
    std::fs::write(&new_key, b"the rotated signing key").unwrap();
    let rotated = w
        .yaml(&[(doppler.addr(), "z1")], "")
        .replacen(
            &format!("signing: {{ key_id: {KEY_ID}, key_file: {} }}", w.key_file.display()),
            &format!(
                "signing: {{ key_id: k2, key_file: {}, previous_keys: [ {{ key_id: {KEY_ID}, key_file: {} }} ] }}",
                new_key.display(),
                w.key_file.display()
            ),
            1,
        )
        .replacen("tags: { team: loggregator }", "tags: { team: firehose, rack: r7 }", 1);
    let config = Config::from_yaml(&rotated).unwrap();
    let signing = config.signing.clone().unwrap();
    let outcome = agent.reload(config).await.expect("the reload applies");
    assert_eq!(
        outcome.applied,
        vec!["tags", "signing", "signing.previous_keys"]
    );

    client.send(send("after")).await.unwrap();
    assert!(doppler.wait_for_count_async(10, STEP).await);
    // Receivers configured from the new file verify both: the new key and the previous one.
    let ring = KeyRing::from_config(&signing);
    for e in doppler.received() {
        let key_id = ring.verify(&e).unwrap_or_else(|err| panic!("{err}: {e:?}"));
        let (want_key, team, rack) = if e.source_id == "before" {
            (KEY_ID, "loggregator", None)
        } else {
            ("k2", "firehose", Some("r7"))
        };
        assert_eq!(key_id, want_key, "{e:?}");
        assert_eq!(e.tags.get("team").map(String::as_str), Some(team));
        assert_eq!(e.tags.get("rack").map(String::as_str), rack);
        // The identity tags are unchanged.
        assert_eq!(e.tags["job"], "diego-cell");
    }
    // The old key alone no longer verifies what is signed now.
    let after = doppler
        .received()
        .into_iter()
        .find(|e| e.source_id == "after")
        .unwrap();
    assert!(metron::verify(&after, KEY_ID, KEY).is_err());
    assert_balanced(&agent);
    agent.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_changes_nothing() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;

    // A certificate file that is no longer PEM: named, and nothing applied (the new tags and
    // Doppler list in the same file are not taken either).
    let broken = w.pki.dir.join("broken.pem");
    std::fs::write(&broken, "not a certificate\n").unwrap();
    let other = FakeDoppler::start(&w.pki);
    let yaml = w.yaml(&[(other.addr(), "z1")], "").replacen(
        "tags: { team: loggregator }",
        "tags: { team: elsewhere }",
        1,
    );
    let bad_cert = yaml.replacen(
        &format!("cert: {}", w.agent_cert.cert_path.display()),
        &format!("cert: {}", broken.display()),
        1,
    );
    match agent.reload(Config::from_yaml(&bad_cert).unwrap()).await {
        Err(ReloadError::Config(e)) => assert_eq!(e.key, "ingress.grpc.tls.cert", "{e}"),
        other => panic!("accepted a broken certificate: {other:?}"),
    }
    // A new key under the same key id: receivers could not tell the two apart.
    let other_key = w.pki.dir.join("other.key");
    std::fs::write(&other_key, b"a different key").unwrap();
    let same_id = yaml.replacen(
        &format!("key_file: {} }}", w.key_file.display()),
        &format!("key_file: {} }}", other_key.display()),
        1,
    );
    match agent.reload(Config::from_yaml(&same_id).unwrap()).await {
        Err(ReloadError::Config(e)) => {
            assert_eq!(e.key, "signing.key_file", "{e}");
            assert!(e.problem.contains("key_id"), "{e}");
        }
        other => panic!("accepted a changed key under the same id: {other:?}"),
    }

    // Removing `signing:` needs a restart (the key in use stays), and does not open a way to
    // bring the same id back with another key.
    let no_signing = yaml.replacen(
        &format!(
            "signing: {{ key_id: {KEY_ID}, key_file: {} }}",
            w.key_file.display()
        ),
        "",
        1,
    );
    let outcome = agent
        .reload(Config::from_yaml(&no_signing).unwrap())
        .await
        .expect("applies the rest");
    assert!(outcome.needs_restart.contains(&"signing"), "{outcome:?}");
    match agent.reload(Config::from_yaml(&same_id).unwrap()).await {
        Err(ReloadError::Config(e)) => assert_eq!(e.key, "signing.key_file", "{e}"),
        other => panic!("accepted a changed key under the same id: {other:?}"),
    }
    // Back to the original file, which the checks below compare against.
    agent
        .reload(Config::from_yaml(&w.yaml(&[(doppler.addr(), "z1")], "")).unwrap())
        .await
        .expect("the original config applies");

    // Still the old config everywhere: old Doppler, old tags, old key, old certificates.
    client
        .send(EnvelopeBatch {
            batch: vec![log_envelope("still", "here")],
        })
        .await
        .unwrap();
    assert!(doppler.wait_for_count_async(1, STEP).await);
    let e = &doppler.received()[0];
    assert_eq!(e.tags["team"], "loggregator");
    metron::verify(e, KEY_ID, KEY).expect("signed with the old key");
    // The running config is still the original: reloading it changes nothing.
    let unchanged = agent
        .reload(w.config(&[(doppler.addr(), "z1")], ""))
        .await
        .expect("the original config applies");
    assert!(unchanged.applied.is_empty(), "{unchanged:?}");
    assert_eq!(
        other.connections_opened(),
        0,
        "the rejected Doppler list was not used"
    );
    assert!(ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert)
        .await
        .send(EnvelopeBatch::default())
        .await
        .is_ok());
    assert_balanced(&agent);
    agent.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_need_a_restart_are_named_and_keep_their_running_values() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], "");
    assert!(doppler.wait_for_streams_async(3, STEP).await);
    let yaml = w
        .yaml(
            &[(doppler.addr(), "z1")],
            "pipeline: { max_buffered_bytes: 20971520, mailbox_capacity: 7 }",
        )
        .replacen("  connections: 3\n", "  connections: 4\n", 1)
        .replacen(
            "log: { level: warn }",
            "log: { level: error, format: json }",
            1,
        );
    let outcome = agent
        .reload(Config::from_yaml(&yaml).unwrap())
        .await
        .unwrap();
    assert_eq!(
        outcome.needs_restart,
        vec![
            "dopplers.connections",
            "pipeline.mailbox_capacity",
            "log.format"
        ]
    );
    assert_eq!(
        outcome.applied,
        vec!["pipeline.max_buffered_bytes", "log.level"]
    );
    // Still three connections; the budget is the new one.
    let text = scrape_async(agent.metrics_addr().unwrap()).await;
    assert_eq!(
        metric_value(&text, "doppler_connections", &[("metric_version", "2.0")]),
        Some(3.0)
    );
    assert_eq!(
        metric_value(&text, "buffered_bytes_limit", &[]),
        Some(20_971_520.0),
        "{text}"
    );
    // Reloading the same file again changes nothing live and still names the restart keys.
    let again = agent
        .reload(Config::from_yaml(&yaml).unwrap())
        .await
        .unwrap();
    assert!(again.applied.is_empty(), "{again:?}");
    assert_eq!(again.needs_restart.len(), 3);
    agent.shutdown();
}

/// An agent started with signing off stays unsigned when a reload brings a key and turns signing
/// on (that needs a restart), and one started with it on keeps signing when a reload turns it
/// off; both are named as needing a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_signing_on_or_off_needs_a_restart() {
    use metron::envelope::tag::{MetronTag, TAG};
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let signed = w.yaml(&[(doppler.addr(), "z1")], "");
    let configured = format!(
        "signing: {{ key_id: {KEY_ID}, key_file: {} }}",
        w.key_file.display()
    );
    let unsigned = signed.replace(&configured, "signing: { enabled: false }");
    assert_ne!(signed, unsigned);
    let mut sent = 0;
    for (start, then, still_signed) in [(&unsigned, &signed, false), (&signed, &unsigned, true)] {
        metron::telemetry::init_logging("warn");
        let agent = metron::Agent::start(Config::from_yaml(start).unwrap()).unwrap();
        let outcome = agent
            .reload(Config::from_yaml(then).unwrap())
            .await
            .expect("the reload applies what it can");
        assert!(
            outcome.needs_restart.contains(&"signing.enabled"),
            "{outcome:?}"
        );
        assert!(!outcome.applied.contains(&"signing"), "{outcome:?}");
        let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
        client
            .send(EnvelopeBatch {
                batch: vec![log_envelope("after-reload", "x")],
            })
            .await
            .unwrap();
        sent += 1;
        assert!(doppler.wait_for_count_async(sent, STEP).await);
        let e = doppler.received().pop().unwrap();
        let tag = MetronTag::parse(&e.tags[TAG]).unwrap();
        assert_eq!(tag.signature.is_some(), still_signed, "{e:?}");
        assert!(tag.sequence.is_some(), "numbered either way");
        agent.shutdown();
    }
}
