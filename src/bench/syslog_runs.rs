//! `metron bench --only syslog`: the agent fanning out to an aggregate syslog drain beside the
//! Doppler sink.
//!
//! First each sink's own ceiling (load straight into it), so that a sink's limit is not read as
//! the agent's: the Doppler sink, and the syslog sink ([`super::syslog_sink`]) on one connection
//! (what a drain has) and on a few, over TCP, and on one over TLS. Then the agent with the
//! Doppler sink only, the syslog sink only (no `dopplers` section) and both: each at 50k/s (the
//! drain over TCP and over TLS), and in a loss-free capacity search (the drain over TCP). A run
//! with both is loss-free only when both sinks got every envelope and the agent dropped none.
//! Prints a table and the issue's three targets, each met or not.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use super::run::{
    capacity_search, drain_wait_all, fmt_drops, fmt_rate, fmt_us, verdict, Arrived, Bench,
    DrainTarget, Outcome, Route, Via,
};
use super::syslog_load::{self, SyslogLoadSpec};
use super::syslog_sink::{SinkTls, SyslogSink};
use super::BenchError;
use crate::config::TlsFiles;

/// The fixed rate, envelopes/s.
const RATE: u64 = 50_000;
/// The issue's targets: the fan-out's CPU against the Doppler's alone at [`RATE`], its loss-free
/// capacity against the Doppler's alone, and the drain's latency at [`RATE`].
const MAX_CPU_RATIO: f64 = 1.6;
const MIN_CAPACITY_RATIO: f64 = 0.6;
const MAX_DRAIN_P99_US: u64 = 10_000;

/// Runs everything and returns the report.
///
/// # Errors
/// When a sink, the agent or a load cannot run.
pub(super) fn run(bench: &Bench, secs: u64, probe_secs: u64) -> Result<String, BenchError> {
    let tls = SinkTls::issue(&bench.dir, &bench.creds.agent.ca)?;
    let tcp_sink = SyslogSink::start(&bench.rt, None)?;
    let tls_sink = SyslogSink::start(&bench.rt, Some(tls.server.clone()))?;
    let tcp_drain = DrainTarget {
        url: tcp_sink.url(),
        tls: None,
        otlp: false,
        takes: (1, 1),
    };
    let tls_drain = DrainTarget {
        url: tls_sink.url(),
        tls: Some(TlsFiles {
            ca: tls.ca.clone(),
            ..bench.creds.agent.clone()
        }),
        otlp: false,
        takes: (1, 1),
    };
    let syslog_tcp = with_drain(false, &tcp_drain, &tcp_sink);
    let both_tcp = with_drain(true, &tcp_drain, &tcp_sink);
    let syslog_tls = with_drain(false, &tls_drain, &tls_sink);
    let both_tls = with_drain(true, &tls_drain, &tls_sink);

    eprintln!("each sink's own ceiling, load straight into it ({probe_secs} s each):");
    let doppler_ceiling = shown(bench.run_to(
        "direct: load → Doppler sink",
        Via::Direct,
        Route::DOPPLER,
        None,
        probe_secs,
    )?);
    let client = tls.client(&bench.creds.emitter)?;
    let ceilings = Ceilings {
        doppler: doppler_ceiling,
        syslog: shown(direct(bench, &tcp_sink, None, 1, probe_secs)?),
        syslog_4: shown(direct(bench, &tcp_sink, None, 4, probe_secs)?),
        syslog_tls: shown(direct(bench, &tls_sink, Some(client), 1, probe_secs)?),
    };

    eprintln!("at {}k/s ({secs} s each):", RATE / 1000);
    let fixed = |name: &str, route| {
        let label = format!("{name}, {}k/s", RATE / 1000);
        bench
            .run_to(&label, Via::Agent, route, Some(RATE), secs)
            .map(shown)
    };
    let at_rate = AtRate {
        doppler: fixed("Doppler only", Route::DOPPLER)?,
        syslog_tcp: fixed("syslog only, TCP", syslog_tcp)?,
        both_tcp: fixed("both, TCP", both_tcp)?,
        syslog_tls: fixed("syslog only, TLS", syslog_tls)?,
        both_tls: fixed("both, TLS", both_tls)?,
    };

    eprintln!("loss-free capacity, drain over TCP ({probe_secs} s probes):");
    // The search starts from the goodput at max offered load, as `bench --only capacity`'s
    // does, but measured in a probe: three full-length runs more would not fit the time.
    let search = |name: &str, route| -> Result<Search, BenchError> {
        let max = shown(bench.run_to(
            &format!("{name}, max offered"),
            Via::Agent,
            route,
            None,
            probe_secs,
        )?);
        let confirmations = capacity_search(
            name,
            max.goodput(),
            probe_secs,
            secs,
            |label, rate, secs| {
                bench
                    .run_to(label, Via::Agent, route, Some(rate), secs)
                    .map(shown)
            },
        )?;
        Ok(Search { max, confirmations })
    };
    let capacity = [
        search("Doppler only", Route::DOPPLER)?,
        search("syslog only", syslog_tcp)?,
        search("both", both_tcp)?,
    ];
    Ok(report(&ceilings, &at_rate, &capacity))
}

