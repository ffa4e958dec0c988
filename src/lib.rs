//! # metron: a Loggregator v2 agent
//!
//! Emitters on a VM send envelopes over mTLS gRPC; metron tags, sequences, signs and batches them
//! once and hands them to every destination that takes them: a pool of Dopplers over mTLS
//! (preferring its own availability zone), syslog drains (Log Cache's aggregate drain and
//! others, and each application's drains from the binding cache), an OpenTelemetry collector,
//! and the local agents that announce themselves in `ingress_port.yml` files (the
//! forwarder-agent's fan-out), each with its own queue, share of the budget, connections and
//! counters.
//!
//! ## Message flow (data goes one way, left to right)
//!
//! ```text
//!  emitters ──gRPC/mTLS──▶ Edge ──IngressBatch──▶ IngressActor ──TaggedBatch──▶ SequencerActor
//!  (Sender, BatchSender,    │ admission:              tagging,           slot, stream and number;
//!   Send)                   │ budget + counts         counter totals     offers each part to every
//!                           ▼                                            destination whose filter
//!                        dropped{ingress}                                takes it, within its share
//!                                                                                    │
//!                                                                          SequencedBatch
//!                                                                        (parts + each destination's pick)
//!                                                                                    ▼
//!  Dopplers ◀──BatchSender/mTLS── DopplerConnection[slot] ◀─slot queue── SignerActor: writes a part
//!                 (one actor, one stream each; EgressQueue per slot)     once (the `metron` tag, the
//!                         ▲ Connect                │ ConnectionUp/Down   signature); every destination
//!                         └──── DopplerSupervisor ◀┘                     gets the same bytes, shared
//!                               (Balancer: local AZ first, backoff)            │
//!                                                                             ▼ outbox per drain
//!  syslog drains ◀──RFC 5424 over TCP/TLS, or HTTPS── DrainConnection[drain]
//!                 (one actor per drain: format, write, retry with backoff; its own account)
//!                        ▲ started by the sequencer on an app's first envelope
//!  binding cache ──poller──SetDrainTable──▶ SequencerActor (app drains: syslog::apps)
//!  notices (LGR: "N messages lost…") ──▶ Edge, like any envelope, not to the drain they are about
//!
//!  OTel collector ◀──OTLP/gRPC── OtlpConnection (otlp::encode, batch per signal, retry/pause)
//!  local v2 agents ◀──Ingress.Send── ForwardConnection[port] (one per ingress_port.yml file)
//!                 (each takes its own outbox, like a drain; files read at start and on SIGHUP)
//! ```
//!
//! * [`grpc::ingress`] — the edge. Takes `BatchSender`/`Send` messages undecoded, counts their
//!   envelopes from the framing and reserves budget ([`telemetry::Ledger`]); if the budget stays
//!   full for `ingress.grpc.max_wait_ms` (or at once while no Doppler stream is open) the batch is
//!   dropped there, *before* it is even read (reason `pipeline_full`, or `no_doppler`).
//!   Otherwise it reads each envelope in place ([`envelope::view`]; envelopes are never decoded),
//!   counts `ingress` and prices each envelope exactly. Emitters are never blocked longer than
//!   that bound.
//! * [`actors::ingress`] — origin → source_id, tags, counter totals ([`envelope::tagging`]).
//! * [`actors::sequencer`] — slot choice, the destinations' filters and shares of the budget
//!   (half the budget is guaranteed, split between the destinations, the Doppler pool's part
//!   between its slots; beyond its share a destination borrows only what no other is owed, so a
//!   stuck Doppler or a dead drain cannot starve the rest), per-source numbering
//!   ([`envelope::sequence`]). Each destination's [`telemetry::Account`] takes over the envelopes
//!   it is offered.
//! * [`actors::signer`] — writes each envelope out ([`envelope::writer`]) as it came with what
//!   the pipeline adds appended ([`envelope::encoded`]): the tags the ingress rules decided, and
//!   the number and the HMAC-SHA256 signature over the canonical form ([`envelope::signing`]) in
//!   one `metron` tag ([`envelope::tag`]). Queued envelopes are held encoded.
//! * [`actors::drain_connection`] — one actor per syslog drain: takes its
//!   [`envelope::outbox::Outbox`], formats ([`syslog::rfc5424`]), writes ([`syslog::writer`],
//!   [`syslog::https`]) and retries on a new connection after a backoff; a panic in its task
//!   restarts it from fresh state.
//! * [`actors::otlp_connection`] — the OpenTelemetry collector: writes OTLP from the envelope
//!   read in place ([`otlp::encode`], upstream's mapping, [`otlp::mapping`]), batches per signal, exports, retries or pauses a signal as [`otlp::export`] decides.
//! * [`actors::forward_connection`] — one actor per downstream v2 agent announced by an
//!   `ingress_port.yml` file ([`forwarding`]).
//! * [`actors::doppler_connection`] — one supervised actor per slot; its queue
//!   ([`envelope::queue::EgressQueue`]) outlives connections, so a restart loses nothing queued. Its
//!   streams are ended and acknowledged every `ack_interval_ms`; only then do envelopes count as
//!   `egress`, and a dying connection's unacknowledged ones as `connection_lost`. A progress
//!   watchdog reports a slot whose queue or acknowledgement makes no progress.
//! * [`actors::supervisor`] — resolves the Dopplers ([`routing::discovery`]) or takes the fixed
//!   list, assigns endpoints with [`routing::balancer`], restarts with capped jittered backoff
//!   ([`routing::backoff`]), moves stalled slots when another endpoint is usable, and makes at most
//!   one graceful move per interval (off a retired Doppler, home to the local AZ, onto an unused
//!   Doppler, periodic recycle); rate-limits its warnings.
//!
//! Every data mailbox is bounded (`pipeline.mailbox_capacity` batches) and entered with
//! `try_send`; a full one drops the batch with its own reason. (Control messages, one per
//! connection event or reload, use `do_send`: they must arrive whatever the mailbox holds, and
//! there are too few of them to grow memory; decision 6.) All queues together are bounded by
//! `pipeline.max_buffered_bytes`. The ledger makes `ingress + destination_copies == Σ egress +
//! Σ dropped + filtered + buffered` exact whenever the pipeline is idle, and per destination
//! `offered == egress + dropped + buffered`; `buffered` is zero after shutdown (decision 27).
//!
//! ## Control (day-2 operations)
//!
//! Control travels apart from the data: [`Agent::reload`] (SIGHUP) reads the new config's files
//! on the caller's thread, then the agent thread checks everything and sends each actor what
//! changed (`SetDefaultTags`, `SetBudget`, `SetWriter`, `SetDopplers`, `SetDial`) and swaps the
//! certificates of the [`tls::ReloadableAcceptor`]s, so new connections get them and open ones
//! keep theirs. [`Agent::dump_state`] (SIGUSR1) asks every actor for a `DumpState` record.
//! [`telemetry::health`] answers `/livez` and `/readyz` from the same counters as `/metrics`.
//!
//! ## Threads
//!
//! The agent runs on one dedicated thread hosting the actix `System` on a 1-worker tokio runtime:
//! the supervisor and connection actors live on the system arbiter; tonic's connections, TLS, the
//! edge and the BatchSender streams run on the tokio worker (`metron-io`); the ingress actor,
//! sequencer and signer share one pipeline arbiter (thread), so a batch crosses threads only into
//! the pipeline and out of it (decision 5).

