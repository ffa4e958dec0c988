//! Builds the actor graph in one place and hands out the handles (no globals). Runs inside the
//! agent's actix `System`. What a SIGHUP changes in the running graph is in `wire/reload.rs`.

mod reload;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use parking_lot::RwLock;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Endpoint as GrpcEndpoint, Server};

use crate::actors::doppler_connection::DopplerConnection;
use crate::actors::drain_connection::{DrainConnection, DrainSetup, Held, Transport};
use crate::actors::forward_connection::{ForwardConnection, ForwardSetup};
use crate::actors::ingress::IngressActor;
use crate::actors::messages::{Drain, DumpState};
use crate::actors::otlp_connection::{OtlpConnection, OtlpSetup};
use crate::actors::sequencer::{AppHandle, AppSetup, Routing, SequencerActor};
use crate::actors::signer::SignerActor;
use crate::actors::supervisor::{DopplerSupervisor, SupervisorSetup};
use crate::config::{AggregateDrain, Config, ConfigError, DopplerSource, OtlpConfig, OtlpSecurity};
use crate::envelope::outbox::{Outbox, Outlet};
use crate::envelope::queue::{BatchLimits, EgressQueue};
use crate::envelope::sequence::Sequencer;
use crate::envelope::tagging::Tagger;
use crate::envelope::writer::Writer;
use crate::grpc::egress::{DialSettings, StreamSettings};
use crate::grpc::ingress::{Edge, EdgeTunables, IngressService};
use crate::proto::{envelope::Message, Counter, Envelope};
use crate::routing::balancer::Endpoint;
use crate::routing::discovery::{Discovery, Resolver};
use crate::routing::Dopplers;
use crate::syslog::apps::DrainSpec;
use crate::syslog::bindings::BlockedRanges;
use crate::syslog::drain::Scheme;
use crate::syslog::https::HttpsTarget;
use crate::syslog::poller::PollerSetup;
use crate::syslog::writer::WriterSettings;
use crate::telemetry::health::{ActorCheck, Health};
use crate::telemetry::server::Site;
use crate::telemetry::{Account, Destination, DrainScope, DropReason};
use crate::telemetry::{Ledger, Metrics};
use crate::tls::{DrainTls, ReloadableAcceptor, TlsMaterial, TlsSet};
use crate::udp::UdpIngress;
use crate::v1::V1Identity;

/// Everything resolved before the runtime starts: TLS material, keys, bound sockets.
pub struct Prepared {
    pub config: Config,
    pub tls: TlsSet,
    /// Each aggregate drain's TLS client configuration (`None`: plain TCP).
    pub drain_tls: Vec<Option<DrainTls>>,
    /// TLS for the development Doppler, when one runs.
    pub dev_doppler_tls: Option<TlsMaterial>,
    /// (key id, key) signing envelopes; `None` with `signing.enabled: false`.
    pub signing: Option<(String, Vec<u8>)>,
    pub ingress_listener: std::net::TcpListener,
    /// v1 datagrams (`ingress.udp`), when enabled.
    pub udp_socket: Option<std::net::UdpSocket>,
    pub metrics_listener: Option<std::net::TcpListener>,
    pub health_listener: Option<std::net::TcpListener>,
    pub dev_doppler_listener: Option<std::net::TcpListener>,
    pub ledger: Arc<Ledger>,
    /// Resolves the Doppler names when `dopplers.router_addr` is set.
    pub resolver: Arc<dyn Resolver>,
}

/// The running graph, as the agent thread needs it for shutdown.
pub struct Running {
    pub connections: Vec<Addr<DopplerConnection>>,
    /// The syslog drains, in `syslog.aggregate_drains` order.
    drains: Vec<RunningDrain>,
    /// Drains a reload removed that may still be delivering what they hold (within the grace
    /// period): the shutdown barrier counts them, and shutdown asks them to finish too.
    retiring: Vec<RunningDrain>,
    /// The drains the binding cache's answers started.
    cache_drains: CacheDrains,
    /// The OTLP collectors (`otlp:`, and those `ingress_port.yml` files announce).
    otlp: Vec<RunningOtlp>,
    /// The downstream v2 agents `ingress_port.yml` files announce.
    forwards: Vec<RunningForward>,
    /// Destinations whose file went away, delivering what they hold within the grace period:
    /// the shutdown barrier counts them, and shutdown asks them to finish too.
    retiring_outlets: Vec<(Outlet, Arc<Held>, Recipient<Drain>)>,
    /// What each `ingress_port.yml` file said when it last read well.
    readings: HashMap<std::path::PathBuf, crate::forwarding::Downstream>,
    /// The binding cache poller (`syslog.binding_cache`).
    poller: Option<JoinHandle<()>>,
    /// The edge, for the rate limits a reload changes.
    edge: Edge,
    queues: Vec<Arc<EgressQueue>>,
    closed: watch::Sender<bool>,
    server: JoinHandle<()>,
    udp: Option<UdpIngress>,
    background: Vec<JoinHandle<()>>,
    pipeline_arbiter: Arbiter,
    ledger: Arc<Ledger>,
    health: Arc<Health>,
    supervisor: Addr<DopplerSupervisor>,
    ingress: Addr<IngressActor>,
    sequencer: Addr<SequencerActor>,
    signer: Addr<SignerActor>,
    /// What a reload may change live, and the state it compares a new config against.
    live: LiveState,
}

/// The live-reloadable part of the running agent (see [`Running::reload`]).
struct LiveState {
    /// The config at start-up: keys that need a restart are compared against it.
    started: Config,
    /// The config last applied.
    current: Config,
    tls: TlsSet,
    /// The (key id, key) signing now (`eph` and a random key without `signing:`; `None` with
    /// `signing.enabled: false`): a new key must come with a new id, whatever the configs said.
    signing: Option<(String, Vec<u8>)>,
    ingress_acceptor: Arc<ReloadableAcceptor>,
    metrics_acceptor: Option<Arc<ReloadableAcceptor>>,
    tunables: Arc<EdgeTunables>,
    resolver: Arc<dyn Resolver>,
    /// The identity the v1 converter writes into dropsonde envelopes that lack one.
    v1_identity: Arc<RwLock<V1Identity>>,
}

/// What a SIGHUP reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Keys whose new values are in force (for new connections, where that applies).
    pub applied: Vec<&'static str>,
    /// Keys that changed but keep their running value until a restart.
    pub needs_restart: Vec<&'static str>,
}

/// The ALPN protocol of gRPC.
const H2: &[&[u8]] = &[b"h2"];

/// HTTP/2 flow-control window the ingress server grants each emitter stream and connection.
/// hyper's default is 1 MiB each: what an emitter has sent and the agent not yet read sits in
/// the agent's memory, outside the budget, so a smaller window bounds it. 256 KiB still holds
/// several of go-loggregator's 100-envelope batches; under a flood it took peak RSS from about
/// 55 MB to 49 MB, and an emitter that never waits could still offer over 1M envelopes/s
/// (docs/decisions.md 15).
const INGRESS_WINDOW_BYTES: u32 = 256 << 10;