/// Each sink's own ceiling (load straight into it).
struct Ceilings {
    doppler: Outcome,
    /// The syslog sink over TCP on one connection (what a drain has), on 4, and over TLS on one.
    syslog: Outcome,
    syslog_4: Outcome,
    syslog_tls: Outcome,
}

/// The runs at [`RATE`].
struct AtRate {
    doppler: Outcome,
    syslog_tcp: Outcome,
    both_tcp: Outcome,
    syslog_tls: Outcome,
    both_tls: Outcome,
}

/// A capacity search: its start and its full-length confirmations.
struct Search {
    max: Outcome,
    confirmations: Vec<Outcome>,
}

impl Search {
    /// The rate of the loss-free confirmation.
    fn capacity(&self) -> Option<u64> {
        self.confirmations
            .iter()
            .rev()
            .find(|o| o.loss_free())
            .and_then(|o| o.target)
    }
}

/// The table, the targets (Doppler only, syslog only and both in `capacity`) and the figures a
/// reader needs to judge them.
fn report(c: &Ceilings, r: &AtRate, capacity: &[Search; 3]) -> String {
    let mut s = String::from(HEADER);
    let ceilings = [&c.doppler, &c.syslog, &c.syslog_4, &c.syslog_tls];
    let at_rate = [
        &r.doppler,
        &r.syslog_tcp,
        &r.both_tcp,
        &r.syslog_tls,
        &r.both_tls,
    ];
    let searches = capacity
        .iter()
        .flat_map(|search| [&search.max].into_iter().chain(&search.confirmations));
    for o in ceilings.into_iter().chain(at_rate).chain(searches) {
        s += &row(o);
    }
    let at = format!("{}k/s", RATE / 1000);
    s += "\n| target | this run | |\n|---|---|---|\n";
    for (transport, both) in [("TCP", &r.both_tcp), ("TLS", &r.both_tls)] {
        let ratio = both.cpu.zip(r.doppler.cpu).map(|(b, d)| b / d);
        let _ = writeln!(
            s,
            "| agent CPU at {at}, both / Doppler only ≤ {MAX_CPU_RATIO}× ({transport} drain) | {} / {} = {} | {} |",
            fmt_cpu(both.cpu),
            fmt_cpu(r.doppler.cpu),
            ratio.map_or("-".into(), |r| format!("{r:.2}×")),
            verdict(ratio.map(|r| r <= MAX_CPU_RATIO)),
        );
    }
    let [doppler_rate, syslog_rate, both_rate] = capacity.each_ref().map(Search::capacity);
    let ratio = both_rate
        .zip(doppler_rate)
        .map(|(b, d)| b as f64 / d as f64);
    let _ = writeln!(
        s,
        "| loss-free capacity, both / Doppler only ≥ {:.0}% (TCP drain) | {} / {} = {} | {} |",
        MIN_CAPACITY_RATIO * 100.0,
        fmt_capacity(both_rate),
        fmt_capacity(doppler_rate),
        ratio.map_or("-".into(), |r| format!("{:.0}%", r * 100.0)),
        verdict(ratio.map(|r| r >= MIN_CAPACITY_RATIO)),
    );
    for (transport, runs) in [
        ("TCP", [&r.syslog_tcp, &r.both_tcp]),
        ("TLS", [&r.syslog_tls, &r.both_tls]),
    ] {
        let p99 = runs.map(|o| o.drain.as_ref().and_then(|d| d.p99_us));
        let worst = p99.iter().try_fold(0, |w, p| p.map(|p| p.max(w)));
        let _ = writeln!(
            s,
            "| syslog sink latency p99 at {at} ≤ {} ({transport} drain) | syslog only {}, both {} | {} |",
            fmt_us(MAX_DRAIN_P99_US),
            p99[0].map_or("-".into(), fmt_us),
            p99[1].map_or("-".into(), fmt_us),
            verdict(worst.map(|w| w <= MAX_DRAIN_P99_US)),
        );
    }
    let share = |cap: Option<u64>, ceiling: &Outcome| {
        cap.map_or("-".into(), |c| {
            format!("{:.0}%", c as f64 * 100.0 / ceiling.goodput().max(1.0))
        })
    };
    let _ = writeln!(
        s,
        "| loss-free capacity (TCP drain) | Doppler only {}, syslog only {}, both {} | |",
        fmt_capacity(doppler_rate),
        fmt_capacity(syslog_rate),
        fmt_capacity(both_rate),
    );
    let _ = writeln!(
        s,
        "| each sink's ceiling, load straight into it | Doppler sink {}; syslog sink {} (TCP, 1 connection), {} (TCP, 4), {} (TLS, 1) | |",
        fmt_rate(c.doppler.goodput()),
        fmt_rate(c.syslog.goodput()),
        fmt_rate(c.syslog_4.goodput()),
        fmt_rate(c.syslog_tls.goodput()),
    );
    let _ = writeln!(
        s,
        "| capacity as a share of the sink's ceiling (near 100%: the sink, not the agent, is the limit) | Doppler only {} of the Doppler sink's; syslog only {} of the syslog sink's (TCP, 1 connection); both {} / {} | |",
        share(doppler_rate, &c.doppler),
        share(syslog_rate, &c.syslog),
        share(both_rate, &c.doppler),
        share(both_rate, &c.syslog),
    );
    s
}

