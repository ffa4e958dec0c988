//! Doppler discovery by DNS, end to end: the agent finds its Dopplers through `router_addr` and
//! `router_addr_with_az` (a [`StaticResolver`] the test rewrites stands in for DNS), prefers the
//! local AZ's, uses Dopplers added to DNS, leaves those removed from it, keeps the last answer
//! while DNS fails, and re-resolves after a connection failure. Every move is checked against
//! exact envelope counts.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::agent::{assert_balanced, assert_losses_accounted, World};
use common::doppler::received_in_send_order;
use common::*;
use metron::config::Config;
use metron::proto::ingress_client::IngressClient;
use metron::proto::{Envelope, EnvelopeBatch};
use metron::routing::discovery::{encode_az_addr, StaticResolver};
use metron::telemetry::RestartCause;
use metron::{Agent, StartOptions};
use tonic::transport::Channel;

/// Bounds every wait; the tests themselves take about a second each.
const WAIT: Duration = Duration::from_secs(10);

/// The name listing every Doppler.
const ALL: &str = "doppler.test";
/// The name listing the Dopplers of the agent's AZ (`z1` in the harness config).
const LOCAL: &str = "z1.doppler.test";

/// The harness config with its `endpoints:` list replaced by DNS names: `router_addr` always,
/// `router_addr_with_az` when given (as written in the config, before encoding).
fn dns_yaml(w: &World, with_az: Option<&str>, resolve_interval_ms: u64) -> String {
    let mut names =
        format!("  router_addr: \"{ALL}:8082\"\n  resolve_interval_ms: {resolve_interval_ms}\n");
    if let Some(name) = with_az {
        names.push_str(&format!("  router_addr_with_az: \"{name}\"\n"));
    }
    let yaml = w.yaml(&[], "");
    assert!(yaml.contains("  endpoints:\n"), "harness template changed");
    yaml.replacen("  endpoints:\n", &names, 1)
}

/// Starts an agent that resolves its Doppler names through `dns`.
fn start(w: &World, dns: &Arc<StaticResolver>, with_az: Option<&str>, resolve_ms: u64) -> Agent {
    metron::telemetry::init_logging("warn");
    let yaml = dns_yaml(w, with_az, resolve_ms);
    let config = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("test config: {e}\n{yaml}"));
    let resolver: Arc<dyn metron::routing::discovery::Resolver> = dns.clone();
    Agent::start_with(
        config,
        StartOptions {
            resolver: Some(resolver),
        },
    )
    .expect("agent starts")
}

/// Dopplers `a` and `b` under both names (local), `remote` under `ALL` only.
fn two_local_one_remote(w: &World) -> (FakeDoppler, FakeDoppler, FakeDoppler, Arc<StaticResolver>) {
    let (a, b, remote) = (
        FakeDoppler::start(&w.pki),
        FakeDoppler::start(&w.pki),
        FakeDoppler::start(&w.pki),
    );
    let dns = StaticResolver::new();
    dns.set(ALL, addrs(&[&remote, &a, &b]));
    dns.set(LOCAL, addrs(&[&a, &b]));
    (a, b, remote, dns)
}

fn addrs(dopplers: &[&FakeDoppler]) -> Vec<SocketAddr> {
    dopplers.iter().map(|d| d.addr()).collect()
}

/// `n` log envelopes over 29 sources (so every slot gets some), payloads `"{tag} {i}"`.
fn wave(tag: &str, n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|i| log_envelope(&format!("app-{}", i % 29), &format!("{tag} {i}")))
        .collect()
}

/// How many times each payload starting with `tag ` arrived at `dopplers`.
fn arrivals(dopplers: &[&FakeDoppler], tag: &str) -> BTreeMap<String, usize> {
    let prefix = format!("{tag} ");
    let mut out = BTreeMap::new();
    for d in dopplers {
        for e in d.received() {
            let Some(metron::proto::envelope::Message::Log(log)) = &e.message else {
                continue;
            };
            let payload = String::from_utf8_lossy(&log.payload).into_owned();
            if payload.starts_with(&prefix) {
                *out.entry(payload).or_insert(0) += 1;
            }
        }
    }
    out
}

