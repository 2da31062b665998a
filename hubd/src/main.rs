//! The `hubd` binary: parse arguments, load the config, bind the sockets, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use hubd::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// hubd: local-first smart-home hub (MQTT over mutual TLS, per-install CA).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Config file (TOML). Without it the built-in default config is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the built-in default config and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Check a config file and exit: 0 if valid, 1 with the error if not.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// State directory (overrides the config and $STATE_DIRECTORY).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Admin socket path (overrides the config).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// MQTT listen address (overrides the config), e.g. 127.0.0.1:8883.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", Config::DEFAULT_TOML);
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &args.check_config {
        return match Config::load(path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("hubd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hubd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(directive: &str) {
    let filter = EnvFilter::try_from_env("HUBD_LOG").unwrap_or_else(|_| EnvFilter::new(directive));
    let registry = tracing_subscriber::registry().with(filter);
    // Under systemd, stderr is the journal too, but the native protocol keeps
    // fields and levels.
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        registry.with(journald).init();
        return;
    }
    registry
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default_config(),
    };
    if let Some(listen) = &args.listen {
        config.edge.listen = listen
            .parse()
            .with_context(|| format!("--listen {listen:?}: invalid socket address"))?;
    }
    // Paths on the command line are relative to where hubd was started; the
    // config file insists on absolute ones.
    if let Some(dir) = args.state_dir {
        let dir = std::path::absolute(&dir)
            .with_context(|| format!("--state-dir {}: cannot resolve", dir.display()))?;
        config.hub.state_dir = Some(dir);
    }
    if let Some(socket) = args.socket {
        let socket = std::path::absolute(&socket)
            .with_context(|| format!("--socket {}: cannot resolve", socket.display()))?;
        config.admin.socket = Some(socket);
    }
    config.validate()?;
    init_logging(&config.hub.log);

    let env = |k: &str| std::env::var_os(k);
    let state_dir = config.resolve_state_dir(&env)?;
    let socket = config.resolve_socket(&state_dir, &env);
    // Before the socket is bound: without a runtime dir the socket lives in
    // the state dir, which must be created 0700, not as a socket's parent.
    hubd::daemon::prepare_state_dir(&state_dir)?;
    config.hub.state_dir = Some(state_dir);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let mqtt = hubd::bind_mqtt(config.edge.listen)
            .await
            .with_context(|| format!("[edge] listen = \"{}\": cannot bind", config.edge.listen))?;
        let admin = hubd::bind_admin_socket(&socket, &config.admin.group).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        let result = hubd::run(config, hubd::Listeners { mqtt, admin }, shutdown).await;
        let _ = std::fs::remove_file(&socket);
        result.map_err(anyhow::Error::from)
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop hubd with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
