//! A real fake Doppler: a `loggregator.v2.Ingress` mTLS server that records what it receives and
//! can be killed, stalled and restarted by a test.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metron::bench::subscriber::SubscriberBuffer;
use metron::proto::ingress_server::{Ingress, IngressServer};
use metron::proto::{BatchSenderResponse, Envelope, EnvelopeBatch, IngressResponse, SendResponse};
use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use super::pki::Pki;
use super::util::install_crypto_provider;

/// The largest message a real Doppler accepts (its gRPC server's receive limit).
pub const DOPPLER_MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;

/// How long `start_on` keeps retrying a bind while the port is still held (for example by the
/// listener of a Doppler that was just killed).
const BIND_RETRY_FOR: Duration = Duration::from_secs(2);

/// Bounds `kill`: the runtime's workers normally exit within milliseconds.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Gives every Doppler started from one `Pki` its own certificate files.
static DOPPLER_COUNTER: AtomicU64 = AtomicU64::new(0);

/// One arrival clock for every fake Doppler in the process, so envelopes received by several
/// Dopplers can be put back in the order they were sent (see [`received_in_send_order`]).
static ARRIVALS: AtomicU64 = AtomicU64::new(0);

/// One clock for every RPC any fake Doppler in the process starts: a `BatchSender` stream, a
/// `Sender` stream or a `Send` call. A connection the agent cuts off can still be read after its
/// slot's next stream began, so what a stream carried is ordered by when the stream started.
static STREAMS: AtomicU64 = AtomicU64::new(0);

/// Everything a `FakeDoppler` has recorded. Outlives its runtimes, so counts accumulate across
/// `kill`/`restart`.
struct Store {
    state: Mutex<Recorded>,
    /// Notified on every change of `state`, so waits are condition waits rather than polls.
    changed: Condvar,
    /// `true` while stalled. A watch channel is runtime-independent, so it survives restarts
    /// and handlers can await it without polling.
    stalled: watch::Sender<bool>,
    /// While set, every `BatchSender` call is refused at once (TLS and HTTP/2 still succeed).
    refusing: std::sync::atomic::AtomicBool,
    /// Mirrors the counters of `state` for async waiters, who must not block on `changed`.
    counts: watch::Sender<Counts>,
    /// Envelopes a second this Doppler takes, all streams together (see
    /// [`FakeDoppler::set_rate`]).
    pacer: metron::bench::pacer::ReadPacer,
}

/// The counters of a `FakeDoppler`, as one consistent snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub envelopes: usize,
    pub batches: usize,
    /// `BatchSender` calls. The agent ends and reopens streams on one connection to have its
    /// envelopes acknowledged, so this counts more than connections.
    pub streams_opened: usize,
    /// Distinct client connections (peer addresses) that opened a `BatchSender` stream.
    pub connections: usize,
}

#[derive(Default)]
struct Recorded {
    /// See [`FakeDoppler::model_subscriber`].
    subscriber: Option<SubscriberBuffer>,
    envelopes: Vec<Envelope>,
    /// For each envelope of `envelopes`: the stream clock's reading when its RPC started, and
    /// the arrival clock's when it arrived.
    arrivals: Vec<(u64, u64)>,
    batches: usize,
    streams_opened: usize,
    peers: std::collections::HashSet<SocketAddr>,
}

impl Recorded {
    fn record(&mut self, stream: u64, batch: Vec<Envelope>) {
        if let Some(s) = &mut self.subscriber {
            s.arrive(batch.len(), Instant::now());
        }
        let n = batch.len() as u64;
        let first = ARRIVALS.fetch_add(n, Ordering::SeqCst);
        self.arrivals
            .extend((first..first + n).map(|at| (stream, at)));
        self.envelopes.extend(batch);
    }

    fn counts(&self) -> Counts {
        Counts {
            envelopes: self.envelopes.len(),
            batches: self.batches,
            streams_opened: self.streams_opened,
            connections: self.peers.len(),
        }
    }
}

impl Store {
    fn update(&self, f: impl FnOnce(&mut Recorded)) {
        let mut state = self.state.lock();
        f(&mut state);
        self.counts.send_replace(state.counts());
        drop(state);
        self.changed.notify_all();
    }

    /// Waits until `done` holds or `timeout` passes; returns whether it holds.
    fn wait(&self, timeout: Duration, mut done: impl FnMut(&Recorded) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state: MutexGuard<'_, Recorded> = self.state.lock();
        while !done(&state) {
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                return done(&state);
            }
        }
        true
    }
}

