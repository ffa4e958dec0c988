//! `metron bench --only downstream`: what the agent's envelopes cost the Doppler behind it.
//!
//! Two sinks in processes of their own decode every message fully with prost and re-encode every
//! envelope, as a Doppler does for each subscriber (`metron sink --decode`). The workload goes to
//! both at the same time: to one through the agent, to the other straight from a second load
//! generator with the identity tags an upstream agent would have added (`deployment`, `job`,
//! `index`, `ip`), so the two differ only by what metron does beyond upstream, under the same
//! conditions. The sinks swap roles every round. The sink's CPU per envelope behind the agent
//! against the direct one is the downstream cost (issue 19: at most 1.15×).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::load::{self, LoadSpec};
use super::run::{
    cpu_ticks, fmt_rate, free_port, wait_listening, AgentProcess, Bench, Via, IDENTITY,
};
use super::BenchError;

/// The decoding sink, as a child process whose CPU is its own.
struct SinkProcess {
    child: Child,
    addr: SocketAddr,
    /// The last `totals` line it printed: (envelopes, bytes).
    totals: Arc<(AtomicU64, AtomicU64)>,
}

impl SinkProcess {
    fn start(bench: &Bench, workers: usize) -> Result<SinkProcess, BenchError> {
        let addr = free_port()?;
        let d = &bench.creds.doppler;
        let exe = std::env::current_exe().map_err(|e| BenchError::Setup(e.to_string()))?;
        let mut child = Command::new(exe)
            .arg("sink")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--ca")
            .arg(&d.ca)
            .arg("--cert")
            .arg(&d.cert)
            .arg("--key")
            .arg(&d.key)
            .args(["--decode", "--totals", "--workers", &workers.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| BenchError::Setup(format!("sink: {e}")))?;
        let totals = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let out = child.stdout.take().expect("piped");
        let seen = totals.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(name)?.parse::<u64>().ok())
                };
                if let (Some(n), Some(b)) = (field("envelopes="), field("bytes=")) {
                    seen.0.store(n, Ordering::Relaxed);
                    seen.1.store(b, Ordering::Relaxed);
                }
            }
        });
        let mut sink = SinkProcess {
            child,
            addr,
            totals,
        };
        match wait_listening(&mut sink.child, addr) {
            Ok(()) => Ok(sink),
            Err(Some(status)) => Err(BenchError::Setup(format!(
                "the sink exited at start-up: {status}"
            ))),
            Err(None) => {
                sink.stop();
                Err(BenchError::Setup(
                    "the sink did not listen within 5 s".into(),
                ))
            }
        }
    }

    fn totals(&self) -> (u64, u64) {
        (
            self.totals.0.load(Ordering::Relaxed),
            self.totals.1.load(Ordering::Relaxed),
        )
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU time of each thread of `pid`, in nanoseconds (`schedstat`), by thread id; or the whole
/// process's in ticks, under thread id 0, where the kernel keeps no schedstat.
fn cpu_sample(pid: u32) -> Option<std::collections::HashMap<u32, u64>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut sample = std::collections::HashMap::new();
    for task in tasks.flatten() {
        let tid = task.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok();
        match stat.and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok()) {
            Some(ns) => sample.insert(tid, ns),
            None => {
                let ticks = cpu_ticks(pid)?;
                return Some(std::collections::HashMap::from([(0, ticks * 10_000_000)]));
            }
        };
    }
    Some(sample)
}

/// CPU time used between two samples of one process: per thread, so that a thread that exits
/// meanwhile takes only its own time with it instead of making the total go backwards.
fn cpu_between(
    before: &std::collections::HashMap<u32, u64>,
    after: &std::collections::HashMap<u32, u64>,
) -> u64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// What one run cost the sink.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    envelopes: u64,
    bytes: u64,
    cpu_ns: u64,
    seconds: f64,
}

impl Cost {
    fn add(&mut self, o: Cost) {
        self.envelopes += o.envelopes;
        self.bytes += o.bytes;
        self.cpu_ns += o.cpu_ns;
        self.seconds += o.seconds;
    }

    fn us_per_envelope(&self) -> f64 {
        self.cpu_ns as f64 / 1e3 / self.envelopes.max(1) as f64
    }

    fn bytes_per_envelope(&self) -> f64 {
        self.bytes as f64 / self.envelopes.max(1) as f64
    }

    fn row(&self, label: &str, rate: u64) -> String {
        format!(
            "| {label} | {} | {} | {:.1} | {:.1}% | {:.2} µs |\n",
            fmt_rate(rate as f64),
            self.envelopes,
            self.bytes_per_envelope(),
            self.cpu_ns as f64 / 1e7 / self.seconds.max(1e-9),
            self.us_per_envelope()
        )
    }
}

