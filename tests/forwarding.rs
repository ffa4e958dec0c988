//! The forwarder drop-in (issue 23): downstream v2 agents announced by `ingress_port.yml` files
//! (`forwarding.ingress_port_glob`) get every envelope beside the Doppler pool, each exactly once
//! with every tag kept; one that is down for 10 s costs the others nothing and its losses,
//! if any, are counted in its own series. Real mTLS gRPC both sides (the downstream agents are
//! fake Dopplers dialled by the name `metron`, as upstream's forwarder dials them).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::agent::World;
use common::*;
use metron::telemetry::Destination;

const WAIT: Duration = Duration::from_secs(30);

/// A directory of `jobs/<job>/config/ingress_port.yml` files, removed when dropped.
struct Jobs(PathBuf);

impl Jobs {
    fn new(ports: &[(&str, u16, &str)]) -> Jobs {
        let dir = std::env::temp_dir().join(format!(
            "metron-jobs-{}-{}",
            std::process::id(),
            ports.first().map_or(0, |p| p.1)
        ));
        for (job, port, protocol) in ports {
            let d = dir.join("jobs").join(job).join("config");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("ingress_port.yml"),
                format!("ingress: {port}\nprotocol: \"{protocol}\"\n"),
            )
            .unwrap();
        }
        Jobs(dir)
    }

    fn yaml(&self) -> String {
        format!(
            "forwarding: {{ ingress_port_glob: \"{}/jobs/*/config/ingress_port.yml\" }}\n",
            self.0.display()
        )
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn forward(d: &FakeDoppler) -> Destination {
    Destination::Forward {
        addr: d.addr().to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_envelope_reaches_every_downstream_agent_once_with_its_tags() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let a = FakeDoppler::start(&w.pki);
    let b = FakeDoppler::start(&w.pki);
    let jobs = Jobs::new(&[
        ("syslog-agent", a.addr().port(), ""),
        ("loggr-forwarder-agent", b.addr().port(), ""),
    ]);
    let agent = w.start(&[(doppler.addr(), "z1")], &jobs.yaml());
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let mut sent = Vec::new();
    for i in 0..400 {
        for mut e in all_types(&format!("app-{}", i % 4)) {
            e.tags.insert("n".into(), i.to_string());
            sent.push(e);
        }
    }
    send_all(&mut client, &sent).await;
    for d in [&doppler, &a, &b] {
        assert!(d.wait_for_count(sent.len(), WAIT), "got {}", d.count());
    }
    assert!(common::agent::wait_drained(&agent, WAIT));
    // The same envelopes, signed and numbered once: each downstream got what the Doppler got.
    let key = |e: &metron::proto::Envelope| format!("{:?}", e.tags.get("metron"));
    let mut at_doppler: Vec<String> = doppler.received().iter().map(key).collect();
    at_doppler.sort();
    for d in [&a, &b] {
        let received = d.received();
        assert_eq!(received.len(), sent.len(), "exactly once");
        for e in &received {
            assert!(e.tags.contains_key("metron"), "every tag kept: {e:?}");
            assert!(e.tags.contains_key("deployment"), "default tags too");
            assert!(e.tags.contains_key("n"));
        }
        let mut keys: Vec<String> = received.iter().map(key).collect();
        keys.sort();
        assert_eq!(keys, at_doppler);
    }
    let m = agent.shutdown().metrics;
    for d in [&a, &b] {
        let acc = m.account(&forward(d)).expect("an account per downstream");
        assert_eq!(
            (acc.offered, acc.egress, acc.dropped_total()),
            (2000, 2000, 0)
        );
    }
    assert_eq!(m.egress, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_agent_that_is_down_costs_the_others_nothing() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let mut a = FakeDoppler::start(&w.pki);
    let b = FakeDoppler::start(&w.pki);
    let jobs = Jobs::new(&[("a", a.addr().port(), ""), ("b", b.addr().port(), "")]);
    // A backoff long enough that `a`'s batch outlives a slow machine's wait for the others.
    let yaml = format!("{}syslog: {{ backoff_max_ms: 2000 }}\n", jobs.yaml());
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    a.kill();
    let batch = |from: usize, n: usize| -> Vec<metron::proto::Envelope> {
        (from..from + n)
            .map(|i| log_envelope("app-a", &i.to_string()))
            .collect()
    };
    // `a` down for 10 s under a steady 1,000 envelopes/s (paced by the clock, not waited on).
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for step in 0..100 {
        tick.tick().await;
        send_all(&mut client, &batch(step * 100, 100)).await;
    }
    // Meanwhile the Doppler and `b` took everything.
    assert!(doppler.wait_for_count(10_000, WAIT));
    assert!(b.wait_for_count(10_000, WAIT));
    assert_eq!(a.count(), 0);
    // Back: `a` gets what was queued for it (retried), and what comes next.
    a.restart();
    send_all(&mut client, &batch(10_000, 1000)).await;
    assert!(doppler.wait_for_count(11_000, WAIT));
    assert!(b.wait_for_count(11_000, WAIT));
    assert!(a.wait_for_count(11_000, WAIT), "a got {}", a.count());
    assert!(common::agent::wait_drained(&agent, WAIT));
    // Each downstream's series: metron's own families and upstream's forwarder family.
    let text = scrape_async(agent.metrics_addr().unwrap()).await;
    let a_addr = a.addr().to_string();
    assert_eq!(
        metric_value(&text, "egress", &[("forward_destination", a_addr.as_str())]),
        Some(11_000.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "egress_expired_total",
            &[("protocol", ""), ("destination", a_addr.as_str())]
        ),
        Some(0.0)
    );
    let m = agent.shutdown().metrics;
    let acc = m.account(&forward(&a)).unwrap();
    assert_eq!((acc.egress, acc.dropped_total()), (11_000, 0), "{acc:?}");
    assert_eq!(m.egress, 11_000);
    assert_eq!(m.dropped_total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_picks_up_a_new_file_and_lets_a_removed_one_go() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let a = FakeDoppler::start(&w.pki);
    let b = FakeDoppler::start(&w.pki);
    let jobs = Jobs::new(&[("a", a.addr().port(), "")]);
    let yaml = jobs.yaml();
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let first: Vec<_> = (0..500)
        .map(|i| log_envelope("app", &i.to_string()))
        .collect();
    send_all(&mut client, &first).await;
    assert!(a.wait_for_count(500, WAIT));
    assert!(common::agent::wait_drained(&agent, WAIT));

    // `b` announces itself, `a` goes away; the same config is applied again (SIGHUP).
    let b_dir = jobs.0.join("jobs/b/config");
    std::fs::create_dir_all(&b_dir).unwrap();
    std::fs::write(
        b_dir.join("ingress_port.yml"),
        format!("ingress: {}\n", b.addr().port()),
    )
    .unwrap();
    std::fs::remove_dir_all(jobs.0.join("jobs/a")).unwrap();
    let outcome = agent
        .reload(w.config(&[(doppler.addr(), "z1")], &yaml))
        .await
        .expect("the reload applies");
    assert_eq!(outcome.applied, vec!["forwarding.ingress_port_glob files"]);
    let second: Vec<_> = (500..1000)
        .map(|i| log_envelope("app", &i.to_string()))
        .collect();
    send_all(&mut client, &second).await;
    assert!(b.wait_for_count(500, WAIT), "b got {}", b.count());
    assert!(doppler.wait_for_count(1000, WAIT));
    assert!(common::agent::wait_drained(&agent, WAIT));
    assert_eq!(a.count(), 500, "nothing more for the removed one");

    // `b`'s file caught half written at the next reload: `b` stays.
    std::fs::write(b_dir.join("ingress_port.yml"), "ingress: [").unwrap();
    let outcome = agent
        .reload(w.config(&[(doppler.addr(), "z1")], &yaml))
        .await
        .expect("the reload applies");
    assert!(outcome.applied.is_empty(), "{outcome:?}");
    let third: Vec<_> = (1000..1100)
        .map(|i| log_envelope("app", &i.to_string()))
        .collect();
    send_all(&mut client, &third).await;
    assert!(b.wait_for_count(600, WAIT), "b got {}", b.count());
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    let acc = m.account(&forward(&b)).expect("b has an account");
    assert_eq!((acc.offered, acc.egress), (600, 600));
    assert!(
        m.account(&forward(&a)).is_none(),
        "a's account is retired once it has delivered"
    );
    assert_eq!(m.egress, 1100);
}

/// A panic in a downstream agent's connection task costs only the batch it held (counted as
/// `actor_panic`, in its own series and under its own actor name); the task starts again and
/// the rest arrives; the Doppler is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_forward_connection_costs_only_the_batch_it_held() {
    use metron::telemetry::{ActorName, DropReason};
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let a = FakeDoppler::start(&w.pki);
    let jobs = Jobs::new(&[("syslog-agent", a.addr().port(), "")]);
    let agent = w.start(&[(doppler.addr(), "z1")], &jobs.yaml());
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let first: Vec<_> = (0..500)
        .map(|i| log_envelope("app-a", &format!("before {i}")))
        .collect();
    send_all(&mut client, &first).await;
    assert!(a.wait_for_count(first.len(), WAIT), "got {}", a.count());
    agent.chaos_panic(ActorName::ForwardConnection, 0, false);
    // The task panics at the first batch it takes once the hook is set: keep sending until it
    // has (bounded), then as much again.
    let mut sent = first.len();
    let mut step = 0;
    let mut after_panic = 0;
    while after_panic < 10 {
        assert!(step < 2_000, "the forward connection never panicked");
        let batch: Vec<_> = (0..50)
            .map(|i| log_envelope("app-a", &format!("after {step} {i}")))
            .collect();
        send_all(&mut client, &batch).await;
        sent += batch.len();
        step += 1;
        if agent.metrics().panics_of(ActorName::ForwardConnection) == 1 {
            after_panic += 1;
        }
    }
    let sent = sent as u64;
    assert!(
        doppler.wait_for_count(sent as usize, WAIT),
        "got {}",
        doppler.count()
    );
    let panicked = |m: &metron::telemetry::MetricsSnapshot| {
        m.panics_of(ActorName::ForwardConnection) == 1
            && m.account(&forward(&a))
                .is_some_and(|acc| acc.offered == acc.egress + acc.dropped_total())
    };
    assert!(
        wait_until_async(WAIT, || panicked(&agent.metrics())).await,
        "{:?}",
        agent.metrics()
    );
    // Its batch held when it panicked is the only loss; what came after arrives.
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    let acc = m.account(&forward(&a)).expect("an account").clone();
    let lost = acc.dropped_by(DropReason::ActorPanic);
    // One take of the connection's at most (1,000 envelopes a call).
    assert!(lost > 0 && lost <= 1_000, "{acc:?}");
    assert_eq!(acc.dropped_total(), lost, "{acc:?}");
    assert_eq!((acc.offered, acc.egress), (sent, sent - lost), "{acc:?}");
    assert_eq!(a.count() as u64, sent - lost);
    assert_eq!(m.panics_of(ActorName::ForwardConnection), 1);
    assert_eq!(m.panics_of(ActorName::DrainConnection), 0);
    assert_eq!(doppler.count() as u64, sent, "the Doppler got everything");
}