/// Every envelope of `wave(tag, n)` arrived at `dopplers` exactly once.
fn assert_arrived_once(dopplers: &[&FakeDoppler], tag: &str, n: usize) {
    let got = arrivals(dopplers, tag);
    let want: BTreeMap<String, usize> = (0..n).map(|i| (format!("{tag} {i}"), 1)).collect();
    if got != want {
        let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
        let twice = got.values().filter(|&&c| c > 1).count();
        panic!("wave {tag:?}: {missing} of {n} missing, {twice} arrived more than once");
    }
}

fn total(dopplers: &[&FakeDoppler]) -> usize {
    dopplers.iter().map(|d| d.count()).sum()
}

/// Connections the Dopplers have seen, together. The agent counts a stream as open before the
/// Doppler has seen its first request, so waits on the agent's metrics are not enough.
fn opened(dopplers: &[&FakeDoppler]) -> usize {
    dopplers.iter().map(|d| d.connections_opened()).sum()
}

/// Shuts the agent down without blocking this runtime; returns its final metrics, once it has
/// flushed everything.
async fn shut_down(agent: Agent) -> metron::telemetry::MetricsSnapshot {
    let report = tokio::task::spawn_blocking(move || agent.shutdown())
        .await
        .unwrap();
    assert!(report.flushed, "{:?}", report.metrics);
    report.metrics
}

async fn drained(agent: &Agent) -> bool {
    wait_until_async(WAIT, || agent.buffered().0 == 0).await
}

/// Every envelope sent was acknowledged, none dropped, and the ledger balances.
fn assert_exact(agent: &Agent, sent: usize) {
    let m = agent.metrics();
    assert_eq!(
        (m.ingress, m.egress, m.dropped_total()),
        (sent as u64, sent as u64, 0),
        "{m:?}"
    );
    assert_balanced(agent);
}

/// An emitter sending 20-envelope batches every 5 ms (payloads `"{tag} {i}"`) until `stop`, so
/// that data flows while connections move. Returns how many it sent. Bounded to 10,000 batches.
fn spawn_emitter(
    mut client: IngressClient<Channel>,
    tag: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        // Paces the load (it is not a synchronisation): unpaced, the emitter would outrun the
        // fake Dopplers and the edge would drop, which is not what these tests are about.
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut i = 0;
        for _ in 0..10_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            tick.tick().await;
            let batch: Vec<Envelope> = (i..i + 20)
                .map(|k| log_envelope(&format!("app-{}", k % 29), &format!("{tag} {k}")))
                .collect();
            client.send(EnvelopeBatch { batch }).await.expect("send");
            i += 20;
        }
        i
    })
}

#[tokio::test]
async fn connections_go_to_the_dopplers_the_az_name_lists() {
    let w = World::new();
    let (a, b, remote, dns) = two_local_one_remote(&w);
    let agent = start(&w, &dns, Some(&format!("{LOCAL}:8082")), 100);
    let slots = agent.connection_slots();
    assert_eq!(slots, 3);

    assert!(
        wait_until_async(WAIT, || agent.metrics().connections_in("z1")
            == slots as i64)
        .await,
        "every connection in the local AZ: {:?}",
        agent.metrics()
    );
    assert!(wait_until_async(WAIT, || opened(&[&a, &b]) == slots).await);
    let m = agent.metrics();
    assert_eq!(
        m.connections_by_az,
        BTreeMap::from([("z1".to_string(), 3)]),
        "none counted as non-local"
    );
    assert_eq!(m.doppler_v2_streams, 3);
    assert!(
        a.connections_opened() >= 1 && b.connections_opened() >= 1,
        "both local Dopplers used: {} and {}",
        a.connections_opened(),
        b.connections_opened()
    );

    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let n = 1_200;
    send_all(&mut client, &wave("local", n)).await;
    assert!(
        wait_until_async(WAIT, || total(&[&a, &b]) >= n).await,
        "{} of {n} arrived locally",
        total(&[&a, &b])
    );
    assert!(drained(&agent).await);
    assert!(
        a.count() > 0 && b.count() > 0,
        "both local Dopplers got data"
    );
    assert_arrived_once(&[&a, &b], "local", n);
    assert_eq!(
        remote.connections_opened(),
        0,
        "nothing dialled the other AZ"
    );
    assert_eq!(remote.count(), 0);
    assert_exact(&agent, n);
    assert_eq!(agent.metrics().restarts_total(), 0);
}