pub mod actors;
pub mod bench;
pub mod config;
pub mod dev;
pub mod entropy;
pub mod envelope;
pub mod forwarding;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod grpc;
pub mod limits;
pub mod otlp;
pub mod routing;
pub mod syslog;
pub mod telemetry;
pub mod tls;
pub mod udp;
pub mod v1;
pub mod wire;

pub mod proto {
    //! Generated Loggregator v2 types (`proto/`), with `BTreeMap` for every map field.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("loggregator.v2");
}

pub mod proto_v1 {
    //! Generated Loggregator v1 ("dropsonde") types (`proto/dropsonde/`), messages only. Fields
    //! upstream declares `required` are `Option`s here; [`crate::v1::decode`] enforces them.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("events");
}

pub mod otlp_proto {
    //! Generated OTLP types and export services (`proto/opentelemetry/`), in the packages'
    //! module tree (the generated code refers to its siblings through `super`).
    #![allow(clippy::all, missing_docs)]
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.common.v1");
        }
    }
    pub mod resource {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.resource.v1");
        }
    }
    pub mod logs {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.logs.v1");
        }
    }
    pub mod metrics {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.metrics.v1");
        }
    }
    pub mod trace {
        pub mod v1 {
            tonic::include_proto!("opentelemetry.proto.trace.v1");
        }
    }
    pub mod collector {
        pub mod logs {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.collector.logs.v1");
            }
        }
        pub mod metrics {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.collector.metrics.v1");
            }
        }
        pub mod trace {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
            }
        }
    }
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use actix::Addr;

