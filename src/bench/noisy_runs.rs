//! `metron bench --only noisy`: noisy neighbours (issue 22).
//!
//! The Doppler sink takes at most [`SINK_CAP`] envelopes a second (it stops reading, so HTTP/2
//! flow control pushes back), the agent runs with its defaults, one emitter connection floods
//! one source id as fast as the agent takes it, and quiet sources send a few envelopes a second
//! each: on a connection of their own, and inside the flood's own batches (the Diego case: one
//! emitter carrying every app's envelopes). Printed per run: the quiet sources' loss (sent
//! against received at the sink, by source id) and latency, the flood's goodput while it ran,
//! and the agent's drops by reason.
//!
//! Then a source offering [`LIMITED_OFFER`] envelopes a second to an agent with a per-source
//! limit of [`LIMIT`] and an uncapped sink: its delivered rate after the first [`WARM_UP`]
//! (the burst), against the limit. The agent's notices about that source's drops (at most one
//! a second) are in its stream too and are counted with it.
//!
//! Latency is the sink's clock minus the envelope's timestamp, stamped when the load generator
//! makes the batch: in the Diego case it includes the time the batch waited in the emitter
//! behind the flood's, as it would in a real emitter.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::load::{self, LoadSpec, Pace};
use super::run::{
    drain_wait, fmt_drops, fmt_rate, fmt_us, verdict, AgentProcess, Bench, Outcome, Via,
};
use super::workload::{envelope, Template, BATCH};
use super::BenchError;

/// What the sink takes, envelopes/s.
const SINK_CAP: u64 = 20_000;
/// The per-source limit of the rate-limited run, and what its source offers, envelopes/s.
const LIMIT: u64 = 10_000;
const LIMITED_OFFER: u64 = 50_000;
/// Left out of the limited source's measured rate (its burst is one second of the limit).
const WARM_UP: Duration = Duration::from_secs(2);
/// The targets: the quiet sources' p99 with the flood on its own connection, and the
/// limited source's rate against its limit.
const MAX_QUIET_P99_US: u64 = 10_000;
const RATE_TOLERANCE: f64 = 0.05;

const FLOOD: &str = "flood";
const QUIET: &str = "quiet-";
const LIMITED: &str = "limited";

/// The quiet sources of a run: `sources` of them, `rate` envelopes/s in all, one envelope each
/// per round.
#[derive(Debug, Clone, Copy)]
struct Quiet {
    sources: usize,
    rate: u64,
}

impl Quiet {
    fn rounds_per_second(self) -> f64 {
        self.rate as f64 / self.sources as f64
    }
}

/// What one flood run measured.
struct FloodRun {
    label: String,
    quiet: Quiet,
    /// The quiet envelopes rode in the flood's batches.
    diego: bool,
    quiet_sent: u64,
    quiet_received: u64,
    /// Quiet sources that lost any envelope, and the most one lost.
    quiet_sources_losing: usize,
    quiet_worst_loss: u64,
    quiet_p50_us: Option<u64>,
    quiet_p99_us: Option<u64>,
    flood_offered: f64,
    /// The flood's envelopes at the sink per second while the load ran.
    flood_goodput: f64,
    /// Every envelope at the sink (the run's figures, drops included).
    all: Outcome,
}

/// `n` envelopes of the workload's mix, all from `source`.
fn batch_of(source: &str, n: usize) -> Template {
    Template::of((0..n).map(|i| {
        let mut e = envelope(i % 10, 0, i, &[]);
        e.source_id = source.to_string();
        e
    }))
}

fn quiet_id(i: usize) -> String {
    format!("{QUIET}{i:03}")
}

/// One envelope (a log) from each quiet source.
fn quiet_round(sources: usize) -> Template {
    Template::of((0..sources).map(|s| {
        let mut e = envelope(0, s, s, &[]);
        e.source_id = quiet_id(s);
        e
    }))
}