#[tokio::test]
async fn dopplers_added_to_dns_get_connections_without_losing_an_envelope() {
    let w = World::new();
    let first = FakeDoppler::start(&w.pki);
    let dns = StaticResolver::new();
    // No AZ name: every Doppler counts as non-local, and the spread alone decides.
    dns.set(ALL, addrs(&[&first]));
    let agent = start(&w, &dns, None, 100);
    assert!(first.wait_for_connections_async(3, WAIT).await);
    assert!(wait_until_async(WAIT, || agent.metrics().connections_in("") == 3).await);

    let client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let stop = Arc::new(AtomicBool::new(false));
    let emitter = spawn_emitter(client, "scale", stop.clone());
    assert!(first.wait_for_count_async(200, WAIT).await, "load flows");

    let (second, third) = (FakeDoppler::start(&w.pki), FakeDoppler::start(&w.pki));
    dns.set(ALL, addrs(&[&first, &second, &third]));
    for (name, d) in [("second", &second), ("third", &third)] {
        assert!(
            d.wait_for_connections_async(1, WAIT).await,
            "the {name} Doppler gets a connection"
        );
        let before = d.count();
        assert!(
            d.wait_for_count_async(before + 100, WAIT).await,
            "the {name} Doppler gets data ({} so far)",
            d.count()
        );
    }
    stop.store(true, Ordering::Relaxed);
    let sent = emitter.await.unwrap();
    assert!(drained(&agent).await);

    let all = [&first, &second, &third];
    assert_arrived_once(&all, "scale", sent);
    assert_exact(&agent, sent);
    let m = agent.metrics();
    assert_eq!(
        [
            first.connections_opened(),
            second.connections_opened(),
            third.connections_opened()
        ],
        [3, 1, 1],
        "two slots moved, one to each new Doppler, and nothing else moved: {m:?}"
    );
    assert_eq!(
        (m.restarts_by(RestartCause::Recycled), m.restarts_total()),
        (2, 2),
        "both moves were graceful recycles: {m:?}"
    );
    assert_eq!(m.failovers, 0);
    assert_eq!(m.doppler_v2_streams, 3);
    // Before the new Dopplers go away (they were started after the agent, so they drop first).
    let m = shut_down(agent).await;
    assert_eq!(m.restarts_total(), 2, "the shutdown broke nothing: {m:?}");
}

#[tokio::test]
async fn a_doppler_removed_from_dns_loses_its_connection_and_no_envelope() {
    let w = World::new();
    let (a, b, leaving) = (
        FakeDoppler::start(&w.pki),
        FakeDoppler::start(&w.pki),
        FakeDoppler::start(&w.pki),
    );
    let dns = StaticResolver::new();
    dns.set(ALL, addrs(&[&a, &b, &leaving]));
    let agent = start(&w, &dns, None, 100);
    for d in [&a, &b, &leaving] {
        assert!(d.wait_for_connections_async(1, WAIT).await, "one each");
    }
    assert!(wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == 3).await);
    assert_eq!(
        [
            a.connections_opened(),
            b.connections_opened(),
            leaving.connections_opened()
        ],
        [1, 1, 1]
    );

    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let n = 900;
    send_all(&mut client, &wave("before", n)).await;
    assert!(wait_until_async(WAIT, || total(&[&a, &b, &leaving]) >= n).await);
    assert!(drained(&agent).await);
    assert!(
        leaving.count() > 0,
        "the leaving Doppler had a slot's share"
    );

    // Removed from DNS but still running: the agent leaves it gracefully.
    dns.set(ALL, addrs(&[&a, &b]));
    assert!(
        wait_until_async(WAIT, || opened(&[&a, &b]) == 3).await,
        "the slot moved to a remaining Doppler"
    );
    assert!(wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == 3).await);
    // Let at least five more resolutions (and as many rebalance ticks) pass: 2 + 1 slots over two
    // Dopplers is as even as it gets, so none of them may move anything.
    let lookups = dns.lookups();
    assert!(wait_until_async(WAIT, || dns.lookups() >= lookups + 5).await);

    let left_with = leaving.count();
    send_all(&mut client, &wave("after", n)).await;
    assert!(
        wait_until_async(WAIT, || total(&[&a, &b]) >= 2 * n - left_with).await,
        "{} arrived at the remaining Dopplers",
        total(&[&a, &b])
    );
    assert!(drained(&agent).await);
    assert_eq!(
        leaving.count(),
        left_with,
        "nothing more went to the leaving Doppler"
    );
    assert_arrived_once(&[&a, &b, &leaving], "before", n);
    assert_arrived_once(&[&a, &b], "after", n);
    assert_exact(&agent, 2 * n);

    let m = agent.metrics();
    assert_eq!(leaving.connections_opened(), 1, "never dialled again");
    let remaining = [a.connections_opened(), b.connections_opened()];
    assert!(
        remaining == [1, 2] || remaining == [2, 1],
        "the moved slot landed on one of them, the others were left alone: {remaining:?}"
    );
    assert_eq!(
        (m.restarts_by(RestartCause::Recycled), m.restarts_total()),
        (1, 1),
        "exactly one graceful move: {m:?}"
    );
}

