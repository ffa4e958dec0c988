//! `metron bench`, `metron sink` and `metron load`: argument parsing, the agent as a child
//! process, the runs and the table.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::load::{self, LoadSpec};
use super::sink::{self, SinkStats};
use super::BenchError;
use crate::dev::DevCredentials;
use crate::tls::TlsMaterial;

/// Linux reports process CPU time in these ticks per second (`USER_HZ`, 100 on every
/// architecture Linux supports).
const TICKS_PER_SEC: f64 = 100.0;

pub const BENCH_USAGE: &str = "\
metron bench [--seconds N] [--probe-seconds N]
             [--only all|capacity|fixed|downstream|outage|syslog|noisy|otlp]
             [--rates N,N...] [--rounds N] [--connections N] [--ack-bytes N] [--ack-interval-ms N]
             [--budget-bytes N] [--signing on|off] [--sequencing on|off] [--agent-bin PATH]
             [--sink-workers N] [--outage-seconds N] [--trace]
    Runs the benchmark (sink, agent, load generator; all on 127.0.0.1) and prints a table.
    --seconds        length of each measured run (default 20)
    --probe-seconds  length of each capacity-search probe (default 8)
    --only           capacity: direct, the two max-offered runs and the capacity search;
                     fixed: the fixed-rate runs (all: both);
                     downstream: what envelopes cost a Doppler behind the agent: two sinks in
                     processes of their own decode and re-encode every envelope, one behind the
                     agent, the other fed the same workload at the same time straight from a
                     load generator with the identity tags an upstream agent adds; their CPU
                     per envelope compared;
                     outage: the sink killed under steady load and restarted, with a modelled
                     1,000-envelope subscriber buffer behind it: the backlog, when delivery
                     resumed, how long the replay took and what the buffer dropped, with the
                     agent's replay pacing and without;
                     syslog: an aggregate syslog drain beside the Doppler: each sink's own
                     ceiling (load straight into it), then the agent with the Doppler sink only,
                     a syslog sink only and both, each at 50k/s (drain over TCP and TLS) and in
                     a loss-free capacity search (TCP); the fan-out's targets met or not.
                     --seconds is the length of the 50k/s runs and of each capacity
                     confirmation, --probe-seconds of the ceilings, max-offered runs and probes;
                     noisy: noisy neighbours (issue 22): one source flooding the agent in front
                     of a sink capped at 20k/s beside quiet sources (on their own connection,
                     and inside the flood's batches), and a source offering 50k/s against a
                     10k/s per-source limit: the quiet sources' loss and p99, the flood's
                     goodput, the drops by reason, the limited rate; --seconds per run;
                     otlp: an OpenTelemetry collector (the benchmark's OTLP sink, mTLS)
                     beside the Doppler: the agent with the Doppler only, the collector only
                     and both at 50k/s, then a loss-free capacity search for the Doppler only
                     and both; --seconds and --probe-seconds as for syslog
    --rates          the fixed rates, envelopes/s (default 10000,50000; downstream: 10000;
                     outage: 1000,5000; syslog: 50000 only, not changed by --rates)
    --rounds         downstream: rounds, the sinks swapping roles each round (default 4)
    --signing, --sequencing
                     the agent's signing.enabled and sequencing.enabled (default on)
    --agent-bin      the agent binary to run (default: this one; e.g. an older build to compare)
    --sink-workers   downstream: threads of each sink (default 2)
    --outage-seconds outage: how long the sink stays down (default 5)
    --connections    the agent's dopplers.connections (default: the agent's default)
    --ack-bytes      the agent's dopplers.ack_bytes (default: the agent's default)
    --ack-interval-ms  the agent's dopplers.ack_interval_ms (default: the agent's default)
    --budget-bytes   the agent's pipeline.max_buffered_bytes (default: the agent's default)
    --trace          print one line a second during each run: delivered, dropped, buffered, RSS";

pub const SINK_USAGE: &str = "\
metron sink --listen ADDR --ca PEM --cert PEM --key PEM [--decode] [--totals] [--workers N]
    A Doppler stand-in for benchmarks: BatchSender over mTLS (clients must present a certificate
    signed by --ca); prints envelopes/s, latency and out-of-order counts every second.
    --decode  decode every message with prost and re-encode every envelope, as a Doppler does
    --totals  print `totals envelopes=N bytes=B` every 100 ms instead (what `bench --only
              downstream` reads)
    --workers threads serving connections (default 2)";

pub const LOAD_USAGE: &str = "\
metron load --target ADDR --ca PEM --cert PEM --key PEM [--server-name NAME] [--rate N]
            [--seconds N] [--streams N]
    The benchmark's load generator: N streams (default 4) of 100-envelope batches over
    BatchSender, at --rate envelopes/s in total (default: as fast as the receiver reads) for
    --seconds (default 20). --server-name defaults to metron.";

/// Flags that take no value.
const SWITCHES: &[&str] = &["trace", "decode", "totals"];

/// Flag values after the subcommand.
struct Args(BTreeMap<String, String>);