/// The flood and the quiet sources for `secs`, the quiet ones on their own connection or
/// inside the flood's batches (`diego`).
fn flood_run(bench: &Bench, quiet: Quiet, diego: bool, secs: u64) -> Result<FloodRun, BenchError> {
    let stats = &bench.stats;
    stats.cap_rate(SINK_CAP);
    stats.watch(Some(QUIET.as_bytes()));
    let agent = AgentProcess::start_with(bench, Via::Agent, Some(bench.sink_addr), None, "", "")?;
    let spec = LoadSpec {
        target: agent.ingress,
        tls: bench.emitter_tls.client_config("metron"),
        streams: if diego { 1 } else { 2 },
        rate: None,
        duration: Duration::from_secs(secs),
        extra_tags: Vec::new(),
    };
    let mut channels = bench.rt.block_on(load::connect_all(&spec))?;
    stats.reset();
    let flood = batch_of(FLOOD, BATCH);
    let round = quiet_round(quiet.sources);
    let (flood_sent, rounds) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let deadline = start + spec.duration;
    let round_every = Duration::from_secs_f64(1.0 / quiet.rounds_per_second());
    let mut tasks = Vec::new();
    if diego {
        // One stream: the flood's batches, a quiet round added to the first one made after it
        // is due.
        let (sent, rounds) = (flood_sent.clone(), rounds.clone());
        let channel = channels.remove(0);
        tasks.push(
            bench
                .rt
                .spawn(load::stream(channel, None, deadline, move |_, base| {
                    sent.fetch_add(BATCH as u64, Ordering::Relaxed);
                    let mut body = flood.stamped(base);
                    let r = rounds.load(Ordering::Relaxed);
                    if Instant::now() >= start + round_every * r as u32 {
                        body.extend(round.stamped(base + BATCH as i64));
                        rounds.fetch_add(1, Ordering::Relaxed);
                    }
                    body
                })),
        );
    } else {
        let sent = flood_sent.clone();
        tasks.push(bench.rt.spawn(load::stream(
            channels.remove(0),
            None,
            deadline,
            move |_, base| {
                sent.fetch_add(BATCH as u64, Ordering::Relaxed);
                flood.stamped(base)
            },
        )));
        let pace = Pace {
            start,
            per_second: quiet.rounds_per_second(),
        };
        let r = rounds.clone();
        tasks.push(bench.rt.spawn(load::stream(
            channels.remove(0),
            Some(pace),
            deadline,
            move |_, base| {
                r.fetch_add(1, Ordering::Relaxed);
                round.stamped(base)
            },
        )));
    }
    for t in tasks {
        bench
            .rt
            .block_on(t)
            .map_err(|e| BenchError::Load(e.to_string()))?
            .map_err(|e| BenchError::Load(format!("a stream failed: {e}")))?;
    }
    let elapsed = start.elapsed().max(Duration::from_millis(1));
    let flood_in_load = count(stats, FLOOD);
    let flood_sent = flood_sent.load(Ordering::Relaxed);
    let rounds = rounds.load(Ordering::Relaxed);
    let quiet_sent = rounds * quiet.sources as u64;
    let (dropped, by_reason) = drain_wait(
        stats,
        Some(&agent),
        flood_sent + quiet_sent,
        Duration::from_secs(15),
    );
    drop(agent);
    stats.cap_rate(0);
    let by_source = stats.received_by_source();
    let got: Vec<u64> = (0..quiet.sources)
        .map(|s| by_source.get(quiet_id(s).as_bytes()).copied().unwrap_or(0))
        .collect();
    let received = stats.received();
    let label = format!(
        "{} quiet at {}/s, {}",
        quiet.sources,
        quiet.rate,
        if diego {
            "inside the flood's batches (Diego)"
        } else {
            "own connection"
        }
    );
    let run = FloodRun {
        label: label.clone(),
        quiet,
        diego,
        quiet_sent,
        quiet_received: got.iter().sum(),
        quiet_sources_losing: got.iter().filter(|&&g| g < rounds).count(),
        quiet_worst_loss: got
            .iter()
            .map(|&g| rounds.saturating_sub(g))
            .max()
            .unwrap_or(0),
        quiet_p50_us: stats.watched_latency.quantile(0.5),
        quiet_p99_us: stats.watched_latency.quantile(0.99),
        flood_offered: flood_sent as f64 / elapsed.as_secs_f64(),
        flood_goodput: flood_in_load as f64 / elapsed.as_secs_f64(),
        all: Outcome {
            label,
            sent: flood_sent + quiet_sent,
            offered_rate: (flood_sent + quiet_sent) as f64 / elapsed.as_secs_f64(),
            received,
            delivered_rate: received as f64 / elapsed.as_secs_f64(),
            agent_dropped: dropped,
            drops_by_reason: by_reason,
            p50_us: stats.latency.quantile(0.5),
            p99_us: stats.latency.quantile(0.99),
            doppler: true,
            ..Outcome::default()
        },
    };
    stats.watch(None);
    eprintln!("  {}", flood_row(&run).trim_end());
    Ok(run)
}