/// The `Ingress` service the fake Doppler serves.
struct Recorder {
    store: Arc<Store>,
}

impl Recorder {
    /// Returns once the Doppler is not stalled. While a handler waits here it does not pull from
    /// its stream, so HTTP/2 flow control pushes back on the sender.
    async fn unstalled(&self, rx: &mut watch::Receiver<bool>) {
        // Errs only once the sender is gone, and the store owns the sender.
        let _ = rx.wait_for(|stalled| !*stalled).await;
    }
}

#[tonic::async_trait]
impl Ingress for Recorder {
    async fn sender(
        &self,
        request: Request<Streaming<Envelope>>,
    ) -> Result<Response<IngressResponse>, Status> {
        let started = STREAMS.fetch_add(1, Ordering::SeqCst);
        let mut stream = request.into_inner();
        let mut stalled = self.store.stalled.subscribe();
        loop {
            self.unstalled(&mut stalled).await;
            match stream.message().await? {
                Some(envelope) => self.store.update(|s| s.record(started, vec![envelope])),
                None => return Ok(Response::new(IngressResponse {})),
            }
        }
    }

    async fn batch_sender(
        &self,
        request: Request<Streaming<EnvelopeBatch>>,
    ) -> Result<Response<BatchSenderResponse>, Status> {
        let started = STREAMS.fetch_add(1, Ordering::SeqCst);
        let peer = request.remote_addr();
        self.store.update(|s| {
            s.streams_opened += 1;
            s.peers.extend(peer);
        });
        if self.store.refusing.load(Ordering::Acquire) {
            return Err(Status::unavailable("this Doppler refuses every stream"));
        }
        let mut stream = request.into_inner();
        let mut stalled = self.store.stalled.subscribe();
        loop {
            self.unstalled(&mut stalled).await;
            match stream.message().await? {
                Some(batch) => {
                    let n = batch.batch.len();
                    self.store.update(|s| {
                        s.batches += 1;
                        s.record(started, batch.batch);
                    });
                    self.store.pacer.after(n as u64).await;
                }
                // As an upstream Doppler answers a stream the sender ended: its handler returns
                // the `io.EOF` from `Recv`, which gRPC-Go sends as `Unknown: EOF`.
                None => return Err(Status::unknown("EOF")),
            }
        }
    }

    async fn send(
        &self,
        request: Request<EnvelopeBatch>,
    ) -> Result<Response<SendResponse>, Status> {
        let started = STREAMS.fetch_add(1, Ordering::SeqCst);
        let mut stalled = self.store.stalled.subscribe();
        self.unstalled(&mut stalled).await;
        let batch = request.into_inner();
        self.store.update(|s| {
            s.batches += 1;
            s.record(started, batch.batch);
        });
        Ok(Response::new(SendResponse {}))
    }
}

/// A Doppler stand-in on `127.0.0.1`, serving `loggregator.v2.Ingress` over mTLS with a server
/// certificate for `doppler` and requiring client certificates issued by the test `Pki`.
///
/// It runs on its own multi-thread runtime, so it keeps serving whatever runtime (or none) the
/// test uses, and `kill` can take it down like a crashed process.
pub struct FakeDoppler {
    addr: SocketAddr,
    store: Arc<Store>,
    /// Kept so `restart` serves the same identity without touching the `Pki` again.
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
    /// `None` once killed.
    runtime: Option<Runtime>,
}

