//! SIGHUP: a new config applied to the running graph, all or nothing. Which keys apply live and
//! which wait for a restart is decided in one table, [`Config::changes`]; this file applies the
//! live ones, matching them exhaustively.

use super::{
    dial_settings, dopplers, fixed_envelope_cost, key_id_len, start_drain, start_poller, tagged,
    ReloadOutcome, Running, RunningDrain, H2,
};
use crate::actors::messages::{
    SetBudget, SetDefaultTags, SetDial, SetDopplers, SetOutlets, SetWriter,
};
use crate::config::{
    Config, ConfigError, Live, SigningConfig, RESTART_SIGNING, RESTART_SIGNING_ENABLED,
};
use crate::envelope::writer::Writer;
use crate::tls::{DrainTls, TlsSet};
use crate::v1::V1Identity;

impl Running {
    /// Applies `new` (already validated, its files read into `tls`) to the running agent, all or
    /// nothing: everything that can fail is checked before anything changes. Keys that only take
    /// effect at start-up keep their running values and are listed in the outcome.
    ///
    /// Open connections are kept: new certificates apply to connections made from now on
    /// (emitters' next connect, each Doppler slot's next dial). Buffered envelopes stay where they
    /// are; those already signed keep the old key's signature.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key when `new` cannot be applied; nothing changed then.
    pub fn reload(
        &mut self,
        new: Config,
        tls: TlsSet,
        drain_tls: Vec<Option<DrainTls>>,
    ) -> Result<ReloadOutcome, ConfigError> {
        // The ingress_port.yml files, read again (the glob itself needs a restart).
        let announced = self.live.started.ingress_port_glob.as_ref().map(|pattern| {
            let (mut found, bad) =
                crate::forwarding::discover_paths(pattern, self.live.started.ingress.listen.port());
            for (path, problem) in bad {
                // Half written, say: what it said last time stands until it reads again.
                let kept = self.readings.get(&path).copied();
                tracing::warn!(
                    file = %path.display(),
                    problem,
                    kept = kept.map(|d| d.addr()),
                    "cannot read an ingress_port.yml file; keeping what it said before"
                );
                if let Some(d) = kept {
                    found.push((path, d));
                }
            }
            self.readings = found.iter().cloned().collect();
            super::wanted(
                crate::forwarding::downstreams(found.into_iter().map(|(_, d)| d)),
                &self.live.started,
            )
        });
        let announced_changed = announced
            .as_ref()
            .is_some_and(|found| *found != self.announced());
        let grace = new.shutdown_grace;
        let live = &mut self.live;
        // Keys that need a restart are compared with the config the agent started with (changed
        // and changed back needs none); live keys with the one applied last.
        let needs_restart = live.started.changes(&new).restart;
        let mut changes = live.current.changes(&new);
        // Files that changed under the same paths: only reading them tells.
        if tls.ingress != live.tls.ingress {
            changes.add_live(Live::IngressTls);
        }
        if tls.doppler != live.tls.doppler {
            changes.add_live(Live::DopplersTls);
        }
        let running: Vec<_> = self.drains.iter().map(|d| (&d.spec, &d.tls)).collect();
        let wanted: Vec<_> = new.syslog.aggregate_drains.iter().zip(&drain_tls).collect();
        if running != wanted {
            changes.add_live(Live::AggregateDrains);
        }
        if announced_changed {
            changes.add_live(Live::Forwarding);
        }
        if live.metrics_acceptor.is_some()
            && tls.metrics.is_some()
            && tls.metrics != live.tls.metrics
        {
            changes.add_live(Live::MetricsTls);
        }

        // Checks first.
        let mut ingress_config = None;
        let mut metrics_config = None;
        let mut new_dopplers = None;
        let mut signer = None;
        for key in &changes.live {
            match key {
                Live::Forwarding => {}
                Live::IngressTls => {
                    ingress_config = Some(tls.ingress.server_config("ingress.grpc.tls", H2)?);
                }
                // Turning it on or off needs a restart (the table says so); only new files of a
                // running mTLS endpoint are applied.
                Live::MetricsTls => {
                    if let (Some(_), Some(m)) = (&live.metrics_acceptor, &tls.metrics) {
                        metrics_config = Some(m.server_config("metrics.tls", &[b"http/1.1"])?);
                    }
                }
                Live::Dopplers { .. } => {
                    new_dopplers = Some(dopplers(&new, &live.started.identity.az, &live.resolver)?);
                }
                Live::Signing => signer = new_key(&live.signing, &new)?,
                Live::Tags
                | Live::IngressMaxWait
                | Live::DopplersTls
                | Live::ConnectTimeout
                | Live::KeepaliveInterval
                | Live::KeepaliveTimeout
                | Live::SigningPreviousKeys
                | Live::Budget
                | Live::LogLevel
                | Live::ReplayExtra
                | Live::ReplayMinRate
                | Live::AggregateDrains
                | Live::BindingCache
                | Live::Limits => {}
            }
        }

        // Then apply.
        let mut applied = Vec::new();
        let mut redial = false;
        for key in changes.live {
            let in_force = match key {
                // Applied below, once the rest is.
                Live::Forwarding => true,
                Live::Tags => {
                    self.ingress
                        .do_send(SetDefaultTags(new.default_tags.clone()));
                    *live.v1_identity.write() = V1Identity::from(&new.identity);
                    true
                }
                Live::IngressTls => {
                    let config = ingress_config.take().expect("checked above");
                    live.ingress_acceptor.set(config);
                    true
                }
                Live::MetricsTls => match (metrics_config.take(), &live.metrics_acceptor) {
                    (Some(config), Some(acceptor)) => {
                        acceptor.set(config);
                        true
                    }
                    _ => false,
                },
                Live::Dopplers { .. } => {
                    let dopplers = new_dopplers.take().expect("checked above");
                    // Control message: must arrive whatever the supervisor's mailbox holds.
                    self.supervisor.do_send(SetDopplers(dopplers));
                    true
                }
                Live::DopplersTls
                | Live::ConnectTimeout
                | Live::KeepaliveInterval
                | Live::KeepaliveTimeout => {
                    redial = true;
                    true
                }
                Live::Signing => match signer.take() {
                    Some(SigningConfig { key_id, key, .. }) => {
                        if let Some((old_id, _)) = &live.signing {
                            warn_unless_kept(old_id, &key_id, &new);
                        }
                        self.signer.do_send(SetWriter(
                            Writer::new(&key_id, &key)
                                .with_sequencing(live.started.sequencing_enabled),
                        ));
                        live.signing = Some((key_id, key));
                        true
                    }
                    None => false,
                },
                // The agent does not sign with them; receivers derive their key ring from the
                // file. Not in force while the section or signing itself waits for a restart.
                Live::SigningPreviousKeys => {
                    !needs_restart.contains(&RESTART_SIGNING)
                        && !needs_restart.contains(&RESTART_SIGNING_ENABLED)
                }
                Live::Budget => {
                    let budget = new.pipeline.max_buffered_bytes.get();
                    self.ledger.set_max_bytes(budget);
                    self.sequencer.do_send(SetBudget(budget));
                    true
                }
                // Set with the rest of the edge's tunables below.
                Live::IngressMaxWait => true,
                // A replay under way goes on at the new pace.
                Live::ReplayExtra | Live::ReplayMinRate => {
                    let rate = new.dopplers.replay_rate(self.queues.len());
                    for q in &self.queues {
                        q.set_replay_rate(rate);
                    }
                    true
                }
                // Applied by the process, which owns logging (main.rs).
                Live::LogLevel => true,
                Live::Limits => {
                    self.edge.set_limits(new.limits.clone());
                    true
                }
                Live::BindingCache => {
                    if let Some(p) = self.poller.take() {
                        p.abort();
                    }
                    // Settings other than the cache's own are the ones the agent started with.
                    let mut c = live.started.clone();
                    c.syslog.binding_cache = new.syslog.binding_cache.clone();
                    c.syslog.default_drain_metadata = new.syslog.default_drain_metadata;
                    self.poller = start_poller(&c, &self.ledger, &self.sequencer);
                    true
                }
                Live::AggregateDrains => {
                    let mut old: Vec<Option<RunningDrain>> = std::mem::take(&mut self.drains)
                        .into_iter()
                        .map(Some)
                        .collect();
                    // Unwatched before anything starts: a drain restarted on new TLS files has
                    // the same name as the one it replaces.
                    for o in old.iter().flatten() {
                        self.health.remove_actor(&o.name());
                    }
                    let entries = new.syslog.aggregate_drains.iter().zip(&drain_tls);
                    for (i, (d, t)) in entries.enumerate() {
                        let same = |o: &Option<RunningDrain>| {
                            o.as_ref().is_some_and(|o| o.spec == *d && o.tls == *t)
                        };
                        if let Some(k) = old.iter().position(same) {
                            let kept = old[k].take().expect("found above");
                            self.health.add_actor(kept.name(), kept.check());
                            self.drains.push(kept);
                            continue;
                        }
                        // The connection settings (timeouts, buffers) are the ones the agent
                        // started with: they need a restart.
                        match start_drain(&live.started, i, d, t.clone(), &self.ledger) {
                            Ok(r) => {
                                self.health.add_actor(r.name(), r.check());
                                self.drains.push(r);
                            }
                            Err(e) => tracing::error!(error = %e, "cannot start a drain"),
                        }
                    }
                    // Gone for good: their actors stopped once they retired.
                    self.retiring.retain(|d| d.actor.connected());
                    self.retiring_outlets.retain(|(_, _, r)| r.connected());
                    let mut retire = Vec::new();
                    for o in old.into_iter().flatten() {
                        tracing::info!(drain = %o.spec.url.anonymized, "removing a syslog drain");
                        retire.push((o.actor.clone().recipient(), new.shutdown_grace));
                        self.retiring.push(o);
                    }
                    let outlets = super::outlets_of(&self.drains, &self.otlp, &self.forwards);
                    // Control message: must arrive whatever the sequencer's mailbox holds.
                    self.sequencer.do_send(SetOutlets { outlets, retire });
                    true
                }
            };
            if in_force {
                applied.push(key.key());
            }
        }
        if redial {
            // Control message: must arrive whatever the supervisor's mailbox holds.
            self.supervisor
                .do_send(SetDial(dial_settings(&new, &tls.doppler)));
        }
        live.tunables.set(
            new.ingress.max_wait,
            fixed_envelope_cost(
                &new,
                tagged(&live.started, &live.signing),
                key_id_len(&live.signing),
            ),
        );
        let ingress = tls.ingress.clone();
        live.tls = tls;
        live.current = new;
        if let Some(found) = announced.filter(|_| announced_changed) {
            let started = self.live.started.clone();
            let retire = self.set_downstreams(&found, &started, &ingress, grace);
            let outlets = super::outlets_of(&self.drains, &self.otlp, &self.forwards);
            // Control message: must arrive whatever the sequencer's mailbox holds.
            self.sequencer.do_send(SetOutlets { outlets, retire });
        }
        Ok(ReloadOutcome {
            applied,
            needs_restart,
        })
    }
}

