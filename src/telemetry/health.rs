//! `GET /livez` and `GET /readyz` (on `health.listen`): what a process supervisor or a load
//! balancer asks, answered from the agent's own counters.
//!
//! * live: each arbiter — the system arbiter (the supervisor and the connection actors) and the
//!   pipeline arbiter (tagging, sequencing, signing) — runs a task within [`LIVENESS_TIMEOUT`], and
//!   every actor is there (a panic that escaped an actor's guard takes it down for good). A
//!   wedged arbiter or a gone actor is what a restart cures.
//! * ready: live actors, the gRPC ingress is listening and at least one destination has a
//!   connection open (a Doppler stream or a drain connection), so what an emitter sends now can
//!   go somewhere. The body reports every destination's connections and balance.
//!
//! Both answer 200 or 503 with a JSON body; its field names are a stable interface.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{DropReason, Ledger};

/// How long an arbiter may take to run a no-op before the agent counts as not live.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);

/// Says whether one actor is still there (its mailbox is open).
pub type ActorCheck = Box<dyn Fn() -> bool + Send + Sync>;

/// What the health endpoint reads.
pub struct Health {
    ledger: Arc<Ledger>,
    /// The gRPC ingress server is running (false before it starts and once shutdown begins).
    ingress_open: AtomicBool,
    /// The arbiters the liveness probe runs a task on, by name.
    arbiters: Vec<(&'static str, actix::ArbiterHandle)>,
    /// Every actor, by name (a reload adds and removes drain connections).
    actors: parking_lot::Mutex<Vec<(String, ActorCheck)>>,
    started: Instant,
}

/// One answer: HTTP status (200 or 503) and its JSON body.
pub struct Answer {
    pub ok: bool,
    pub body: String,
}

impl Health {
    pub fn new(
        ledger: Arc<Ledger>,
        arbiters: Vec<(&'static str, actix::ArbiterHandle)>,
        actors: Vec<(String, ActorCheck)>,
    ) -> Arc<Self> {
        Arc::new(Self {
            ledger,
            ingress_open: AtomicBool::new(false),
            arbiters,
            actors: parking_lot::Mutex::new(actors),
            started: Instant::now(),
        })
    }

    /// The actors that are gone (a panic escaped their guard), by name.
    pub fn gone_actors(&self) -> Vec<String> {
        self.actors
            .lock()
            .iter()
            .filter(|(_, alive)| !alive())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Watches one more actor (a drain a reload added).
    pub fn add_actor(&self, name: String, check: ActorCheck) {
        self.actors.lock().push((name, check));
    }

    /// Stops watching an actor (a drain a reload removed), before it stops.
    pub fn remove_actor(&self, name: &str) {
        self.actors.lock().retain(|(n, _)| n != name);
    }

    pub fn set_ingress_open(&self, open: bool) {
        self.ingress_open.store(open, Ordering::Relaxed);
    }

    /// `/readyz`.
    pub fn readiness(&self) -> Answer {
        let m = self.ledger.metrics().snapshot();
        let ingress = self.ingress_open.load(Ordering::Relaxed);
        let streams = m.doppler_v2_streams.max(0);
        let gone = self.gone_actors();
        let gone_reason = format!("actor gone: {}", gone.join(", "));
        let mut not_ready = Vec::new();
        if !gone.is_empty() {
            not_ready.push(gone_reason.as_str());
        }
        if !ingress {
            not_ready.push("ingress is not listening");
        }
        let drains_open = m.drain_connections.max(0);
        if streams == 0 && drains_open == 0 {
            not_ready.push("no destination has a connection open (no Doppler stream, no drain)");
        }
        let (envelopes, bytes) = self.ledger.buffered();
        let mut b = String::with_capacity(512);
        let _ = write!(
            b,
            "{{\"status\":\"{}\",\"ingress\":\"{}\",\"doppler_streams\":{streams},\
             \"connections_by_az\":{{",
            if not_ready.is_empty() {
                "ready"
            } else {
                "not_ready"
            },
            if ingress { "listening" } else { "closed" },
        );
        for (i, (az, n)) in m.connections_by_az.iter().enumerate() {
            if i > 0 {
                b.push(',');
            }
            push_json_str(&mut b, az);
            let _ = write!(b, ":{n}");
        }
        let _ = write!(
            b,
            "}},\"buffered\":{{\"envelopes\":{envelopes},\"bytes\":{bytes},\"budget_bytes\":{}}},\
             \"dropped\":{{\"total\":{}",
            self.ledger.max_bytes(),
            m.dropped_total()
        );
        for reason in DropReason::ALL {
            let _ = write!(b, ",\"{}\":{}", reason.name(), m.dropped_by(reason));
        }
        b.push_str("},\"destinations\":[");
        // App drains (as many as `syslog.max_app_drains`) are summed into one entry.
        let is_app = |a: &&super::AccountSnapshot| matches!(&a.destination, super::Destination::Drain { scope, .. } if *scope == super::DrainScope::App);
        for (i, a) in m.accounts.iter().filter(|a| !is_app(a)).enumerate() {
            if i > 0 {
                b.push(',');
            }
            b.push_str("{\"destination\":");
            match &a.destination {
                super::Destination::Doppler => {
                    b.push_str("\"doppler\"");
                    let _ = write!(b, ",\"connections\":{streams}");
                }
                super::Destination::Drain { scope, url } => {
                    b.push_str("\"drain\",\"drain_scope\":");
                    push_json_str(&mut b, scope.name());
                    b.push_str(",\"drain_url\":");
                    push_json_str(&mut b, url);
                    let _ = write!(b, ",\"connections\":{}", a.connections.max(0));
                }
                super::Destination::Otlp { endpoint } => {
                    b.push_str("\"otlp\",\"otlp_endpoint\":");
                    push_json_str(&mut b, endpoint);
                    let _ = write!(b, ",\"connections\":{}", a.connections.max(0));
                }
                super::Destination::Forward { addr } => {
                    b.push_str("\"forward\",\"forward_destination\":");
                    push_json_str(&mut b, addr);
                    let _ = write!(b, ",\"connections\":{}", a.connections.max(0));
                }
            }
            let _ = write!(
                b,
                ",\"offered\":{},\"egress\":{},\"dropped\":{},\"buffered\":{}}}",
                a.offered,
                a.egress,
                a.dropped_total(),
                a.buffered
            );
        }
        let apps: Vec<&super::AccountSnapshot> = m.accounts.iter().filter(is_app).collect();
        if !apps.is_empty() {
            if apps.len() < m.accounts.len() {
                b.push(',');
            }
            let sum =
                |f: fn(&super::AccountSnapshot) -> u64| apps.iter().map(|a| f(a)).sum::<u64>();
            let _ = write!(
                b,
                "{{\"destination\":\"app_drains\",\"drains\":{},\"connections\":{},                 \"offered\":{},\"egress\":{},\"dropped\":{},\"buffered\":{}}}",
                apps.len(),
                apps.iter().map(|a| a.connections.max(0)).sum::<i64>(),
                sum(|a| a.offered),
                sum(|a| a.egress),
                sum(super::AccountSnapshot::dropped_total),
                sum(|a| a.buffered),
            );
        }
        b.push(']');
        // While the agent sheds by source: who.
        let heaviest = self.ledger.metrics().heaviest();
        if heaviest
            .iter()
            .any(|h| h.fair_share_per_second + h.rate_limited_per_second >= 0.5)
        {
            b.push_str(",\"heaviest_sources\":[");
            for (i, h) in heaviest.iter().enumerate() {
                if i > 0 {
                    b.push(',');
                }
                let _ = write!(b, "{{\"rank\":{},\"source_id\":", i + 1);
                push_json_str(&mut b, &h.source_id);
                let _ = write!(
                    b,
                    ",\"envelopes_per_second\":{:.1},\"bytes_per_second\":{:.1},\
                     \"dropped_per_second\":{{\"fair_share\":{:.1},\"source_rate_limited\":{:.1}}}}}",
                    h.envelopes_per_second,
                    h.bytes_per_second,
                    h.fair_share_per_second,
                    h.rate_limited_per_second
                );
            }
            b.push(']');
        }
        b.push_str(",\"reasons\":[");
        for (i, r) in not_ready.iter().enumerate() {
            if i > 0 {
                b.push(',');
            }
            push_json_str(&mut b, r);
        }
        b.push_str("]}\n");
        Answer {
            ok: not_ready.is_empty(),
            body: b,
        }
    }

    /// `/livez`.
    pub async fn liveness(&self) -> Answer {
        let deadline = tokio::time::Instant::now() + LIVENESS_TIMEOUT;
        let probes: Vec<_> = self
            .arbiters
            .iter()
            .map(|(name, arbiter)| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let queued = arbiter.spawn(async move {
                    let _ = tx.send(());
                });
                (*name, queued, rx)
            })
            .collect();
        let mut stuck = Vec::new();
        for (name, queued, rx) in probes {
            let answered = queued
                && tokio::time::timeout_at(deadline, rx)
                    .await
                    .is_ok_and(|r| r.is_ok());
            if !answered {
                stuck.push(name);
            }
        }
        let uptime = self.started.elapsed().as_secs();
        let gone = self.gone_actors();
        let mut reasons = Vec::new();
        if !stuck.is_empty() {
            reasons.push(format!(
                "the {} arbiter did not run a task within {} ms",
                stuck.join(" and "),
                LIVENESS_TIMEOUT.as_millis()
            ));
        }
        if !gone.is_empty() {
            reasons.push(format!(
                "actor gone (a panic escaped its guard): {}",
                gone.join(", ")
            ));
        }
        let mut body = format!(
            "{{\"status\":\"{}\",\"uptime_s\":{uptime}",
            if reasons.is_empty() {
                "alive"
            } else {
                "not_alive"
            }
        );
        if !reasons.is_empty() {
            body.push_str(",\"reason\":");
            push_json_str(&mut body, &reasons.join("; "));
        }
        body.push_str("}\n");
        Answer {
            ok: reasons.is_empty(),
            body,
        }
    }
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    let _ = super::logging::write_json_string(out, format_args!("{s}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        push_json_str(&mut s, "z\"1\\\n\u{1}é");
        assert_eq!(s, r#""z\"1\\\n\u0001é""#);
    }
}