#[tokio::test]
async fn a_dns_outage_keeps_the_connections_and_the_data_flowing() {
    let w = World::new();
    let (a, b, remote, dns) = two_local_one_remote(&w);
    let agent = start(&w, &dns, Some(&format!("{LOCAL}:8082")), 100);
    assert!(wait_until_async(WAIT, || agent.metrics().connections_in("z1") == 3).await);
    assert!(wait_until_async(WAIT, || opened(&[&a, &b]) == 3).await);
    let before = [a.connections_opened(), b.connections_opened()];

    dns.set_failing(ALL, true);
    dns.set_failing(LOCAL, true);
    // Two lookups per resolution: three failed resolutions at least.
    let lookups = dns.lookups();
    assert!(
        wait_until_async(WAIT, || dns.lookups() >= lookups + 6).await,
        "the agent keeps re-resolving"
    );
    let m = agent.metrics();
    assert_eq!(m.doppler_v2_streams, 3, "{m:?}");
    assert_eq!(m.connections_by_az, BTreeMap::from([("z1".to_string(), 3)]));

    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let n = 900;
    send_all(&mut client, &wave("outage", n)).await;
    assert!(wait_until_async(WAIT, || total(&[&a, &b]) >= n).await);
    assert!(drained(&agent).await);
    // Still failing after the data went through.
    assert!(wait_until_async(WAIT, || dns.lookups() >= lookups + 10).await);
    assert_arrived_once(&[&a, &b], "outage", n);
    assert_exact(&agent, n);
    let m = agent.metrics();
    assert_eq!(m.restarts_total(), 0, "no connection touched: {m:?}");
    assert_eq!(m.doppler_v2_streams, 3);
    assert_eq!([a.connections_opened(), b.connections_opened()], before);
    assert_eq!(remote.connections_opened(), 0);
}

#[tokio::test]
async fn a_failed_connection_makes_the_agent_re_resolve_and_move_to_the_new_doppler() {
    let w = World::new();
    let mut old = FakeDoppler::start(&w.pki);
    let dns = StaticResolver::new();
    dns.set(ALL, addrs(&[&old]));
    // The periodic resolution never comes round during the test: only a failure can make the
    // agent look again.
    let agent = start(&w, &dns, None, 600_000);
    assert!(old.wait_for_connections_async(3, WAIT).await);
    assert!(wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == 3).await);
    assert_eq!(dns.lookups(), 1, "resolved once, at start");

    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let n = 600;
    send_all(&mut client, &wave("first", n)).await;
    assert!(old.wait_for_count_async(n, WAIT).await);
    // Acknowledged before the kill, so the kill cannot count them as lost.
    assert!(drained(&agent).await);

    let new = FakeDoppler::start(&w.pki);
    old.kill();
    dns.set(ALL, addrs(&[&new]));
    // Sent into the outage: dropped at the edge while no stream is open, or queued, or (written
    // before the agent noticed the kill) counted as connection_lost. Never silently lost.
    send_all(&mut client, &wave("outage", n)).await;

    assert!(
        new.wait_for_connections_async(3, WAIT).await,
        "every connection moved to the Doppler DNS now names ({} so far)",
        new.connections_opened()
    );
    assert!(wait_until_async(WAIT, || agent.metrics().doppler_v2_streams == 3).await);
    assert!(dns.lookups() >= 2, "re-resolved after the failure");
    send_all(&mut client, &wave("after", n)).await;
    assert!(
        wait_until_async(WAIT, || arrivals(&[&new], "after").len() == n).await,
        "{} of the {n} sent after the switch arrived",
        arrivals(&[&new], "after").len()
    );
    assert_arrived_once(&[&new], "after", n);
    assert_arrived_once(&[&old], "first", n);
    assert!(drained(&agent).await);

    drop(client);
    let m = shut_down(agent).await;
    assert_eq!(m.ingress, 3 * n as u64);
    assert_eq!(m.ingress, m.egress + m.dropped_total(), "{m:?}");
    // Each slot left A: by failing over, or (if the new DNS answer retired A first) by a
    // graceful move.
    assert_eq!(
        m.failovers + m.restarts_by(RestartCause::Recycled),
        3,
        "each slot moved once: {m:?}"
    );
    assert_losses_accounted(&received_in_send_order(&[&old, &new]), &m);
}