use crate::actors::doppler_connection::DopplerConnection;
use crate::config::{Config, ConfigError};
use crate::dev::DevCredentials;
use crate::telemetry::{Ledger, Metrics, MetricsSnapshot};
use crate::tls::{TlsMaterial, TlsSet};

pub use envelope::signing::{verify, KeyRing, VerifyError};
pub use wire::ReloadOutcome;

/// The key id of the random per-process key an agent without a `signing:` section signs with.
pub const EPHEMERAL_KEY_ID: &str = "eph";

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration found while preparing (e.g. a certificate file that does not parse).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dev(#[from] dev::DevError),
    #[error("cannot start the agent runtime: {0}")]
    Runtime(std::io::Error),
}

impl StartError {
    /// The process exit code `main` uses: 64 for configuration problems, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) => 64,
            _ => 1,
        }
    }
}

/// What a finished agent reports.
#[derive(Debug, Clone)]
pub struct ShutdownReport {
    /// Everything buffered reached a Doppler stream before the grace period ran out.
    pub flushed: bool,
    pub metrics: MetricsSnapshot,
    /// The agent stopped itself because these actors were gone (a panic escaped their guard);
    /// `None` when it was asked to stop. The daemon then exits with [`EXIT_ACTOR_GONE`].
    pub actors_gone: Option<String>,
}

/// The daemon's exit status when it stopped itself because an actor was gone (EX_SOFTWARE):
/// the service manager's cue to start it again.
pub const EXIT_ACTOR_GONE: u8 = 70;

/// How often the agent looks for an actor a panic took down.
const GONE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

enum Control {
    Shutdown,
    Reload(
        Box<(Config, TlsSet, Vec<Option<tls::DrainTls>>)>,
        ReloadReply,
    ),
    DumpState(tokio::sync::oneshot::Sender<()>),
    #[cfg(feature = "chaos-hooks")]
    ChaosPanic(telemetry::ActorName, usize, bool),
}

/// How the agent thread talks to [`Agent`].
struct Channels {
    ready: std::sync::mpsc::Sender<std::io::Result<Vec<Addr<DopplerConnection>>>>,
    control: tokio::sync::mpsc::UnboundedReceiver<Control>,
    gone: tokio::sync::watch::Sender<Option<String>>,
}

type ReloadReply = tokio::sync::oneshot::Sender<Result<ReloadOutcome, ConfigError>>;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config (or a file it names) is not usable; the agent runs on as before.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the agent is shutting down")]
    ShuttingDown,
}

/// What an embedder (or a test) may swap in when starting an agent.
#[derive(Default)]
pub struct StartOptions {
    /// Resolves `dopplers.router_addr` / `router_addr_with_az`; the system resolver (A and AAAA)
    /// when `None`. Tests pass a [`routing::discovery::StaticResolver`] they change at run time.
    pub resolver: Option<Arc<dyn routing::discovery::Resolver>>,
}

/// A running agent. Dropping it shuts it down gracefully (bounded by the grace period).
pub struct Agent {
    ingress_addr: SocketAddr,
    udp_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    health_addr: Option<SocketAddr>,
    /// `/metrics` is served over mTLS (fixed at start-up).
    metrics_tls: bool,
    dev_doppler_addr: Option<SocketAddr>,
    dev_credentials: Option<DevCredentials>,
    ledger: Arc<Ledger>,
    connections: Vec<Addr<DopplerConnection>>,
    /// Set (to the gone actors' names) when the agent stops itself.
    gone: tokio::sync::watch::Receiver<Option<String>>,
    control: Option<tokio::sync::mpsc::UnboundedSender<Control>>,
    thread: Option<JoinHandle<ShutdownReport>>,
}

fn bind(key: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| StartError::Bind {
        key,
        addr,
        source,
    })?;
    l.set_nonblocking(true).map_err(StartError::Runtime)?;
    Ok(l)
}