impl FakeDoppler {
    /// Starts on an ephemeral port of 127.0.0.1.
    ///
    /// # Panics
    /// If the certificate, the listener or the runtime cannot be set up.
    pub fn start(pki: &Pki) -> FakeDoppler {
        FakeDoppler::start_on(pki, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts on `addr`, retrying the bind for up to 2 s while the port is in use. The port is
    /// listening (connections queue in the backlog) by the time this returns.
    ///
    /// # Panics
    /// If the certificate, the listener or the runtime cannot be set up.
    pub fn start_on(pki: &Pki, addr: SocketAddr) -> FakeDoppler {
        let n = DOPPLER_COUNTER.fetch_add(1, Ordering::Relaxed);
        // `metron`: a fake Doppler also stands in for a downstream v2 agent (a syslog-agent), which
        // the forwarder dials by that name.
        let cert = pki.issue(&format!("doppler-{n}"), &["doppler", "localhost", "metron"]);
        let (stalled, _) = watch::channel(false);
        let (counts, _) = watch::channel(Counts::default());
        let mut doppler = FakeDoppler {
            addr,
            store: Arc::new(Store {
                state: Mutex::new(Recorded::default()),
                changed: Condvar::new(),
                stalled,
                refusing: std::sync::atomic::AtomicBool::new(false),
                pacer: Default::default(),
                counts,
            }),
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
            ca_pem: pki.ca_pem.clone(),
            runtime: None,
        };
        doppler.serve();
        doppler
    }

    /// Binds `self.addr`, records the actual address and serves on a fresh runtime.
    fn serve(&mut self) {
        install_crypto_provider();
        self.store.update(|s| {
            if let Some(sub) = &mut s.subscriber {
                sub.empty();
            }
        });
        let listener = bind_with_retry(self.addr);
        listener
            .set_nonblocking(true)
            .expect("set listener non-blocking");
        self.addr = listener.local_addr().expect("listener address");

        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem));
        let service = IngressServer::new(Recorder {
            store: self.store.clone(),
        })
        .max_decoding_message_size(DOPPLER_MAX_MESSAGE_BYTES);
        let router = Server::builder()
            .tls_config(tls)
            .expect("fake doppler TLS config")
            .add_service(service);

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-doppler")
            .enable_all()
            .build()
            .expect("fake doppler runtime");
        let addr = self.addr;
        runtime.spawn(async move {
            // `from_std` needs the runtime's reactor, hence inside the task.
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return eprintln!("fake doppler {addr}: listener: {e}"),
            };
            if let Err(e) = router
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
            {
                eprintln!("fake doppler {addr}: server stopped: {e}");
            }
        });
        self.runtime = Some(runtime);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every envelope received so far (across streams and restarts), in the order it was sent:
    /// by the stream that carried it, in the order streams started, then in arrival order. See
    /// [`received_in_send_order`].
    pub fn received(&self) -> Vec<Envelope> {
        received_in_send_order(&[self])
    }

    fn received_with_arrivals(&self) -> Vec<((u64, u64), Envelope)> {
        let s = self.store.state.lock();
        s.arrivals
            .iter()
            .copied()
            .zip(s.envelopes.iter().cloned())
            .collect()
    }

    /// Envelopes received so far, over every RPC.
    pub fn count(&self) -> usize {
        self.store.state.lock().envelopes.len()
    }

    /// `EnvelopeBatch` messages received so far (`BatchSender` messages and `Send` calls).
    pub fn batches(&self) -> usize {
        self.store.state.lock().batches
    }

    /// `BatchSender` streams accepted so far (a stream counts as soon as its handler starts,
    /// even while stalled).
    pub fn streams_opened(&self) -> usize {
        self.store.state.lock().streams_opened
    }

    /// All counters at once, consistent with each other.
    pub fn counts(&self) -> Counts {
        self.store.state.lock().counts()
    }

    /// While stalled, handlers stop pulling messages, so HTTP/2 flow control backs up on the
    /// senders while their TCP connections stay open. A handler already awaiting a message
    /// when the stall begins records that one message before it stops.
    pub fn set_stalled(&self, stalled: bool) {
        self.store.stalled.send_replace(stalled);
    }

    /// While refusing, connections and TLS succeed but every `BatchSender` call fails at once:
    /// a Doppler that passes a dial and fails every stream.
    pub fn set_refusing(&self, refusing: bool) {
        self.store.refusing.store(refusing, Ordering::Release);
    }

    /// Takes at most `per_second` envelopes a second from now on, all streams together (a slow
    /// Doppler); 0 lifts the cap.
    pub fn set_rate(&self, per_second: u64) {
        self.store.pacer.set(per_second);
    }

    /// From now on, models a subscriber's bounded buffer behind this Doppler
    /// ([`SubscriberBuffer`]): `capacity` envelopes read at `rate` a second, what overflows dropped (see
    /// [`FakeDoppler::subscriber_drops`]). A restart empties it, as a restarted Doppler's buffers
    /// are.
    pub fn model_subscriber(&self, capacity: usize, rate: f64) {
        self.store
            .update(|s| s.subscriber = Some(SubscriberBuffer::new(capacity, rate)));
    }

    /// Envelopes the modelled subscriber buffer dropped so far.
    pub fn subscriber_drops(&self) -> u64 {
        self.store
            .state
            .lock()
            .subscriber
            .map_or(0, |s| s.dropped())
    }

