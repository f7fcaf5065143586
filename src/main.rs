//! The `tollgate` binary: CLI, logging, listeners and signals. All logic
//! lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use tollgate::config::Config;
use tollgate::{Listeners, Tollgate};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A metering reverse proxy for AI agents"
)]
struct Cli {
    /// Config file to serve with.
    #[arg(
        long,
        env = "TOLLGATE_CONFIG",
        default_value = "config/tollgate.toml",
        global = true
    )]
    config: PathBuf,
    /// Log format: json (one object per line) or text.
    #[arg(
        long,
        env = "TOLLGATE_LOG_FORMAT",
        default_value = "json",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the config (the default).
    Serve,
    /// Validate a config file: prints every error with its key path and line; exit 0 valid, 2 invalid.
    CheckConfig {
        /// The file to check.
        path: PathBuf,
    },
    /// Run tollgate in front of a simulated provider, paid tools and agent
    /// fleet (no API key, no network) and print the URLs to open.
    Demo {
        /// Agent listener; a taken port falls back to a free one.
        #[arg(long, default_value = "127.0.0.1:8787")]
        agent_listen: std::net::SocketAddr,
        /// Admin listener (/metrics, /api); a taken port falls back to a free one.
        #[arg(long, default_value = "127.0.0.1:9787")]
        admin_listen: std::net::SocketAddr,
        /// Runs in the first batch.
        #[arg(long, default_value_t = 40)]
        runs: usize,
        /// Latency multiplier: 2 makes the simulated provider twice as fast.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig { path } => check_config(&path),
        Command::Serve => {
            // Per-call lines go out in batches (`tollgate::logging::StdoutBatch`);
            // the guard writes what is pending once serving has stopped.
            let batch = tollgate::logging::StdoutBatch::start();
            let guard = match batch {
                Ok((sink, guard)) => {
                    init_tracing(cli.log_format, "info", sink);
                    Some(guard)
                }
                Err(e) => {
                    eprintln!("tollgate: cannot start the log writer ({e}); logging line by line");
                    init_tracing(cli.log_format, "info", std::io::stdout);
                    None
                }
            };
            let code = run_async(serve(cli.config));
            if let Some(guard) = guard {
                guard.flush_and_stop();
            }
            code
        }
        Command::Demo {
            agent_listen,
            admin_listen,
            runs,
            speed,
        } => {
            // The demo prints its own summary; per-call logs would bury it.
            init_tracing(cli.log_format, "warn", std::io::stdout);
            let options = tollgate::demo::DemoOptions {
                agent_listen,
                admin_listen,
                runs,
                speed,
                ..tollgate::demo::DemoOptions::default()
            };
            run_async(async move {
                tollgate::demo::run(options, shutdown_signal())
                    .await
                    .map(|_| ())
            })
        }
    }
}

fn run_async(future: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tollgate: {message}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = tollgate::pricing::PriceTable::load(&config.raw.pricing, &config.base_dir) {
        eprintln!("{}: pricing: {e}", path.display());
        return ExitCode::from(2);
    }
    println!("{}: ok ({} routes)", path.display(), config.routes.len());
    ExitCode::SUCCESS
}

async fn serve(path: PathBuf) -> Result<(), String> {
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    let agent = TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (server.listen): {e}", config.listen))?;
    let admin = TcpListener::bind(config.admin_listen).await.map_err(|e| {
        format!(
            "cannot listen on {} (admin.listen): {e}",
            config.admin_listen
        )
    })?;
    let tollgate = Tollgate::new(config.clone(), Some(path)).map_err(|e| e.to_string())?;
    let state = tollgate.state().clone();
    // Before "listening": from then on a SIGTERM must drain, not kill.
    let shutdown = shutdown_signal();
    let bound = |l: &TcpListener, configured| l.local_addr().unwrap_or(configured);
    tracing::info!(
        message = "tollgate listening",
        agent = %bound(&agent, config.listen),
        admin = %bound(&admin, config.admin_listen),
        routes = config.routes.len()
    );
    spawn_reload_on_sighup(state)?;
    tollgate.run(Listeners { agent, admin }, shutdown).await;
    Ok(())
}

#[cfg(unix)]
fn spawn_reload_on_sighup(state: std::sync::Arc<tollgate::AppState>) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup =
        signal(SignalKind::hangup()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let _ = state.reload();
        }
    });
    Ok(())
}

#[cfg(not(unix))]
fn spawn_reload_on_sighup(_state: std::sync::Arc<tollgate::AppState>) -> Result<(), String> {
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled: the listeners serve before
/// `Tollgate::run` polls it, and a signal arriving in between would
/// otherwise take its default action and kill the process undrained.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (term, interrupt) {
                (Ok(mut term), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_tracing<W>(format: LogFormat, default_filter: &str, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.event_format(tollgate::logging::JsonLines).init(),
        LogFormat::Text => builder.init(),
    }
}