/// Envelopes the sink has from `source`.
fn count(stats: &super::sink::SinkStats, source: &str) -> u64 {
    stats
        .received_by_source()
        .get(source.as_bytes())
        .copied()
        .unwrap_or(0)
}

/// What the rate-limited run measured.
struct LimitedRun {
    offered: f64,
    /// Delivered envelopes/s after [`WARM_UP`], until the load ended.
    rate: f64,
    sent: u64,
    received: u64,
    dropped: u64,
    by_reason: BTreeMap<String, u64>,
}

/// One source offering [`LIMITED_OFFER`] to an agent limiting every source to [`LIMIT`].
fn limited_run(bench: &Bench, secs: u64) -> Result<LimitedRun, BenchError> {
    let stats = &bench.stats;
    let limits = format!(
        "limits: {{ per_source: {{ envelopes_per_second: {LIMIT}, burst_seconds: 1 }} }}\n"
    );
    let agent =
        AgentProcess::start_with(bench, Via::Agent, Some(bench.sink_addr), None, "", &limits)?;
    let spec = LoadSpec {
        target: agent.ingress,
        tls: bench.emitter_tls.client_config("metron"),
        streams: 1,
        rate: Some(LIMITED_OFFER),
        duration: Duration::from_secs(secs.max(WARM_UP.as_secs() + 1)),
        extra_tags: Vec::new(),
    };
    let mut channels = bench.rt.block_on(load::connect_all(&spec))?;
    stats.reset();
    let batch = batch_of(LIMITED, BATCH);
    let start = Instant::now();
    let deadline = start + spec.duration;
    let pace = Pace {
        start,
        per_second: LIMITED_OFFER as f64 / BATCH as f64,
    };
    let task = bench.rt.spawn(load::stream(
        channels.remove(0),
        Some(pace),
        deadline,
        move |_, base| batch.stamped(base),
    ));
    std::thread::sleep(WARM_UP);
    let (n0, t0) = (count(stats, LIMITED), Instant::now());
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    let (n1, t1) = (count(stats, LIMITED), Instant::now());
    let batches = bench
        .rt
        .block_on(task)
        .map_err(|e| BenchError::Load(e.to_string()))?
        .map_err(|e| BenchError::Load(format!("a stream failed: {e}")))?;
    let elapsed = start.elapsed();
    let sent = batches * BATCH as u64;
    let (dropped, by_reason) = drain_wait(stats, Some(&agent), sent, Duration::from_secs(15));
    let run = LimitedRun {
        offered: sent as f64 / elapsed.as_secs_f64(),
        rate: (n1 - n0) as f64 / (t1 - t0).as_secs_f64(),
        sent,
        received: count(stats, LIMITED),
        dropped,
        by_reason,
    };
    eprintln!(
        "  limited: offered {}/s, delivered {:.0}/s after {} s",
        fmt_rate(run.offered),
        run.rate,
        WARM_UP.as_secs()
    );
    Ok(run)
}

/// Runs everything and returns the report.
///
/// # Errors
/// When the agent or a load cannot run.
pub(super) fn run(bench: &Bench, secs: u64) -> Result<String, BenchError> {
    let mut floods = Vec::new();
    for quiet in [
        Quiet {
            sources: 10,
            rate: 200,
        },
        Quiet {
            sources: 100,
            rate: 1_000,
        },
    ] {
        for diego in [false, true] {
            eprintln!(
                "flood beside {} quiet sources ({}/s), {}, sink capped at {}/s ({secs} s):",
                quiet.sources,
                quiet.rate,
                if diego { "Diego" } else { "own connection" },
                SINK_CAP
            );
            floods.push(flood_run(bench, quiet, diego, secs)?);
        }
    }
    eprintln!("one source at {LIMITED_OFFER}/s, limited to {LIMIT}/s ({secs} s):");
    let limited = limited_run(bench, secs)?;
    Ok(report(&floods, &limited))
}

