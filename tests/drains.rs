//! Syslog drains beside the Doppler pool: every destination gets what its filter takes, written as
//! upstream's syslog-agent writes it, and a blackholed drain costs the other destinations nothing
//! (its losses show in its own series only). Real mTLS gRPC in, real TCP and mTLS syslog out.

mod common;

use std::time::Duration;

use common::agent::{sequences, World};
use common::drain::{Behaviour, FakeDrain};
use common::load::Load;
use common::*;
use metron::proto::envelope::Message;
use metron::telemetry::{Destination, DrainScope, DropReason, MetricsSnapshot};
use metron::Agent;

const WAIT: Duration = Duration::from_secs(20);

fn drain_yaml(w: &World, drains: &[(String, bool)], extra: &str) -> String {
    let entries: String = drains
        .iter()
        .map(|(url, mtls)| {
            if *mtls {
                format!(
                    "    - {{ url: \"{url}\", ca: {}, cert: {}, key: {} }}\n",
                    w.pki.ca_path.display(),
                    w.client_cert.cert_path.display(),
                    w.client_cert.key_path.display()
                )
            } else {
                format!("    - {{ url: \"{url}\" }}\n")
            }
        })
        .collect();
    format!("syslog:\n  aggregate_drains:\n{entries}{extra}")
}

fn drain(url: &str) -> Destination {
    Destination::Drain {
        scope: DrainScope::Aggregate,
        url: url.to_string(),
    }
}

/// Every destination settled what it was offered, and the agent-wide balance holds:
/// `ingress + destination_copies == Σ egress + Σ dropped + filtered` (nothing buffered).
fn assert_fan_out_balanced(m: &MetricsSnapshot) {
    for a in &m.accounts {
        assert_eq!(
            a.offered,
            a.egress + a.dropped_total() + a.buffered,
            "{:?}: offered == egress + dropped + buffered",
            a.destination
        );
        assert_eq!(a.buffered, 0, "{:?} holds nothing", a.destination);
    }
    assert_eq!(
        m.ingress + m.destination_copies,
        m.egress + m.drain_egress() + m.dropped_total() + m.drain_dropped() + m.filtered,
        "the fan-out balance: {m:?}"
    );
}