/// Prints a run's row as it ends, for whoever watches.
fn shown(o: Outcome) -> Outcome {
    eprintln!("  {}", row(&o).trim_end());
    o
}

/// The pre-formatted workload straight into `sink` on `connections` connections, as fast as it
/// reads, for `secs`.
fn direct(
    bench: &Bench,
    sink: &SyslogSink,
    tls: Option<Arc<rustls::ClientConfig>>,
    connections: usize,
    secs: u64,
) -> Result<Outcome, BenchError> {
    let label = format!(
        "direct: load → syslog sink, {}, {connections} connection{}",
        if tls.is_some() { "TLS" } else { "TCP" },
        if connections == 1 { "" } else { "s" }
    );
    sink.stats.reset();
    let spec = SyslogLoadSpec {
        target: sink.addr,
        tls,
        connections,
        duration: Duration::from_secs(secs),
    };
    let r = bench.rt.block_on(syslog_load::run(spec))?;
    drain_wait_all(&[(&sink.stats, r.sent)], None, Duration::from_secs(15));
    Ok(Outcome {
        label,
        target: None,
        sent: r.sent,
        offered_rate: r.rate(),
        doppler: false,
        // The load's messages carry the time it started: no latency to show.
        drain: Some(Arrived {
            p50_us: None,
            p99_us: None,
            ..Arrived::of(&sink.stats, r.elapsed, (1, 1))
        }),
        ..Outcome::default()
    })
}

/// The agent forwarding to `drain` (the syslog sink `sink`), and to the Doppler sink too with
/// `doppler`.
fn with_drain<'a>(doppler: bool, drain: &'a DrainTarget, sink: &'a SyslogSink) -> Route<'a> {
    Route {
        doppler,
        drain: Some((drain, &sink.stats)),
    }
}

fn fmt_capacity(rate: Option<u64>) -> String {
    rate.map_or("none found".into(), |r| fmt_rate(r as f64))
}

fn fmt_cpu(cpu: Option<f64>) -> String {
    cpu.map_or("-".into(), |c| format!("{c:.1}%"))
}

const HEADER: &str = "| run | target/s | offered/s | Doppler sink got/s | syslog sink got/s | lost, Doppler / syslog | agent drops | agent CPU | agent peak RSS | Doppler sink p50 / p99 | syslog sink p50 / p99 | out of order, Doppler / syslog |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n";

fn row(o: &Outcome) -> String {
    let lost = |received: u64| {
        let n = o.sent.saturating_sub(received);
        format!("{n} ({:.2}%)", n as f64 * 100.0 / o.sent.max(1) as f64)
    };
    let latency = |p50: Option<u64>, p99: Option<u64>| match (p50, p99) {
        (Some(a), Some(b)) => format!("{} / {}", fmt_us(a), fmt_us(b)),
        _ => "-".into(),
    };
    let doppler = o.doppler.then_some(o);
    let drain = o.drain.as_ref();
    let or_dash = |cell: Option<String>| cell.unwrap_or_else(|| "-".into());
    format!(
        "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} / {} |\n",
        o.label,
        o.target.map_or("max".into(), |t| fmt_rate(t as f64)),
        fmt_rate(o.offered_rate),
        or_dash(doppler.map(|d| fmt_rate(d.delivered_rate))),
        or_dash(drain.map(|d| fmt_rate(d.rate))),
        or_dash(doppler.map(|d| lost(d.received))),
        or_dash(drain.map(|d| lost(d.received))),
        fmt_drops(o),
        fmt_cpu(o.cpu),
        o.peak_rss_mb.map_or("-".into(), |m| format!("{m:.1} MB")),
        or_dash(doppler.map(|d| latency(d.p50_us, d.p99_us))),
        or_dash(drain.map(|d| latency(d.p50_us, d.p99_us))),
        or_dash(doppler.map(|d| d.out_of_order.to_string())),
        or_dash(drain.map(|d| d.out_of_order.to_string())),
    )
}