impl Args {
    fn parse(args: &[String], known: &[&str]) -> Result<Args, BenchError> {
        let mut map = BTreeMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .filter(|k| known.contains(k))
                .ok_or_else(|| BenchError::Usage(format!("unknown argument {a:?}")))?;
            // Switches take no value.
            if SWITCHES.contains(&key) {
                map.insert(key.to_string(), String::new());
                continue;
            }
            let value = it
                .next()
                .ok_or_else(|| BenchError::Usage(format!("{a} needs a value")))?;
            map.insert(key.to_string(), value.clone());
        }
        Ok(Args(map))
    }

    fn get<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, BenchError> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| BenchError::Usage(format!("--{key}: cannot parse {v:?}"))),
        }
    }

    fn required(&self, key: &str) -> Result<String, BenchError> {
        self.0
            .get(key)
            .cloned()
            .ok_or_else(|| BenchError::Usage(format!("--{key} is required")))
    }

    fn tls(&self) -> Result<TlsMaterial, BenchError> {
        let files = crate::config::TlsFiles {
            ca: self.required("ca")?.into(),
            cert: self.required("cert")?.into(),
            key: self.required("key")?.into(),
        };
        TlsMaterial::load(&files, "--ca/--cert/--key").map_err(|e| BenchError::Setup(e.to_string()))
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, BenchError> {
    runtime_with(2)
}

pub(super) fn runtime_with(workers: usize) -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()
        .map_err(|e| BenchError::Setup(format!("tokio runtime: {e}")))
}

/// `metron sink ...`
///
/// # Errors
/// On bad arguments or when the sink cannot start.
pub fn sink_main(args: &[String]) -> Result<(), BenchError> {
    let a = Args::parse(
        args,
        &["listen", "ca", "cert", "key", "decode", "totals", "workers"],
    )?;
    let listen: SocketAddr = a.get("listen", "127.0.0.1:8082".parse().expect("literal"))?;
    let tls = a.tls()?;
    let workers: usize = a.get("workers", 2)?;
    crate::tls::install_crypto_provider();
    runtime_with(workers)?.block_on(async move {
        let listener = sink::bind(listen)
            .await
            .map_err(|e| BenchError::Setup(format!("--listen {listen}: {e}")))?;
        let stats = Arc::new(if a.0.contains_key("decode") {
            SinkStats::decoding()
        } else {
            SinkStats::default()
        });
        let shown = stats.clone();
        if a.0.contains_key("totals") {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    println!(
                        "totals envelopes={} bytes={}",
                        shown.received(),
                        shown.bytes.load(Ordering::Relaxed)
                    );
                }
            });
        } else {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let p = |q| shown.latency.quantile(q).map_or("-".into(), fmt_us);
                    println!(
                        "received {}/s, latency p50 {} p99 {}, out of order {}",
                        shown.received.swap(0, Ordering::Relaxed),
                        p(0.5),
                        p(0.99),
                        shown.out_of_order.load(Ordering::Relaxed)
                    );
                    shown.latency.reset();
                }
            });
        }
        eprintln!("sink listening on {listen}");
        sink::serve(listener, tls.tonic_server_config(), stats)
            .await
            .map_err(|e| BenchError::Setup(e.to_string()))
    })
}

/// `metron load ...`
///
/// # Errors
/// On bad arguments or when the load cannot be delivered.
pub fn load_main(args: &[String]) -> Result<(), BenchError> {
    let a = Args::parse(
        args,
        &[
            "target",
            "ca",
            "cert",
            "key",
            "server-name",
            "rate",
            "seconds",
            "streams",
        ],
    )?;
    let target: SocketAddr = a.get("target", "127.0.0.1:3458".parse().expect("literal"))?;
    let tls = a.tls()?;
    let rate: u64 = a.get("rate", 0)?;
    let spec = LoadSpec {
        target,
        tls: tls.client_config(&a.get("server-name", "metron".to_string())?),
        streams: a.get("streams", 4)?,
        rate: (rate > 0).then_some(rate),
        duration: Duration::from_secs(a.get("seconds", 20)?),
        extra_tags: Vec::new(),
    };
    crate::tls::install_crypto_provider();
    let r = runtime()?.block_on(load::run(spec))?;
    println!(
        "sent {} envelopes in {:.1} s: {:.0}/s",
        r.sent,
        r.elapsed.as_secs_f64(),
        r.rate()
    );
    Ok(())
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub label: String,
    pub target: Option<u64>,
    pub sent: u64,
    pub offered_rate: f64,
    pub received: u64,
    pub delivered_rate: f64,
    /// Counted by the agent as dropped (sum over reasons).
    pub agent_dropped: u64,
    pub drops_by_reason: BTreeMap<String, u64>,
    /// Agent CPU over the load, % of one core (`None` for the direct run).
    pub cpu: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub out_of_order: u64,
    /// Whether the Doppler sink was a destination (`received` to `out_of_order` are its
    /// figures); not in `bench --only syslog`'s runs to the syslog sink alone.
    pub doppler: bool,
    /// What the syslog sink got, when it was a destination (`bench --only syslog`).
    pub drain: Option<Arrived>,
}

/// What the syslog sink got in a run: one message per envelope (the workload's gauges have one
/// metric each).
#[derive(Debug, Clone, Default)]
pub struct Arrived {
    pub received: u64,
    /// What the destination takes of the workload (see [`DrainTarget::takes`]).
    pub takes: (u64, u64),
    pub rate: f64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub out_of_order: u64,
}