/// How long an emitter (or a scraper) may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown lets emitter calls already in progress finish before closing their
/// connections (an admission waits at most `ingress.grpc.max_wait_ms`, capped at 10 s).
const SERVER_SETTLE: Duration = Duration::from_millis(200);

/// The part of every envelope's budget cost that does not depend on the envelope: an upper bound
/// on what the agent appends to it — its `metron` tag (for a key id of `key_id_len` bytes; none
/// when `tagged` is false) and every default tag, each with its map-entry framing — plus
/// [`crate::envelope::ITEM_OVERHEAD`].
fn fixed_envelope_cost(config: &Config, tagged: bool, key_id_len: usize) -> u32 {
    use crate::envelope::{tag, ENTRY_FRAMING, ITEM_OVERHEAD};
    let agent = if tagged {
        tag::wire_bytes(tag::max_value_len(key_id_len))
    } else {
        0
    };
    let defaults: usize = config
        .default_tags
        .iter()
        .map(|(k, v)| k.len() + v.len() + ENTRY_FRAMING)
        .sum();
    u32::try_from(agent + defaults + ITEM_OVERHEAD).unwrap_or(u32::MAX)
}

/// Whether envelopes leave with a `metron` tag: signing or sequencing is on (both need a restart
/// to change, so `config` is the one the agent started with).
fn tagged(config: &Config, signing: &Option<(String, Vec<u8>)>) -> bool {
    signing.is_some() || config.sequencing_enabled
}

fn key_id_len(signing: &Option<(String, Vec<u8>)>) -> usize {
    signing.as_ref().map_or(0, |(id, _)| id.len())
}