    /// Takes the Doppler down abruptly: every task is dropped and every socket (listener and
    /// connections) is closed without a goodbye, like a crashed process. When this returns the
    /// sockets are closed. Recorded data stays readable. Idempotent; safe to call from async code.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // shutdown_background alone returns before the workers have dropped the tasks, so
            // the port could still accept for a moment. Waiting for the workers has to happen
            // off any async context (tokio panics otherwise), hence the plain thread.
            let waited = std::thread::Builder::new()
                .name("fake-doppler-kill".into())
                .spawn(move || runtime.shutdown_timeout(SHUTDOWN_WAIT))
                .expect("spawn kill thread")
                .join();
            if waited.is_err() {
                eprintln!("fake doppler {}: runtime shutdown panicked", self.addr);
            }
        }
    }

    /// Kills (if running) and starts again on the same address with the same certificate and
    /// the same recorded data, so counts accumulate across restarts. The stall flag is kept.
    pub fn restart(&mut self) {
        self.kill();
        self.serve();
    }

    pub fn is_running(&self) -> bool {
        self.runtime.is_some()
    }

    /// Waits until at least `n` envelopes have been received; returns whether that happened
    /// within `timeout`. A condition wait: woken on every receive.
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> bool {
        self.store.wait(timeout, |s| s.envelopes.len() >= n)
    }

    /// Waits until at least `n` `BatchSender` streams have been accepted in total.
    pub fn wait_for_streams(&self, n: usize, timeout: Duration) -> bool {
        self.store.wait(timeout, |s| s.streams_opened >= n)
    }

    /// Waits until `n` distinct agent connections have opened a `BatchSender` stream.
    pub fn wait_for_connections(&self, n: usize, timeout: Duration) -> bool {
        self.store.wait(timeout, |s| s.peers.len() >= n)
    }

    /// Distinct agent connections that opened a `BatchSender` stream (survives restarts).
    pub fn connections_opened(&self) -> usize {
        self.store.state.lock().peers.len()
    }

    /// `wait_for_count` for async code: awaits instead of blocking the thread, so it is the one
    /// to use on a single-threaded runtime that also runs the sender (an actix `System`,
    /// `#[tokio::test]`'s default flavour). Needs a runtime with time enabled.
    pub async fn wait_for_count_async(&self, n: usize, timeout: Duration) -> bool {
        self.wait_async(timeout, |c| c.envelopes >= n).await
    }

    /// `wait_for_streams` for async code (see `wait_for_count_async`).
    pub async fn wait_for_streams_async(&self, n: usize, timeout: Duration) -> bool {
        self.wait_async(timeout, |c| c.streams_opened >= n).await
    }

    /// `wait_for_connections` for async code.
    pub async fn wait_for_connections_async(&self, n: usize, timeout: Duration) -> bool {
        self.wait_async(timeout, |c| c.connections >= n).await
    }

    /// Awaits any condition on the counters, woken on every change; returns whether it held
    /// within `timeout`. Needs a runtime with time enabled.
    pub async fn wait_async(
        &self,
        timeout: Duration,
        mut done: impl FnMut(Counts) -> bool,
    ) -> bool {
        let mut counts = self.store.counts.subscribe();
        tokio::time::timeout(timeout, counts.wait_for(|c| done(*c)))
            .await
            .is_ok_and(|woke| woke.is_ok())
    }
}

impl Drop for FakeDoppler {
    fn drop(&mut self) {
        self.kill();
    }
}

fn bind_with_retry(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + BIND_RETRY_FOR;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                // A bounded retry, not synchronisation: nothing to wait on for a port to free.
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("fake doppler: bind {addr}: {e}"),
        }
    }
}

/// Everything several Dopplers received, merged in the order it was sent: by the stream that
/// carried it, in the order streams started at any of them, then in arrival order.
///
/// Arrival order alone is not send order. When the agent cuts a connection off (a watchdog, a
/// killed actor), the Doppler may still read the old stream's last messages after the slot's
/// next stream delivered its first ones. Those envelopes are counted as `connection_lost`, and
/// arrived anyway (`docs/architecture.md`, "Known limits"). The agent still sent them first: each stream of a
/// slot starts only after the previous one ended.
pub fn received_in_send_order(dopplers: &[&FakeDoppler]) -> Vec<Envelope> {
    let mut all: Vec<((u64, u64), Envelope)> = dopplers
        .iter()
        .flat_map(|d| d.received_with_arrivals())
        .collect();
    all.sort_by_key(|(at, _)| *at);
    all.into_iter().map(|(_, e)| e).collect()
}