fn bind_udp(key: &'static str, addr: SocketAddr) -> Result<std::net::UdpSocket, StartError> {
    let s =
        std::net::UdpSocket::bind(addr).map_err(|source| StartError::Bind { key, addr, source })?;
    s.set_nonblocking(true).map_err(StartError::Runtime)?;
    Ok(s)
}

impl Agent {
    /// Resolves credentials, binds every socket, then starts the actor system on its own thread.
    /// Returns once the agent accepts emitters.
    ///
    /// # Errors
    /// A [`StartError`]; nothing is left running when it fails.
    pub fn start(config: Config) -> Result<Agent, StartError> {
        Self::start_with(config, StartOptions::default())
    }

    /// [`Agent::start`] with parts swapped in (see [`StartOptions`]).
    ///
    /// # Errors
    /// A [`StartError`]; nothing is left running when it fails.
    pub fn start_with(config: Config, options: StartOptions) -> Result<Agent, StartError> {
        tls::install_crypto_provider();
        let dev_credentials = if config.development.enabled
            && (config.ingress.tls.is_none() || config.dopplers.tls.is_none())
        {
            let creds = dev::generate(&config.development.credentials_dir)?;
            tracing::warn!(
                dir = %config.development.credentials_dir.display(),
                "!!! RUNNING WITH DEVELOPMENT CREDENTIALS: a throwaway CA and certificates were \
                 generated at start-up. NEVER use this in production: configure ingress.grpc.tls \
                 and dopplers.tls and set development.enabled: false !!!"
            );
            Some(creds)
        } else {
            None
        };
        let tls = TlsSet::load(&config, dev_credentials.as_ref(), true)?;
        let drain_tls = tls::aggregate_drain_tls(&config)?;
        let metrics_tls = tls.metrics.is_some();
        let dev_doppler_tls = match (&config.development.doppler_listen, &dev_credentials) {
            (Some(_), Some(d)) => Some(TlsMaterial::load(&d.doppler, "development")?),
            _ => None,
        };

        let signing = match (&config.signing, config.signing_enabled) {
            (_, false) => None,
            (Some(s), true) => Some((s.key_id.clone(), s.key.clone())),
            (None, true) => {
                let mut key = vec![0u8; 32];
                entropy::fill(&mut key);
                tracing::warn!(
                    "!!! NO signing KEY CONFIGURED: envelopes are signed with a random key made for \
                     this process only (key id \"{EPHEMERAL_KEY_ID}\"); nobody can verify them. Set \
                     signing.key_id and signing.key_file, or signing.enabled: false !!!"
                );
                Some((EPHEMERAL_KEY_ID.to_string(), key))
            }
        };

        let ingress_listener = bind("ingress.grpc.listen", config.ingress.listen)?;
        let ingress_addr = ingress_listener.local_addr().map_err(StartError::Runtime)?;
        let udp_socket = config
            .ingress
            .udp
            .as_ref()
            .map(|u| bind_udp("ingress.udp.listen", u.listen))
            .transpose()?;
        let udp_addr = udp_socket.as_ref().and_then(|s| s.local_addr().ok());
        let metrics_listener = config
            .metrics
            .listen
            .map(|a| bind("metrics.listen", a))
            .transpose()?;
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let health_listener = config
            .health
            .listen
            .map(|a| bind("health.listen", a))
            .transpose()?;
        let health_addr = health_listener.as_ref().and_then(|l| l.local_addr().ok());
        let dev_doppler_listener = match (&config.development.doppler_listen, &dev_doppler_tls) {
            (Some(a), Some(_)) => Some(bind("development.doppler_listen", *a)?),
            _ => None,
        };
        let dev_doppler_addr = dev_doppler_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok());