/// Starts every actor and server. Must run inside the agent's actix `System`.
///
/// # Errors
/// When a listener cannot be handed to tokio or TLS set-up fails.
pub fn start(p: Prepared) -> std::io::Result<Running> {
    // Everything that can fail comes first, before any actor or task exists.
    let listener = tokio::net::TcpListener::from_std(p.ingress_listener)?;
    let udp_socket = p
        .udp_socket
        .map(tokio::net::UdpSocket::from_std)
        .transpose()?;
    let metrics_listener = p
        .metrics_listener
        .map(tokio::net::TcpListener::from_std)
        .transpose()?;
    let dev_doppler_listener = p
        .dev_doppler_listener
        .map(tokio::net::TcpListener::from_std)
        .transpose()?;
    let health_listener = p
        .health_listener
        .map(tokio::net::TcpListener::from_std)
        .transpose()?;
    let ingress_acceptor = ReloadableAcceptor::new(
        p.tls
            .ingress
            .server_config("ingress.grpc.tls", H2)
            .map_err(std::io::Error::other)?,
    );
    let metrics_acceptor = match &p.tls.metrics {
        Some(m) => Some(ReloadableAcceptor::new(
            m.server_config("metrics.tls", &[b"http/1.1"])
                .map_err(std::io::Error::other)?,
        )),
        None => None,
    };
    let dev_doppler_tls = p
        .dev_doppler_tls
        .as_ref()
        .map(|t| t.server_config("development", H2))
        .transpose()
        .map_err(std::io::Error::other)?;
    let mut server_builder = Server::builder()
        .initial_stream_window_size(INGRESS_WINDOW_BYTES)
        .initial_connection_window_size(INGRESS_WINDOW_BYTES);

    let c = &p.config;
    let cap = c.pipeline.mailbox_capacity.get();
    let ledger = p.ledger.clone();
    // No Doppler pool, no slots: the supervisor idles and the sequencer offers nothing to it.
    let slots = match c.dopplers.source {
        DopplerSource::None => 0,
        _ => c.dopplers.connections.get(),
    };

    let dopplers = dopplers(c, &c.identity.az, &p.resolver).map_err(std::io::Error::other)?;
    let queues: Vec<Arc<EgressQueue>> = (0..slots).map(|_| Arc::default()).collect();
    for q in &queues {
        q.set_replay_rate(c.dopplers.replay_rate(slots));
    }
    let queue_handles = queues.clone();
    let (supervisor, connections) = DopplerSupervisor::launch(SupervisorSetup {
        local_az: c.identity.az.clone(),
        dopplers,
        backoff_initial: c.dopplers.backoff_initial,
        backoff_max: c.dopplers.backoff_max,
        recycle_interval: c.dopplers.recycle_interval,
        queues: queues.clone(),
        mailbox_capacity: cap,
        rebalance_interval: c.dopplers.rebalance_interval,
        dial: dial_settings(c, &p.tls.doppler),
        streams: StreamSettings {
            limits: BatchLimits {
                max_envelopes: c.dopplers.batch_max_envelopes.get(),
                max_bytes: c.dopplers.batch_max_bytes.get(),
            },
            ack_interval: c.dopplers.ack_interval,
            ack_bytes: c.dopplers.ack_bytes.get(),
        },
        progress_timeout: c.dopplers.progress_timeout,
        ledger: ledger.clone(),
    });

    let drains = start_aggregate_drains(c, &p.drain_tls, &ledger).map_err(std::io::Error::other)?;
    let mut readings = HashMap::new();
    let (otlp, forwards) =
        start_outlets(c, &p.tls.ingress, &ledger, &mut readings).map_err(std::io::Error::other)?;
    let outlets: Vec<Outlet> = drains
        .iter()
        .map(|d| d.outlet.clone())
        .chain(otlp.iter().map(|o| o.outlet.clone()))
        .chain(forwards.iter().map(|f| f.outlet.clone()))
        .collect();
    let cache_drains = CacheDrains::default();
    // Fair shedding's table: the edge keeps it, the sequencer reads who is light (decision 30).
    let fair = Arc::new(parking_lot::Mutex::new(crate::limits::fair::FairShed::new(
        crate::grpc::ingress::FAIR_SOURCES,
    )));
    let apps = c.syslog.binding_cache.as_ref().map(|_| AppSetup {
        starter: cache_drain_starter(c, &ledger, &cache_drains),
        idle: c.syslog.idle_drain_timeout,
        max: c.syslog.max_app_drains.get(),
        grace: c.shutdown_grace,
    });

    // The data path (ingress actor, sequencer, signer) shares one thread, so a batch crosses
    // threads only into it and out of it; supervision stays on the system arbiter, where signing
    // never delays a reconnect or a move (decision 5).
    let pipeline_arbiter = Arbiter::new();
    let signer = {
        let ledger = ledger.clone();
        let queues = queues.clone();
        let signer = match &p.signing {
            Some((id, key)) => Writer::new(id, key),
            None => Writer::unsigned(),
        }
        .with_sequencing(c.sequencing_enabled);
        SignerActor::start_in_arbiter(&pipeline_arbiter.handle(), move |ctx| {
            ctx.set_mailbox_capacity(cap);
            SignerActor::new(signer, queues, ledger)
        })
    };
    let sequencer = {
        let sequencer = Sequencer::new(c.pipeline.max_sources.get(), || {
            let mut id = [0; crate::envelope::tag::STREAM_BYTES];
            crate::entropy::fill(&mut id);
            id
        });
        if c.sequencing_enabled {
            tracing::info!(
                stream = %crate::envelope::signing::encode_hex(&sequencer.stream_id()),
                "sequence stream started"
            );
        }
        let ledger = ledger.clone();
        let signer = signer.clone();
        let budget = c.pipeline.max_buffered_bytes.get();
        let numbering = c.sequencing_enabled;
        let doppler_kinds = c.dopplers.kinds();
        let fair = Some(fair.clone());
        SequencerActor::start_in_arbiter(&pipeline_arbiter.handle(), move |ctx| {
            ctx.set_mailbox_capacity(cap);
            SequencerActor::new(
                sequencer,
                numbering,
                Routing {
                    queues,
                    doppler_kinds,
                    outlets,
                    budget,
                    apps,
                    fair,
                },
                signer.recipient(),
                ledger,
            )
        })
    };
    let ingress = {
        let tagger = Tagger::new(&c.default_tags, c.pipeline.max_counter_keys.get());
        let ledger = ledger.clone();
        let sequencer = sequencer.clone();
        IngressActor::start_in_arbiter(&pipeline_arbiter.handle(), move |ctx| {
            ctx.set_mailbox_capacity(cap);
            IngressActor::new(tagger, sequencer.recipient(), ledger)
        })
    };

    let (closed, closed_rx) = watch::channel(false);
    let tunables = Arc::new(EdgeTunables::new(
        c.ingress.max_wait,
        fixed_envelope_cost(c, tagged(c, &p.signing), key_id_len(&p.signing)),
    ));
    let edge = Edge::new(
        ingress.clone().recipient(),
        ledger.clone(),
        tunables.clone(),
        closed_rx.clone(),
        fair.clone(),
    );

    // The socket is bound exactly when `ingress.udp` is enabled.
    let v1_identity = Arc::new(RwLock::new(V1Identity::from(&c.identity)));
    let udp = udp_socket.zip(c.ingress.udp.as_ref()).map(|(socket, u)| {
        UdpIngress::start(
            socket,
            u.buffer_bytes.get(),
            v1_identity.clone(),
            edge.clone(),
            ledger.clone(),
            closed_rx.clone(),
        )
    });

    let mut stop = closed_rx;
    // Limits in force before the first emitter connects.
    edge.set_limits(c.limits.clone());
    let router = server_builder.add_service(IngressService::router(edge.clone()));
    let health = Health::new(
        ledger.clone(),
        vec![
            ("system", Arbiter::current()),
            ("pipeline", pipeline_arbiter.handle()),
        ],
        {
            let mut checks = actor_checks(
                &ingress,
                &sequencer,
                &signer,
                &supervisor,
                &connections,
                &drains,
            );
            for o in &otlp {
                checks.push((o.name.clone(), check(&o.actor)));
            }
            for f in &forwards {
                checks.push((f.name.clone(), check(&f.actor)));
            }
            checks
        },
    );
    let incoming =
        ingress_acceptor
            .clone()
            .incoming(listener, HANDSHAKE_TIMEOUT, "ingress.grpc.listen");
    let server = {
        let health = health.clone();
        health.set_ingress_open(true);
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|c| *c).await;
            };
            if let Err(e) = router
                .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
                .await
            {
                tracing::error!(error = %e, "ingress server failed");
            }
            health.set_ingress_open(false);
        })
    };

    let mut background = Vec::new();
    if let Some(l) = metrics_listener {
        background.push(tokio::spawn(crate::telemetry::server::serve(
            l,
            Site::Metrics(ledger.clone()),
            metrics_acceptor.clone(),
        )));
    }
    if let Some(l) = health_listener {
        background.push(tokio::spawn(crate::telemetry::server::serve(
            l,
            Site::Health(health.clone()),
            None,
        )));
    }
    if let (Some(l), Some(tls)) = (dev_doppler_listener, dev_doppler_tls) {
        background.push(tokio::spawn(crate::grpc::dev_doppler::serve(
            l,
            tls,
            Duration::from_secs(5),
        )));
    }
    if let Some(every) = c.metrics.envelope_interval {
        let edge = edge.clone();
        let metrics = ledger.clone();
        background.push(tokio::spawn(async move {
            // The first tick is immediate: a newcomer sees the agent's own envelopes at once.
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                edge.accept(self_envelopes(metrics.metrics())).await;
            }
        }));
    }

    let poller = start_poller(c, &ledger, &sequencer);
    if poller.is_some() {
        background.push(tokio::spawn(send_notices(
            cache_drains.clone(),
            edge.clone(),
            ledger.clone(),
        )));
    }

    background.push(tokio::spawn(send_rate_limit_notices(
        edge.clone(),
        ledger.clone(),
    )));
    {
        // The heaviest sources' report, for /metrics, /readyz and the state dump: on its own
        // tick, so notices waiting for room never delay it.
        let (edge, ledger) = (edge.clone(), ledger.clone());
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                ledger.metrics().set_heaviest(edge.heaviest());
            }
        }));
    }

    let live = LiveState {
        started: p.config.clone(),
        current: p.config.clone(),
        tls: p.tls,
        signing: p.signing,
        ingress_acceptor,
        metrics_acceptor,
        tunables,
        resolver: p.resolver.clone(),
        v1_identity,
    };
    Ok(Running {
        connections,
        drains,
        retiring: Vec::new(),
        cache_drains,
        otlp,
        forwards,
        retiring_outlets: Vec::new(),
        readings,
        poller,
        edge,
        queues: queue_handles,
        closed,
        server,
        udp,
        background,
        pipeline_arbiter,
        ledger,
        health,
        supervisor,
        ingress,
        sequencer,
        signer,
        live,
    })
}

/// Whether each actor is still there, by name, for `/livez`, `/readyz` and the agent's watch
/// for a gone actor.
fn actor_checks(
    ingress: &Addr<IngressActor>,
    sequencer: &Addr<SequencerActor>,
    signer: &Addr<SignerActor>,
    supervisor: &Addr<DopplerSupervisor>,
    connections: &[Addr<DopplerConnection>],
    drains: &[RunningDrain],
) -> Vec<(String, ActorCheck)> {
    fn check<A: Actor>(addr: &Addr<A>) -> ActorCheck {
        let addr = addr.clone();
        Box::new(move || addr.connected())
    }
    let mut checks = vec![
        ("ingress".to_owned(), check(ingress)),
        ("sequencer".to_owned(), check(sequencer)),
        ("signer".to_owned(), check(signer)),
        ("supervisor".to_owned(), check(supervisor)),
    ];
    for (slot, c) in connections.iter().enumerate() {
        checks.push((format!("doppler_connection[{slot}]"), check(c)));
    }
    for d in drains {
        checks.push((d.name(), d.check()));
    }
    checks
}