/// The APP-NAME and MSG of an RFC 5424 message (MSG without its trailing newline).
fn app_and_msg(m: &str) -> (String, String) {
    let fields: Vec<&str> = m.splitn(7, ' ').collect();
    let rest = fields[6];
    // Structured data runs to the last `]` before the message (or is `-`).
    let msg = if let Some(r) = rest.strip_prefix("- ") {
        r
    } else {
        rest.rfind("] ").map_or("", |i| &rest[i + 2..])
    };
    (
        fields[3].to_string(),
        msg.trim_end_matches('\n').to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_destination_receives_what_its_filter_takes() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let all = FakeDrain::tcp(Behaviour::Read);
    let logs = FakeDrain::mtls(&w.pki, Behaviour::Read);
    let all_url = format!("syslog://{}", all.addr());
    let logs_url = format!("syslog-tls://{}", logs.addr());
    let yaml = drain_yaml(
        &w,
        &[
            (format!("{all_url}?include-metrics-deprecated=true"), false),
            (format!("{logs_url}?drain-type=logs"), true),
        ],
        "",
    );
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let mut sent = Vec::new();
    for round in 0..20 {
        for src in ["app-a", "app-b", "rep"] {
            for mut e in all_types(src) {
                if let Some(Message::Log(l)) = &mut e.message {
                    l.payload = format!("{src} {round}").into_bytes();
                }
                sent.push(e);
            }
        }
    }
    send_all(&mut client, &sent).await;
    let n = sent.len();
    let n_logs = n / 5;
    assert!(
        doppler.wait_for_count(n, WAIT),
        "the Doppler got {}",
        doppler.count()
    );
    assert!(all.wait_for(n, WAIT), "the all-drain got {}", all.count());
    assert!(
        logs.wait_for(n_logs, WAIT),
        "the logs-drain got {}",
        logs.count()
    );
    assert!(common::agent::wait_drained(&agent, WAIT));

    // The Doppler pool: every envelope, numbered per source as before.
    let received = doppler.received();
    assert_eq!(received.len(), n);
    for ((_, source), seqs) in sequences(&received) {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "{source}");
    }
    // The all-drain: one message per envelope (each gauge has one metric), the agent's default
    // tags in, its own tag out; logs in order per source.
    let msgs = all.messages();
    assert_eq!(msgs.len(), n);
    for m in &msgs {
        assert!(m.contains("deployment=\"cf\""), "default tags: {m}");
        assert!(!m.contains("metron="), "no metron tag by default: {m}");
    }
    for kind in ["counter@47450", "gauge@47450", "timer@47450", "event@47450"] {
        assert_eq!(
            msgs.iter().filter(|m| m.contains(kind)).count(),
            n / 5,
            "{kind}"
        );
    }
    // The logs-drain (drain-type=logs, over mTLS): logs only, each source's in order.
    let msgs = logs.messages();
    assert_eq!(msgs.len(), n_logs, "logs only");
    for src in ["app-a", "app-b", "rep"] {
        let got: Vec<String> = msgs
            .iter()
            .map(|m| app_and_msg(m))
            .filter(|(app, _)| app == src)
            .map(|(_, msg)| msg)
            .collect();
        let want: Vec<String> = (0..20).map(|r| format!("{src} {r}")).collect();
        assert_eq!(got, want, "{src}'s logs, in order");
    }

    let text = scrape(agent.metrics_addr().unwrap());
    for (url, egress) in [(&all_url, n), (&logs_url, n_logs)] {
        let labels = [("drain_scope", "aggregate"), ("drain_url", url.as_str())];
        assert_eq!(
            metric_value(&text, "egress", &labels),
            Some(egress as f64),
            "{url}"
        );
        assert_eq!(
            metric_value(&text, "destination_offered", &labels),
            Some(egress as f64)
        );
    }
    assert_eq!(
        metric_value(&text, "destination_offered", &[("destination", "doppler")]),
        Some(n as f64)
    );
    assert_eq!(
        metric_value(&text, "drains", &[("drain_scope", "aggregate")]),
        Some(2.0)
    );

    let report = agent.shutdown();
    assert!(report.flushed);
    let m = report.metrics;
    assert_eq!(m.ingress, n as u64);
    assert_eq!(m.destination_copies, (n + n_logs) as u64);
    assert_eq!(m.account(&drain(&all_url)).unwrap().egress, n as u64);
    assert_eq!(m.account(&drain(&logs_url)).unwrap().egress, n_logs as u64);
    assert_fan_out_balanced(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_disable_logs_the_doppler_gets_no_logs_and_a_drain_still_does() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let d = FakeDrain::tcp(Behaviour::Read);
    let url = format!("syslog://{}", d.addr());
    let yaml = drain_yaml(&w, &[(format!("{url}?drain-type=logs"), false)], "");
    let mut config = w.config(&[(doppler.addr(), "z1")], &yaml);
    config.dopplers.disable_logs = true;
    metron::telemetry::init_logging("warn");
    let agent = Agent::start(config).unwrap();
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let sent: Vec<_> = (0..10).flat_map(|_| all_types("app")).collect();
    send_all(&mut client, &sent).await;
    assert!(d.wait_for(10, WAIT));
    assert!(doppler.wait_for_count(40, WAIT));
    assert!(common::agent::wait_drained(&agent, WAIT));
    assert!(
        doppler
            .received()
            .iter()
            .all(|e| !matches!(e.message, Some(Message::Log(_)))),
        "no log reaches a Doppler"
    );
    assert_eq!(
        doppler.count(),
        40,
        "counters, gauges, timers and events do"
    );
    let m = agent.shutdown().metrics;
    assert_eq!(m.filtered, 0, "every envelope had a destination");
    assert_eq!(m.destination_copies, 0, "and only one");
    assert_fan_out_balanced(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_drain_costs_the_doppler_and_the_other_drain_nothing() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let dead = FakeDrain::tcp(Behaviour::Blackhole);
    let healthy = FakeDrain::tcp(Behaviour::Read);
    let dead_url = format!("syslog://{}", dead.addr());
    let healthy_url = format!("syslog://{}", healthy.addr());
    let yaml = drain_yaml(
        &w,
        &[(dead_url.clone(), false), (healthy_url.clone(), false)],
        "  write_timeout_ms: 1000\n  backoff_max_ms: 500\n  send_buffer_bytes: 16384\n\
         pipeline: { max_buffered_bytes: 12582912 }\nshutdown: { grace_period_ms: 1000 }\n",
    );
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    // 5,000 envelopes/s for 15 s: two streams, one 40-envelope batch each per 16 ms.
    let load = Load::start(&agent, &w, 2, Some(Duration::from_millis(16))).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let sent = load.stop().await as usize;
    assert!(
        doppler.wait_for_count(sent, WAIT),
        "the Doppler got {} of {sent}",
        doppler.count()
    );
    assert!(
        healthy.wait_for(sent, WAIT),
        "drain B got {} of {sent}",
        healthy.count()
    );

    let text = scrape(agent.metrics_addr().unwrap());
    let dead_labels = [
        ("drain_scope", "aggregate"),
        ("drain_url", dead_url.as_str()),
    ];
    let healthy_labels = [
        ("drain_scope", "aggregate"),
        ("drain_url", healthy_url.as_str()),
    ];
    assert!(
        metric_value(&text, "dropped", &dead_labels).unwrap() > 0.0,
        "the dead drain's losses are in its series: {:?}",
        agent.metrics().account(&drain(&dead_url))
    );
    assert_eq!(metric_value(&text, "dropped", &healthy_labels), Some(0.0));
    assert!(metric_value(&text, "messages_dropped_per_drain", &dead_labels).unwrap() > 0.0);

    let report = agent.shutdown();
    assert!(!report.flushed, "the dead drain never took its backlog");
    let m = report.metrics;
    assert_eq!(m.ingress, sent as u64);
    assert_eq!(m.egress, sent as u64, "the Doppler pool lost nothing");
    assert_eq!(
        m.dropped_total(),
        0,
        "no drop outside the dead drain: {m:?}"
    );
    let b = m.account(&drain(&healthy_url)).unwrap();
    assert_eq!(
        (b.egress, b.dropped_total()),
        (sent as u64, 0),
        "drain B lost nothing"
    );
    let a = m.account(&drain(&dead_url)).unwrap();
    assert_eq!(a.offered, sent as u64);
    assert!(a.dropped_by(DropReason::DrainQueueFull) > 0, "{a:?}");
    assert_fan_out_balanced(&m);
    assert!(
        m.peak_buffered_bytes <= 12 << 20,
        "the budget held: {}",
        m.peak_buffered_bytes
    );

    // B and the Doppler got every source's envelopes in order.
    let received = doppler.received();
    for ((_, source), seqs) in sequences(&received) {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "{source} at the Doppler");
    }
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    for msg in healthy.messages() {
        let (app, payload) = app_and_msg(&msg);
        let i: u64 = payload.parse().unwrap();
        let prev = last.insert(app.clone(), i).unwrap_or(0);
        assert!(i > prev, "{app}: {i} after {prev}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_log_cache_would_refuse_is_dropped_and_counted_not_sent() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let d = FakeDrain::tcp(Behaviour::Read);
    let url = format!("syslog://{}", d.addr());
    let agent = w.start(
        &[(doppler.addr(), "z1")],
        &drain_yaml(&w, &[(url.clone(), false)], ""),
    );
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let huge = log_envelope("app", &"x".repeat(70_000));
    let mut odd = log_envelope("app", "a log type neither OUT nor ERR");
    if let Some(Message::Log(l)) = &mut odd.message {
        l.r#type = 7;
    }
    let fine = log_envelope("app", "fine");
    send_all(&mut client, &[huge, odd, fine]).await;
    assert!(
        doppler.wait_for_count(3, WAIT),
        "the Doppler takes all three"
    );
    assert!(d.wait_for(1, WAIT));
    assert!(common::agent::wait_drained(&agent, WAIT));
    let msgs = d.messages();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(msgs[0].ends_with(" fine\n"), "{}", msgs[0]);
    let m = agent.shutdown().metrics;
    let a = m.account(&drain(&url)).unwrap();
    assert_eq!(a.dropped_by(DropReason::Unformattable), 2, "{a:?}");
    assert_eq!(a.egress, 1);
    assert_fan_out_balanced(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_drain_connection_starts_over_and_loses_only_what_it_held() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let d = FakeDrain::tcp(Behaviour::Read);
    let url = format!("syslog://{}", d.addr());
    let agent = w.start(
        &[(doppler.addr(), "z1")],
        &drain_yaml(&w, &[(url.clone(), false)], ""),
    );
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let first: Vec<_> = (0..10)
        .map(|i| log_envelope("app", &format!("{i}")))
        .collect();
    send_all(&mut client, &first).await;
    assert!(d.wait_for(10, WAIT));
    agent.chaos_panic(metron::telemetry::ActorName::DrainConnection, 0, false);
    // Once the hook is armed, the next batch the task takes is lost to the panic; the one after
    // goes through a fresh task.
    let panics = || {
        agent
            .metrics()
            .panics_of(metron::telemetry::ActorName::DrainConnection)
    };
    let mut sent = 10;
    while panics() == 0 {
        assert!(sent < 100, "the hook never struck");
        send_all(&mut client, &[log_envelope("app", &format!("{sent}"))]).await;
        sent += 1;
        common::wait_until(Duration::from_millis(200), || panics() > 0);
    }
    send_all(&mut client, &[log_envelope("app", "after")]).await;
    sent += 1;
    assert!(
        d.wait_for(sent - 1, WAIT),
        "all but the one lost: {}",
        d.count()
    );
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    assert_eq!(
        m.panics_of(metron::telemetry::ActorName::DrainConnection),
        1
    );
    let a = m.account(&drain(&url)).unwrap();
    assert_eq!(a.dropped_by(DropReason::ActorPanic), 1, "{a:?}");
    assert_eq!(a.egress as usize, d.count());
    assert_eq!(m.egress as usize, sent, "the Doppler pool lost nothing");
    assert_fan_out_balanced(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dopplers_a_drain_alone_takes_everything() {
    let w = World::new();
    let d = FakeDrain::mtls(&w.pki, Behaviour::Read);
    let url = format!("syslog-tls://{}", d.addr());
    let yaml = w.yaml(
        &[],
        &drain_yaml(&w, &[(format!("{url}?drain-data=all"), true)], ""),
    );
    // The World's YAML always has a dopplers section: cut it out.
    let start = yaml.find("dopplers:\n").unwrap();
    let end = yaml[start..].find("metrics:\n").unwrap() + start;
    let yaml = format!("{}{}", &yaml[..start], &yaml[end..]);
    let config = metron::config::Config::from_yaml(&yaml).unwrap();
    metron::telemetry::init_logging("warn");
    let agent = Agent::start(config).unwrap();
    assert_eq!(agent.connection_slots(), 0, "no Doppler pool");
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let sent: Vec<_> = (0..20).flat_map(|_| all_types("app")).collect();
    send_all(&mut client, &sent).await;
    assert!(d.wait_for(sent.len(), WAIT), "the drain got {}", d.count());
    let (_, ready) = http_get(agent.health_addr().unwrap(), "/readyz")
        .await
        .unwrap();
    assert!(
        ready.contains("\"status\":\"ready\""),
        "a drain connection makes it ready: {ready}"
    );
    assert!(
        ready.contains(&format!("\"drain_url\":\"{url}\"")),
        "{ready}"
    );
    assert!(common::agent::wait_drained(&agent, WAIT));
    let report = agent.shutdown();
    assert!(report.flushed);
    let m = report.metrics;
    assert_eq!((m.egress, m.drain_egress()), (0, sent.len() as u64));
    assert_eq!(m.account(&Destination::Doppler).unwrap().offered, 0);
    assert_fan_out_balanced(&m);
}

#[test]
fn a_config_without_dopplers_needs_a_drain() {
    let w = World::new();
    let yaml = w.yaml(&[], "");
    let start = yaml.find("dopplers:\n").unwrap();
    let end = yaml[start..].find("metrics:\n").unwrap() + start;
    let yaml = format!("{}{}", &yaml[..start], &yaml[end..]);
    let e = metron::config::Config::from_yaml(&yaml).unwrap_err();
    assert_eq!(e.key, "dopplers", "{e}");
    assert!(e.problem.contains("syslog.aggregate_drains"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_drains_and_keeps_the_unchanged_one() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let kept = FakeDrain::tcp(Behaviour::Read);
    let removed = FakeDrain::tcp(Behaviour::Read);
    let added = FakeDrain::tcp(Behaviour::Read);
    let url = |d: &FakeDrain| format!("syslog://{}", d.addr());
    let before = drain_yaml(&w, &[(url(&kept), false), (url(&removed), false)], "");
    let after = drain_yaml(&w, &[(url(&added), false), (url(&kept), false)], "");
    let agent = w.start(&[(doppler.addr(), "z1")], &before);
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let first: Vec<_> = (0..50)
        .map(|i| log_envelope("app", &format!("a{i}")))
        .collect();
    send_all(&mut client, &first).await;
    assert!(kept.wait_for(50, WAIT) && removed.wait_for(50, WAIT));

    let outcome = agent
        .reload(w.config(&[(doppler.addr(), "z1")], &after))
        .await
        .unwrap();
    assert_eq!(outcome.applied, vec!["syslog.aggregate_drains"]);
    assert!(outcome.needs_restart.is_empty(), "{outcome:?}");
    // The removed drain's series go once it has delivered what it held.
    assert!(
        wait_until(WAIT, || agent
            .metrics()
            .account(&drain(&url(&removed)))
            .is_none()),
        "the removed drain retires"
    );
    let second: Vec<_> = (0..50)
        .map(|i| log_envelope("app", &format!("b{i}")))
        .collect();
    send_all(&mut client, &second).await;
    assert!(
        kept.wait_for(100, WAIT),
        "the kept drain got {}",
        kept.count()
    );
    assert!(
        added.wait_for(50, WAIT),
        "the added drain got {}",
        added.count()
    );
    assert!(common::agent::wait_drained(&agent, WAIT));
    assert_eq!(removed.count(), 50, "nothing after its removal");
    assert!(
        added.messages().iter().all(|m| m.contains(" b")),
        "only what came after"
    );
    let kept_msgs = kept.messages();
    assert_eq!(
        kept_msgs.len(),
        100,
        "the kept drain missed nothing across the reload"
    );

    let m = agent.shutdown().metrics;
    assert_eq!(m.retired_drain_egress, 50);
    assert_eq!(m.drain_egress(), 200);
    assert_fan_out_balanced(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_drain_gets_one_message_per_post_with_basic_auth() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let https = common::https_drain::FakeHttpsDrain::start(&w.pki);
    let url = format!(
        "https://user:p%40ss@localhost:{}/drain/path?drain-type=logs",
        https.addr().port()
    );
    let yaml = format!(
        "syslog:\n  aggregate_drains:\n    - {{ url: \"{url}\", ca: {} }}\n",
        w.pki.ca_path.display()
    );
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let sent: Vec<_> = (0..30)
        .map(|i| log_envelope("app", &format!("line {i}")))
        .collect();
    send_all(&mut client, &sent).await;
    assert!(https.wait_for(30, WAIT), "got {}", https.posts().len());
    let posts = https.posts();
    assert_eq!(posts.len(), 30, "one message per POST");
    for (i, p) in posts.iter().enumerate() {
        assert_eq!(p.method, "POST");
        assert_eq!(
            p.target, "/drain/path?drain-type=logs",
            "posted to the URL's path and query"
        );
        assert_eq!(p.content_type, "text/plain");
        // base64("user:p@ss"): the userinfo percent-decoded.
        assert_eq!(p.authorization, "Basic dXNlcjpwQHNz");
        let (app, msg) = app_and_msg(&p.body);
        assert_eq!(
            (app.as_str(), msg),
            ("app", format!("line {i}")),
            "in order"
        );
        assert!(p.body.ends_with('\n') && p.body.matches('\n').count() == 1);
    }
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    let labels = drain(&format!(
        "https://localhost:{}/drain/path",
        https.addr().port()
    ));
    assert_eq!(
        m.account(&labels).unwrap().egress,
        30,
        "labelled without credentials and query"
    );
    assert_fan_out_balanced(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_batch_drain_posts_newline_joined_batches_within_the_size_bound() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let https = common::https_drain::FakeHttpsDrain::start(&w.pki);
    let url = format!("https-batch://localhost:{}/batch", https.addr().port());
    let yaml = format!(
        "syslog:\n  aggregate_drains:\n    - {{ url: \"{url}\", ca: {} }}\n",
        w.pki.ca_path.display()
    );
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    // About 3.5 MB of logs: several requests at the 512 KiB bound.
    let payload = "y".repeat(700);
    let sent: Vec<_> = (0..5_000)
        .map(|i| log_envelope(&format!("app-{}", i % 7), &format!("{i} {payload}")))
        .collect();
    send_all(&mut client, &sent).await;
    assert!(
        https.wait_for(5_000, WAIT),
        "got {}",
        https.messages().len()
    );
    let posts = https.posts();
    assert!(posts.len() >= 7, "{} requests", posts.len());
    for p in &posts {
        assert!(
            p.body.len() <= 512 << 10,
            "a batch of {} bytes",
            p.body.len()
        );
        assert!(p.body.ends_with('\n'));
        assert!(
            !p.body.starts_with(|c: char| c.is_ascii_digit()),
            "no octet count"
        );
    }
    let messages = https.messages();
    assert_eq!(messages.len(), 5_000);
    let mut last = std::collections::HashMap::new();
    for m in &messages {
        let (app, msg) = app_and_msg(m);
        let i: u64 = msg.split(' ').next().unwrap().parse().unwrap();
        let prev = last.insert(app.clone(), i);
        assert!(prev.is_none_or(|p| p < i), "{app}: {i} after {prev:?}");
    }
    // A trickle goes out without filling a request.
    send_all(&mut client, &[log_envelope("late", "alone")]).await;
    assert!(
        https.wait_for(5_001, WAIT),
        "a lone message is posted within the batch wait"
    );
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    assert_fan_out_balanced(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_drops_what_it_refuses_for_good_and_gives_up_after_22_attempts() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let https = common::https_drain::FakeHttpsDrain::start(&w.pki);
    let url = format!("https://localhost:{}/", https.addr().port());
    let yaml = format!(
        "syslog:\n  aggregate_drains:\n    - {{ url: \"{url}\", ca: {} }}\n\
         \x20 backoff_initial_ms: 1\n  backoff_max_ms: 5\n",
        w.pki.ca_path.display()
    );
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let account = || agent.metrics().account(&drain(&url)).cloned().unwrap();

    // A 400 is final: dropped at once, one request.
    https.answer(400);
    send_all(&mut client, &[log_envelope("app", "refused")]).await;
    assert!(wait_until(WAIT, || account()
        .dropped_by(DropReason::DrainRefused)
        == 1));
    assert_eq!(https.posts().len(), 1, "not retried");

    // A 503 is retried, 22 attempts in all, then dropped.
    https.answer(503);
    send_all(&mut client, &[log_envelope("app", "unavailable")]).await;
    assert!(wait_until(WAIT, || account()
        .dropped_by(DropReason::DrainWriteFailed)
        == 1));
    assert_eq!(https.posts().len(), 1 + 22);

    // The drain is not stuck: the next message goes through.
    https.answer(200);
    send_all(&mut client, &[log_envelope("app", "fine")]).await;
    assert!(wait_until(WAIT, || account().egress == 1));
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    assert_fan_out_balanced(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binding_cache_client_reads_both_lists_over_mtls() {
    use metron::syslog::cache::{CacheClient, CacheError};
    let w = World::new();
    let cache = common::https_drain::FakeHttpsDrain::start_with(&w.pki, true);
    cache.page(
        "/base/v2/bindings",
        r#"[{"url": "syslog://d.example:514", "credentials":
              [{"apps": [{"hostname": "org.space.web", "app_id": "app-1"}]}]}]"#,
    );
    cache.page(
        "/base/v2/aggregate",
        r#"[{"url": "syslog-tls://lc.example:6067?include-metrics-deprecated=true"}]"#,
    );
    let tls = metron::tls::drain_client_config(
        Some(&w.pki.ca_path),
        Some((&w.agent_cert.cert_path, &w.agent_cert.key_path)),
        "syslog.binding_cache.tls",
    )
    .unwrap()
    .0;
    let url = format!("https://localhost:{}/base/", cache.addr().port());
    let client = CacheClient::new(&url, tls.clone(), "localhost", WAIT).unwrap();
    let answer = client.poll(true, 5).await.unwrap();
    assert_eq!(
        answer.apps["app-1"][0].url.anonymized,
        "syslog://d.example:514"
    );
    assert_eq!(answer.aggregate.len(), 1);
    // A cache outage is an error the poller keeps its last good answer through.
    cache.answer(503);
    assert!(matches!(
        client.poll(true, 5).await,
        Err(CacheError::Status(503))
    ));
    // Without the agent's certificate the cache refuses the handshake.
    let anonymous = metron::tls::drain_client_config(Some(&w.pki.ca_path), None, "x")
        .unwrap()
        .0;
    let client = CacheClient::new(&url, anonymous, "localhost", WAIT).unwrap();
    assert!(client.poll(true, 5).await.is_err());
}

/// `syslog.binding_cache` pointing at `cache` (mTLS with the agent's certificate), polled every
/// 200 ms.
fn cache_yaml(w: &World, cache: &common::https_drain::FakeHttpsDrain, extra: &str) -> String {
    format!(
        "syslog:\n  binding_cache:\n    url: https://localhost:{}\n    polling_interval_ms: 200\n    \
         tls: {{ ca: {}, cert: {}, key: {}, server_name: localhost }}\n{extra}",
        cache.addr().port(),
        w.pki.ca_path.display(),
        w.agent_cert.cert_path.display(),
        w.agent_cert.key_path.display(),
    )
}

/// One `/v2/bindings` entry: `url` bound to `app` (hostname `org.space.<app>`), with `ca` PEM.
fn binding(url: &str, app: &str, ca: &str) -> String {
    serde_json::json!({
        "url": url,
        "credentials": [{"ca": ca, "apps": [{"hostname": format!("org.space.{app}"), "app_id": app}]}]
    })
    .to_string()
}

fn app_drain(url: &str) -> Destination {
    Destination::Drain {
        scope: DrainScope::App,
        url: url.to_string(),
    }
}

/// The binding cache's polls so far with `result` (`ok` or `failed`), from `/metrics`.
fn polls(agent: &Agent, result: &str) -> u64 {
    let text = scrape(agent.metrics_addr().unwrap());
    metric_value(&text, "binding_cache_polls", &[("result", result)]).unwrap_or(0.0) as u64
}

/// Ten logs from each of `apps`, payloads `<round><i>`.
fn round(apps: &[&str], round: &str) -> Vec<metron::proto::Envelope> {
    apps.iter()
        .flat_map(|app| (0..10).map(move |i| log_envelope(app, &format!("{round}{i}"))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_drains_follow_the_binding_cache_and_outlive_its_outage() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let cache = common::https_drain::FakeHttpsDrain::start_with(&w.pki, true);
    let (a, b, c) = (
        FakeDrain::tcp(Behaviour::Read),
        FakeDrain::tcp(Behaviour::Read),
        FakeDrain::tcp(Behaviour::Read),
    );
    let url = |d: &FakeDrain| format!("syslog://{}", d.addr());
    let bindings = |list: &[(&FakeDrain, &str)]| {
        let entries: Vec<String> = list
            .iter()
            .map(|(d, app)| binding(&url(d), app, ""))
            .collect();
        format!("[{}]", entries.join(","))
    };
    cache.page("/v2/bindings", &bindings(&[(&a, "app-1"), (&b, "app-2")]));
    cache.page("/v2/aggregate", "[]");
    let agent = w.start(&[(doppler.addr(), "z1")], &cache_yaml(&w, &cache, ""));
    assert!(
        wait_until(WAIT, || polls(&agent, "ok") >= 1),
        "the cache answers"
    );
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let apps = ["app-1", "app-2", "app-3"];

    send_all(&mut client, &round(&apps, "a")).await;
    assert!(
        a.wait_for(10, WAIT) && b.wait_for(10, WAIT),
        "{} {}",
        a.count(),
        b.count()
    );
    let (_, ready) = http_get(agent.health_addr().unwrap(), "/readyz")
        .await
        .unwrap();
    assert!(
        ready.contains(r#"{"destination":"app_drains","drains":2,"#),
        "app drains summed in /readyz: {ready}"
    );
    for (d, app) in [(&a, "app-1"), (&b, "app-2")] {
        for m in d.messages() {
            assert_eq!(app_and_msg(&m).0, app, "only its app's envelopes: {m}");
            assert!(
                m.contains(&format!(" org.space.{app} ")),
                "the binding's hostname: {m}"
            );
        }
    }

    // app-2 unbound, app-3 bound: followed within an interval (two polls later, surely).
    cache.page("/v2/bindings", &bindings(&[(&a, "app-1"), (&c, "app-3")]));
    let seen = polls(&agent, "ok");
    assert!(wait_until(WAIT, || polls(&agent, "ok") >= seen + 2));
    send_all(&mut client, &round(&apps, "b")).await;
    assert!(
        a.wait_for(20, WAIT) && c.wait_for(10, WAIT),
        "{} {}",
        a.count(),
        c.count()
    );
    assert!(
        wait_until(WAIT, || agent
            .metrics()
            .account(&app_drain(&url(&b)))
            .is_none()),
        "the unbound drain retires"
    );

    // An outage keeps the drains.
    cache.answer(503);
    let failed = polls(&agent, "failed");
    assert!(wait_until(WAIT, || polls(&agent, "failed") >= failed + 2));
    send_all(&mut client, &round(&apps, "c")).await;
    assert!(
        a.wait_for(30, WAIT) && c.wait_for(20, WAIT),
        "{} {}",
        a.count(),
        c.count()
    );
    assert!(doppler.wait_for_count(90, WAIT));
    assert!(common::agent::wait_drained(&agent, WAIT));

    assert_eq!(b.count(), 10, "nothing after its binding went");
    let payloads =
        |d: &FakeDrain| -> Vec<String> { d.messages().iter().map(|m| app_and_msg(m).1).collect() };
    assert!(
        payloads(&c).iter().all(|p| !p.starts_with('a')),
        "the new drain got only what came after its binding"
    );
    assert_eq!(a.count(), 30, "the drain that stayed bound missed nothing");
    let m = agent.shutdown().metrics;
    assert_eq!(m.dropped_total() + m.drain_dropped(), 0, "{m:?}");
    assert_eq!(m.drain_egress(), 60);
    assert_fan_out_balanced(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_hears_of_its_drains_losses_but_not_through_the_drain_at_fault() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let cache = common::https_drain::FakeHttpsDrain::start_with(&w.pki, true);
    // app-1's drains: one refusing every POST, one healthy, one where nothing listens.
    let refusing = common::https_drain::FakeHttpsDrain::start(&w.pki);
    refusing.answer(400);
    let healthy = FakeDrain::tcp(Behaviour::Read);
    let dead = common::agent::unserved_addr();
    let refusing_url = format!("https://localhost:{}/drain", refusing.addr().port());
    let healthy_url = format!("syslog://{}", healthy.addr());
    let dead_url = format!("syslog://{dead}");
    let entries = [
        binding(&refusing_url, "app-1", &w.pki.ca_pem),
        binding(&healthy_url, "app-1", ""),
        binding(&dead_url, "app-1", ""),
    ];
    cache.page("/v2/bindings", &format!("[{}]", entries.join(",")));
    cache.page("/v2/aggregate", "[]");
    let yaml = cache_yaml(&w, &cache, "  backoff_initial_ms: 1\n  backoff_max_ms: 2\n");
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    assert!(wait_until(WAIT, || polls(&agent, "ok") >= 1));
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    send_all(&mut client, &round(&["app-1"], "x")).await;

    let lost_at = |url: &str| {
        format!("messages lost for application app-1 in user provided syslog drain with url {url}")
    };
    let heard = |text: &str| healthy.messages().iter().any(|m| m.contains(text));
    assert!(
        wait_until(WAIT, || heard(&lost_at(&refusing_url))
            && heard(&lost_at(&dead_url))
            && heard(&format!("Failed to connect to {dead_url}"))),
        "the healthy drain carries the notices: {:?}",
        healthy.messages()
    );
    assert!(
        refusing
            .messages()
            .iter()
            .all(|m| !m.contains(&lost_at(&refusing_url))),
        "a notice about a drain is not sent to it"
    );
    // Through the pipeline like any envelope: the Doppler has them, in the app's stream.
    let notices: Vec<metron::proto::Envelope> = doppler
        .received()
        .into_iter()
        .filter(|e| e.tags.get("source_type").map(String::as_str) == Some("LGR"))
        .collect();
    assert!(!notices.is_empty());
    for n in &notices {
        assert_eq!(
            (n.source_id.as_str(), n.instance_id.as_str()),
            ("app-1", "0")
        );
        let Some(Message::Log(log)) = &n.message else {
            panic!("a log: {n:?}")
        };
        assert_eq!(log.r#type, metron::proto::log::Type::Err as i32);
        let text = String::from_utf8_lossy(&log.payload);
        let count: u64 = text.split(' ').next().unwrap().parse().unwrap_or(1);
        assert!(
            count >= 1
                && (text.contains(" messages lost for application app-1 ")
                    || text.starts_with("Failed to connect to ")),
            "{text}"
        );
    }
    // At most one notice of each kind per drain per 5 s.
    let about = |url: &str| -> Vec<i64> {
        notices
            .iter()
            .filter(|n| {
                matches!(&n.message, Some(Message::Log(l))
                    if String::from_utf8_lossy(&l.payload).contains(&lost_at(url)))
            })
            .map(|n| n.timestamp)
            .collect()
    };
    for url in [&refusing_url, &dead_url] {
        for pair in about(url).windows(2) {
            assert!(
                pair[1] - pair[0] >= 4_900_000_000,
                "{url}: notices {pair:?} ns apart"
            );
        }
    }
    let m = agent.shutdown().metrics;
    let refused = m.account(&app_drain(&refusing_url)).unwrap();
    assert!(
        refused.dropped_by(DropReason::DrainRefused) >= 10,
        "{refused:?}"
    );
    assert_fan_out_balanced(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_app_drain_closes_and_reopens_and_a_blocked_address_is_never_dialled() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let cache = common::https_drain::FakeHttpsDrain::start_with(&w.pki, true);
    let drain = FakeDrain::tcp(Behaviour::Read);
    let blocked = FakeDrain::tcp(Behaviour::Read);
    let url = format!("syslog://{}", drain.addr());
    // Same address, another port: the range blocks 127.0.0.2 only.
    let blocked_url = format!("syslog://127.0.0.2:{}", blocked.addr().port());
    let entries = [
        binding(&url, "app-1", ""),
        binding(&blocked_url, "app-2", ""),
    ];
    cache.page("/v2/bindings", &format!("[{}]", entries.join(",")));
    cache.page("/v2/aggregate", "[]");
    let yaml = cache_yaml(
        &w,
        &cache,
        "  idle_drain_timeout_ms: 300\n  blocked_ranges: [ { start: 127.0.0.2, end: 127.0.0.2 } ]\n",
    );
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    assert!(wait_until(WAIT, || polls(&agent, "ok") >= 1));
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let open = |agent: &Agent| {
        let text = scrape(agent.metrics_addr().unwrap());
        metric_value(&text, "app_drains_open", &[]).unwrap_or(-1.0) as i64
    };

    send_all(&mut client, &round(&["app-1", "app-2"], "a")).await;
    assert!(drain.wait_for(10, WAIT));
    let refused = || {
        agent
            .metrics()
            .account(&app_drain(&blocked_url))
            .map_or(0, |a| a.dropped_by(DropReason::DrainRefused))
    };
    assert!(
        wait_until(WAIT, || refused() == 10),
        "blocked: {}",
        refused()
    );
    assert_eq!(blocked.count(), 0, "never dialled");
    assert!(wait_until(WAIT, || open(&agent) == 2), "both opened");

    // Silence past the idle timeout closes both; the next envelope opens app-1's again.
    assert!(
        wait_until(WAIT, || open(&agent) == 0
            && agent.metrics().account(&app_drain(&url)).is_none()),
        "idle drains close and retire"
    );
    send_all(&mut client, &round(&["app-1"], "b")).await;
    assert!(drain.wait_for(20, WAIT), "reopened: {}", drain.count());
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    assert_eq!(m.drain_egress(), 20);
    assert_eq!(m.drain_dropped(), 10, "the blocked drain's, nothing else");
    assert_fan_out_balanced(&m);
}