#[test]
fn config_errors_name_the_discovery_key() {
    let w = World::new();
    let key = |yaml: &str| {
        Config::from_yaml(yaml)
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{yaml}"))
    };
    let dns = dns_yaml(&w, Some("z1.doppler.test:8082"), 100);
    Config::from_yaml(&dns).expect("the DNS config itself is valid");

    let e = key(&dns.replace(&format!("\"{ALL}:8082\""), "\"nope\""));
    assert_eq!(e.key, "dopplers.router_addr");
    assert!(e.problem.contains("\"nope\""), "echoes the value: {e}");

    let e = key(&dns.replace("\"z1.doppler.test:8082\"", "\"z1.doppler.test\""));
    assert_eq!(e.key, "dopplers.router_addr_with_az");
    assert!(e.problem.contains("\"z1.doppler.test\""), "{e}");

    let e = key(&dns.replace("resolve_interval_ms: 100", "resolve_interval_ms: 0"));
    assert_eq!(e.key, "dopplers.resolve_interval_ms");

    // A static list and DNS names together: which one would win is not for the agent to guess.
    let static_list = w.yaml(&[("127.0.0.1:8082".parse().unwrap(), "z1")], "");
    let both = static_list.replacen(
        "  endpoints:\n",
        &format!("  router_addr: \"{ALL}:8082\"\n  endpoints:\n"),
        1,
    );
    let e = key(&both);
    assert_eq!(e.key, "dopplers.router_addr");
    assert!(e.problem.contains("not both"), "{e}");

    // The AZ name narrows router_addr; on its own it means nothing.
    let az_only = static_list.replacen(
        "  endpoints:\n",
        "  router_addr_with_az: \"z1.doppler.test:8082\"\n  endpoints:\n",
        1,
    );
    assert_eq!(key(&az_only).key, "dopplers.router_addr_with_az");
}

#[tokio::test]
async fn the_az_name_is_looked_up_in_its_encoded_form() {
    let w = World::new();
    let (local, other) = (FakeDoppler::start(&w.pki), FakeDoppler::start(&w.pki));
    let configured = "zürich@1.doppler.test:8082";
    let encoded = encode_az_addr(configured).unwrap();
    let (host, _) = encoded.rsplit_once(':').unwrap();
    // ToASCII first (`@` is a basic code point and survives it), then `@` → `-`.
    assert!(host.starts_with("xn--") && !host.contains('@'), "{encoded}");
    assert!(!host.contains("zürich"), "{encoded}");

    let dns = StaticResolver::new();
    dns.set(ALL, addrs(&[&local, &other]));
    dns.set(host, addrs(&[&local]));
    // Decoys: had the agent looked up the name as written, or encoded it without replacing the
    // `@`, the other Doppler would count as local.
    dns.set("zürich@1.doppler.test", addrs(&[&other]));
    dns.set("zürich-1.doppler.test", addrs(&[&other]));
    let agent = start(&w, &dns, Some(configured), 100);

    assert!(
        local.wait_for_connections_async(3, WAIT).await,
        "every connection on the Doppler under the encoded name"
    );
    assert!(wait_until_async(WAIT, || agent.metrics().connections_in("z1") == 3).await);
    // A few more resolutions: had another name been looked up, a slot would have moved by now.
    let lookups = dns.lookups();
    assert!(wait_until_async(WAIT, || dns.lookups() >= lookups + 6).await);
    assert_eq!(other.connections_opened(), 0);
    assert_eq!(
        agent.metrics().connections_by_az,
        BTreeMap::from([("z1".to_string(), 3)])
    );

    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let n = 300;
    send_all(&mut client, &wave("idna", n)).await;
    assert!(local.wait_for_count_async(n, WAIT).await);
    assert!(drained(&agent).await);
    assert_arrived_once(&[&local], "idna", n);
    assert_eq!(other.count(), 0);
    assert_exact(&agent, n);
}