/// A running drain: its actor, what the shutdown barrier counts as queued, and what it was
/// started from (a reload keeps a drain whose entry and TLS files are unchanged).
struct RunningDrain {
    actor: Addr<DrainConnection>,
    outlet: Outlet,
    held: Arc<Held>,
    spec: AggregateDrain,
    tls: Option<DrainTls>,
}

impl RunningDrain {
    /// Its name in `/livez`, `/readyz` and the state dump.
    fn name(&self) -> String {
        format!("drain_connection[{}]", self.spec.url.anonymized)
    }

    fn check(&self) -> ActorCheck {
        let addr = self.actor.clone();
        Box::new(move || addr.connected())
    }
}

/// Starts one connection actor per `syslog.aggregate_drains` entry, each with its own outbox
/// and account.
fn start_aggregate_drains(
    c: &Config,
    tls: &[Option<DrainTls>],
    ledger: &Arc<Ledger>,
) -> Result<Vec<RunningDrain>, ConfigError> {
    c.syslog
        .aggregate_drains
        .iter()
        .zip(tls)
        .enumerate()
        .map(|(i, (d, tls))| start_drain(c, i, d, tls.clone(), ledger))
        .collect()
}

/// Starts the connection actor of aggregate drain `i`, `d`.
fn start_drain(
    c: &Config,
    i: usize,
    d: &AggregateDrain,
    tls: Option<DrainTls>,
    ledger: &Arc<Ledger>,
) -> Result<RunningDrain, ConfigError> {
    let (connection, outlet, _) = drain_connection(
        &c.syslog,
        NewDrain {
            url: &d.url,
            hostname: String::new(),
            tls: tls.as_ref().map(|t| t.config.clone()),
            scope: DrainScope::Aggregate,
            outbox: Outbox::default(),
            // As upstream: the blocked ranges apply to the binding cache's drains.
            blocked: Arc::default(),
        },
        ledger,
    )
    .map_err(|problem| ConfigError {
        key: format!("syslog.aggregate_drains[{i}].url"),
        problem,
    })?;
    let held = connection.held();
    tracing::info!(drain = %d.url.anonymized, scope = "aggregate", "syslog drain configured");
    Ok(RunningDrain {
        actor: connection.start(),
        outlet,
        held,
        spec: d.clone(),
        tls,
    })
}

/// A running OTLP collector or downstream agent: its actor and what the shutdown barrier
/// counts as queued.
pub(crate) struct RunningOutlet<A: Actor> {
    /// The file that announced it (`None`: the `otlp:` section's collector).
    announced: Option<crate::forwarding::Downstream>,
    name: String,
    actor: Addr<A>,
    outlet: Outlet,
    held: Arc<Held>,
}

type RunningOtlp = RunningOutlet<OtlpConnection>;
type RunningForward = RunningOutlet<ForwardConnection>;

/// Takes out of `running` those a file announced that `found` no longer lists: each is told to
/// retire (after the last batch routed to it: `retire`, for the sequencer) and kept in
/// `retiring` until it has.
fn take_gone<A>(
    running: &mut Vec<RunningOutlet<A>>,
    found: &[crate::forwarding::Downstream],
    grace: Duration,
    health: &Health,
    retire: &mut Vec<(Recipient<crate::actors::messages::Retire>, Duration)>,
    retiring: &mut Vec<(Outlet, Arc<Held>, Recipient<Drain>)>,
) where
    A: Actor<Context = Context<A>> + Handler<crate::actors::messages::Retire> + Handler<Drain>,
{
    let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(running)
        .into_iter()
        .partition(|o| o.announced.is_some_and(|d| !found.contains(&d)));
    *running = kept;
    for o in gone {
        health.remove_actor(&o.name);
        retire.push((o.actor.clone().recipient(), grace));
        retiring.push((o.outlet, o.held, o.actor.recipient()));
    }
}

fn check<A: Actor>(addr: &Addr<A>) -> ActorCheck {
    let addr = addr.clone();
    Box::new(move || addr.connected())
}

