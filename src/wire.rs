//! Builds the actor graph in one place and hands out the handles (no globals). Runs inside the
//! agent's actix `System`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::actors::doppler_connection::DopplerConnection;
use crate::actors::ingress::IngressActor;
use crate::actors::messages::Drain;
use crate::actors::sequencer::SequencerActor;
use crate::actors::signer::SignerActor;
use crate::actors::supervisor::{DopplerSupervisor, Dopplers, SupervisorSetup};
use crate::config::{Config, DopplerSource};
use crate::envelope::sequence::Sequencer;
use crate::envelope::signing::Signer;
use crate::envelope::tagging::Tagger;
use crate::grpc::egress::{BatchLimits, DialSettings, EgressQueue, StreamSettings};
use crate::grpc::ingress::{Edge, IngressService};
use crate::proto::{envelope::Message, Counter, Envelope};
use crate::routing::balancer::Endpoint;
use crate::routing::discovery::{Discovery, Resolver};
use crate::telemetry::{Ledger, Metrics};
use crate::tls::TlsMaterial;
use crate::udp::UdpIngress;

/// Everything resolved before the runtime starts: TLS material, keys, bound sockets.
pub struct Prepared {
    pub config: Config,
    pub ingress_tls: TlsMaterial,
    pub doppler_tls: TlsMaterial,
    /// TLS for the development Doppler, when one runs.
    pub dev_doppler_tls: Option<TlsMaterial>,
    pub signing_key_id: String,
    pub signing_key: Vec<u8>,
    pub ingress_listener: std::net::TcpListener,
    /// v1 datagrams (`ingress.udp`), when enabled.
    pub udp_socket: Option<std::net::UdpSocket>,
    pub metrics_listener: Option<std::net::TcpListener>,
    pub dev_doppler_listener: Option<std::net::TcpListener>,
    pub ledger: Arc<Ledger>,
    /// Resolves the Doppler names when `dopplers.router_addr` is set.
    pub resolver: Arc<dyn Resolver>,
}

/// The running graph, as the agent thread needs it for shutdown.
pub struct Running {
    pub connections: Vec<Addr<DopplerConnection>>,
    queues: Vec<Arc<EgressQueue>>,
    closed: watch::Sender<bool>,
    server: JoinHandle<()>,
    udp: Option<UdpIngress>,
    background: Vec<JoinHandle<()>>,
    signer_arbiter: Arbiter,
    ledger: Arc<Ledger>,
    _supervisor: Addr<DopplerSupervisor>,
}

/// How long shutdown lets emitter calls already in progress finish before closing their
/// connections (an admission waits at most `ingress.grpc.max_wait_ms`, capped at 10 s).
const SERVER_SETTLE: Duration = Duration::from_millis(200);

/// What a decoded envelope costs in memory beyond its encoded bytes: the struct, two map headers
/// and tree nodes, allocation slack. Deliberately generous: it is what makes the byte budget
/// bound memory (and the envelope count) even for tiny envelopes.
const IN_MEMORY_OVERHEAD: usize = 256;