        let metrics = Arc::new(Metrics::new());
        let ledger = Arc::new(Ledger::new(
            metrics,
            config.pipeline.max_buffered_bytes.get(),
        ));
        let grace = config.shutdown_grace;
        let prepared = wire::Prepared {
            config,
            tls,
            drain_tls,
            dev_doppler_tls,
            signing,
            ingress_listener,
            udp_socket,
            metrics_listener,
            health_listener,
            dev_doppler_listener,
            ledger: ledger.clone(),
            resolver: options
                .resolver
                .unwrap_or_else(|| Arc::new(routing::discovery::SystemResolver)),
        };

        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
        let (gone_tx, gone) = tokio::sync::watch::channel(None);
        let thread_ledger = ledger.clone();
        let thread = std::thread::Builder::new()
            .name("metron-system".into())
            .spawn(move || {
                let channels = Channels {
                    ready: ready_tx,
                    control: control_rx,
                    gone: gone_tx,
                };
                run_system(prepared, grace, thread_ledger, channels)
            })
            .map_err(StartError::Runtime)?;
        let connections = match ready_rx.recv() {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(StartError::Runtime(e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(StartError::Runtime(std::io::Error::other(
                    "agent thread exited during start-up",
                )));
            }
        };
        tracing::info!(
            ingress = %ingress_addr,
            udp = ?udp_addr,
            metrics = ?metrics_addr,
            health = ?health_addr,
            dev_doppler = ?dev_doppler_addr,
            "metron is running"
        );
        Ok(Agent {
            ingress_addr,
            udp_addr,
            metrics_addr,
            health_addr,
            metrics_tls,
            dev_doppler_addr,
            dev_credentials,
            ledger,
            connections,
            gone,
            control: Some(control_tx),
            thread: Some(thread),
        })
    }