const FLOOD_HEADER: &str = "| run | quiet sent | quiet lost | quiet sources losing any (worst) | quiet p50 / p99 | flood offered/s | flood goodput/s | all p50 / p99 | agent drops |\n|---|---|---|---|---|---|---|---|---|\n";

fn flood_row(r: &FloodRun) -> String {
    let lost = r.quiet_sent.saturating_sub(r.quiet_received);
    let p = |a: Option<u64>, b: Option<u64>| {
        format!(
            "{} / {}",
            a.map_or("-".into(), fmt_us),
            b.map_or("-".into(), fmt_us)
        )
    };
    format!(
        "| {} | {} | {lost} ({:.2}%) | {} of {} ({}) | {} | {} | {} | {} | {} |\n",
        r.label,
        r.quiet_sent,
        lost as f64 * 100.0 / r.quiet_sent.max(1) as f64,
        r.quiet_sources_losing,
        r.quiet.sources,
        r.quiet_worst_loss,
        p(r.quiet_p50_us, r.quiet_p99_us),
        fmt_rate(r.flood_offered),
        fmt_rate(r.flood_goodput),
        p(r.all.p50_us, r.all.p99_us),
        fmt_drops(&r.all),
    )
}

/// The tables and the targets.
fn report(floods: &[FloodRun], limited: &LimitedRun) -> String {
    let mut s = format!(
        "noisy neighbours: one source ({FLOOD}) flooding as fast as the agent takes it, the sink \
         capped at {}/s, the agent's defaults\n\n{FLOOD_HEADER}",
        fmt_rate(SINK_CAP as f64)
    );
    for r in floods {
        s += &flood_row(r);
    }
    let _ = write!(
        s,
        "\nrate limit: one source offering {}/s, limits.per_source {}/s with a 1 s burst, the \
         sink uncapped\n\n| offered/s | delivered/s after the first {} s | against the limit | \
         sent | delivered | agent drops |\n|---|---|---|---|---|---|\n",
        fmt_rate(LIMITED_OFFER as f64),
        fmt_rate(LIMIT as f64),
        WARM_UP.as_secs()
    );
    let off = limited.rate / LIMIT as f64 - 1.0;
    let drops = Outcome {
        agent_dropped: limited.dropped,
        drops_by_reason: limited.by_reason.clone(),
        ..Outcome::default()
    };
    let _ = writeln!(
        s,
        "| {} | {:.0} | {:+.1}% | {} | {} | {} |",
        fmt_rate(limited.offered),
        limited.rate,
        off * 100.0,
        limited.sent,
        limited.received,
        fmt_drops(&drops)
    );
    s += "\n| target | this run | |\n|---|---|---|\n";
    for r in floods {
        let lost = r.quiet_sent.saturating_sub(r.quiet_received);
        let _ = writeln!(
            s,
            "| quiet sources lose nothing ({}) | {lost} of {} lost | {} |",
            r.label,
            r.quiet_sent,
            verdict(Some(lost == 0 && r.quiet_sent > 0)),
        );
    }
    for r in floods.iter().filter(|r| !r.diego) {
        let _ = writeln!(
            s,
            "| quiet p99 ≤ {} ({}) | {} | {} |",
            fmt_us(MAX_QUIET_P99_US),
            r.label,
            r.quiet_p99_us.map_or("-".into(), fmt_us),
            verdict(r.quiet_p99_us.map(|p| p <= MAX_QUIET_P99_US)),
        );
    }
    let _ = writeln!(
        s,
        "| limited source within ±{:.0}% of its {}/s limit | {:.0}/s ({:+.1}%) | {} |",
        RATE_TOLERANCE * 100.0,
        fmt_rate(LIMIT as f64),
        limited.rate,
        off * 100.0,
        verdict(Some(off.abs() <= RATE_TOLERANCE)),
    );
    s
}
