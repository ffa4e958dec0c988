//! `metron [--config PATH]`: load and validate the config (exit 64 on any problem), start the
//! agent, run until SIGTERM/SIGINT, drain within the grace period, exit 0. A second signal exits
//! at once with code 1.

use std::path::PathBuf;
use std::process::ExitCode;

use metron::config::Config;
use metron::Agent;

/// Signals this soon after the first count as the same request.
const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_millis(500);

const USAGE: &str = "usage: metron [--config PATH]   (default ./config.yaml)";

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
                println!("{USAGE}");
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

fn main() -> ExitCode {
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
    metron::telemetry::init_logging(&config.log_level);

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
    rt.block_on(async {
        // Listeners are made once, before the first wait, so a second signal that arrives while
        // the first is being handled is not lost.
        let mut signals = Signals::new();
        signals.next().await;
        tracing::info!("signal received: shutting down gracefully (send another to exit at once)");
        std::thread::spawn(move || {
            // Exit 0 either way: what could not be flushed is counted and logged by the agent.
            agent.shutdown();
            std::process::exit(0);
        });
        let first = std::time::Instant::now();
        loop {
            signals.next().await;
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

/// SIGTERM and SIGINT, installed once.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    async fn next(&mut self) {
        match (&mut self.term, &mut self.int) {
            (Some(term), Some(int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            // Without signal handlers the process can only be killed; park instead of spinning.
            _ => std::future::pending::<()>().await,
        }
    }
}