/// Starts an OTLP destination's connection actor for `o`: over mTLS with `otlp.tls` or the
/// agent's own ingress certificate (`ingress`), or plaintext on loopback.
fn start_otlp(
    c: &Config,
    o: &OtlpConfig,
    ingress: &TlsMaterial,
    ledger: &Arc<Ledger>,
) -> Result<RunningOtlp, ConfigError> {
    let bad = |problem: String| ConfigError {
        key: "otlp.endpoint".into(),
        problem,
    };
    let endpoint = match &o.security {
        OtlpSecurity::Tls { files, server_name } => {
            let material = match files {
                Some(f) => TlsMaterial::load(f, "otlp.tls")?,
                None => ingress.clone(),
            };
            GrpcEndpoint::from_shared(format!("https://{}", o.endpoint))
                .map_err(|e| bad(e.to_string()))?
                .tls_config(material.client_config(server_name))
                .map_err(|e| bad(e.to_string()))?
        }
        OtlpSecurity::Plaintext => {
            tracing::warn!(
                endpoint = %o.endpoint,
                "PLAINTEXT OTLP: envelopes go to the collector unencrypted and unauthenticated \
                 (otlp.plaintext, loopback only)"
            );
            GrpcEndpoint::from_shared(format!("http://{}", o.endpoint))
                .map_err(|e| bad(e.to_string()))?
        }
    };
    let channel = endpoint
        .connect_timeout(c.dopplers.connect_timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    let account = Arc::new(Account::new(Destination::Otlp {
        endpoint: o.endpoint.clone(),
    }));
    ledger.metrics().register(account.clone());
    let outlet = Outlet {
        kinds: crate::actors::otlp_connection::kinds(o.signals),
        outbox: Arc::new(Outbox::default()),
        account,
    };
    let connection = OtlpConnection::new(OtlpSetup {
        outlet: outlet.clone(),
        config: o.clone(),
        channel,
        ledger: ledger.clone(),
    });
    let held = connection.held();
    tracing::info!(endpoint = %o.endpoint, signals = ?o.signals, "OTLP collector configured");
    Ok(RunningOtlp {
        announced: None,
        name: format!("otlp_connection[{}]", o.endpoint),
        actor: connection.start(),
        outlet,
        held,
    })
}

/// The destinations beside the Doppler pool and the drains: `otlp:`, and what the
/// `ingress_port.yml` files announce (`forwarding.ingress_port_glob`) read now.
fn start_outlets(
    c: &Config,
    ingress: &TlsMaterial,
    ledger: &Arc<Ledger>,
    readings: &mut HashMap<std::path::PathBuf, crate::forwarding::Downstream>,
) -> Result<(Vec<RunningOtlp>, Vec<RunningForward>), ConfigError> {
    let mut otlp = Vec::new();
    if let Some(o) = &c.otlp {
        otlp.push(start_otlp(c, o, ingress, ledger)?);
    }
    let mut forwards = Vec::new();
    let Some(pattern) = &c.ingress_port_glob else {
        return Ok((otlp, forwards));
    };
    let (found, bad) = crate::forwarding::discover_paths(pattern, c.ingress.listen.port());
    for (path, problem) in bad {
        tracing::warn!(file = %path.display(), problem, "ignoring an ingress_port.yml file");
    }
    *readings = found.iter().cloned().collect();
    let found = crate::forwarding::downstreams(found.into_iter().map(|(_, d)| d));
    for d in wanted(found, c) {
        start_downstream(c, d, ingress, ledger, &mut otlp, &mut forwards)?;
    }
    tracing::info!(
        pattern,
        forwards = forwards.len(),
        collectors = otlp.len(),
        "downstream agents discovered"
    );
    Ok((otlp, forwards))
}

/// What the files announce that is not already configured: a collector the `otlp:` section
/// names is that one.
fn wanted(
    found: Vec<crate::forwarding::Downstream>,
    c: &Config,
) -> Vec<crate::forwarding::Downstream> {
    // `localhost:9100`, `127.0.0.1:9100` and `[::1]:9100` name the collector a file announcing
    // 9100 does.
    let section_port = c.otlp.as_ref().and_then(|o| {
        let (host, port) = o.endpoint.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let local = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        local.then(|| port.parse::<u16>().ok()).flatten()
    });
    found
        .into_iter()
        .filter(|d| {
            d.protocol != crate::forwarding::Protocol::Otelcol || Some(d.port) != section_port
        })
        .collect()
}

/// Starts what an `ingress_port.yml` file announces: a collector or a downstream v2 agent.
fn start_downstream(
    c: &Config,
    d: crate::forwarding::Downstream,
    ingress: &TlsMaterial,
    ledger: &Arc<Ledger>,
    otlp: &mut Vec<RunningOtlp>,
    forwards: &mut Vec<RunningForward>,
) -> Result<(), ConfigError> {
    match d.protocol {
        crate::forwarding::Protocol::Otelcol => {
            let o = OtlpConfig::announced(c.otlp.as_ref(), d.addr());
            let mut r = start_otlp(c, &o, ingress, ledger)?;
            r.announced = Some(d);
            otlp.push(r);
        }
        crate::forwarding::Protocol::V2 => forwards.push(start_forward(c, d, ingress, ledger)?),
    }
    Ok(())
}

/// Every destination beside the Doppler pool, as the sequencer routes to them.
fn outlets_of(
    drains: &[RunningDrain],
    otlp: &[RunningOtlp],
    forwards: &[RunningForward],
) -> Vec<Outlet> {
    drains
        .iter()
        .map(|d| d.outlet.clone())
        .chain(otlp.iter().map(|o| o.outlet.clone()))
        .chain(forwards.iter().map(|f| f.outlet.clone()))
        .collect()
}

impl Running {
    /// The downstreams started from `ingress_port.yml` files, sorted.
    fn announced(&self) -> Vec<crate::forwarding::Downstream> {
        let mut v: Vec<_> = self
            .otlp
            .iter()
            .filter_map(|o| o.announced)
            .chain(self.forwards.iter().filter_map(|f| f.announced))
            .collect();
        v.sort();
        v
    }

    /// Makes the running downstreams the `found` ones: starts the new, and returns the gone
    /// ones' retirements (to follow the last batch routed to them).
    fn set_downstreams(
        &mut self,
        found: &[crate::forwarding::Downstream],
        started: &Config,
        ingress: &TlsMaterial,
        grace: Duration,
    ) -> Vec<(Recipient<crate::actors::messages::Retire>, Duration)> {
        let mut retire = Vec::new();
        let (health, retiring) = (&self.health, &mut self.retiring_outlets);
        take_gone(&mut self.otlp, found, grace, health, &mut retire, retiring);
        take_gone(
            &mut self.forwards,
            found,
            grace,
            health,
            &mut retire,
            retiring,
        );
        let running = self.announced();
        for d in found.iter().filter(|d| !running.contains(d)) {
            let (mut otlp, mut forwards) = (Vec::new(), Vec::new());
            match start_downstream(started, *d, ingress, &self.ledger, &mut otlp, &mut forwards) {
                Ok(()) => {
                    for o in otlp {
                        self.health.add_actor(o.name.clone(), check(&o.actor));
                        self.otlp.push(o);
                    }
                    for f in forwards {
                        self.health.add_actor(f.name.clone(), check(&f.actor));
                        self.forwards.push(f);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a downstream agent's connection")
                }
            }
        }
        retire
    }
}

/// Starts the connection actor of a downstream v2 agent.
fn start_forward(
    c: &Config,
    d: crate::forwarding::Downstream,
    ingress: &TlsMaterial,
    ledger: &Arc<Ledger>,
) -> Result<RunningForward, ConfigError> {
    let addr = d.addr();
    let channel = GrpcEndpoint::from_shared(format!("https://{addr}"))
        .and_then(|e| e.tls_config(ingress.client_config("metron")))
        .map_err(|e| ConfigError {
            key: "forwarding.ingress_port_glob".into(),
            problem: format!("{addr}: {e}"),
        })?
        .connect_timeout(c.dopplers.connect_timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    let account = Arc::new(Account::new(Destination::Forward { addr: addr.clone() }));
    ledger.metrics().register(account.clone());
    let outlet = Outlet {
        kinds: crate::envelope::Kinds::ALL,
        outbox: Arc::new(Outbox::default()),
        account,
    };
    let connection = ForwardConnection::new(ForwardSetup {
        outlet: outlet.clone(),
        addr: addr.clone(),
        channel,
        backoff_initial: c.syslog.backoff_initial,
        backoff_max: c.syslog.backoff_max,
        ledger: ledger.clone(),
    });
    let held = connection.held();
    tracing::info!(destination = %addr, "forwarding to a downstream v2 agent");
    Ok(RunningForward {
        announced: Some(d),
        name: format!("forward_connection[{addr}]"),
        actor: connection.start(),
        outlet,
        held,
    })
}

/// What makes one drain, beside the `syslog:` settings.
struct NewDrain<'a> {
    url: &'a crate::syslog::drain::DrainUrl,
    /// The binding's (empty for an aggregate drain).
    hostname: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    scope: DrainScope,
    outbox: Outbox,
    /// Addresses never dialled.
    blocked: Arc<BlockedRanges>,
}

/// A drain's connection actor (not started), its outlet (with its outbox, and an account
/// registered under its scope), and its count of failed connects.
///
/// # Errors
/// The URL's host is not a name TLS can verify (a TLS drain).
fn drain_connection(
    s: &crate::config::SyslogConfig,
    d: NewDrain,
    ledger: &Arc<Ledger>,
) -> Result<(DrainConnection, Outlet, Arc<AtomicU64>), String> {
    let NewDrain {
        url,
        hostname,
        tls,
        scope,
        outbox,
        blocked,
    } = d;
    let writer_tls = match tls {
        None => None,
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| format!("{}: not a name TLS can verify: {e}", url.anonymized))?;
            Some((config, name))
        }
    };
    let settings = WriterSettings {
        tls: writer_tls.clone(),
        dial_timeout: s.dial_timeout,
        write_timeout: s.write_timeout,
        idle_reconnect: s.idle_reconnect,
        send_buffer: s.send_buffer_bytes.get(),
        blocked: blocked.clone(),
    };
    let transport = match (url.scheme, writer_tls) {
        (Scheme::Https | Scheme::HttpsBatch, Some((tls, server_name))) => Transport::Https {
            target: HttpsTarget {
                host: url.host.clone(),
                port: url.port,
                target: url.target.clone(),
                basic_auth: url.basic_auth.clone(),
                tls,
                server_name,
                blocked,
            },
            batch: url.scheme == Scheme::HttpsBatch,
            settings,
        },
        _ => Transport::Syslog {
            addr: if url.host.contains(':') {
                format!("[{}]:{}", url.host, url.port)
            } else {
                format!("{}:{}", url.host, url.port)
            },
            settings,
        },
    };
    let destination =
        ledger
            .metrics()
            .drain_destination(scope, &url.anonymized, s.max_drain_series.get());
    let account = Arc::new(Account::new(destination));
    ledger.metrics().register(account.clone());
    let outlet = Outlet {
        kinds: url.data.kinds(),
        outbox: Arc::new(outbox),
        account,
    };
    let connect_failures = Arc::new(AtomicU64::new(0));
    let connection = DrainConnection::new(DrainSetup {
        outlet: outlet.clone(),
        url: url.clone(),
        transport,
        metron_tag: s.include_metron_tags,
        backoff_initial: s.backoff_initial,
        backoff_max: s.backoff_max,
        ledger: ledger.clone(),
        hostname,
        connect_failures: connect_failures.clone(),
    });
    Ok((connection, outlet, connect_failures))
}