/// The part of every envelope's budget cost that does not depend on the envelope: an upper bound
/// on what the agent adds to it — `metron_stream` (32 hex), `metron_seq` (≤ 20 digits),
/// `metron_sig` (key id + 65), every default tag, map-entry framing — plus [`IN_MEMORY_OVERHEAD`].
fn fixed_envelope_cost(config: &Config, key_id: &str) -> u32 {
    let framing = 8;
    let agent = (13 + 32 + framing) + (10 + 20 + framing) + (10 + key_id.len() + 65 + framing);
    let defaults: usize = config
        .default_tags
        .iter()
        .map(|(k, v)| k.len() + v.len() + framing)
        .sum();
    let entries = (config.default_tags.len() + 3) * crate::envelope::MAP_ENTRY_OVERHEAD;
    u32::try_from(agent + defaults + entries + IN_MEMORY_OVERHEAD).unwrap_or(u32::MAX)
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
    let mut server_builder = Server::builder()
        .tls_config(p.ingress_tls.server_config())
        .map_err(std::io::Error::other)?;

    let c = &p.config;
    let cap = c.pipeline.mailbox_capacity.get();
    let ledger = p.ledger.clone();
    let slots = c.dopplers.connections.get();

    let dopplers = match &c.dopplers.source {
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
                    &c.identity.az,
                    p.resolver.clone(),
                )
                .map_err(std::io::Error::other)?,
            ),
            interval: *resolve_interval,
        },
    };
    let queues: Vec<Arc<EgressQueue>> = (0..slots).map(|_| Arc::default()).collect();
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
        dial: DialSettings {
            tls: p.doppler_tls.client_config(&c.dopplers.server_name),
            connect_timeout: c.dopplers.connect_timeout,
            keepalive_interval: c.dopplers.keepalive_interval,
            keepalive_timeout: c.dopplers.keepalive_timeout,
        },
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

    // Signing is the CPU-heavy stage: it gets its own thread so it never stalls routing.
    let signer_arbiter = Arbiter::new();
    let signer = {
        let ledger = ledger.clone();
        let queues = queues.clone();
        let signer = Signer::new(&p.signing_key_id, &p.signing_key);
        SignerActor::start_in_arbiter(&signer_arbiter.handle(), move |ctx| {
            ctx.set_mailbox_capacity(cap);
            SignerActor::new(signer, queues, ledger)
        })
    };
    let sequencer = {
        let sequencer = Sequencer::new(c.pipeline.max_sources.get(), || {
            crate::entropy::random_hex(16)
        });
        tracing::info!(
            metron_stream = sequencer.stream_id(),
            "sequence stream started"
        );
        let ledger = ledger.clone();
        SequencerActor::create(move |ctx| {
            ctx.set_mailbox_capacity(cap);
            SequencerActor::new(
                sequencer,
                queues,
                c.pipeline.max_buffered_bytes.get(),
                signer.recipient(),
                ledger,
            )
        })
    };
    let ingress = {
        let tagger = Tagger::new(&c.default_tags, c.pipeline.max_counter_keys.get());
        let ledger = ledger.clone();
        IngressActor::create(move |ctx| {
            ctx.set_mailbox_capacity(cap);
            IngressActor::new(tagger, sequencer.recipient(), ledger)
        })
    };

    let (closed, closed_rx) = watch::channel(false);
    let edge = Edge::new(
        ingress.recipient(),
        ledger.clone(),
        c.ingress.max_wait,
        fixed_envelope_cost(c, &p.signing_key_id),
        closed_rx.clone(),
    );

    // The socket is bound exactly when `ingress.udp` is enabled.
    let udp = udp_socket.zip(c.ingress.udp.as_ref()).map(|(socket, u)| {
        UdpIngress::start(
            socket,
            u.buffer_bytes.get(),
            edge.clone(),
            ledger.clone(),
            closed_rx.clone(),
        )
    });

    let mut stop = closed_rx;
    let router = server_builder.add_service(IngressService::router(edge.clone()));
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|c| *c).await;
        };
        if let Err(e) = router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await
        {
            tracing::error!(error = %e, "ingress server failed");
        }
    });

    let mut background = Vec::new();
    if let Some(l) = metrics_listener {
        background.push(tokio::spawn(crate::telemetry::server::serve(
            l,
            ledger.clone(),
        )));
    }
    if let (Some(l), Some(tls)) = (dev_doppler_listener, p.dev_doppler_tls) {
        background.push(tokio::spawn(crate::grpc::dev_doppler::serve(
            l,
            tls.server_config(),
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

    Ok(Running {
        connections,
        queues: queue_handles,
        closed,
        server,
        udp,
        background,
        signer_arbiter,
        ledger,
        _supervisor: supervisor,
    })
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
    /// Graceful shutdown, phase one: stop accepting, let the actors hand everything to the slot
    /// queues, then have every connection flush its queue and end its stream, all before
    /// `deadline`. What is still buffered afterwards is counted by the caller once nothing can
    /// move any more. Returns whether every stream was flushed and acknowledged by a Doppler.
    pub async fn drain(self, deadline: tokio::time::Instant) -> (bool, Arbiter) {
        let _ = self.closed.send(true);
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
                .sum();
            if buffered == queued as u64 {
                break;
            }
            tick.tick().await;
        }
        let requests: Vec<_> = self.connections.iter().map(|c| c.send(Drain)).collect();
        let mut acknowledged = true;
        for r in requests {
            let ok = matches!(tokio::time::timeout_at(deadline, r).await, Ok(Ok(true)));
            acknowledged &= ok;
        }
        for t in self.background {
            t.abort();
        }
        (acknowledged, self.signer_arbiter)
    }
}
