//! `metron [--config PATH]`: load and validate the config (exit 64 on any problem), start the
//! agent, run until SIGTERM/SIGINT, drain within the grace period, exit 0. A second signal exits
//! at once with code 1. SIGHUP reloads the config file and the files it names; SIGUSR1 writes a
//! state dump. `metron --help` prints the manual (`src/help.txt`).

use std::path::PathBuf;
use std::process::ExitCode;

use std::path::Path;

use metron::config::{Config, Live, Scheduling};
use metron::telemetry::logging::LogHandle;
use metron::Agent;

/// Signals this soon after the first count as the same request.
const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_millis(500);

const USAGE: &str = "usage: metron [--config PATH]   (default ./config.yaml)
       metron bench | sink | load [FLAGS]   (the benchmark and its parts; --help on each)
       metron --help                        (the manual: signals, endpoints, exit status)";

/// `metron --help`: the manual.
const HELP: &str = include_str!("help.txt");

/// `metron bench|sink|load ...`: the benchmark's subcommands (see `metron::bench`).
fn subcommand(name: &str, args: &[String]) -> Option<ExitCode> {
    use metron::bench::run;
    type Main = fn(&[String]) -> Result<(), metron::bench::BenchError>;
    let (usage, main): (&str, Main) = match name {
        "bench" => (run::BENCH_USAGE, run::bench_main),
        "sink" => (run::SINK_USAGE, run::sink_main),
        "load" => (run::LOAD_USAGE, run::load_main),
        _ => return None,
    };
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{usage}");
        return Some(ExitCode::SUCCESS);
    }
    Some(match main(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ metron::bench::BenchError::Usage(_)) => {
            eprintln!("metron {name}: {e}\n{usage}");
            ExitCode::from(64)
        }
        Err(e) => {
            eprintln!("metron {name}: {e}");
            ExitCode::from(1)
        }
    })
}

fn parse_args() -> Result<PathBuf, String> {
    let mut args = std::env::args().skip(1);
    let mut config = PathBuf::from("config.yaml");
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => {
                config = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or("--config needs a path")?;
            }
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--version" | "-V" => {
                println!("metron {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(config)
}

/// One glibc malloc arena for the whole daemon instead of up to eight per core. Buffers are
/// allocated on one thread and freed on another (the I/O thread and the pipeline arbiter), and
/// with an arena per thread each arena kept its own freed memory: under a flood the agent's RSS
/// went from about 68 MB to 52-54 MB with one arena, at no measurable cost in CPU or goodput
/// (docs/decisions.md 15). Runs before the agent starts any thread.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// `pipeline.scheduling: batch`: puts this thread under `SCHED_BATCH` (same priority as
/// `SCHED_OTHER`) before any other thread exists, so every thread the agent starts inherits it.
/// An agent thread that wakes then never preempts the thread running on that core, so the
/// agent's two threads stop preempting each other (and an app's); what that saved is in
/// docs/decisions.md 21. Returns what to log once logging is up.
fn tune_scheduler(scheduling: Scheduling) -> Result<&'static str, std::io::Error> {
    match scheduling {
        Scheduling::Inherit => Ok("the scheduling policy the process was started with"),
        #[cfg(target_os = "linux")]
        Scheduling::Batch => {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread, which is the
            // only one. Unprivileged processes may always choose SCHED_BATCH.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } == 0 {
                Ok("SCHED_BATCH")
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        #[cfg(not(target_os = "linux"))]
        Scheduling::Batch => Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "SCHED_BATCH is Linux only",
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = args.first().and_then(|n| subcommand(n, &args[1..])) {
        return code;
    }
    tune_allocator();
    let path = match parse_args() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("metron: {e}\n{USAGE}");
            return ExitCode::from(64);
        }
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("metron: config error in {}: {e}", path.display());
            return ExitCode::from(64);
        }
    };
    let scheduled = tune_scheduler(config.pipeline.scheduling);
    let log = metron::telemetry::logging::init(&config.log.level, config.log.format);
    metron::telemetry::logging::install_panic_hook();
    match scheduled {
        Ok(policy) => tracing::info!(policy, "agent threads scheduled (pipeline.scheduling)"),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot set SCHED_BATCH (pipeline.scheduling): running under the inherited policy"
        ),
    }

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metron: cannot start the signal handler: {e}");
            return ExitCode::from(1);
        }
    };
    // Handlers are installed before the agent starts: a HUP or USR1 during start-up (a reload
    // sent by a supervisor too early) must not kill the process, which is their default action.
    // Each is made once, so a signal that arrives while another is being handled is not lost.
    let mut signals = {
        let _runtime = rt.enter();
        Signals::new()
    };

    let agent = match Agent::start(config) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("metron: {e}");
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    if let Some(d) = agent.dev_credentials() {
        tracing::warn!(
            ca = %d.emitter.ca.display(),
            cert = %d.emitter.cert.display(),
            key = %d.emitter.key.display(),
            "development emitter credentials (dial the agent with server name \"metron\")"
        );
    }

    rt.block_on(async {
        let gone = loop {
            // One at a time: a reload or dump runs to its end (or its time limit) before the next
            // HUP or USR1 is read; TERM and INT are read meanwhile and win.
            let signal = tokio::select! {
                signal = signals.next() => signal,
                // The agent is already stopping itself (it logged why).
                _ = agent.actor_gone() => break true,
            };
            let stopped = match signal {
                Signal::Stop => true,
                Signal::Reload => {
                    let work = reload(&agent, &path, &log);
                    unless_stopped(&mut signals, work, "the reload").await
                }
                Signal::Dump => {
                    tracing::info!("SIGUSR1: writing the state dump (target metron::state)");
                    let work = agent.dump_state();
                    unless_stopped(&mut signals, work, "the state dump").await
                }
            };
            if stopped {
                break false;
            }
        };
        if !gone {
            tracing::info!(
                "signal received: shutting down gracefully (send another to exit at once)"
            );
        }
        std::thread::spawn(move || {
            // What could not be flushed is counted and logged by the agent. An agent that
            // stopped itself exits non-zero, so its service manager starts it again.
            agent.shutdown();
            std::process::exit(if gone {
                metron::EXIT_ACTOR_GONE.into()
            } else {
                0
            });
        });
        let first = std::time::Instant::now();
        loop {
            if signals.next().await != Signal::Stop {
                tracing::info!("shutting down: SIGHUP and SIGUSR1 are ignored now");
                continue;
            }
            // `timeout`, systemd and shells may deliver one request twice (to the process and to
            // its group): a repeat within REPEAT_WINDOW is the same request, not a second one.
            if first.elapsed() >= REPEAT_WINDOW {
                break;
            }
            tracing::debug!("ignoring a repeated signal");
        }
        tracing::warn!("second signal: exiting at once");
        std::process::exit(1);
    })
}