/// Where one of the two loads goes: through a fresh agent, or straight to its sink with the
/// identity tags.
fn spec(
    bench: &Bench,
    sink: &SinkProcess,
    agent: Option<&AgentProcess>,
    rate: u64,
    secs: u64,
) -> LoadSpec {
    let (target, server_name, extra_tags) = match agent {
        Some(a) => (a.ingress, "metron", Vec::new()),
        None => (
            sink.addr,
            "doppler",
            IDENTITY
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
    };
    LoadSpec {
        target,
        tls: bench.emitter_tls.client_config(server_name),
        streams: 4,
        rate: Some(rate),
        duration: Duration::from_secs(secs),
        extra_tags,
    }
}

/// One round: the workload through a fresh agent into `via_agent`, and at the same time straight
/// into `direct` with the identity tags, both at `rate` for `secs`; then waits (bounded) until
/// both sinks have everything sent. Both are measured over the same window, so whatever the VM's
/// speed does meanwhile it does to both (this machine's CPU figures drift by tens of percent
/// between runs minutes apart, which one run after the other could not tell from the agent).
fn measure_round(
    bench: &Bench,
    via_agent: &SinkProcess,
    direct: &SinkProcess,
    rate: u64,
    secs: u64,
) -> Result<(Cost, Cost), BenchError> {
    let agent = AgentProcess::start(bench, Via::Agent, via_agent.addr)?;
    let loads = (
        spec(bench, via_agent, Some(&agent), rate, secs),
        spec(bench, direct, None, rate, secs),
    );
    let sinks = [via_agent, direct];
    // The handshakes come first: the agent's with its sink happened as it started, and the
    // direct load's must not fall into the window either.
    let channels = bench.rt.block_on(async {
        tokio::try_join!(load::connect_all(&loads.0), load::connect_all(&loads.1))
    })?;
    let before: Vec<((u64, u64), _)> = sinks
        .iter()
        .map(|s| (s.totals(), cpu_sample(s.child.id())))
        .collect();
    let started = Instant::now();
    let (a, d) = bench.rt.block_on(async {
        tokio::join!(
            load::send(loads.0, channels.0),
            load::send(loads.1, channels.1)
        )
    });
    let sent = [a?.sent, d?.sent];
    let give_up = Instant::now() + Duration::from_secs(15);
    let arrived = |i: usize| sinks[i].totals().0 - before[i].0 .0 >= sent[i];
    while !(arrived(0) && arrived(1)) && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu: Vec<_> = sinks.iter().map(|s| cpu_sample(s.child.id())).collect();
    let seconds = started.elapsed().as_secs_f64();
    drop(agent);
    let cost = |i: usize| {
        let ((n0, b0), cpu0) = &before[i];
        let (n0, b0) = (*n0, *b0);
        let (n1, b1) = sinks[i].totals();
        if n1 - n0 < sent[i] {
            eprintln!(
                "  warning: a sink received {} of {} envelopes",
                n1 - n0,
                sent[i]
            );
        }
        Cost {
            envelopes: n1 - n0,
            bytes: b1 - b0,
            cpu_ns: cpu[i]
                .as_ref()
                .zip(cpu0.as_ref())
                .map_or(0, |(after, before)| cpu_between(before, after)),
            seconds,
        }
    };
    Ok((cost(0), cost(1)))
}

const HEADER: &str = "| run | rate | envelopes | bytes per envelope | sink CPU | sink CPU per envelope |\n|---|---|---|---|---|---|\n";

/// Runs `rounds` rounds per rate (both paths at once, the two sinks swapping roles every round,
/// so neither process's own luck counts for one path only) and returns the report.
///
/// # Errors
/// When a sink, the agent or a load cannot run.
pub(super) fn run(
    bench: &Bench,
    rates: &[u64],
    secs: u64,
    rounds: usize,
    workers: usize,
) -> Result<String, BenchError> {
    let sinks = [
        SinkProcess::start(bench, workers)?,
        SinkProcess::start(bench, workers)?,
    ];
    let mut out = String::from(
        "Downstream cost: two sinks in processes of their own decode every message with prost and \
         re-encode every envelope, as a Doppler does. At the same time, one receives the workload \
         through the agent and the other receives it straight from a load generator, with the \
         identity tags an upstream agent adds; they swap roles every round. Their CPU per \
         envelope compares what the two forms cost a Doppler.\n\n",
    );
    out.push_str(HEADER);
    let mut summary = String::new();
    for &rate in rates {
        let (mut agent, mut direct) = (Cost::default(), Cost::default());
        let mut ratios = Vec::new();
        for round in 1..=rounds {
            eprintln!(
                "downstream, {}/s, round {round} of {rounds}:",
                fmt_rate(rate as f64)
            );
            let (via, other) = if round % 2 == 1 {
                (&sinks[0], &sinks[1])
            } else {
                (&sinks[1], &sinks[0])
            };
            let (a, d) = measure_round(bench, via, other, rate, secs)?;
            for (label, c) in [("behind the agent", a), ("direct, identity tags", d)] {
                let line = c.row(&format!("{label}, round {round}"), rate);
                eprint!("  {line}");
                out.push_str(&line);
            }
            ratios.push(format!(
                "{:.2}",
                a.us_per_envelope() / d.us_per_envelope().max(1e-9)
            ));
            agent.add(a);
            direct.add(d);
        }
        out.push_str(&agent.row("**behind the agent, all rounds**", rate));
        out.push_str(&direct.row("**direct, identity tags, all rounds**", rate));
        summary.push_str(&format!(
            "- at {}/s: sink CPU per envelope behind the agent / direct = **{:.2}×** (target ≤ 1.15×; \
             rounds {}); bytes per envelope {:.1} against {:.1} (+{:.1})\n",
            fmt_rate(rate as f64),
            agent.us_per_envelope() / direct.us_per_envelope().max(1e-9),
            ratios.join(", "),
            agent.bytes_per_envelope(),
            direct.bytes_per_envelope(),
            agent.bytes_per_envelope() - direct.bytes_per_envelope()
        ));
    }
    out.push('\n');
    out.push_str(&summary);
    Ok(out)
}