/// The key to sign with from now on, if `new` brings one. Compared with the key signing now
/// (`running`), not with the last config: a section removed (which needs a restart) must not let
/// the same id come back with another key. While signing is off, or the new config turns it off
/// (which needs a restart), keys are not looked at.
///
/// # Errors
/// The new config changes the key but not its id.
fn new_key(
    running: &Option<(String, Vec<u8>)>,
    new: &Config,
) -> Result<Option<SigningConfig>, ConfigError> {
    match (running, &new.signing) {
        (None, _) | (_, None) => Ok(None),
        _ if !new.signing_enabled => Ok(None),
        (Some((id, key)), Some(n)) if n.key_id == *id && n.key != *key => Err(ConfigError {
            key: "signing.key_file".into(),
            problem: format!(
                "the key changed but signing.key_id ({:?}) did not: give the new key a new id, \
                 and list the old one in signing.previous_keys, so receivers can tell envelopes \
                 signed before and after apart",
                n.key_id
            ),
        }),
        (Some((id, _)), Some(n)) if n.key_id != *id => Ok(Some(n.clone())),
        (Some(_), Some(_)) => Ok(None),
    }
}

/// Warns when a rotation drops the old key from `signing.previous_keys`: envelopes signed with
/// it may still be buffered or in flight.
fn warn_unless_kept(old_id: &str, new_id: &str, new: &Config) {
    let kept = new
        .signing
        .as_ref()
        .is_some_and(|s| s.previous_keys.iter().any(|(id, _)| id == old_id));
    if !kept {
        tracing::warn!(
            old_key_id = %old_id,
            new_key_id = %new_id,
            "signing key rotated, but the old key id is not in signing.previous_keys: envelopes \
             signed with it may still be buffered or in flight, and receivers configured from this \
             file will not verify them"
        );
    }
}
