//! The OTLP destination beside the Doppler pool (issue 23): envelopes reach a collector over
//! mTLS (server name `otel-collector`, the agent's own certificate) mapped as upstream maps them;
//! a collector that is down is retried and loses nothing within the budget; a signal it does not
//! take is paused while the others flow; partial rejections are counted; a dead collector costs
//! the Doppler nothing. Real gRPC both sides, certificates made at test time.

mod common;

use std::time::Duration;

use common::agent::World;
use common::otlp::{Behaviour, FakeCollector, Signal};
use common::*;
use metron::otlp_proto::common::v1::any_value;
use metron::otlp_proto::metrics::v1::{metric, number_data_point};
use metron::proto::Envelope;
use metron::telemetry::{Destination, DropReason, MetricsSnapshot};

const WAIT: Duration = Duration::from_secs(30);

fn otlp_yaml(collector: &FakeCollector, extra: &str) -> String {
    format!(
        "otlp:\n  endpoint: \"{}\"\n  retry: {{ initial_ms: 50, max_ms: 200, max_elapsed_ms: 60000 }}\n{extra}",
        collector.addr()
    )
}

fn account(m: &MetricsSnapshot, collector: &FakeCollector) -> metron::telemetry::AccountSnapshot {
    m.account(&Destination::Otlp {
        endpoint: collector.addr().to_string(),
    })
    .expect("the OTLP destination has an account")
    .clone()
}