impl Arrived {
    pub(super) fn of(stats: &SinkStats, elapsed: Duration, takes: (u64, u64)) -> Self {
        Self {
            received: stats.received(),
            takes,
            rate: stats.received() as f64 / elapsed.as_secs_f64(),
            p50_us: stats.latency.quantile(0.5),
            p99_us: stats.latency.quantile(0.99),
            out_of_order: stats.out_of_order.load(Ordering::Relaxed),
        }
    }
}

impl Outcome {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    /// Every envelope arrived at every destination, the agent dropped none and the load
    /// generator kept its pace.
    pub fn loss_free(&self) -> bool {
        (!self.doppler || self.lost() == 0)
            && self
                .drain
                .as_ref()
                .is_none_or(|d| d.received * d.takes.1 >= self.sent * d.takes.0)
            && self.agent_dropped == 0
            && self
                .target
                .is_none_or(|t| self.offered_rate >= 0.98 * t as f64)
    }

    /// The delivered rate of the slowest destination.
    pub fn goodput(&self) -> f64 {
        let doppler = if self.doppler {
            self.delivered_rate
        } else {
            f64::INFINITY
        };
        // In envelopes of the workload: what the destination does not take counts as taken.
        self.drain.as_ref().map_or(doppler, |d| {
            doppler.min(d.rate * d.takes.1 as f64 / d.takes.0.max(1) as f64)
        })
    }
}

/// Where the load goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Straight into the sink.
    Direct,
    /// Through a fresh agent with its defaults (an emitter waits at most `max_wait_ms`, 100).
    Agent,
    /// Through a fresh agent that never makes an emitter wait (`max_wait_ms: 0`), like upstream:
    /// what it cannot take at once it sheds.
    AgentNoWait,
}

/// The sinks an agent run forwards to.
#[derive(Clone, Copy)]
pub(super) struct Route<'a> {
    /// The Doppler sink (a `dopplers` section).
    pub doppler: bool,
    /// An aggregate drain, and the stats of the syslog sink behind it.
    pub drain: Option<(&'a DrainTarget, &'a Arc<SinkStats>)>,
}

impl Route<'_> {
    /// Every run but `bench --only syslog`'s.
    pub const DOPPLER: Route<'static> = Route {
        doppler: true,
        drain: None,
    };
}

/// The destination beside the Doppler in the agent's config: an aggregate syslog drain, or an
/// OTLP collector.
#[derive(Debug, Clone)]
pub(super) struct DrainTarget {
    /// A drain's URL, or the collector's `host:port` (with `otlp`).
    pub url: String,
    /// `syslog-tls://`: the CA the sink is verified against (`ca`) and the agent's client
    /// certificate (`cert`, `key`).
    pub tls: Option<crate::config::TlsFiles>,
    /// An OTLP collector (mTLS with the agent's certificate, server name `doppler`, traces off)
    /// rather than a syslog drain.
    pub otlp: bool,
    /// The share of the workload's envelopes it takes, as (of, in): the OTLP sink gets no
    /// timers (9 in 10), a drain everything (1 in 1).
    pub takes: (u64, u64),
}

/// A running agent process.
pub(super) struct AgentProcess {
    child: Child,
    pub(super) ingress: SocketAddr,
    metrics: SocketAddr,
}

/// Waits (5 s at most) until `child` accepts connections on `addr`. `Err(Some(status))` when it
/// exited first, `Err(None)` when it did not listen in time.
pub(super) fn wait_listening(
    child: &mut Child,
    addr: SocketAddr,
) -> Result<(), Option<std::process::ExitStatus>> {
    for _ in 0..200 {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Some(status));
        }
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(None)
}

pub(super) fn free_port() -> Result<SocketAddr, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| BenchError::Setup(format!("no free port: {e}")))
}

fn yaml_tls(files: &crate::config::TlsFiles) -> String {
    format!(
        "{{ ca: \"{}\", cert: \"{}\", key: \"{}\"",
        files.ca.display(),
        files.cert.display(),
        files.key.display()
    )
}

impl AgentProcess {
    /// Starts the agent with the benchmark's settings, forwarding to the sink at `sink`.
    pub(super) fn start(
        bench: &Bench,
        via: Via,
        sink: SocketAddr,
    ) -> Result<AgentProcess, BenchError> {
        Self::start_with(bench, via, Some(sink), None, "", "")
    }

