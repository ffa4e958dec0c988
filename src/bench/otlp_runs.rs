//! `metron bench --only otlp`: the agent exporting to an OpenTelemetry collector (the
//! benchmark's OTLP sink, [`super::otlp_sink`]) beside the Doppler sink, over mTLS both. The
//! collector takes logs, counters and gauges (traces off: the workload's timers carry no trace
//! ids, so they could not be spans), 9 of every 10 envelopes.
//!
//! Runs at 50k/s with the Doppler only, the collector only (no `dopplers` section) and both,
//! then a loss-free capacity search for the Doppler only and both. A run with both is
//! loss-free only when both sinks got everything they take and the agent dropped nothing.
//! Prints a table and the targets.

use std::fmt::Write as _;

use super::otlp_sink::OtlpSink;
use super::run::{
    capacity_search, fmt_drops, fmt_rate, fmt_us, verdict, Bench, DrainTarget, Outcome, Route, Via,
};
use super::BenchError;
use crate::tls::TlsMaterial;

const RATE: u64 = 50_000;
/// The targets: both at most 1.6× the Doppler-only CPU at [`RATE`]; the Doppler's
/// figures with a healthy collector within 5% of Doppler-only.
const MAX_CPU_RATIO: f64 = 1.6;

/// Runs everything and returns the report.
///
/// # Errors
/// When a sink, the agent or a load cannot run.
pub(super) fn run(bench: &Bench, secs: u64, probe_secs: u64) -> Result<String, BenchError> {
    let tls = TlsMaterial::load(&bench.creds.doppler, "doppler")
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    // The collector on threads of its own, as a real one is a process of its own: decoding a
    // large export on the Doppler sink's runtime would hold up the Doppler sink's reads and show
    // as the Doppler's latency.
    let otlp_rt = super::run::runtime_with(1)?;
    let sink = OtlpSink::start(&otlp_rt, tls.tonic_server_config())?;
    let target = DrainTarget {
        url: sink.addr.to_string(),
        tls: None,
        otlp: true,
        takes: (9, 10),
    };
    let otlp_only = Route {
        doppler: false,
        drain: Some((&target, &sink.stats)),
    };
    let both = Route {
        doppler: true,
        drain: Some((&target, &sink.stats)),
    };
    eprintln!("at {}k/s ({secs} s each):", RATE / 1000);
    let fixed = |name: &str, route| {
        let label = format!("{name}, {}k/s", RATE / 1000);
        let o = bench.run_to(&label, Via::Agent, route, Some(RATE), secs)?;
        eprintln!("  {}", row(&o).trim_end());
        Ok::<_, BenchError>(o)
    };
    let doppler = fixed("Doppler only", Route::DOPPLER)?;
    let collector = fixed("OTLP only", otlp_only)?;
    let together = fixed("both", both)?;
    eprintln!("loss-free capacity ({probe_secs} s probes):");
    let search = |name: &str, route| -> Result<Option<u64>, BenchError> {
        let max = bench.run_to(
            &format!("{name}, max offered"),
            Via::Agent,
            route,
            None,
            probe_secs,
        )?;
        eprintln!("  {}", row(&max).trim_end());
        let confirmations = capacity_search(
            name,
            max.goodput(),
            probe_secs,
            secs,
            |label, rate, secs| {
                let o = bench.run_to(label, Via::Agent, route, Some(rate), secs)?;
                eprintln!("  {}", row(&o).trim_end());
                Ok(o)
            },
        )?;
        Ok(confirmations
            .iter()
            .rev()
            .find(|o| o.loss_free())
            .and_then(|o| o.target))
    };
    let doppler_capacity = search("Doppler only", Route::DOPPLER)?;
    let both_capacity = search("both", both)?;

    let mut s = String::from(
        "OTLP beside the Doppler: the agent with the Doppler sink only, the OTLP sink only and both \
         (mTLS both; the collector takes logs, counters and gauges)\n\n\
         | run | offered/s | Doppler sink | OTLP sink (of 90%) | agent drops | agent CPU | peak RSS | Doppler p50 / p99 | OTLP p50 / p99 |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for o in [&doppler, &collector, &together] {
        s += &row(o);
    }
    let ratio = together.cpu.zip(doppler.cpu).map(|(b, d)| b / d);
    let _ = writeln!(
        s,
        "\n| target | this run | |\n|---|---|---|\n| agent CPU at {}k/s, both / Doppler only ≤ {MAX_CPU_RATIO}× | {} / {} = {} | {} |",
        RATE / 1000,
        together.cpu.map_or("-".into(), |c| format!("{c:.1}%")),
        doppler.cpu.map_or("-".into(), |c| format!("{c:.1}%")),
        ratio.map_or("-".into(), |r| format!("{r:.2}×")),
        verdict(ratio.map(|r| r <= MAX_CPU_RATIO)),
    );
    let _ = writeln!(
        s,
        "| the Doppler's p99 with a healthy collector, against Doppler only | {} against {} | compare in interleaved pairs |",
        together.p99_us.map_or("-".into(), fmt_us),
        doppler.p99_us.map_or("-".into(), fmt_us),
    );
    let fmt = |r: Option<u64>| r.map_or("-".into(), |r| fmt_rate(r as f64));
    let _ = writeln!(
        s,
        "| loss-free capacity | Doppler only {}, both {} | |",
        fmt(doppler_capacity),
        fmt(both_capacity),
    );
    Ok(s)
}

fn row(o: &Outcome) -> String {
    let p = |v: Option<u64>| v.map_or("-".into(), fmt_us);
    let otlp = o.drain.as_ref();
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} |\n",
        o.label,
        fmt_rate(o.offered_rate),
        if o.doppler {
            o.received.to_string()
        } else {
            "-".into()
        },
        otlp.map_or("-".into(), |d| format!(
            "{} of {}",
            d.received,
            o.sent * 9 / 10
        )),
        fmt_drops(o),
        o.cpu.map_or("-".into(), |c| format!("{c:.1}%")),
        o.peak_rss_mb.map_or("-".into(), |m| format!("{m:.1} MB")),
        p(if o.doppler { o.p50_us } else { None }),
        p(if o.doppler { o.p99_us } else { None }),
        p(otlp.and_then(|d| d.p50_us)),
        p(otlp.and_then(|d| d.p99_us)),
    )
}