/// The longest a reload or a state dump may take before the process stops waiting for it. Both
/// take milliseconds; only an agent whose actor system is stuck makes them wait (and `/livez`
/// then says so).
const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `work` until it is done, [`CONTROL_TIMEOUT`] passes, or TERM or INT arrives; returns
/// whether one did (the work is then abandoned: shutting down comes first).
async fn unless_stopped(
    signals: &mut Signals,
    work: impl std::future::Future<Output = ()>,
    what: &str,
) -> bool {
    let work = tokio::time::timeout(CONTROL_TIMEOUT, work);
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => {
                if done.is_err() {
                    tracing::error!(
                        "{what} did not finish within {} s: the agent may be stuck (see /livez)",
                        CONTROL_TIMEOUT.as_secs()
                    );
                }
                return false;
            }
            signal = signals.next() => {
                if signal == Signal::Stop {
                    return true;
                }
                tracing::info!("busy with {what}: ignoring this signal");
            }
        }
    }
}

/// SIGHUP: re-reads `path` and applies it. A config that does not load, or that the agent cannot
/// apply, is rejected with one line naming the key; the agent runs on as before.
async fn reload(agent: &metron::Agent, path: &Path, log: &LogHandle) {
    tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
    let rejected = |e: &dyn std::fmt::Display| {
        tracing::error!(
            error = %e,
            "configuration reload rejected; still running on the previous configuration"
        );
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return rejected(&e),
    };
    let level = config.log.level.clone();
    match agent.reload(config).await {
        Ok(outcome) => {
            if outcome.applied.contains(&Live::LogLevel.key()) {
                if let Err(e) = log.set_level(&level) {
                    tracing::error!(error = %e, "log.level: cannot apply; keeping the old level");
                }
            }
            tracing::info!(
                applied = ?outcome.applied,
                needs_restart = ?outcome.needs_restart,
                "configuration reloaded"
            );
            if !outcome.needs_restart.is_empty() {
                tracing::warn!(
                    keys = ?outcome.needs_restart,
                    "these keys changed but take effect only after a restart; their running \
                     values are kept"
                );
            }
        }
        Err(e) => rejected(&e),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
    /// SIGUSR1.
    Dump,
}

/// The signals the daemon answers, installed once.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
    usr1: Option<tokio::signal::unix::Signal>,
}

/// The next delivery of `s`, or never if it could not be installed.
async fn delivery(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
            hup: signal(SignalKind::hangup()).ok(),
            usr1: signal(SignalKind::user_defined1()).ok(),
        }
    }

    async fn next(&mut self) -> Signal {
        // Without handlers for TERM and INT the process can only be killed; the waits below then
        // park instead of spinning.
        tokio::select! {
            () = delivery(&mut self.term) => Signal::Stop,
            () = delivery(&mut self.int) => Signal::Stop,
            () = delivery(&mut self.hup) => Signal::Reload,
            () = delivery(&mut self.usr1) => Signal::Dump,
        }
    }
}