    /// Starts the agent forwarding to the Doppler sink at `doppler` (`None`: no `dopplers`
    /// section) and to `drain`, with `dopplers_extra` (e.g. `"\n  replay_min_rate: 50"`) added to
    /// the `dopplers` section and `sections` (whole top-level sections, each line ending in a
    /// newline, e.g. `"limits: { ... }\n"`) to the config.
    pub(super) fn start_with(
        bench: &Bench,
        via: Via,
        doppler: Option<SocketAddr>,
        drain: Option<&DrainTarget>,
        dopplers_extra: &str,
        sections: &str,
    ) -> Result<AgentProcess, BenchError> {
        let ingress = free_port()?;
        let metrics = free_port()?;
        let mut dopplers = dopplers_extra.to_string();
        if let Some(c) = bench.tuning.connections {
            dopplers.push_str(&format!("\n  connections: {c}"));
        }
        if let Some(b) = bench.tuning.ack_bytes {
            dopplers.push_str(&format!("\n  ack_bytes: {b}"));
        }
        if let Some(ms) = bench.tuning.ack_interval_ms {
            dopplers.push_str(&format!("\n  ack_interval_ms: {ms}"));
        }
        let pipeline = bench.tuning.budget_bytes.map_or(String::new(), |b| {
            format!("pipeline: {{ max_buffered_bytes: {b} }}\n")
        });
        let max_wait = if via == Via::AgentNoWait { 0 } else { 100 };
        // Only what is switched off is written, so that an older agent (`--agent-bin`) that knows
        // neither key still reads the config.
        let signing = if bench.tuning.signing {
            format!(
                "signing: {{ key_id: {BENCH_KEY_ID}, key_file: \"{}\" }}",
                bench.key_file.display()
            )
        } else {
            "signing: { enabled: false }".to_string()
        };
        let sequencing = if bench.tuning.sequencing {
            ""
        } else {
            "sequencing: { enabled: false }\n"
        };
        let dopplers = doppler.map_or(String::new(), |sink| {
            format!(
                "dopplers:
  endpoints: [ {{ addr: \"{sink}\", az: z1 }} ]
  tls: {}, server_name: doppler }}{dopplers}
",
                yaml_tls(&bench.creds.agent)
            )
        });
        let syslog = drain.map_or(String::new(), |d| {
            if d.otlp {
                return format!(
                    "otlp:\n  endpoint: \"{}\"\n  tls: {{ ca: \"{}\", cert: \"{}\", key: \"{}\", server_name: doppler }}\n  signals: {{ traces: false }}\n",
                    d.url,
                    bench.creds.agent.ca.display(),
                    bench.creds.agent.cert.display(),
                    bench.creds.agent.key.display()
                );
            }
            let tls = d.tls.as_ref().map_or(String::new(), |f| {
                format!(
                    ", ca: \"{}\", cert: \"{}\", key: \"{}\"",
                    f.ca.display(),
                    f.cert.display(),
                    f.key.display()
                )
            });
            format!(
                "syslog:\n  aggregate_drains:\n    - {{ url: \"{}\"{tls} }}\n",
                d.url
            )
        });
        let yaml = format!(
            "identity: {{ deployment: {}, job: {}, index: \"{}\", ip: {}, az: z1 }}
ingress:
  grpc:
    listen: \"{ingress}\"
    max_wait_ms: {max_wait}
    tls: {} }}
  udp: {{ enabled: false }}
{dopplers}{syslog}metrics:
  listen: \"{metrics}\"
{signing}
log: {{ level: warn }}
health: {{ listen: null }}
development: {{ enabled: false }}
{pipeline}{sequencing}{sections}",
            IDENTITY[0].1,
            IDENTITY[1].1,
            IDENTITY[2].1,
            IDENTITY[3].1,
            yaml_tls(&bench.creds.agent),
        );
        let config = bench.dir.join("agent.yaml");
        std::fs::write(&config, yaml).map_err(|e| BenchError::Setup(e.to_string()))?;
        let log = std::fs::File::create(bench.dir.join("agent.log"))
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        let child = Command::new(&bench.agent_bin)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| BenchError::Agent(format!("{}: {e}", bench.agent_bin.display())))?;
        let mut agent = AgentProcess {
            child,
            ingress,
            metrics,
        };
        // Start-up is well under a second.
        match wait_listening(&mut agent.child, ingress) {
            Ok(()) => Ok(agent),
            Err(Some(status)) => Err(BenchError::Agent(format!(
                "exited with {status} at start-up; see {}",
                bench.dir.join("agent.log").display()
            ))),
            Err(None) => {
                agent.stop();
                Err(BenchError::Agent("did not listen within 5 s".into()))
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's `/metrics` text (empty when it does not answer).
    pub(super) fn metrics_text(&self) -> String {
        scrape(self.metrics).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        for _ in 0..400 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// (dropped in total, by reason) as the agent counts them.
    pub(super) fn drops(&self) -> (u64, BTreeMap<String, u64>) {
        let text = scrape(self.metrics).unwrap_or_default();
        let mut by_reason = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("dropped_by_reason{") else {
                continue;
            };
            let reason = rest
                .split("reason=\"")
                .nth(1)
                .and_then(|r| r.split('"').next());
            let value = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let (Some(r), Some(v)) = (reason, value) {
                *by_reason.entry(r.to_string()).or_default() += v as u64;
            }
        }
        (metric(&text, "dropped") as u64, by_reason)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// The sum of a metric's samples in Prometheus text (`name` alone or with labels).
pub(super) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metron\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// utime + stime of `pid`, in ticks.
pub(super) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Agent settings the benchmark may override (`None`: the agent's default).
#[derive(Debug, Clone, Copy)]
struct AgentTuning {
    connections: Option<usize>,
    ack_bytes: Option<usize>,
    ack_interval_ms: Option<usize>,
    budget_bytes: Option<usize>,
    /// `signing.enabled` (on by default).
    signing: bool,
    /// `sequencing.enabled` (on by default).
    sequencing: bool,
}

/// The agent's signing key id in every run.
const BENCH_KEY_ID: &str = "bench";

/// The agent's identity in every run (`identity` in its config).
pub(super) const IDENTITY: [(&str, &str); 4] = [
    ("deployment", "bench"),
    ("job", "bench"),
    ("index", "0"),
    ("ip", "127.0.0.1"),
];

/// Shared set-up for every run.
pub(super) struct Bench {
    pub(super) dir: PathBuf,
    pub(super) creds: DevCredentials,
    key_file: PathBuf,
    pub(super) sink_addr: SocketAddr,
    pub(super) stats: Arc<SinkStats>,
    agent_bin: PathBuf,
    tuning: AgentTuning,
    trace: bool,
    pub(super) emitter_tls: TlsMaterial,
    pub(super) rt: tokio::runtime::Runtime,
}

impl Bench {
    /// One run: the load (through a fresh agent, or straight into the sink) for `secs`, then
    /// a bounded wait until everything sent is delivered or counted as dropped.
    fn run(
        &self,
        label: &str,
        via: Via,
        rate: Option<u64>,
        secs: u64,
    ) -> Result<Outcome, BenchError> {
        let o = self.run_to(label, via, Route::DOPPLER, rate, secs)?;
        eprintln!("  {}", row(&o).trim_end());
        Ok(o)
    }

    /// [`Bench::run`] through an agent forwarding along `route` (`Via::Direct`: into the Doppler
    /// sink, whatever `route` says); prints nothing.
    pub(super) fn run_to(
        &self,
        label: &str,
        via: Via,
        route: Route,
        rate: Option<u64>,
        secs: u64,
    ) -> Result<Outcome, BenchError> {
        let agent = match via {
            Via::Direct => None,
            _ => Some(AgentProcess::start_with(
                self,
                via,
                route.doppler.then_some(self.sink_addr),
                route.drain.map(|d| d.0),
                "",
                "",
            )?),
        };
        let route = if agent.is_some() {
            route
        } else {
            Route::DOPPLER
        };
        let (target, server_name) = match &agent {
            Some(a) => (a.ingress, "metron"),
            None => (self.sink_addr, "doppler"),
        };
        let spec = LoadSpec {
            target,
            tls: self.emitter_tls.client_config(server_name),
            streams: 4,
            rate,
            duration: Duration::from_secs(secs),
            extra_tags: Vec::new(),
        };
        let mut sinks: Vec<(&Arc<SinkStats>, (u64, u64))> = Vec::new();
        if route.doppler {
            sinks.push((&self.stats, (1, 1)));
        }
        sinks.extend(route.drain.map(|d| (d.1, d.0.takes)));
        for (s, _) in &sinks {
            s.reset();
        }
        // What `--trace` shows: the Doppler sink, unless the run has only the syslog sink.
        let traced = route
            .drain
            .filter(|_| !route.doppler)
            .map_or(&self.stats, |d| d.1);
        let pid = agent.as_ref().map(AgentProcess::pid);
        let peak_kb = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = pid.map(|pid| {
            let (peak, on) = (peak_kb.clone(), sampling.clone());
            let trace = self
                .trace
                .then(|| (agent.as_ref().map(|a| a.metrics), traced.clone()));
            std::thread::spawn(move || {
                let mut tracer = trace.map(|(metrics, stats)| Tracer::new(metrics, stats));
                let mut tick = 0u64;
                while on.load(Ordering::Relaxed) {
                    if let Some(kb) = rss_kb(pid) {
                        peak.fetch_max(kb, Ordering::Relaxed);
                        if let Some(t) = tracer.as_mut().filter(|_| tick % 20 == 19) {
                            t.line(kb);
                        }
                    }
                    tick += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        });
        let cpu0 = pid.and_then(cpu_ticks);
        let started = Instant::now();
        let result = self.rt.block_on(load::run(spec));
        let cpu1 = pid.and_then(cpu_ticks);
        let busy = started.elapsed();
        let result = result?;
        let sinks: Vec<(&SinkStats, u64)> = sinks
            .iter()
            .map(|(s, (of, in_))| (&***s, result.sent * of / in_))
            .collect();
        let drops = drain_wait_all(&sinks, agent.as_ref(), Duration::from_secs(15));
        sampling.store(false, Ordering::Relaxed);
        if let Some(s) = sampler {
            let _ = s.join();
        }
        drop(agent);
        let received = self.stats.received();
        let o = Outcome {
            label: label.to_string(),
            target: rate,
            sent: result.sent,
            offered_rate: result.rate(),
            received,
            delivered_rate: received as f64 / result.elapsed.as_secs_f64(),
            agent_dropped: drops.0,
            drops_by_reason: drops.1,
            cpu: match (cpu0, cpu1) {
                (Some(a), Some(b)) => {
                    Some((b - a) as f64 / TICKS_PER_SEC / busy.as_secs_f64() * 100.0)
                }
                _ => None,
            },
            peak_rss_mb: pid.map(|_| peak_kb.load(Ordering::Relaxed) as f64 / 1024.0),
            p50_us: self.stats.latency.quantile(0.5),
            p99_us: self.stats.latency.quantile(0.99),
            out_of_order: self.stats.out_of_order.load(Ordering::Relaxed),
            doppler: route.doppler,
            drain: route
                .drain
                .map(|d| Arrived::of(d.1, result.elapsed, d.0.takes)),
        };
        Ok(o)
    }
}

/// A bounded wait after a run's load: until everything `sent` is received by the sink or
/// counted as dropped by the agent, nothing has moved for 2 s, or `at_most` passed. Returns the
/// agent's drops (total, by reason).
pub(super) fn drain_wait(
    stats: &SinkStats,
    agent: Option<&AgentProcess>,
    sent: u64,
    at_most: Duration,
) -> (u64, BTreeMap<String, u64>) {
    drain_wait_all(&[(stats, sent)], agent, at_most)
}

/// [`drain_wait`] for several sinks, each of which takes every envelope: until each has
/// received everything `sent` or the agent counted the rest as dropped. The agent's drops in
/// total stand in for each sink's own: a run with any drop is not loss-free anyway, and its
/// figures are what arrived until then.
/// `sinks`: each with what it should receive.
pub(super) fn drain_wait_all(
    sinks: &[(&SinkStats, u64)],
    agent: Option<&AgentProcess>,
    at_most: Duration,
) -> (u64, BTreeMap<String, u64>) {
    let mut last = (u64::MAX, Instant::now());
    let mut drops = (0, BTreeMap::new());
    let give_up = Instant::now() + at_most;
    loop {
        if let Some(a) = agent {
            drops = a.drops();
        }
        let done = sinks
            .iter()
            .all(|(s, sent)| s.received() + drops.0 >= *sent);
        if done || Instant::now() > give_up {
            return drops;
        }
        let received: u64 = sinks.iter().map(|(s, _)| s.received()).sum();
        if received != last.0 {
            last = (received, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            return drops;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `--trace`: one line a second of what the sink received and the agent's own counters.
struct Tracer {
    metrics: Option<SocketAddr>,
    stats: Arc<SinkStats>,
    started: Instant,
    last: (u64, u64),
}

impl Tracer {
    fn new(metrics: Option<SocketAddr>, stats: Arc<SinkStats>) -> Self {
        Self {
            metrics,
            stats,
            started: Instant::now(),
            last: (0, 0),
        }
    }

    fn line(&mut self, rss_kb: u64) {
        let text = self
            .metrics
            .and_then(|m| scrape(m).ok())
            .unwrap_or_default();
        let value = |name: &str| metric(&text, name) as u64;
        let received = self.stats.received();
        let dropped = value("dropped");
        eprintln!(
            "    {:>5.1} s  delivered {:>8}/s  dropped {:>8}/s  buffered {:>7} envelopes {:>6} KiB  rss {:>6} KiB",
            self.started.elapsed().as_secs_f64(),
            received - self.last.0,
            dropped.saturating_sub(self.last.1),
            value("buffered_envelopes"),
            value("buffered_bytes") / 1024,
            rss_kb
        );
        self.last = (received, dropped);
    }
}

pub(super) fn fmt_us(us: u64) -> String {
    if us < 10_000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{:.0} ms", us as f64 / 1000.0)
    }
}

/// A target's cell: met, not met, or not measured (`None`).
pub(super) fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "not met",
        None => "not measured",
    }
}

pub(super) fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else {
        format!("{:.1}k", r / 1e3)
    }
}

const HEADER: &str = "| run | target/s | offered/s | delivered/s | lost | agent drops | agent CPU | agent peak RSS | latency p50 / p99 | out of order |\n|---|---|---|---|---|---|---|---|---|---|\n";

/// The agent's drops in total and by reason.
pub(super) fn fmt_drops(o: &Outcome) -> String {
    let reasons: Vec<String> = o
        .drops_by_reason
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    if reasons.is_empty() {
        o.agent_dropped.to_string()
    } else {
        format!("{} ({})", o.agent_dropped, reasons.join(", "))
    }
}

fn row(o: &Outcome) -> String {
    let drops = fmt_drops(o);
    let pct = |n: u64| {
        if o.sent == 0 {
            "-".to_string()
        } else {
            format!("{} ({:.2}%)", n, n as f64 * 100.0 / o.sent as f64)
        }
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |\n",
        o.label,
        o.target.map_or("max".into(), |t| fmt_rate(t as f64)),
        fmt_rate(o.offered_rate),
        fmt_rate(o.delivered_rate),
        pct(o.lost()),
        drops,
        o.cpu.map_or("-".into(), |c| format!("{c:.1}%")),
        o.peak_rss_mb.map_or("-".into(), |m| format!("{m:.1} MB")),
        o.p50_us.map_or("-".into(), fmt_us),
        o.p99_us.map_or("-".into(), fmt_us),
        pct(o.out_of_order),
    )
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_string(), |m| m.trim().to_string());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    format!("{}, {cores} cores, {model}", date.trim())
}

/// `metron bench ...`
///
/// # Errors
/// On bad arguments or when a part of the benchmark cannot run.
pub fn bench_main(args: &[String]) -> Result<(), BenchError> {
    let a = Args::parse(
        args,
        &[
            "seconds",
            "probe-seconds",
            "only",
            "rates",
            "connections",
            "ack-bytes",
            "ack-interval-ms",
            "budget-bytes",
            "trace",
            "rounds",
            "signing",
            "sequencing",
            "agent-bin",
            "sink-workers",
            "outage-seconds",
        ],
    )?;
    let secs: u64 = a.get("seconds", 20)?;
    let probe_secs: u64 = a.get("probe-seconds", 8)?;
    let only: String = a.get("only", "all".to_string())?;
    if ![
        "all",
        "capacity",
        "fixed",
        "downstream",
        "outage",
        "syslog",
        "noisy",
        "otlp",
    ]
    .contains(&only.as_str())
    {
        return Err(BenchError::Usage(format!(
            "--only must be all, capacity, fixed, downstream, outage, syslog, noisy or otlp, not {only:?}"
        )));
    }
    let on_off = |key: &str| match a.0.get(key).map(String::as_str) {
        None | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(BenchError::Usage(format!(
            "--{key} must be on or off, not {other:?}"
        ))),
    };
    let optional = |key: &str| match a.0.get(key) {
        Some(_) => a.get(key, 0).map(Some),
        None => Ok(None),
    };
    let tuning = AgentTuning {
        connections: optional("connections")?,
        ack_bytes: optional("ack-bytes")?,
        ack_interval_ms: optional("ack-interval-ms")?,
        budget_bytes: optional("budget-bytes")?,
        signing: on_off("signing")?,
        sequencing: on_off("sequencing")?,
    };
    let default_rates = match only.as_str() {
        "downstream" => "10000",
        "outage" => "1000,5000",
        _ => "10000,50000",
    };
    let rates = a
        .get("rates", default_rates.to_string())?
        .split(',')
        .map(|r| {
            r.trim()
                .parse::<u64>()
                .ok()
                .filter(|r| *r > 0)
                .ok_or_else(|| BenchError::Usage(format!("--rates: cannot parse {r:?}")))
        })
        .collect::<Result<Vec<u64>, _>>()?;
    crate::tls::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("metron-bench-{}", std::process::id()));
    let mut bench = setup(&dir, tuning)?;
    bench.trace = a.0.contains_key("trace");
    if let Some(bin) = a.0.get("agent-bin") {
        bench.agent_bin = PathBuf::from(bin);
    }
    let started = Instant::now();
    println!("metron bench: {}", machine());
    let on = |b: bool| if b { "on" } else { "off" };
    println!(
        "workload: 4 streams of 100-envelope batches over BatchSender, 70% logs (200-byte payload), \
         10% each counters, gauges, timers; 100 source ids; 3 tags; {secs} s per run; mTLS both sides, \
         sequencing {} and signing {}; agent {}\n",
        on(tuning.sequencing),
        on(tuning.signing),
        bench.agent_bin.display()
    );
    let report = match only.as_str() {
        "syslog" => Some(super::syslog_runs::run(&bench, secs, probe_secs)),
        "otlp" => Some(super::otlp_runs::run(&bench, secs, probe_secs)),
        "noisy" => Some(super::noisy_runs::run(&bench, secs)),
        "outage" => {
            let outage_secs: u64 = a.get("outage-seconds", 5)?;
            Some(super::outage::run(&bench, &rates, outage_secs.max(1)))
        }
        "downstream" => {
            let rounds: usize = a.get("rounds", 4)?;
            let workers: usize = a.get("sink-workers", 2)?;
            Some(super::downstream::run(
                &bench,
                &rates,
                secs,
                rounds.max(1),
                workers,
            ))
        }
        _ => None,
    };
    if let Some(report) = report {
        let _ = std::fs::remove_dir_all(&dir);
        print!("{}", report?);
        println!(
            "\n(benchmark took {:.0} s)",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let mut results = Vec::new();
    let mut capacity = None;
    if only != "fixed" {
        eprintln!("direct (load generator → sink), as fast as it goes:");
        let direct = bench.run("direct: load → sink, max", Via::Direct, None, secs)?;
        eprintln!("through the agent, as fast as it goes:");
        let max = bench.run("agent, max offered", Via::Agent, None, secs)?;
        eprintln!("through an agent that never makes emitters wait (max_wait_ms: 0):");
        let shed = bench.run(
            "agent (max_wait_ms 0), max offered",
            Via::AgentNoWait,
            None,
            secs,
        )?;
        eprintln!("capacity search ({probe_secs} s probes):");
        let cap = capacity_search(
            "agent",
            max.delivered_rate,
            probe_secs,
            secs,
            |label, rate, secs| bench.run(label, Via::Agent, Some(rate), secs),
        )?;
        capacity = Some((direct.clone(), max.clone(), shed.clone(), cap.clone()));
        results.extend([direct, max, shed]);
        results.extend(cap);
    }
    let mut fixed = Vec::new();
    if only != "capacity" {
        eprintln!("fixed rates:");
        for &rate in &rates {
            fixed.push(bench.run(
                &format!("agent, {}k/s", rate / 1000),
                Via::Agent,
                Some(rate),
                secs,
            )?);
        }
        results.extend(fixed.iter().cloned());
    }
    let _ = std::fs::remove_dir_all(&dir);
    print!("{HEADER}");
    for o in &results {
        print!("{}", row(o));
    }
    println!();
    print!(
        "{}",
        summary(
            capacity.as_ref(),
            fixed.iter().find(|o| o.target == Some(50_000))
        )
    );
    println!(
        "\n(benchmark took {:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn setup(dir: &Path, tuning: AgentTuning) -> Result<Bench, BenchError> {
    let creds = crate::dev::generate(dir).map_err(|e| BenchError::Setup(e.to_string()))?;
    let key_file = dir.join("signing.key");
    let mut key = [0u8; 32];
    crate::entropy::fill(&mut key);
    std::fs::write(&key_file, key).map_err(|e| BenchError::Setup(e.to_string()))?;
    let emitter_tls = TlsMaterial::load(&creds.emitter, "emitter")
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let doppler_tls = TlsMaterial::load(&creds.doppler, "doppler")
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let rt = runtime()?;
    let stats = Arc::new(SinkStats::default());
    let sink_addr = rt.block_on(async {
        let listener = sink::bind("127.0.0.1:0".parse().expect("literal"))
            .await
            .map_err(|e| BenchError::Setup(format!("sink: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        tokio::spawn(sink::serve(
            listener,
            doppler_tls.tonic_server_config(),
            stats.clone(),
        ));
        Ok::<_, BenchError>(addr)
    })?;
    let agent_bin = std::env::current_exe().map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(Bench {
        dir: dir.to_path_buf(),
        creds,
        key_file,
        sink_addr,
        stats,
        agent_bin,
        tuning,
        trace: false,
        emitter_tls,
        rt,
    })
}

/// Finds the highest loss-free rate: probes around `start` (the goodput at max offered load),
/// then confirms the best with a full-length run, stepping down 10% at a time (at most three
/// times) while the confirmation loses: short probes are optimistic on a saturated 2-core
/// machine. `run(label, rate, secs)` makes one run; labels start with `name`. Returns the
/// confirmation runs.
pub(super) fn capacity_search(
    name: &str,
    start: f64,
    probe_secs: u64,
    secs: u64,
    mut run: impl FnMut(&str, u64, u64) -> Result<Outcome, BenchError>,
) -> Result<Vec<Outcome>, BenchError> {
    let round = |r: f64| ((r / 10_000.0).round() as u64).max(1) * 10_000;
    let mut rate = round(start).max(20_000);
    let (mut best, mut worst): (Option<u64>, Option<u64>) = (None, None);
    for _ in 0..5 {
        let o = run(
            &format!("{name}, probe {}k/s", rate / 1000),
            rate,
            probe_secs,
        )?;
        if o.loss_free() {
            best = Some(rate);
        } else {
            worst = Some(rate);
        }
        let next = match (best, worst) {
            (Some(b), Some(w)) => round((b + w) as f64 / 2.0),
            (Some(b), None) => round(b as f64 * 1.25),
            (None, Some(w)) => round(w as f64 * 0.75),
            (None, None) => unreachable!("one was set"),
        };
        if best == Some(next) || worst == Some(next) {
            break;
        }
        rate = next;
    }
    let mut out = Vec::new();
    let mut rate = best.unwrap_or(10_000);
    for _ in 0..4 {
        let o = run(&format!("{name}, capacity {}k/s", rate / 1000), rate, secs)?;
        let ok = o.loss_free();
        out.push(o);
        if ok {
            break;
        }
        rate = round(rate as f64 * 0.9);
    }
    Ok(out)
}

fn summary(
    capacity: Option<&(Outcome, Outcome, Outcome, Vec<Outcome>)>,
    at_50k: Option<&Outcome>,
) -> String {
    let mut s = String::from(
        "| figure | upstream Go agent | metron must | metron (this run) |\n|---|---|---|---|\n",
    );
    if let Some((direct, max, shed, cap)) = capacity {
        let found = cap.iter().rev().find(|o| o.loss_free());
        let cap_rate = found.map_or(0.0, |o| o.delivered_rate);
        s += &format!(
            "| loss-free capacity | ~50k/s | ≥ 300k/s | {} |\n",
            found.map_or("none found".into(), |o| fmt_rate(
                o.target.unwrap_or(0) as f64
            ))
        );
        let goodput = |what: &str, upstream: &str, o: &Outcome| {
            format!(
                "| {what} ({} offered) | {upstream} | ≥ 80% of capacity | {} ({:.0}% of capacity), {:.1}% dropped |\n",
                fmt_rate(o.offered_rate),
                fmt_rate(o.delivered_rate),
                if cap_rate > 0.0 { o.delivered_rate / cap_rate * 100.0 } else { 0.0 },
                o.lost() as f64 * 100.0 / o.sent.max(1) as f64
            )
        };
        s += &goodput("goodput at max offered", "~76k/s", max);
        s += &goodput(
            "goodput, agent never makes emitters wait",
            "~76k/s (88% dropped)",
            shed,
        );
        s += &format!(
            "| direct load → sink (no agent) | ~2.0M/s | - | {}; agent max / direct = {:.2} |\n",
            fmt_rate(direct.delivered_rate),
            max.delivered_rate / direct.delivered_rate.max(1.0)
        );
    }
    if let Some(o) = at_50k {
        s += &format!(
            "| agent CPU at 50k/s | 34% | ≤ 15% | {} |\n",
            o.cpu.map_or("-".into(), |c| format!("{c:.1}%"))
        );
        s += &format!(
            "| peak RSS at 50k/s | 33-40 MB | ≤ 20 MB | {} |\n",
            o.peak_rss_mb.map_or("-".into(), |m| format!("{m:.1} MB"))
        );
        s += &format!(
            "| added latency at 50k/s, p50 / p99 | 55 / 109 ms | ≤ 2 / ≤ 10 ms | {} / {} |\n",
            o.p50_us.map_or("-".into(), fmt_us),
            o.p99_us.map_or("-".into(), fmt_us)
        );
        s += &format!(
            "| out of order within a source | 8-19% | 0 | {} |\n",
            o.out_of_order
        );
    }
    s
}
