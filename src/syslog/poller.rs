//! The binding cache poller (`syslog.binding_cache`): a task that asks the cache for every
//! binding at a random offset within the first interval, then every interval, and hands each
//! good answer, resolved ([`DrainTable`]), to the sequencer. A failed poll keeps the last good
//! answer in force; until the first answer, app drains receive nothing (as upstream). The TLS
//! files are read at every poll, so rotated certificates are picked up without a reload.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::apps::DrainTable;
use super::cache::{Answer, CacheClient};
use super::drain::Scheme;
use crate::actors::messages::SetDrainTable;
use crate::config::syslog::MAX_AGGREGATE_DRAINS;
use crate::config::BindingCache;
use crate::telemetry::ratelimit::RateLimit;
use crate::telemetry::Ledger;

/// How the poller runs.
pub struct PollerSetup {
    pub cache: BindingCache,
    /// `syslog.default_drain_metadata`.
    pub default_metadata: bool,
    /// Each poll's bound (`syslog.dial_timeout_ms`).
    pub timeout: Duration,
    pub ledger: Arc<Ledger>,
    pub target: Recipient<SetDrainTable>,
}

/// Polls until aborted.
pub async fn run(setup: PollerSetup) {
    let interval = setup.cache.polling_interval;
    // Upstream's first tick: a random offset within the interval, so a fleet restarted at once
    // does not ask the cache all together.
    let offset = crate::entropy::random_u64() % (interval.as_millis().max(1) as u64);
    tokio::time::sleep(Duration::from_millis(offset)).await;
    let warnings = RateLimit::new(Duration::from_secs(60));
    let mut previous = Arc::new(DrainTable::default());
    let mut reported: HashSet<String> = HashSet::new();
    let mut failing = false;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match poll(&setup).await {
            Ok(answer) => {
                let metrics = setup.ledger.metrics();
                metrics.binding_polls.fetch_add(1, Ordering::Relaxed);
                if std::mem::replace(&mut failing, false) {
                    tracing::info!("the binding cache answers again");
                }
                let table = resolve(answer, &previous, &mut reported);
                metrics
                    .app_bindings
                    .store(table.apps.len() as u64, Ordering::Relaxed);
                let table = Arc::new(table);
                previous = table.clone();
                // Control message: must arrive whatever the sequencer's mailbox holds.
                setup.target.do_send(SetDrainTable(table));
            }
            Err(e) => {
                setup
                    .ledger
                    .metrics()
                    .binding_poll_failures
                    .fetch_add(1, Ordering::Relaxed);
                failing = true;
                warnings.warn_every(|times| {
                    tracing::warn!(
                        error = %e,
                        times,
                        "binding cache poll failed; the last good answer stays in force"
                    );
                });
            }
        }
    }
}

/// One poll, with a client made from the TLS files as they are now.
async fn poll(setup: &PollerSetup) -> Result<Answer, String> {
    let c = &setup.cache;
    let tls = cache_tls(c)?;
    let client =
        CacheClient::new(&c.url, tls, &c.server_name, setup.timeout).map_err(|e| e.to_string())?;
    client
        .poll(setup.default_metadata, c.per_app_limit.get())
        .await
        .map_err(|e| e.to_string())
}

/// The cache's TLS: its CA only (it is internal), the agent's certificate for mTLS.
fn cache_tls(c: &BindingCache) -> Result<Arc<rustls::ClientConfig>, String> {
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| {
            format!(
                "syslog.binding_cache.tls.{what}: cannot read {}: {e}",
                p.display()
            )
        })
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = read("ca", &c.ca)?;
    roots.add_parsable_certificates(CertificateDer::pem_slice_iter(&ca).filter_map(Result::ok));
    if roots.is_empty() {
        return Err("syslog.binding_cache.tls.ca holds no usable certificate".into());
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("cert", &c.cert)?)
            .filter_map(Result::ok)
            .collect();
    let key = PrivateKeyDer::from_pem_slice(&read("key", &c.key)?)
        .map_err(|e| format!("syslog.binding_cache.tls.key: no usable private key: {e}"))?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("syslog.binding_cache.tls: {e}"))?;
    Ok(Arc::new(config))
}

/// An answer resolved against the previous table; drains that cannot serve are logged once
/// each (anonymized).
fn resolve(answer: Answer, previous: &DrainTable, reported: &mut HashSet<String>) -> DrainTable {
    let mut report = |url: &str, problem: &str| {
        if reported.len() < 10_000 && reported.insert(format!("{url} {problem}")) {
            tracing::warn!(drain = %url, problem, "binding cache lists a drain that cannot serve");
        }
    };
    for r in &answer.refused {
        report(&r.url, &r.problem);
    }
    let mut aggregate = answer.aggregate;
    // Each is a destination with its own share, as the configured ones.
    for (url, _) in aggregate.iter().skip(MAX_AGGREGATE_DRAINS) {
        report(
            &url.anonymized,
            &format!("more than {MAX_AGGREGATE_DRAINS} aggregate drains; the first ones are kept"),
        );
    }
    aggregate.truncate(MAX_AGGREGATE_DRAINS);
    DrainTable::resolve(
        answer.apps,
        aggregate,
        previous,
        |url, credentials| {
            if url.scheme == Scheme::Syslog {
                return Ok(None);
            }
            let pem = |s: &str| (!s.is_empty()).then(|| s.as_bytes().to_vec());
            let ca = pem(&credentials.ca);
            let client = pem(&credentials.cert).zip(pem(&credentials.key));
            crate::tls::drain_client_config_pem(
                ca.as_deref(),
                client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
            )
            .map(Some)
            .map_err(|(part, problem)| format!("the binding's {part} {problem}"))
        },
        |url, problem| report(&url.anonymized, &problem),
    )
}