    pub fn ingress_addr(&self) -> SocketAddr {
        self.ingress_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where `/livez` and `/readyz` are served (`None` when `health.listen` is null).
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Applies a new config to the running agent (what SIGHUP does): reads the certificate files
    /// it names (falling back to the development credentials where a `tls:` block is left out,
    /// as at start-up) and applies what can change live. Keys that need a restart keep their
    /// running values and are listed in the outcome. The process's log level is the caller's to
    /// apply (logging belongs to the process, not the agent).
    ///
    /// # Errors
    /// [`ReloadError::Config`] naming the key when the new config cannot be applied; the agent
    /// then runs on exactly as before.
    pub async fn reload(&self, config: Config) -> Result<ReloadOutcome, ReloadError> {
        let tls = TlsSet::load(&config, self.dev_credentials.as_ref(), self.metrics_tls)?;
        let drain_tls = tls::aggregate_drain_tls(&config)?;
        let control = self.control.as_ref().ok_or(ReloadError::ShuttingDown)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        control
            .send(Control::Reload(Box::new((config, tls, drain_tls)), tx))
            .map_err(|_| ReloadError::ShuttingDown)?;
        match rx.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ReloadError::ShuttingDown),
        }
    }

    /// Writes the state dump (what SIGUSR1 does): one structured log record per actor, target
    /// `metron::state`. Returns once every record is written.
    pub async fn dump_state(&self) {
        let Some(control) = &self.control else {
            return;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if control.send(Control::DumpState(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Where v1 datagrams are read (`None` when `ingress.udp.enabled` is false).
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp_addr
    }

    pub fn dev_doppler_addr(&self) -> Option<SocketAddr> {
        self.dev_doppler_addr
    }

    /// The development credentials in use, if any (the emitter certificate is for clients).
    pub fn dev_credentials(&self) -> Option<&DevCredentials> {
        self.dev_credentials.as_ref()
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.ledger.metrics().snapshot()
    }

    /// (envelopes, budget bytes) admitted and not yet delivered or dropped.
    pub fn buffered(&self) -> (u64, u64) {
        self.ledger.buffered()
    }

    /// Number of Doppler connection slots.
    pub fn connection_slots(&self) -> usize {
        self.connections.len()
    }

    /// Test-only chaos hook: makes slot `slot`'s connection actor panic (inside its guard); it
    /// restarts like after any failure (cause `panic`).
    #[cfg(feature = "chaos-hooks")]
    pub fn chaos_panic_connection(&self, slot: usize) {
        self.chaos_panic(telemetry::ActorName::DopplerConnection, slot, false);
    }

    /// Resolves when the agent stops itself because an actor is gone (a panic escaped its
    /// guard), with the actors' names; never while every actor is there. The agent is shutting
    /// down gracefully by then: [`Agent::shutdown`] waits for it to finish.
    pub async fn actor_gone(&self) -> String {
        let mut gone = self.gone.clone();
        // An error: the agent thread ended without a gone actor, so none will ever be reported.
        let names = gone
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|names| names.clone());
        match names {
            Some(names) => names,
            None => std::future::pending().await,
        }
    }

    /// Test-only chaos hook: makes an actor panic, inside its guard (`escape: false`; the
    /// pipeline actors on their next batch) or outside it, taking it down (`escape: true`).
    /// `actor` is `ingress`, `sequencer`, `signer`, `supervisor` or `doppler_connection[slot]`.
    #[cfg(feature = "chaos-hooks")]
    pub fn chaos_panic(&self, actor: telemetry::ActorName, slot: usize, escape: bool) {
        if let Some(c) = &self.control {
            let _ = c.send(Control::ChaosPanic(actor, slot, escape));
        }
    }

    /// Graceful shutdown: stop accepting, flush to Dopplers within the grace period, stop.
    pub fn shutdown(mut self) -> ShutdownReport {
        self.stop()
    }

    /// Starts the graceful shutdown without waiting for it; [`Agent::shutdown`] then waits.
    pub fn begin_shutdown(&mut self) {
        if let Some(c) = self.control.take() {
            let _ = c.send(Control::Shutdown);
        }
    }

    fn stop(&mut self) -> ShutdownReport {
        self.begin_shutdown();
        let report = self.thread.take().and_then(|t| t.join().ok());
        report.unwrap_or_else(|| ShutdownReport {
            flushed: false,
            metrics: self.metrics(),
            actors_gone: None,
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// The agent thread: builds the graph inside an actix `System` on a 1-worker tokio runtime
/// (decision 5), runs until told to stop, drains, then counts whatever could not be flushed.
fn run_system(
    prepared: wire::Prepared,
    grace: std::time::Duration,
    ledger: Arc<Ledger>,
    channels: Channels,
) -> ShutdownReport {
    let Channels {
        ready,
        mut control,
        gone,
    } = channels;
    let runner = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            // One I/O thread: measured cheaper per envelope than two, with more capacity
            // (decision 5).
            .worker_threads(1)
            .thread_name("metron-io")
            .enable_all()
            .build()
            .expect("tokio runtime")
    });
    let (flushed, pipeline_arbiter, actors_gone) = runner.block_on(async move {
        let mut running = match wire::start(prepared) {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send(Err(e));
                return (false, None, None);
            }
        };
        let _ = ready.send(Ok(running.connections.clone()));
        // Until told to stop (or the agent is gone, or one of its actors): reloads and state
        // dumps, one at a time.
        let mut look = tokio::time::interval(GONE_CHECK_INTERVAL);
        let actors_gone = loop {
            let c = tokio::select! {
                c = control.recv() => c,
                _ = look.tick() => {
                    let names = running.gone_actors();
                    if names.is_empty() {
                        continue;
                    }
                    let names = names.join(", ");
                    tracing::error!(
                        actors = %names,
                        "an actor is gone (a panic escaped its guard; a bug, please report it): \
                         stopping gracefully so the service manager starts metron again"
                    );
                    let _ = gone.send(Some(names.clone()));
                    break Some(names);
                }
            };
            match c {
                None | Some(Control::Shutdown) => break None,
                Some(Control::Reload(new, reply)) => {
                    let (config, tls, drain_tls) = *new;
                    let _ = reply.send(running.reload(config, tls, drain_tls));
                }
                Some(Control::DumpState(done)) => {
                    running.dump_state().await;
                    let _ = done.send(());
                }
                #[cfg(feature = "chaos-hooks")]
                Some(Control::ChaosPanic(actor, slot, escape)) => {
                    running.chaos_panic(actor, slot, escape);
                }
            }
        };
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: draining to Dopplers"
        );
        let deadline = tokio::time::Instant::now() + grace;
        let (flushed, arbiter) = running.drain(deadline).await;
        (flushed, Some(arbiter), actors_gone)
    });
    if let Some(a) = pipeline_arbiter {
        a.stop();
        let _ = a.join();
    }
    // Dropping the runtime stops every actor and task: from here on nothing moves, so what is
    // still buffered is exactly what the grace period could not flush.
    drop(runner);
    let left = ledger.expire_all();
    let metrics = ledger.metrics().snapshot();
    tracing::info!(
        flushed = flushed && left == 0,
        ingress = metrics.ingress,
        ingress_v1 = metrics.ingress_v1,
        egress = metrics.egress,
        dropped = metrics.dropped_total(),
        "metron stopped"
    );
    ShutdownReport {
        flushed: flushed && left == 0,
        metrics,
        actors_gone,
    }
}