/// A drain from the binding cache, running: what shutdown waits for and notices are made from.
#[derive(Clone)]
struct CacheDrain {
    actor: Addr<DrainConnection>,
    outlet: Outlet,
    held: Arc<Held>,
    /// Empty for the cache's aggregate drains.
    app_id: String,
    url: String,
    connect_failures: Arc<AtomicU64>,
}

/// Every drain the binding cache's answers started (the sequencer starts them; entries go once
/// their actor stopped).
type CacheDrains = Arc<parking_lot::Mutex<Vec<CacheDrain>>>;

/// What the sequencer calls to start a drain from the binding cache: on the system arbiter, as
/// the other connections.
fn cache_drain_starter(
    c: &Config,
    ledger: &Arc<Ledger>,
    registry: &CacheDrains,
) -> crate::actors::sequencer::Starter {
    let (syslog, ledger, registry) = (c.syslog.clone(), ledger.clone(), registry.clone());
    let blocked = Arc::new(c.syslog.blocked_ranges.clone());
    let system = Arbiter::current();
    Arc::new(move |spec: &Arc<DrainSpec>, group| {
        let (scope, outbox) = match group {
            Some(g) => (DrainScope::App, Outbox::in_group(g)),
            None => (DrainScope::Aggregate, Outbox::default()),
        };
        let started = drain_connection(
            &syslog,
            NewDrain {
                url: &spec.url,
                hostname: spec.hostname.clone(),
                tls: spec.tls.clone(),
                scope,
                outbox,
                blocked: blocked.clone(),
            },
            &ledger,
        );
        let (connection, outlet, connect_failures) = match started {
            Ok(s) => s,
            Err(problem) => {
                tracing::warn!(app_id = %spec.app_id, problem, "cannot start a drain of the binding cache");
                return None;
            }
        };
        let held = connection.held();
        let actor = DrainConnection::start_in_arbiter(&system, move |_| connection);
        tracing::debug!(app_id = %spec.app_id, drain = %spec.url.anonymized, "drain opened");
        let mut r = registry.lock();
        r.retain(|d| d.actor.connected());
        r.push(CacheDrain {
            actor: actor.clone(),
            outlet: outlet.clone(),
            held,
            app_id: spec.app_id.clone(),
            url: spec.url.anonymized.clone(),
            connect_failures,
        });
        Some(AppHandle {
            outlet,
            retire: actor.recipient(),
        })
    })
}

/// Starts the binding cache poller, when `c` configures one.
fn start_poller(
    c: &Config,
    ledger: &Arc<Ledger>,
    sequencer: &Addr<SequencerActor>,
) -> Option<JoinHandle<()>> {
    let cache = c.syslog.binding_cache.clone()?;
    tracing::info!(
        url = %crate::syslog::drain::redact_unparsed(&cache.url),
        interval_ms = cache.polling_interval.as_millis() as u64,
        "polling the binding cache; app drains receive nothing until it first answers"
    );
    Some(tokio::spawn(crate::syslog::poller::run(PollerSetup {
        cache,
        default_metadata: c.syslog.default_drain_metadata,
        timeout: c.syslog.dial_timeout,
        ledger: ledger.clone(),
        target: sequencer.clone().recipient(),
    })))
}

/// How often each kind of notice may reach an app about one drain (upstream's limit).
const NOTICE_INTERVAL: Duration = Duration::from_secs(5);

/// What the app was last told about one drain.
#[derive(Default)]
struct Noticed {
    lost: u64,
    connect_failures: u64,
    lost_at: Option<tokio::time::Instant>,
    failed_at: Option<tokio::time::Instant>,
}