/// A timer with the trace tags upstream needs to make a span of it.
fn traced_timer(source: &str, i: u64) -> Envelope {
    let mut e = timer_envelope(source, "http", 1_000, 2_000);
    e.tags.insert("trace_id".into(), format!("{:032x}", i + 1));
    e.tags.insert("span_id".into(), format!("{:016x}", i + 1));
    e.tags.insert("peer_type".into(), "Server".into());
    e.tags
        .insert("uri".into(), format!("https://x.example/path/{i}?q=1"));
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_signal_reaches_the_collector_as_upstream_maps_it() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let collector = FakeCollector::start(&w.pki);
    let agent = w.start(&[(doppler.addr(), "z1")], &otlp_yaml(&collector, ""));
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let mut sent = Vec::new();
    for i in 0..200u64 {
        sent.push(log_envelope("app-a", &format!("line {i}")));
        sent.push(counter_envelope("app-a", "requests", 1, i + 1));
        sent.push(gauge_envelope("app-a", "cpu", i as f64, "percentage"));
        sent.push(traced_timer("app-a", i));
        sent.push(event_envelope("app-a", "deployed", "an event"));
    }
    send_all(&mut client, &sent).await;
    assert!(
        collector
            .wait_for_async(WAIT, |c| c.log_records >= 400
                && c.data_points >= 400
                && c.spans >= 200)
            .await,
        "the collector got {:?}",
        collector.counts()
    );
    assert!(doppler.wait_for_count(sent.len(), WAIT));
    assert!(common::agent::wait_drained(&agent, WAIT));
    assert_eq!(
        (
            collector.log_records(),
            collector.data_points(),
            collector.spans()
        ),
        (400, 400, 200),
        "each envelope once"
    );
    // Field by field, a few of each: counters are cumulative monotonic sums of the total;
    // attributes start with instance_id and source_id, carry the default tags and never the
    // agent's own `metron` tag.
    let mut totals = Vec::new();
    for req in collector.metrics() {
        for rm in &req.resource_metrics {
            for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                match &m.data {
                    Some(metric::Data::Sum(s)) => {
                        assert!(s.is_monotonic);
                        let p = &s.data_points[0];
                        let keys: Vec<&str> = p.attributes.iter().map(|a| a.key.as_str()).collect();
                        assert_eq!(&keys[..2], ["instance_id", "source_id"]);
                        assert!(keys.contains(&"deployment"), "{keys:?}");
                        assert!(!keys.contains(&"metron"), "{keys:?}");
                        if let Some(number_data_point::Value::AsInt(v)) = p.value {
                            totals.push(v);
                        }
                    }
                    Some(metric::Data::Gauge(g)) => {
                        assert_eq!((m.name.as_str(), m.unit.as_str()), ("cpu", "percentage"));
                        assert_eq!(g.data_points.len(), 1);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }
    assert_eq!(totals, (1..=200).collect::<Vec<i64>>(), "totals in order");
    let bodies: Vec<String> = collector
        .logs()
        .iter()
        .flat_map(|r| r.resource_logs.clone())
        .flat_map(|r| r.scope_logs)
        .flat_map(|s| s.log_records)
        .filter(|r| r.severity_number == 9)
        .map(|r| match r.body.and_then(|b| b.value) {
            Some(any_value::Value::StringValue(s)) => s,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        bodies,
        (0..200).map(|i| format!("line {i}")).collect::<Vec<_>>()
    );
    let span = &collector.traces()[0].resource_spans[0].scope_spans[0].spans[0];
    assert_eq!((span.name.as_str(), span.kind), ("/path/0", 2));

    let m = agent.shutdown().metrics;
    let a = account(&m, &collector);
    assert_eq!(
        (a.offered, a.egress, a.dropped_total()),
        (1000, 1000, 0),
        "{a:?}"
    );
}

/// `otlp.attributes: semconv`: each app's identity on the Resource under the semantic
/// conventions' names, its records grouped under it; the other tags (the agent's default tags
/// among them) stay on the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semconv_puts_each_apps_identity_on_its_resource() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let collector = FakeCollector::start(&w.pki);
    let agent = w.start(
        &[(doppler.addr(), "z1")],
        &otlp_yaml(&collector, "  attributes: semconv\n"),
    );
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let app_log = |app: &str, i: usize| {
        let mut e = log_envelope(app, &format!("{app} {i}"));
        e.instance_id = "2".into();
        for (k, v) in [
            ("app_id", app),
            ("app_name", "shop"),
            ("space_name", "dev"),
            ("process_type", "web"),
        ] {
            e.tags.insert(k.into(), v.into());
        }
        e
    };
    let sent: Vec<Envelope> = (0..300)
        .map(|i| app_log(if i % 2 == 0 { "app-a" } else { "app-b" }, i))
        .collect();
    send_all(&mut client, &sent).await;
    assert!(
        collector
            .wait_for_async(WAIT, |c| c.log_records >= 300)
            .await
    );
    assert!(doppler.wait_for_count(sent.len(), WAIT));
    let mut per_app = std::collections::BTreeMap::<String, usize>::new();
    let requests = collector.logs();
    // The records of an app share their resource (one per app in each batch; exports joined
    // behind a slow call keep their batches' own).
    let resources = requests
        .iter()
        .map(|r| r.resource_logs.len())
        .sum::<usize>();
    assert!(resources < 300, "{resources} resources for 300 records");
    for r in requests.iter().flat_map(|r| &r.resource_logs) {
        let resource: Vec<(&str, &str)> = r
            .resource
            .as_ref()
            .expect("a resource")
            .attributes
            .iter()
            .map(|a| match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => (a.key.as_str(), s.as_str()),
                other => panic!("{other:?}"),
            })
            .collect();
        let app = resource[0].1;
        assert_eq!(
            resource,
            [
                ("cloudfoundry.system.id", app),
                ("cloudfoundry.system.instance.id", "2"),
                ("cloudfoundry.app.instance.id", "2"),
                ("cloudfoundry.app.id", app),
                ("cloudfoundry.app.name", "shop"),
                ("cloudfoundry.process.type", "web"),
                ("cloudfoundry.space.name", "dev"),
            ]
        );
        for record in r.scope_logs.iter().flat_map(|s| &s.log_records) {
            let keys: Vec<&str> = record.attributes.iter().map(|a| a.key.as_str()).collect();
            assert!(keys.contains(&"deployment"), "{keys:?}");
            for moved in [
                "app_id",
                "app_name",
                "space_name",
                "process_type",
                "source_id",
                "instance_id",
                "metron",
            ] {
                assert!(!keys.contains(&moved), "{moved} in {keys:?}");
            }
            match record.body.as_ref().and_then(|b| b.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => assert!(s.starts_with(app), "{s}"),
                other => panic!("{other:?}"),
            }
            *per_app.entry(app.to_string()).or_default() += 1;
        }
    }
    assert_eq!(
        per_app,
        [("app-a".to_string(), 150), ("app-b".to_string(), 150)].into()
    );
    assert!(common::agent::wait_drained(&agent, WAIT));
    let a = account(&agent.shutdown().metrics, &collector);
    assert_eq!((a.egress, a.dropped_total()), (300, 0), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_down_then_back_loses_nothing_within_the_budget() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let collector = FakeCollector::start(&w.pki);
    collector.set_behaviour_all(Behaviour::Unavailable);
    let agent = w.start(&[(doppler.addr(), "z1")], &otlp_yaml(&collector, ""));
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let sent: Vec<Envelope> = (0..2_000)
        .map(|i| log_envelope("app-a", &format!("{i}")))
        .collect();
    send_all(&mut client, &sent).await;
    // Refused while it is unavailable, retried on the schedule; the Doppler is not held up.
    assert!(
        collector
            .wait_for_async(WAIT, |c| c.requests(Signal::Logs) >= 3)
            .await
    );
    assert!(doppler.wait_for_count(sent.len(), WAIT));
    assert_eq!(collector.log_records(), 0);
    collector.set_behaviour_all(Behaviour::Ok);
    assert!(
        collector
            .wait_for_async(WAIT, |c| c.log_records >= 2_000)
            .await,
        "{:?}",
        collector.counts()
    );
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    let a = account(&m, &collector);
    assert_eq!((a.egress, a.dropped_total()), (2_000, 0), "{a:?}");
    assert_eq!(collector.log_records(), 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_the_collector_lacks_is_paused_and_the_others_flow() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let collector = FakeCollector::start(&w.pki);
    collector.set_behaviour(Signal::Logs, Behaviour::Unimplemented);
    collector.set_behaviour(Signal::Metrics, Behaviour::PartialSuccess { rejected: 1 });
    let agent = w.start(&[(doppler.addr(), "z1")], &otlp_yaml(&collector, ""));
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let mut sent = Vec::new();
    for i in 0..300u64 {
        sent.push(log_envelope("app-a", &format!("{i}")));
        sent.push(counter_envelope("app-a", "requests", 1, i + 1));
    }
    send_all(&mut client, &sent).await;
    assert!(doppler.wait_for_count(sent.len(), WAIT));
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    let a = account(&m, &collector);
    // Logs: one export tried, answered UNIMPLEMENTED; the signal paused, everything counted.
    assert_eq!(
        collector.requests(Signal::Logs),
        1,
        "paused after the first"
    );
    assert_eq!(a.dropped_by(DropReason::SignalUnimplemented), 300, "{a:?}");
    // Metrics: every export answered with one rejected point, counted as such (one data point
    // per counter, so one envelope per rejection).
    let exports = collector.requests(Signal::Metrics) as u64;
    assert!(exports >= 2, "several exports: {exports}");
    assert_eq!(a.dropped_by(DropReason::OtlpRejected), exports, "{a:?}");
    assert_eq!(a.egress, 300 - exports);
    assert_eq!(a.offered, a.egress + a.dropped_total());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_the_doppler_nothing() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let mut collector = FakeCollector::start(&w.pki);
    collector.kill();
    let agent = w.start(
        &[(doppler.addr(), "z1")],
        &otlp_yaml(&collector, "pipeline: { max_buffered_bytes: 10485760 }\n"),
    );
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    // Enough to fill the collector's share several times over (a fifth of the 10 MiB budget).
    let payload = "x".repeat(300);
    let sent: Vec<Envelope> = (0..30_000)
        .map(|i| log_envelope("app-a", &format!("{i} {payload}")))
        .collect();
    // In steps the Doppler keeps up with, however slow the machine: what is tested is that the
    // collector's full share costs the Doppler nothing, not how the pipeline sheds overload.
    for (i, step) in sent.chunks(2_000).enumerate() {
        send_all(&mut client, step).await;
        assert!(
            doppler.wait_for_count((i + 1) * 2_000, WAIT),
            "the Doppler got {}; the agent dropped {:?}",
            doppler.count(),
            agent.metrics().dropped
        );
    }
    // Acknowledged by the Doppler, while the collector's share fills and sheds.
    assert!(wait_until_async(WAIT, || agent.metrics().egress == 30_000).await);
    let m = agent.metrics();
    assert_eq!(doppler.count(), 30_000, "the Doppler got everything once");
    assert_eq!(m.dropped_total(), 0, "and lost nothing");
    let a = account(&m, &collector);
    assert_eq!(a.egress, 0);
    assert_eq!(a.offered, 30_000);
    assert_eq!(
        a.offered,
        a.egress + a.dropped_total() + a.buffered,
        "{a:?}"
    );
    // What it could not hold is its own loss, counted in its own series.
    assert!(a.dropped_by(DropReason::DrainQueueFull) > 0, "{a:?}");
    assert_eq!(a.dropped_total(), a.dropped_by(DropReason::DrainQueueFull));
    drop(agent);
}

/// `rotel-agent`, the Rust OpenTelemetry collector in PyPI's `rotel` package (installed by
/// `.ci/run`); `ROTEL_AGENT` overrides where it is.
fn rotel_agent() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ROTEL_AGENT") {
        return p.into();
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the rotel package is not installed (pip install rotel==0.0.1a15, as .ci/run does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("a path").trim().into()
}

/// A real collector as a child process on a loopback port, printing what it decodes; stopped
/// when dropped.
struct Rotel {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    out: std::path::PathBuf,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Rotel {
    fn start() -> Rotel {
        let addr = common::agent::unserved_addr();
        let dir = std::env::temp_dir().join(format!(
            "metron-rotel-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("rotel.out");
        let file = std::fs::File::create(&out).unwrap();
        let child = std::process::Command::new(rotel_agent())
            .args(["start", "--otlp-grpc-endpoint", &addr.to_string()])
            .args([
                "--otlp-http-endpoint",
                &common::agent::unserved_addr().to_string(),
            ])
            .args(["--exporter", "blackhole"])
            .args(["--debug-log", "logs", "--debug-log", "metrics"])
            .args(["--debug-log-verbosity", "detailed"])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("rotel-agent starts");
        let rotel = Rotel {
            child,
            addr,
            out,
            _dir: tempfile_dir::Dir(dir),
        };
        assert!(
            wait_until(WAIT, || std::net::TcpStream::connect(addr).is_ok()),
            "rotel listens on {addr}: {}",
            rotel.output()
        );
        rotel
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One record or metric as rotel's debug exporter prints it (`--debug-log-verbosity detailed`):
/// its `Key: value` fields, and its attributes (`-> key: Str(value)`) in order.
#[derive(Debug, Default)]
struct Printed {
    fields: std::collections::HashMap<String, String>,
    attributes: Vec<(String, String)>,
}

/// The log records and the metrics in rotel's output.
fn parse_rotel(output: &str) -> (Vec<Printed>, Vec<Printed>) {
    let (mut logs, mut metrics) = (Vec::new(), Vec::new());
    // Which list the current block goes to, and whether `->` lines are attributes.
    let mut current: Option<(bool, Printed)> = None;
    let mut in_attributes = false;
    let mut flush = |c: &mut Option<(bool, Printed)>| {
        if let Some((is_log, p)) = c.take() {
            if is_log {
                logs.push(p);
            } else {
                metrics.push(p);
            }
        }
    };
    for line in output.lines() {
        let t = line.trim();
        if t.starts_with("LogRecord #") || t.starts_with("Metric #") {
            flush(&mut current);
            current = Some((t.starts_with("LogRecord"), Printed::default()));
            in_attributes = false;
            continue;
        }
        if t.starts_with("ResourceLog #") || t.starts_with("ResourceMetrics #") {
            flush(&mut current);
            continue;
        }
        let Some((_, p)) = &mut current else { continue };
        if t == "Attributes:" || t == "Data point attributes:" {
            in_attributes = true;
            continue;
        }
        if let Some(kv) = t.strip_prefix("-> ") {
            let (k, v) = kv
                .split_once(": ")
                .unwrap_or((kv.trim_end_matches(':'), ""));
            if in_attributes {
                let v = v
                    .strip_prefix("Str(")
                    .and_then(|v| v.strip_suffix(')'))
                    .unwrap_or(v);
                p.attributes.push((k.to_string(), v.to_string()));
            } else {
                p.fields.insert(k.to_string(), v.to_string());
            }
            continue;
        }
        in_attributes = false;
        if let Some((k, v)) = t.split_once(": ") {
            p.fields.insert(k.to_string(), v.to_string());
        }
    }
    flush(&mut current);
    (logs, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_collector_decodes_logs_counters_and_gauges_as_sent() {
    const N: u64 = 1_000;
    let rotel = Rotel::start();
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let yaml = format!(
        "otlp: {{ endpoint: \"{}\", plaintext: true, signals: {{ traces: false }} }}\n",
        rotel.addr
    );
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let mut sent = Vec::new();
    for i in 0..N {
        sent.push(log_envelope("app-a", &format!("line {i}")));
        sent.push(counter_envelope("app-a", "requests", 1, i + 1));
        sent.push(gauge_envelope("app-a", "cpu", i as f64 + 0.5, "percentage"));
    }
    send_all(&mut client, &sent).await;
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    let a = m
        .account(&Destination::Otlp {
            endpoint: rotel.addr.to_string(),
        })
        .expect("an account")
        .clone();
    assert_eq!(
        (a.offered, a.egress, a.dropped_total()),
        (3 * N, 3 * N, 0),
        "{a:?}"
    );
    // Printed as it decodes: wait (bounded) until every item is in its output.
    assert!(wait_until(WAIT, || {
        let (logs, metrics) = parse_rotel(&rotel.output());
        logs.len() as u64 >= N && metrics.len() as u64 >= 2 * N
    }));
    let (logs, metrics) = parse_rotel(&rotel.output());
    assert_eq!((logs.len() as u64, metrics.len() as u64), (N, 2 * N));
    let timestamps: Vec<String> = sent.iter().map(|e| e.timestamp.to_string()).collect();
    let want_attributes = |p: &Printed| {
        let keys: Vec<&str> = p.attributes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(&keys[..2], ["instance_id", "source_id"], "{p:?}");
        assert_eq!(p.attributes[1].1, "app-a");
        assert!(
            p.attributes.contains(&("deployment".into(), "cf".into())),
            "{p:?}"
        );
        assert!(!keys.contains(&"metron"), "{p:?}");
    };
    for (i, l) in logs.iter().enumerate() {
        assert_eq!(
            l.fields["Body"],
            format!("Str(line {i})"),
            "in order: {l:?}"
        );
        assert_eq!(l.fields["SeverityText"], "SEVERITY_NUMBER_INFO");
        assert_eq!(l.fields["SeverityNumber"], "SEVERITY_NUMBER_INFO(9)");
        assert_eq!(l.fields["Timestamp"], timestamps[i * 3]);
        want_attributes(l);
    }
    let (mut counters, mut gauges) = (0u64, 0u64);
    for m in &metrics {
        want_attributes(m);
        match m.fields["Name"].as_str() {
            "requests" => {
                assert_eq!(m.fields["DataType"], "Sum");
                assert_eq!(m.fields["IsMonotonic"], "true");
                assert_eq!(
                    m.fields["AggregationTemporality"],
                    "AGGREGATION_TEMPORALITY_CUMULATIVE"
                );
                assert_eq!(
                    m.fields["Value"],
                    (counters + 1).to_string(),
                    "totals in order"
                );
                assert_eq!(m.fields["Timestamp"], timestamps[counters as usize * 3 + 1]);
                counters += 1;
            }
            "cpu" => {
                assert_eq!(m.fields["DataType"], "Gauge");
                assert_eq!(m.fields["Unit"], "percentage");
                assert_eq!(
                    m.fields["Value"].parse::<f64>().unwrap(),
                    gauges as f64 + 0.5
                );
                gauges += 1;
            }
            other => panic!("unexpected metric {other}: {m:?}"),
        }
    }
    assert_eq!((counters, gauges), (N, N));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_being_retried_does_not_hold_the_others() {
    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let collector = FakeCollector::start(&w.pki);
    collector.set_behaviour(Signal::Logs, Behaviour::Unavailable);
    let agent = w.start(&[(doppler.addr(), "z1")], &otlp_yaml(&collector, ""));
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let mut sent = Vec::new();
    for i in 0..300u64 {
        sent.push(log_envelope("app-a", &format!("{i}")));
        sent.push(counter_envelope("app-a", "requests", 1, i + 1));
    }
    send_all(&mut client, &sent).await;
    // Logs are refused and retried; the counters go meanwhile.
    assert!(
        collector
            .wait_for_async(WAIT, |c| c.data_points >= 300
                && c.requests(Signal::Logs) >= 2)
            .await,
        "{:?}",
        collector.counts()
    );
    assert_eq!(collector.log_records(), 0);
    collector.set_behaviour(Signal::Logs, Behaviour::Ok);
    assert!(
        collector
            .wait_for_async(WAIT, |c| c.log_records >= 300)
            .await
    );
    assert!(common::agent::wait_drained(&agent, WAIT));
    let m = agent.shutdown().metrics;
    let a = account(&m, &collector);
    assert_eq!((a.egress, a.dropped_total()), (600, 0), "{a:?}");
}

/// What the collector recorded, by unique value: log bodies, counter totals and gauge values.
fn recorded_values(collector: &FakeCollector) -> (Vec<String>, Vec<i64>, Vec<f64>) {
    let bodies = collector
        .logs()
        .into_iter()
        .flat_map(|r| r.resource_logs)
        .flat_map(|r| r.scope_logs)
        .flat_map(|s| s.log_records)
        .map(|r| match r.body.and_then(|b| b.value) {
            Some(any_value::Value::StringValue(s)) => s,
            other => panic!("a log body: {other:?}"),
        })
        .collect();
    let (mut totals, mut gauges) = (Vec::new(), Vec::new());
    for req in collector.metrics() {
        for m in req
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|s| &s.metrics)
        {
            match &m.data {
                Some(metric::Data::Sum(s)) => {
                    totals.extend(s.data_points.iter().map(|p| match p.value {
                        Some(number_data_point::Value::AsInt(v)) => v,
                        other => panic!("a counter total: {other:?}"),
                    }))
                }
                Some(metric::Data::Gauge(g)) => {
                    gauges.extend(g.data_points.iter().map(|p| match p.value {
                        Some(number_data_point::Value::AsDouble(v)) => v,
                        other => panic!("a gauge value: {other:?}"),
                    }))
                }
                other => panic!("{other:?}"),
            }
        }
    }
    (bodies, totals, gauges)
}

/// The scenario, literally: an mTLS collector (server name `otel-collector`, the agent's
/// own certificate) answers UNAVAILABLE for 30 s while emitters send 5,000 envelopes/s, then
/// recovers while they go on; with the shipped retry schedule and a budget that holds the
/// outage, the collector ends up with every envelope exactly once, and the Doppler is not held
/// up meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_seconds_unavailable_at_5000_per_second_then_recovery_loses_nothing() {
    /// 50 envelopes every 10 ms: 5,000/s.
    const PER_TICK: usize = 50;
    const TICK: Duration = Duration::from_millis(10);
    /// 30 s of UNAVAILABLE, then 5 s more at the same rate once the collector is back.
    const OUTAGE_TICKS: usize = 3_000;
    const AFTER_TICKS: usize = 500;
    /// Everything sent in the outage's first 25 s must be at the Doppler before it ends.
    const DOPPLER_CHECK_TICK: usize = 2_500;
    /// Bounds the wait for the backlog to reach the collector after the sending stops.
    const RECOVERY_WAIT: Duration = Duration::from_secs(120);
    /// 256 MiB. The collector is one of two destinations, so half the budget's guaranteed half
    /// is its own share (64 MiB), without borrowing anything. The outage gathers 150,000
    /// envelopes of about 195 budget bytes each (printed below as `held at the flip`): about
    /// 29 MB, so the share holds the outage twice over and nothing is shed for room (the
    /// default 32 MiB budget guarantees it 8 MiB: about 8 s of this rate).
    const BUDGET: u64 = 256 << 20;

    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let collector = FakeCollector::start(&w.pki);
    collector.set_behaviour_all(Behaviour::Unavailable);
    // The shipped retry schedule (1, 2, 4, 8, 16, 30, 30 s; 91 s in all): the export first
    // refused just after the start is tried again about 31 s later, after the recovery, well
    // within the 91 s.
    let yaml = format!(
        "otlp:\n  endpoint: \"{}\"\npipeline: {{ max_buffered_bytes: {BUDGET} }}\n",
        collector.addr()
    );
    let agent = w.start(&[(doppler.addr(), "z1")], &yaml);
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;

    // Mostly logs: of every ten envelopes eight logs, a counter and a gauge; every value is
    // unique (body, counter total, gauge value), so duplicates and losses both show.
    let (mut logs, mut counters, mut gauges) = (0usize, 0u64, 0u64);
    let mut next_batch = || -> Vec<Envelope> {
        (0..PER_TICK)
            .map(|j| match j % 10 {
                8 => {
                    counters += 1;
                    counter_envelope("app-a", "requests", 1, counters)
                }
                9 => {
                    gauges += 1;
                    gauge_envelope("app-a", "cpu", (gauges - 1) as f64, "percentage")
                }
                _ => {
                    logs += 1;
                    log_envelope("app-a", &format!("line {}", logs - 1))
                }
            })
            .collect()
    };

    // Pacing sets the offered rate and synchronises nothing; `interval` keeps the schedule
    // (a late tick is made up at once), so the rate does not drift.
    let mut tick = tokio::time::interval(TICK);
    let started = std::time::Instant::now();
    let mut sent = 0usize;
    let mut doppler_due = None;
    let mut doppler_kept_up = false;
    for t in 0..OUTAGE_TICKS + AFTER_TICKS {
        tick.tick().await;
        if t == DOPPLER_CHECK_TICK {
            doppler_due = Some(sent);
        }
        if let Some(due) = doppler_due.filter(|_| !doppler_kept_up) {
            doppler_kept_up = doppler.count() >= due;
        }
        if t == OUTAGE_TICKS {
            let outage = started.elapsed();
            let c = collector.counts();
            assert_eq!(
                (c.log_records, c.data_points),
                (0, 0),
                "nothing accepted during the outage: {c:?}"
            );
            assert!(
                c.requests(Signal::Logs) >= 2 && c.requests(Signal::Metrics) >= 2,
                "refused and retried during the outage: {c:?}"
            );
            assert!(
                doppler_kept_up,
                "the Doppler had not got the {} envelopes sent in the outage's first 25 s by its \
                 end: {}",
                doppler_due.unwrap_or(0),
                doppler.count()
            );
            let m = agent.metrics();
            let a = account(&m, &collector);
            assert_eq!(
                (a.offered, a.egress, a.dropped_total(), a.buffered),
                (sent as u64, 0, 0, sent as u64),
                "the collector's share holds the whole outage: {a:?}"
            );
            eprintln!(
                "outage {outage:?}: {sent} sent; held at the flip {} envelopes, {} bytes ({} per \
                 envelope); {c:?}",
                a.buffered,
                a.buffered_bytes,
                a.buffered_bytes / a.buffered.max(1)
            );
            collector.set_behaviour_all(Behaviour::Ok);
        }
        let batch = next_batch();
        send_all(&mut client, &batch).await;
        sent += batch.len();
    }
    let sending = started.elapsed();
    let (logs, counters, gauges) = (logs, counters as usize, gauges as usize);
    assert_eq!(sent, 175_000);
    assert_eq!(logs + counters + gauges, sent);
    eprintln!("sent {sent} in {sending:?} ({logs} logs, {counters} counters, {gauges} gauges)");

    let got_everything = collector
        .wait_for_async(RECOVERY_WAIT, |c| {
            c.log_records >= logs && c.data_points >= counters + gauges
        })
        .await;
    let m = agent.metrics();
    assert!(
        got_everything,
        "the collector got {:?} of {logs} log records and {} data points; its account: {:?}",
        collector.counts(),
        counters + gauges,
        account(&m, &collector)
    );
    eprintln!(
        "the collector had everything {:?} after the start",
        started.elapsed()
    );
    assert!(
        wait_until_async(WAIT, || agent.buffered().0 == 0).await,
        "drained"
    );
    assert!(doppler.wait_for_count_async(sent, WAIT).await);

    // Every envelope exactly once at the collector, by value; the counter's totals in the
    // order they were sent, across the retries and the joined exports.
    let (mut bodies, mut totals, mut values) = recorded_values(&collector);
    assert!(
        totals.windows(2).all(|w| w[0] < w[1]),
        "counter totals arrived out of order"
    );
    bodies.sort_unstable();
    bodies.dedup();
    totals.sort_unstable();
    totals.dedup();
    values.sort_unstable_by(f64::total_cmp);
    values.dedup();
    let c = collector.counts();
    assert_eq!(
        (c.log_records, c.data_points),
        (logs, counters + gauges),
        "each once: {c:?}"
    );
    let mut want_bodies: Vec<String> = (0..logs).map(|i| format!("line {i}")).collect();
    want_bodies.sort_unstable();
    assert!(
        bodies == want_bodies,
        "{} distinct log bodies of {logs}",
        bodies.len()
    );
    assert_eq!(totals, (1..=counters as i64).collect::<Vec<_>>());
    assert_eq!(values, (0..gauges).map(|v| v as f64).collect::<Vec<_>>());
    // And at the Doppler, every log line once.
    let received = doppler.received();
    let doppler_lines: std::collections::HashSet<Vec<u8>> = received
        .iter()
        .filter_map(|e| match &e.message {
            Some(metron::proto::envelope::Message::Log(l)) => Some(l.payload.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        (received.len(), doppler_lines.len()),
        (sent, logs),
        "the Doppler got everything once"
    );

    let m = agent.shutdown().metrics;
    let a = account(&m, &collector);
    eprintln!("{a:?}; peak {} bytes", m.peak_buffered_bytes);
    assert_eq!(
        (a.offered, a.egress, a.dropped_total(), a.buffered),
        (sent as u64, sent as u64, 0, 0),
        "{a:?}"
    );
    assert_eq!(
        (m.ingress, m.egress, m.dropped_total()),
        (sent as u64, sent as u64, 0)
    );
    assert_eq!((m.destination_copies, m.filtered), (sent as u64, 0));
    assert_eq!(
        m.ingress + m.destination_copies,
        m.egress + m.drain_egress() + m.dropped_total() + m.drain_dropped() + m.filtered,
        "the fan-out balance: {m:?}"
    );
    assert!(m.peak_buffered_bytes <= BUDGET, "within the budget: {m:?}");
}

/// Gauges with many values and many tags make requests several times the size of their
/// envelopes (every value carries the attributes): each export stays under the collector's
/// 4 MiB receive limit, after an outage too, when the exports that queued go together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_gauges_stay_within_the_collectors_message_limit() {
    use std::collections::BTreeMap;

    use metron::proto::envelope::Message;
    use metron::proto::{Gauge, GaugeValue};

    let w = World::new();
    let doppler = FakeDoppler::start(&w.pki);
    let collector = FakeCollector::start(&w.pki);
    collector.set_behaviour_all(Behaviour::Unavailable);
    let agent = w.start(
        &[(doppler.addr(), "z1")],
        &otlp_yaml(&collector, "pipeline: { max_buffered_bytes: 268435456 }\n"),
    );
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let sent: Vec<Envelope> = (0..1_000)
        .map(|i| {
            let mut e = gauge_envelope("app-a", "x", 0.0, "");
            let metrics: BTreeMap<String, GaugeValue> = (0..30)
                .map(|j| {
                    let value = (i * 1_000 + j) as f64;
                    let unit = String::new();
                    (format!("m{j:02}"), GaugeValue { unit, value })
                })
                .collect();
            e.message = Some(Message::Gauge(Gauge { metrics }));
            for t in 0..20 {
                e.tags.insert(
                    format!("tag_{t:02}"),
                    "6f3c2b1e-7a8d-4c9e-b2f1-0d5e6a7b8c9d".into(),
                );
            }
            e
        })
        .collect();
    send_all(&mut client, &sent).await;
    assert!(doppler.wait_for_count(sent.len(), WAIT));
    // Refused while everything queues, then back.
    assert!(
        collector
            .wait_for_async(WAIT, |c| c.requests(Signal::Metrics) >= 2)
            .await
    );
    collector.set_behaviour_all(Behaviour::Ok);
    assert!(
        collector
            .wait_for_async(WAIT, |c| c.data_points >= 30_000)
            .await,
        "{:?}",
        collector.counts()
    );
    assert!(common::agent::wait_drained(&agent, WAIT));
    let a = account(&agent.shutdown().metrics, &collector);
    assert_eq!((a.egress, a.dropped_total()), (1_000, 0), "{a:?}");
    assert_eq!(collector.data_points(), 30_000, "each once");
}
