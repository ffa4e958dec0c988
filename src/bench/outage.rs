//! `metron bench --only outage`: a Doppler restart under steady load, and the replay after it.
//!
//! The sink (a Doppler stand-in) runs on a runtime of its own so that it can be killed like a
//! crashed process (every socket closed at once) and restarted on the same address. Behind it
//! sits a modelled subscriber buffer ([`super::subscriber`]): 1,000 envelopes, upstream
//! Doppler's default, read at twice the offered rate. Each rate runs twice: with the agent's
//! default replay pace, and with pacing effectively off (`replay_extra_percent: 1000`,
//! `replay_min_rate: 1000000`), which is how every backlog went before pacing.
//!
//! Printed per run: envelopes the agent held when the sink came back, how soon delivery resumed,
//! how long the replay took (until no connection was pacing a backlog any more: the
//! `doppler_replaying` gauge), what the modelled subscriber dropped (invisible to the agent),
//! and what the agent counted as dropped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::load::{self, LoadSpec};
use super::run::{drain_wait, fmt_rate, metric, AgentProcess, Bench, Via};
use super::sink::{self, SinkStats};
use super::subscriber::SubscriberBuffer;
use super::BenchError;
use crate::config::{DEFAULT_REPLAY_EXTRA_PERCENT, DEFAULT_REPLAY_MIN_RATE};
use crate::tls::TlsMaterial;

/// Steady load before the sink is killed.
const WARM: Duration = Duration::from_secs(3);
/// The modelled subscriber's buffer (upstream Doppler's default).
const SUBSCRIBER_CAPACITY: usize = 1_000;
/// How much faster than the offered rate the modelled subscriber reads.
const SUBSCRIBER_HEADROOM: f64 = 2.0;
/// The `dopplers` keys of the unpaced runs (an `--agent-bin` older than them cannot run these).
const UNPACED: &str = "\n  replay_extra_percent: 1000\n  replay_min_rate: 1000000";

/// A sink that can be killed and restarted on the same address.
struct KillableSink {
    addr: SocketAddr,
    tls: TlsMaterial,
    stats: Arc<SinkStats>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl KillableSink {
    fn start(tls: TlsMaterial, stats: Arc<SinkStats>) -> Result<Self, BenchError> {
        let addr = super::run::free_port()?;
        let mut s = Self {
            addr,
            tls,
            stats,
            runtime: None,
        };
        s.serve()?;
        Ok(s)
    }

    fn serve(&mut self) -> Result<(), BenchError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-sink")
            .enable_all()
            .build()
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        // The killed sink's port may take a moment to be free again: a bounded retry.
        let mut tries = 0;
        let listener = loop {
            match rt.block_on(sink::bind(self.addr)) {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(BenchError::Setup(format!("sink {}: {e}", self.addr))),
            }
        };
        rt.spawn(sink::serve(
            listener,
            self.tls.tonic_server_config(),
            self.stats.clone(),
        ));
        self.stats.empty_subscriber();
        self.runtime = Some(rt);
        Ok(())
    }

    /// Every socket closed at once, like a crashed process.
    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for KillableSink {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What one outage showed.
struct Outcome {
    rate: u64,
    paced: bool,
    held: u64,
    resumed: Option<Duration>,
    replay: Option<Duration>,
    model_drops: u64,
    agent_dropped: u64,
    sent: u64,
    received: u64,
}

fn one(
    bench: &Bench,
    rate: u64,
    outage: Duration,
    after: Duration,
    paced: bool,
) -> Result<Outcome, BenchError> {
    let doppler_tls = TlsMaterial::load(&bench.creds.doppler, "doppler")
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let stats = Arc::new(SinkStats::default());
    stats.model_subscriber(Some(SubscriberBuffer::new(
        SUBSCRIBER_CAPACITY,
        SUBSCRIBER_HEADROOM * rate as f64,
    )));
    let mut sink = KillableSink::start(doppler_tls, stats.clone())?;
    let extra = if paced { "" } else { UNPACED };
    let agent = AgentProcess::start_with(bench, Via::Agent, Some(sink.addr), None, extra, "")?;
    let spec = LoadSpec {
        target: agent.ingress,
        tls: bench.emitter_tls.client_config("metron"),
        streams: 4,
        rate: Some(rate),
        duration: WARM + outage + after,
        extra_tags: Vec::new(),
    };
    let load = bench.rt.spawn(load::run(spec));

    std::thread::sleep(WARM);
    sink.kill();
    std::thread::sleep(outage);
    let text = agent.metrics_text();
    let held = metric(&text, "buffered_envelopes") as u64;
    let replays = metric(&text, "doppler_replays");
    let received = stats.received();
    sink.serve()?;
    let back = Instant::now();
    let (mut resumed, mut replay) = (None, None);
    let give_up = back + after + Duration::from_secs(30);
    while replay.is_none() && Instant::now() < give_up {
        if resumed.is_none() && stats.received() > received {
            resumed = Some(back.elapsed());
        }
        let text = agent.metrics_text();
        if metric(&text, "doppler_replays") > replays && metric(&text, "doppler_replaying") == 0.0 {
            replay = Some(back.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let result = bench
        .rt
        .block_on(load)
        .map_err(|e| BenchError::Load(e.to_string()))??;
    let (dropped, _) = drain_wait(&stats, Some(&agent), result.sent, Duration::from_secs(60));
    Ok(Outcome {
        rate,
        paced,
        held,
        resumed,
        replay,
        model_drops: stats.subscriber_drops(),
        agent_dropped: dropped,
        sent: result.sent,
        received: stats.received(),
    })
}

/// Runs the outage at each rate, paced and unpaced; returns the report.
pub(super) fn run(bench: &Bench, rates: &[u64], outage_secs: u64) -> Result<String, BenchError> {
    let outage = Duration::from_secs(outage_secs);
    // Long enough for the default pace (50% of the live rate) to replay the backlog: about
    // twice the outage, with room to spare.
    let after = outage * 3 + Duration::from_secs(5);
    let mut rows = Vec::new();
    for &rate in rates {
        for paced in [true, false] {
            eprintln!(
                "outage at {}/s, {}:",
                fmt_rate(rate as f64),
                if paced { "paced" } else { "unpaced" }
            );
            let o = one(bench, rate, outage, after, paced)?;
            eprintln!(
                "  held {}, replay {:?}, model drops {}",
                o.held, o.replay, o.model_drops
            );
            rows.push(o);
        }
    }
    let ms = |d: Option<Duration>| d.map_or("—".into(), |d| format!("{} ms", d.as_millis()));
    let mut out = format!(
        "outage: the sink killed for {outage_secs} s under steady load, then restarted; behind it \
         a modelled subscriber buffer of {SUBSCRIBER_CAPACITY} envelopes read at \
         {SUBSCRIBER_HEADROOM}× the offered rate\n\n\
         | rate | replay pace | held at restart | delivery resumed | replay took | subscriber drops (model) | agent drops | sent | received |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    for o in &rows {
        let _ = writeln!(
            out,
            "| {}/s | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_rate(o.rate as f64),
            if o.paced {
                format!("default (+{DEFAULT_REPLAY_EXTRA_PERCENT}%, {DEFAULT_REPLAY_MIN_RATE}/s)")
            } else {
                "off".to_string()
            },
            o.held,
            ms(o.resumed),
            ms(o.replay),
            o.model_drops,
            o.agent_dropped,
            o.sent,
            o.received
        );
    }
    Ok(out)
}