/// Every second: tells each app whose drain lost envelopes, or could not connect, in its own
/// stream, at most once per drain per [`NOTICE_INTERVAL`] each (decision 29).
async fn send_notices(registry: CacheDrains, edge: Edge, ledger: Arc<Ledger>) {
    let mut told: HashMap<u64, Noticed> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let drains: Vec<CacheDrain> = {
            let mut r = registry.lock();
            r.retain(|d| d.actor.connected());
            r.iter().filter(|d| !d.app_id.is_empty()).cloned().collect()
        };
        let live: std::collections::HashSet<u64> =
            drains.iter().map(|d| d.outlet.outbox.id()).collect();
        told.retain(|id, _| live.contains(id));
        for d in drains {
            let s = d.outlet.account.snapshot();
            // What the app lost at this drain (a removed drain's leftovers are not news to it).
            let lost = s.dropped_total()
                - s.dropped_by(DropReason::DrainRemoved)
                - s.dropped_by(DropReason::ShuttingDown);
            let failures = d.connect_failures.load(Ordering::Relaxed);
            let id = d.outlet.outbox.id();
            let t = told.entry(id).or_default();
            let due =
                |at: Option<tokio::time::Instant>| at.is_none_or(|at| now - at >= NOTICE_INTERVAL);
            let mut notices = Vec::new();
            if lost > t.lost && due(t.lost_at) {
                notices.push(format!(
                    "{} messages lost for application {} in user provided syslog drain with url {}",
                    lost - t.lost,
                    d.app_id,
                    d.url
                ));
                t.lost = lost;
                t.lost_at = Some(now);
            }
            if failures > t.connect_failures && due(t.failed_at) {
                notices.push(format!("Failed to connect to {}", d.url));
                t.connect_failures = failures;
                t.failed_at = Some(now);
            }
            for text in notices {
                ledger.metrics().app_notices.fetch_add(1, Ordering::Relaxed);
                edge.accept_notice(notice(&d.app_id, text), Some(id)).await;
            }
        }
    }
}

/// The most sources told of their rate limit per second (the rest are told later, their counts
/// kept): each notice may wait up to `ingress.grpc.max_wait_ms` for room.
const RATE_NOTICES_PER_TICK: usize = 100;

/// Every second: tells each source whose envelopes its rate limit refused since, in its own
/// stream (at most one notice per source per second).
async fn send_rate_limit_notices(edge: Edge, ledger: Arc<Ledger>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for (source, n, limit) in edge.rate_limited(RATE_NOTICES_PER_TICK) {
            let limit = limit.map_or_else(String::new, |l| {
                let mut parts = Vec::new();
                if let Some(e) = l.envelopes_per_second {
                    parts.push(format!("{e} envelopes/s"));
                }
                if let Some(b) = l.bytes_per_second {
                    parts.push(format!("{b} bytes/s"));
                }
                format!(" of {}", parts.join(" and "))
            });
            let text = format!(
                "{n} envelopes from source {source} dropped by the agent: over its rate limit{limit}"
            );
            ledger.metrics().app_notices.fetch_add(1, Ordering::Relaxed);
            edge.accept_notice(notice(&source, text), None).await;
        }
    }
}

/// An app notice as upstream's syslog-agent sends it: an ERR log in the app's stream,
/// `source_type` `LGR`, instance `0`.
fn notice(app_id: &str, text: String) -> Envelope {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let mut e = Envelope {
        timestamp: now,
        source_id: app_id.into(),
        instance_id: "0".into(),
        message: Some(Message::Log(crate::proto::Log {
            payload: text.into_bytes(),
            r#type: crate::proto::log::Type::Err as i32,
        })),
        ..Default::default()
    };
    e.tags.insert("source_type".into(), "LGR".into());
    e
}

/// Where the Dopplers are, as the supervisor takes it; `local_az` is the one the supervisor runs
/// with (`identity.az` needs a restart).
fn dopplers(
    c: &Config,
    local_az: &str,
    resolver: &Arc<dyn Resolver>,
) -> Result<Dopplers, ConfigError> {
    Ok(match &c.dopplers.source {
        DopplerSource::None => Dopplers::Static(Vec::new()),
        DopplerSource::Static(list) => Dopplers::Static(
            list.iter()
                .map(|e| Endpoint {
                    addr: e.addr.clone(),
                    az: e.az.clone(),
                })
                .collect(),
        ),
        DopplerSource::Dns {
            router_addr,
            router_addr_with_az,
            resolve_interval,
        } => Dopplers::Discovered {
            discovery: Arc::new(
                Discovery::new(
                    router_addr,
                    router_addr_with_az.as_deref(),
                    local_az,
                    resolver.clone(),
                )
                .map_err(|e| ConfigError {
                    key: "dopplers.router_addr".into(),
                    problem: e.to_string(),
                })?,
            ),
            interval: *resolve_interval,
        },
    })
}

fn dial_settings(c: &Config, tls: &TlsMaterial) -> DialSettings {
    DialSettings {
        tls: tls.client_config(&c.dopplers.server_name),
        connect_timeout: c.dopplers.connect_timeout,
        keepalive_interval: c.dopplers.keepalive_interval,
        keepalive_timeout: c.dopplers.keepalive_timeout,
    }
}

/// The agent's own counters as envelopes (source_id `metron`), sent through its own pipeline.
fn self_envelopes(m: &Metrics) -> Vec<Envelope> {
    let s = m.snapshot();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    [
        ("ingress", s.ingress_total()),
        ("egress", s.egress),
        ("dropped", s.dropped_total()),
        ("origin_mappings", s.origin_mappings),
    ]
    .into_iter()
    .map(|(name, total)| {
        let mut e = Envelope {
            timestamp: now,
            source_id: "metron".into(),
            message: Some(Message::Counter(Counter {
                name: name.into(),
                delta: 0,
                total,
            })),
            ..Default::default()
        };
        e.tags.insert("metric_version".into(), "2.0".into());
        e
    })
    .collect()
}

impl Running {
    /// The chaos hook behind [`crate::Agent::chaos_panic`].
    #[cfg(feature = "chaos-hooks")]
    pub fn chaos_panic(&self, actor: crate::telemetry::ActorName, slot: usize, escape: bool) {
        use crate::actors::messages::ChaosPanic;
        use crate::telemetry::ActorName;
        let msg = ChaosPanic { escape };
        match actor {
            ActorName::Ingress => self.ingress.do_send(msg),
            ActorName::Sequencer => self.sequencer.do_send(msg),
            ActorName::Signer => self.signer.do_send(msg),
            ActorName::Supervisor => self.supervisor.do_send(msg),
            ActorName::DopplerConnection => self.connections[slot].do_send(msg),
            ActorName::DrainConnection => self.drains[slot].actor.do_send(msg),
            ActorName::OtlpConnection => {
                if let Some(o) = self.otlp.get(slot) {
                    o.actor.do_send(msg);
                }
            }
            ActorName::ForwardConnection => {
                if let Some(f) = self.forwards.get(slot) {
                    f.actor.do_send(msg);
                }
            }
            // Not an actor: its reader's panics are caught per batch, with no mailbox to reach.
            ActorName::Edge => {}
        }
    }

    /// The actors a panic took down for good (it escaped their guard), by name.
    pub fn gone_actors(&self) -> Vec<String> {
        self.health.gone_actors()
    }