/// Upstream looks the AZ name up again only when a connection dials, so a DNS blip moves nothing.
/// metron keeps each name's last answer while that name fails: no Doppler is reclassified, so the
/// spread repair has no reason to move a connection to the other AZ (and back afterwards).
#[tokio::test]
async fn an_outage_of_the_az_name_alone_moves_nothing() {
    let w = World::new();
    let (a, b, remote, dns) = two_local_one_remote(&w);
    let agent = start(&w, &dns, Some(&format!("{LOCAL}:8082")), 100);
    assert!(wait_until_async(WAIT, || opened(&[&a, &b]) == 3).await);

    dns.set_failing(LOCAL, true);
    // Ten resolutions (two lookups each), and as many rebalance ticks.
    let lookups = dns.lookups();
    assert!(wait_until_async(WAIT, || dns.lookups() >= lookups + 20).await);
    dns.set_failing(LOCAL, false);
    let lookups = dns.lookups();
    assert!(wait_until_async(WAIT, || dns.lookups() >= lookups + 20).await);

    let m = agent.metrics();
    assert_eq!(
        remote.connections_opened(),
        0,
        "moved to the other AZ: {m:?}"
    );
    assert_eq!(m.restarts_total(), 0, "{m:?}");
    assert_eq!(opened(&[&a, &b]), 3);
}

#[tokio::test]
async fn a_reload_switches_between_dns_and_a_fixed_list_without_losing_an_envelope() {
    let w = World::new();
    let (a, b) = (FakeDoppler::start(&w.pki), FakeDoppler::start(&w.pki));
    let dns = StaticResolver::new();
    dns.set(ALL, addrs(&[&a]));
    // Resolving every 20 ms: a resolution left running after the switch would show at once.
    let agent = start(&w, &dns, None, 20);
    assert!(a.wait_for_connections_async(3, WAIT).await);
    let mut client = ingress_client(agent.ingress_addr(), &w.pki, &w.client_cert).await;
    let n = 300;
    send_all(&mut client, &wave("dns", n)).await;

    // To a fixed list: every slot moves to it, gracefully, and DNS is no longer asked.
    let fixed = Config::from_yaml(&w.yaml(&[(b.addr(), "z1")], "")).unwrap();
    let outcome = agent.reload(fixed).await.expect("reload applies");
    assert_eq!(outcome.applied, vec!["dopplers.endpoints"]);
    assert!(outcome.needs_restart.is_empty(), "{outcome:?}");
    assert!(wait_until_async(WAIT, || b.connections_opened() == 3).await);
    let lookups = dns.lookups();
    send_all(&mut client, &wave("fixed", n)).await;
    assert!(wait_until_async(WAIT, || total(&[&a, &b]) >= 2 * n).await);
    assert!(drained(&agent).await);
    assert_eq!(dns.lookups(), lookups, "DNS is not asked any more");

    // And back to DNS, which lists `a` again.
    let by_dns = Config::from_yaml(&dns_yaml(&w, None, 20)).unwrap();
    let outcome = agent.reload(by_dns).await.expect("reload applies");
    assert_eq!(outcome.applied, vec!["dopplers.router_addr"]);
    assert!(wait_until_async(WAIT, || a.connections_opened() == 6).await);
    send_all(&mut client, &wave("dns-again", n)).await;
    assert!(wait_until_async(WAIT, || total(&[&a, &b]) >= 3 * n).await);
    assert!(drained(&agent).await);

    for tag in ["dns", "fixed", "dns-again"] {
        assert_arrived_once(&[&a, &b], tag, n);
    }
    assert_exact(&agent, 3 * n);
    let m = shut_down(agent).await;
    assert_eq!(m.dropped_total(), 0, "{m:?}");
}