    /// SIGUSR1: one structured log record (target `metron::state`) per actor, then the edge and
    /// buffer levels. Each actor answers through its mailbox, behind the batches already there;
    /// one that does not answer within a second is named instead.
    pub async fn dump_state(&self) {
        // Every request is queued at once and shares one deadline: the dump takes at most a
        // second whatever the number of slots.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut asked: Vec<(String, RecipientRequest<DumpState>)> = Vec::new();
        let mut silent: Vec<String> = Vec::new();
        let ingress = self.ingress.send(DumpState);
        let sequencer = self.sequencer.send(DumpState);
        let signer = self.signer.send(DumpState);
        let supervisor = self.supervisor.send(DumpState);
        for (slot, c) in self.connections.iter().enumerate() {
            let c = c.clone().recipient::<DumpState>();
            asked.push((format!("doppler_connection[{slot}]"), c.send(DumpState)));
        }
        for d in &self.drains {
            let name = d.name();
            let d = d.actor.clone().recipient::<DumpState>();
            asked.push((name, d.send(DumpState)));
        }
        for o in &self.otlp {
            let a = o.actor.clone().recipient::<DumpState>();
            asked.push((o.name.clone(), a.send(DumpState)));
        }
        for f in &self.forwards {
            let a = f.actor.clone().recipient::<DumpState>();
            asked.push((f.name.clone(), a.send(DumpState)));
        }
        let answered = |r: Result<Result<(), MailboxError>, _>| matches!(r, Ok(Ok(())));
        if !answered(tokio::time::timeout_at(deadline, ingress).await) {
            silent.push("ingress".into());
        }
        if !answered(tokio::time::timeout_at(deadline, sequencer).await) {
            silent.push("sequencer".into());
        }
        if !answered(tokio::time::timeout_at(deadline, signer).await) {
            silent.push("signer".into());
        }
        if !answered(tokio::time::timeout_at(deadline, supervisor).await) {
            silent.push("supervisor".into());
        }
        for (name, request) in asked {
            if !answered(tokio::time::timeout_at(deadline, request).await) {
                silent.push(name);
            }
        }
        let (envelopes, bytes) = self.ledger.buffered();
        let (udp_datagrams, udp_bytes) = self.udp.as_ref().map_or((0, 0), |u| u.queued());
        let m = self.ledger.metrics().snapshot();
        tracing::info!(
            target: "metron::state",
            actor = "edge",
            ingress_open = !*self.closed.borrow(),
            max_wait_ms = self.live.tunables.max_wait().as_millis() as u64,
            buffered_envelopes = envelopes,
            buffered_bytes = bytes,
            budget_bytes = self.ledger.max_bytes(),
            peak_buffered_bytes = m.peak_buffered_bytes,
            udp_queued_datagrams = udp_datagrams,
            udp_queued_bytes = udp_bytes,
            ingress = m.ingress_total(),
            egress = m.egress,
            dropped = m.dropped_total(),
            "state"
        );
        for (i, h) in self.ledger.metrics().heaviest().iter().enumerate() {
            tracing::info!(
                target: "metron::state",
                actor = "edge",
                rank = i + 1,
                source_id = %h.source_id,
                envelopes_per_second = h.envelopes_per_second as u64,
                bytes_per_second = h.bytes_per_second as u64,
                fair_share_per_second = h.fair_share_per_second as u64,
                source_rate_limited_per_second = h.rate_limited_per_second as u64,
                "heaviest source"
            );
        }
        if !silent.is_empty() {
            tracing::warn!(
                target: "metron::state",
                actors = ?silent,
                "state dump: these actors did not answer within 1 s (busy or stuck)"
            );
        }
    }

    /// Graceful shutdown, phase one: stop accepting, let the actors hand everything to the slot
    /// queues, then have every connection flush its queue and end its stream, all before
    /// `deadline`. What is still buffered afterwards is counted by the caller once nothing can
    /// move any more. Returns whether every stream was flushed and acknowledged by a Doppler.
    pub async fn drain(self, deadline: tokio::time::Instant) -> (bool, Arbiter) {
        let _ = self.closed.send(true);
        // No new answer from now on: the drains stay as they are while they flush.
        if let Some(p) = &self.poller {
            p.abort();
        }
        self.health.set_ingress_open(false);
        // Emitter handlers see `closed` and return; give the ones mid-call a moment to finish,
        // then cut idle emitter connections (the edge is cancel-safe, so nothing is miscounted).
        let mut server = self.server;
        let settle = tokio::time::Instant::now() + SERVER_SETTLE;
        if tokio::time::timeout_at(settle.min(deadline), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        // Whatever the UDP edge read is admitted or counted before the barrier below.
        if let Some(udp) = self.udp {
            udp.finish(deadline).await;
        }
        // Barrier: once everything buffered sits in a slot queue (or in flight on a stream), no
        // batch is still on its way
        // through a mailbox, and closing the queues cannot strand one. The edge re-checks
        // `closed` after admitting, so nothing new arrives.
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while tokio::time::Instant::now() < deadline {
            // Ledger first: takes and pushes between the two reads can then only make the
            // comparison fail, never pass early.
            let buffered = self.ledger.buffered().0;
            let queued: usize = self
                .queues
                .iter()
                .map(|q| q.envelopes() + q.in_flight())
                .chain(
                    self.drains
                        .iter()
                        .chain(&self.retiring)
                        .map(|d| d.outlet.outbox.envelopes() + d.held.envelopes()),
                )
                .chain(
                    self.cache_drains
                        .lock()
                        .iter()
                        .map(|d| d.outlet.outbox.envelopes() + d.held.envelopes()),
                )
                .chain(
                    self.otlp
                        .iter()
                        .map(|o| o.outlet.outbox.envelopes() + o.held.envelopes()),
                )
                .chain(
                    self.forwards
                        .iter()
                        .map(|f| f.outlet.outbox.envelopes() + f.held.envelopes()),
                )
                .chain(
                    self.retiring_outlets
                        .iter()
                        .map(|(o, h, _)| o.outbox.envelopes() + h.envelopes()),
                )
                .sum();
            if buffered == queued as u64 {
                break;
            }
            tick.tick().await;
        }
        let requests: Vec<_> = self
            .connections
            .iter()
            .map(|c| c.clone().recipient::<Drain>())
            .chain(
                self.drains
                    .iter()
                    .chain(self.retiring.iter().filter(|d| d.actor.connected()))
                    .map(|d| d.actor.clone().recipient()),
            )
            .chain(
                self.cache_drains
                    .lock()
                    .iter()
                    .filter(|d| d.actor.connected())
                    .map(|d| d.actor.clone().recipient()),
            )
            .chain(self.otlp.iter().map(|o| o.actor.clone().recipient()))
            .chain(self.forwards.iter().map(|f| f.actor.clone().recipient()))
            .chain(
                self.retiring_outlets
                    .iter()
                    .filter(|(_, _, r)| r.connected())
                    .map(|(_, _, r)| r.clone()),
            )
            .map(|r| r.send(Drain))
            .collect();
        let mut acknowledged = true;
        for r in requests {
            let ok = matches!(tokio::time::timeout_at(deadline, r).await, Ok(Ok(true)));
            acknowledged &= ok;
        }
        for t in self.background.into_iter().chain(self.poller) {
            t.abort();
        }
        (acknowledged, self.pipeline_arbiter)
    }
}
