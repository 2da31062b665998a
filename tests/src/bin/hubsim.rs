//! `hubsim`: a simulated device for developers and tests.
//!
//! `hubsim pair --uri URI --code CODE --out DIR` does the device half of
//! pairing ([`hub_tests::pair`]): it makes its own P-256 key and CSR, pins
//! the hub CA by the URI's fingerprint, proves the code and writes key.pem
//! (0600), cert.pem, ca.pem and device.json into DIR. It prints the device
//! id on stdout. On failure it prints `hubsim: <reason>` on stderr and exits
//! 1; a refusal reads `hubsim: pairing refused: <message> (<error code>)`.
//!
//! `hubsim connect --dir DIR --host H --port P [--state JSON]` connects as the
//! device in DIR over mTLS, renews its certificate first if less than 30
//! days remain (writing the new one into DIR), publishes its state
//! (retained) and disconnects.
//!
//! `hubsim run --devices N [--kinds sensor,switch] [--rate R] [--socket PATH]
//! [--host H --port P] [--dir DIR] [--backoff-base 1s --backoff-cap 60s]
//! [--enroll] [--duration D]` runs a fleet ([`hub_tests::sim`]): devices it
//! has no identity for in DIR/<n>/ are paired through the admin socket (a
//! pairing window each, then the device half of pairing; `--enroll` uses
//! factory enrolment instead), the rest are reused. It runs until Ctrl-C or
//! SIGTERM (or for `--duration`), prints a live one-line summary every
//! second on stderr and a summary table on stdout at exit.
//!
//! `hubsim outage --devices N --down 10s ...` runs the same fleet, waits
//! until every device is connected, takes the network away from all of them
//! at once for `--down`, and reports how long the fleet took to be 100% back
//! and how many connection attempts per second reached the hub meanwhile.
//!
//! The fleet's devices take signed firmware updates (hubd/OTA.md,
//! [`hub_tests::ota`]). They trust the simulated maker's published test key
//! unless `--vendor-pub FILE` names another (an SPKI PEM);
//! `--ota-corrupt` makes them corrupt every download, so they refuse every
//! update as `hash`. The simulated maker's tools:
//!
//! - `hubsim firmware keygen --out DIR` writes a new Ed25519 maker key:
//!   DIR/vendor.key (PKCS#8 PEM, 0600, as `openssl genpkey -algorithm
//!   ed25519` writes) and DIR/vendor.pub (SPKI PEM). It does not overwrite
//!   an existing key.
//! - `hubsim firmware image --model M --version V --out FILE` writes a
//!   simulated image ([`hub_tests::ota::simulated_image`]: a text header
//!   naming the maker, model and version, then deterministic pseudo-random
//!   filler, 40,000 bytes in all, so it spans several 16 KiB chunks) and
//!   prints its SHA-256.
//! - `hubsim firmware sign (--key KEYFILE | --hubsim-key) --model M
//!   --version V IMAGE --out SIGFILE` signs IMAGE as OTA.md says, writes the
//!   signature to SIGFILE as one line of base64 (88 characters) and prints
//!   the image's SHA-256. openssl's Ed25519 keys work as KEYFILE.
//! - `hubsim firmware pubkey [--key KEYFILE]` prints the public key PEM of
//!   the simulated maker (or of KEYFILE): what the owner trusts for the
//!   simulated models.
//!
//! Errors name the file and what is wrong with it (missing, not a PEM, the
//! wrong type of key).

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use hub_proto::v1 as pb;
use hub_tests::DeviceEvent;
use hub_tests::ota::{self, VendorKey};
use hub_tests::pair::{self, PairError};
use hub_tests::sim::{self, Fleet, FleetConfig, FleetStats, Kind, Provisioning};

#[derive(Parser)]
#[command(name = "hubsim", about = "A simulated hubd device", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pair with a hub using a pairing URI and a setup code.
    Pair(PairArgs),
    /// Connect as a paired device, renew if due, publish state once.
    Connect(ConnectArgs),
    /// Run a fleet of simulated devices until stopped.
    Run(RunArgs),
    /// Run a fleet, drop every device's network at once, measure the return.
    Outage(OutageArgs),
    /// The simulated maker's firmware tools: keys, images, signatures.
    #[command(subcommand)]
    Firmware(FirmwareCommand),
}

#[derive(Subcommand)]
enum FirmwareCommand {
    /// Write a new maker key: DIR/vendor.key (PKCS#8 PEM, 0600) and DIR/vendor.pub (SPKI PEM).
    Keygen {
        /// The directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a simulated firmware image for a model and version; print its SHA-256.
    Image {
        /// The model (HS-SW10 is the simulated switch, HS-TH20 the sensor).
        #[arg(long)]
        model: String,
        /// The firmware version.
        #[arg(long)]
        version: String,
        /// The image file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign an image; write the base64 signature and print the image's SHA-256.
    Sign {
        #[command(flatten)]
        signer: Signer,
        /// The model the image is for.
        #[arg(long)]
        model: String,
        /// The image's firmware version.
        #[arg(long)]
        version: String,
        /// The image to sign.
        image: PathBuf,
        /// Where to write the signature (one line of base64).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the simulated maker's public key PEM (or that of --key).
    Pubkey {
        /// A private key file (PKCS#8 PEM) instead of the simulated maker's.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

/// Which key signs: exactly one of the two.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct Signer {
    /// The maker's private key (PKCS#8 PEM, from keygen or openssl genpkey).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Sign with the simulated maker's published test key instead.
    #[arg(long)]
    hubsim_key: bool,
}

#[derive(Args)]
struct FleetArgs {
    /// How many devices to run.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Device kinds, used in turn.
    #[arg(long, value_delimiter = ',', default_value = "sensor,switch")]
    kinds: Vec<Kind>,
    /// State messages per second per sensor (fractional is fine; 0: only on connect).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// hubd's admin socket (default: where hubctl looks).
    #[arg(long, env = "HUBD_SOCKET")]
    socket: Option<PathBuf>,
    /// The hub's MQTT host (default: from the hub's status); also replaces
    /// the host in pairing URIs.
    #[arg(long)]
    host: Option<String>,
    /// The hub's MQTT port (default: from the hub's status).
    #[arg(long)]
    port: Option<u16>,
    /// Where device identities live, one directory per device
    /// (default: $XDG_DATA_HOME/hubsim or ~/.local/share/hubsim).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Reconnect backoff: the first window.
    #[arg(long, default_value = "1s", value_parser = duration)]
    backoff_base: Duration,
    /// Reconnect backoff: the largest window.
    #[arg(long, default_value = "60s", value_parser = duration)]
    backoff_cap: Duration,
    /// Each device waits a random time up to this before its first attempt.
    #[arg(long, default_value = "0s", value_parser = duration)]
    start_spread: Duration,
    /// Provision missing devices with EnrollDevice (factory enrolment)
    /// instead of pairing windows: fast, but not the householder's path.
    #[arg(long)]
    enroll: bool,
    /// The maker public key the devices trust for firmware updates (SPKI
    /// PEM, e.g. vendor.pub from `hubsim firmware keygen`; default: the
    /// simulated maker's test key, `hubsim firmware pubkey`).
    #[arg(long)]
    vendor_pub: Option<PathBuf>,
    /// Fault: the devices corrupt every firmware download, so they refuse
    /// every update as "hash".
    #[arg(long)]
    ota_corrupt: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Stop after this long instead of waiting for Ctrl-C or SIGTERM.
    #[arg(long, value_parser = duration)]
    duration: Option<Duration>,
}

#[derive(Args)]
struct OutageArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// How long the network stays away.
    #[arg(long, default_value = "10s", value_parser = duration)]
    down: Duration,
    /// Longest wait for the fleet to connect, and again to come back.
    #[arg(long, default_value = "180s", value_parser = duration)]
    timeout: Duration,
}

/// Parses "500ms", "10s", "5m", "1h" as hubd's config does.
fn duration(text: &str) -> Result<Duration, String> {
    hubd::config::parse_duration(text)
        .ok_or_else(|| format!("{text:?}: expected a whole number and ms, s, m or h"))
}

#[derive(Args)]
struct ConnectArgs {
    /// The directory `hubsim pair --out` wrote.
    #[arg(long)]
    dir: PathBuf,
    /// The hub's MQTT host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The hub's MQTT port.
    #[arg(long, default_value_t = 8883)]
    port: u16,
    /// The state to publish on d/<id>/state (retained).
    #[arg(long, default_value = "{\"online\":true}")]
    state: String,
}

#[derive(Args)]
struct PairArgs {
    /// The pairing URI `hubctl pair` printed (hubpair://HOST:PORT/?ca=...&claim=...).
    #[arg(long)]
    uri: String,
    /// The setup code, as printed (grouping and case do not matter to the hub).
    #[arg(long)]
    code: String,
    /// Where to write key.pem, cert.pem, ca.pem and device.json.
    #[arg(long)]
    out: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = pair::PAIR_TIMEOUT.as_secs())]
    timeout: u64,
}

// Multi-threaded: a fleet is many devices' TLS and MQTT at once.
#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pair(args) => run_pair(args).await,
        Command::Connect(args) => run_connect(args).await,
        Command::Run(args) => run_fleet(args).await,
        Command::Outage(args) => run_outage(args).await,
        Command::Firmware(command) => run_firmware(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("hubsim: {why}");
            ExitCode::FAILURE
        }
    }
}

async fn run_pair(args: PairArgs) -> Result<(), String> {
    let limit = Duration::from_secs(args.timeout.max(1));
    let identity = pair::pair_with_timeout(&args.uri, &args.code, limit)
        .await
        // A refusal displays as "pairing refused: <message> (<error>)".
        .map_err(|e: PairError| e.to_string())?;
    pair::write_identity(&identity, &args.out).map_err(|e| {
        format!(
            "paired as {}, but cannot write {}: {e}",
            identity.id,
            args.out.display()
        )
    })?;
    println!("{}", identity.id);
    Ok(())
}

async fn run_connect(args: ConnectArgs) -> Result<(), String> {
    let identity = pair::read_identity(&args.dir)
        .map_err(|e| format!("cannot read the device in {}: {e}", args.dir.display()))?;
    let addr = tokio::net::lookup_host((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("{}:{}: {e}", args.host, args.port))?
        .next()
        .ok_or_else(|| format!("{}:{}: no address", args.host, args.port))?;
    let (device, current) = hub_tests::renew::connect_renewing(&identity, addr)
        .await
        .map_err(|e| format!("connect: {e:#}"))?;
    if current.cert_pem != identity.cert_pem {
        pair::write_identity(&current, &args.dir)
            .map_err(|e| format!("renewed, but cannot write {}: {e}", args.dir.display()))?;
        eprintln!("hubsim: certificate renewed");
    }
    let mut device = device;
    // QoS 1, and wait for the PUBACK: the process ends right after.
    device
        .client
        .publish(
            format!("d/{}/state", current.id),
            rumqttc::QoS::AtLeastOnce,
            true,
            args.state.into_bytes(),
        )
        .await
        .map_err(|e| format!("publish: {e}"))?;
    loop {
        match device.next().await.map_err(|e| format!("publish: {e:#}"))? {
            DeviceEvent::PubAck(_) => break,
            DeviceEvent::Disconnected(why) => return Err(format!("disconnected: {why}")),
            DeviceEvent::Message { .. } | DeviceEvent::SubAck(_) => {}
        }
    }
    device
        .client
        .disconnect()
        .await
        .map_err(|e| format!("disconnect: {e}"))?;
    let _ = device.disconnected().await;
    println!("{}", current.id);
    Ok(())
}

/// The admin socket hubctl would use, in the same order: systemd's runtime
/// directory, the packaged hub's socket if it exists, then the per-user
/// places a hand-started hubd picks.
fn default_socket() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(dirs) = std::env::var_os("RUNTIME_DIRECTORY").filter(|v| !v.is_empty()) {
        // systemd joins several RuntimeDirectory= entries with ':'.
        let first = dirs.to_string_lossy().split(':').next().map(PathBuf::from);
        if let Some(dir) = first.filter(|p| p.is_absolute()) {
            return dir.join("hubd.sock");
        }
    }
    let system = PathBuf::from("/run/hubd/hubd.sock");
    if system.exists() {
        return system;
    }
    if let Some(dir) = var("XDG_RUNTIME_DIR") {
        return dir.join("hubd").join("hubd.sock");
    }
    if let Some(dir) = var("XDG_DATA_HOME") {
        return dir.join("hubd").join("hubd.sock");
    }
    if let Some(home) = var("HOME") {
        return home.join(".local/share/hubd/hubd.sock");
    }
    system
}

/// Where device identities live by default.
fn default_dir() -> Result<PathBuf, String> {
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(dir) = var("XDG_DATA_HOME") {
        return Ok(dir.join("hubsim"));
    }
    if let Some(home) = var("HOME") {
        return Ok(home.join(".local/share/hubsim"));
    }
    Err("no --dir, and neither $XDG_DATA_HOME nor $HOME is set".to_owned())
}

/// A running fleet and what it was started with.
struct Running {
    fleet: Fleet,
    addr: SocketAddr,
    kinds: Vec<Kind>,
    /// Where the identities live.
    dir: PathBuf,
}

/// Provisions the devices, finds the hub's MQTT address and starts the fleet.
async fn start_fleet(args: &FleetArgs) -> Result<Running, String> {
    if args.devices == 0 {
        return Err("--devices must be at least 1".to_owned());
    }
    if args.kinds.is_empty() {
        return Err("--kinds names no kind".to_owned());
    }
    if !args.rate.is_finite() || args.rate < 0.0 {
        return Err(format!("--rate {}: must be a number >= 0", args.rate));
    }
    if args.backoff_base.is_zero() || args.backoff_cap < args.backoff_base {
        return Err("--backoff-base must be > 0 and at most --backoff-cap".to_owned());
    }
    let socket = args.socket.clone().unwrap_or_else(default_socket);
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => default_dir()?,
    };
    let how = if args.enroll {
        Provisioning::Enroll
    } else {
        Provisioning::Pair {
            host: args.host.clone(),
        }
    };
    let tty = std::io::stderr().is_terminal();
    let devices = sim::provision(&socket, &dir, args.devices, &args.kinds, &how, |done, n| {
        if tty {
            eprint!("\rhubsim: devices ready {done}/{n}");
        }
    })
    .await
    .map_err(|e| format!("provision devices in {}: {e:#}", dir.display()))?;
    if tty {
        eprintln!();
    }
    let addr = mqtt_addr(args, &socket).await?;
    let vendor_key = match &args.vendor_pub {
        Some(path) => ota::public_from_pem(&read_text(path)?)
            .map_err(|e| format!("{}: {e}", path.display()))?,
        None => VendorKey::hubsim().public_key(),
    };
    let cfg = FleetConfig {
        rate: args.rate,
        backoff_base: args.backoff_base,
        backoff_cap: args.backoff_cap,
        start_spread: args.start_spread,
        vendor_key,
        ota_fault_corrupt: args.ota_corrupt,
        ..FleetConfig::default()
    };
    eprintln!(
        "hubsim: {} devices from {} against {addr}",
        devices.len(),
        dir.display()
    );
    Ok(Running {
        fleet: Fleet::start(devices, addr, cfg),
        addr,
        kinds: args.kinds.clone(),
        dir,
    })
}

/// The MQTT address: `--host`/`--port`, the rest from the hub's `Status`.
/// An unspecified listen address (0.0.0.0, ::) is reached on loopback.
async fn mqtt_addr(args: &FleetArgs, socket: &Path) -> Result<SocketAddr, String> {
    let from_status = if args.host.is_none() || args.port.is_none() {
        let mut admin = hub_proto::admin_client(socket)
            .await
            .map_err(|e| format!("cannot reach hubd at {}: {e}", socket.display()))?;
        let status = admin
            .status(pb::StatusRequest {})
            .await
            .map_err(|e| format!("status: {}", e.message()))?
            .into_inner();
        let listen: SocketAddr = status
            .mqtt_listen
            .parse()
            .map_err(|e| format!("the hub's mqtt_listen {:?}: {e}", status.mqtt_listen))?;
        Some(listen)
    } else {
        None
    };
    let port = match (args.port, from_status) {
        (Some(port), _) => port,
        (None, Some(listen)) => listen.port(),
        (None, None) => unreachable!("the status is read when --port is missing"),
    };
    let ip = match (&args.host, from_status) {
        (Some(host), _) => match host.parse::<IpAddr>() {
            Ok(ip) => ip,
            // A name: resolved once here; the devices only ever see the address.
            Err(_) => tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| format!("{host}: {e}"))?
                .next()
                .ok_or_else(|| format!("{host}: no address"))?
                .ip(),
        },
        (None, Some(listen)) if listen.ip().is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        (None, Some(listen)) => listen.ip(),
        (None, None) => unreachable!("the status is read when --host is missing"),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => Some(term),
        Err(e) => {
            eprintln!("hubsim: cannot watch SIGTERM ({e}); Ctrl-C still stops");
            None
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        Some(_) = async {
            match &mut term {
                Some(term) => term.recv().await,
                None => std::future::pending().await,
            }
        } => {}
    }
}

fn kinds_summary(fleet: &Fleet, kinds: &[Kind]) -> String {
    let devices = fleet.devices();
    kinds
        .iter()
        .map(|k| format!("{} {k}", devices.iter().filter(|(_, d)| d == k).count()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn peak(histogram: &[u64]) -> u64 {
    histogram.iter().copied().max().unwrap_or(0)
}

/// Prints one `name  value` row of a summary table.
fn row(name: &str, value: impl std::fmt::Display) {
    println!("  {name:<28} {value}");
}

async fn run_fleet(args: RunArgs) -> Result<(), String> {
    let Running {
        fleet,
        addr,
        kinds,
        dir: running_dir,
    } = start_fleet(&args.fleet).await?;
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let until = args.duration.map(|d| tokio::time::Instant::now() + d);
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut last = (Instant::now(), fleet.stats());
    let mut peak_connected = 0;
    loop {
        tokio::select! {
            () = &mut stop => break,
            () = async {
                match until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => break,
            _ = ticker.tick() => {
                let now = (Instant::now(), fleet.stats());
                let messages = (now.1.published + now.1.received)
                    .saturating_sub(last.1.published + last.1.received);
                let rate = messages as f64 / (now.0 - last.0).as_secs_f64().max(1e-3);
                peak_connected = peak_connected.max(now.1.connected);
                let line = format!(
                    "connected {}/{}  msgs/s {rate:.1}  reconnects {}  busy {}",
                    now.1.connected, now.1.devices, now.1.reconnects, now.1.busy
                );
                if tty {
                    // Overwrites the line in place; the padding clears a longer one.
                    eprint!("\r{line:<60}");
                    let _ = std::io::stderr().flush();
                } else {
                    eprintln!("{line}");
                }
                last = now;
            }
        }
    }
    if tty {
        eprintln!();
    }
    let at_stop = fleet.stats();
    peak_connected = peak_connected.max(at_stop.connected);
    let elapsed = started.elapsed();
    let histogram = fleet.attempt_histogram(started, Duration::from_secs(1));
    let kinds = kinds_summary(&fleet, &kinds);
    let forgotten = fleet.forgotten();
    fleet.stop().await;
    if !forgotten.is_empty() {
        // They obeyed a reset (a hub wipe, or removal): their credentials go.
        let deleted = sim::forget_identities(&running_dir, &forgotten).map_err(|e| {
            format!(
                "forget the reset devices in {}: {e:#}",
                running_dir.display()
            )
        })?;
        eprintln!("hubsim: {deleted} devices obeyed a reset and forgot their credentials");
    }
    println!(
        "hubsim run: {} devices ({kinds}) for {:.1} s against {addr}",
        at_stop.devices,
        elapsed.as_secs_f64()
    );
    print_stats(&at_stop, peak_connected, elapsed, peak(&histogram));
    Ok(())
}

fn print_stats(s: &FleetStats, peak_connected: usize, elapsed: Duration, peak_attempts: u64) {
    let secs = elapsed.as_secs_f64().max(1e-3);
    row(
        "connected at exit",
        format!("{}/{}", s.connected, s.devices),
    );
    row(
        "connected (peak)",
        format!("{peak_connected}/{}", s.devices),
    );
    row("connects", s.connects);
    row("reconnects", s.reconnects);
    row("connection attempts", s.attempts);
    row("failed attempts", s.failures);
    row("busy refusals", s.busy);
    row("peak attempts/s", peak_attempts);
    row("sessions ended", s.disconnects);
    row("messages published", s.published);
    row("messages received", s.received);
    row("commands obeyed", s.commands);
    row(
        "published msgs/s",
        format!("{:.1}", s.published as f64 / secs),
    );
    row("devices that gave up", s.gave_up);
    row("devices reset (credentials forgotten)", s.forgot);
    row("firmware updates installed", s.updates_installed);
    row("firmware updates refused", s.updates_refused);
}

async fn run_outage(args: OutageArgs) -> Result<(), String> {
    let Running {
        fleet, addr, kinds, ..
    } = start_fleet(&args.fleet).await?;
    let n = fleet.len();
    eprintln!("hubsim: waiting for all {n} devices to connect");
    fleet
        .wait_connected(n, args.timeout)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let before = fleet.stats();

    eprintln!("hubsim: network down for {:.1} s", args.down.as_secs_f64());
    let down_at = Instant::now();
    fleet.set_network(false);
    fleet
        .wait_until("every session dropped", args.timeout, |f| {
            f.stats().connected == 0
        })
        .await
        .map_err(|e| format!("{e:#}"))?;
    // The outage itself is the scenario's length, not a wait for a condition.
    tokio::time::sleep(args.down.saturating_sub(down_at.elapsed())).await;
    let during = fleet.stats();

    eprintln!("hubsim: network back; waiting for every device");
    let up_at = Instant::now();
    fleet.set_network(true);
    let back = fleet
        .wait_until("every device back", args.timeout, |f| {
            f.connected_since(up_at) == n
        })
        .await;
    let after = fleet.stats();
    let back_at = fleet.last_connected_at();
    let histogram = fleet.attempt_histogram(up_at, Duration::from_secs(1));
    let kinds = kinds_summary(&fleet, &kinds);
    let back_count = fleet.connected_since(up_at);
    fleet.stop().await;

    println!(
        "hubsim outage: {n} devices ({kinds}) against {addr}, network down {:.1} s, \
         backoff base {:?} cap {:?}",
        args.down.as_secs_f64(),
        args.fleet.backoff_base,
        args.fleet.backoff_cap
    );
    row("sessions dropped", during.disconnects - before.disconnects);
    row(
        "attempts blocked while down",
        during.blocked - before.blocked,
    );
    match (&back, back_at) {
        (Ok(()), Some(at)) => row(
            "100% back after",
            format!(
                "{:.1} s after the network returned",
                (at - up_at).as_secs_f64()
            ),
        ),
        _ => row(
            "100% back after",
            format!("NOT within {:?}: {back_count}/{n} back", args.timeout),
        ),
    }
    row("attempts after return", after.attempts - during.attempts);
    row(
        "failed attempts after return",
        after.failures - during.failures,
    );
    row("busy refusals after return", after.busy - during.busy);
    row("peak attempts/s after return", peak(&histogram));
    row("attempts per second", format!("{histogram:?}"));
    row("devices that gave up", after.gave_up);
    back.map_err(|e| format!("{e:#}"))
}

fn run_firmware(command: FirmwareCommand) -> Result<(), String> {
    match command {
        FirmwareCommand::Keygen { out } => {
            let (key, public) = firmware_keygen(&out)?;
            println!("{}", key.display());
            println!("{}", public.display());
        }
        FirmwareCommand::Image {
            model,
            version,
            out,
        } => println!("{}", firmware_image(&model, &version, &out)?),
        FirmwareCommand::Sign {
            signer: Signer { key, .. },
            model,
            version,
            image,
            out,
        } => println!(
            "{}",
            firmware_sign(key.as_deref(), &model, &version, &image, &out)?
        ),
        FirmwareCommand::Pubkey { key } => {
            let key = match key {
                Some(path) => read_private_key(&path)?,
                None => VendorKey::hubsim(),
            };
            print!("{}", key.public_pem());
        }
    }
    Ok(())
}

/// Reads a text file, naming it in the error.
fn read_text(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// Reads a maker's private key (PKCS#8 PEM), naming the file in the error.
fn read_private_key(path: &Path) -> Result<VendorKey, String> {
    VendorKey::from_seed_pem(&read_text(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

fn check_model_version(model: &str, version: &str) -> Result<(), String> {
    if !ota::valid_model(model) {
        return Err(format!(
            "--model {model:?}: expected 1-64 printable ASCII characters without /"
        ));
    }
    if !ota::valid_version(version) {
        return Err(format!(
            "--version {version:?}: expected 1-32 of A-Z a-z 0-9 . - + _"
        ));
    }
    Ok(())
}

/// Writes `contents` to a new file `path` with `mode`; never replaces one.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                format!("{}: already exists; not overwriting a key", path.display())
            }
            _ => format!("{}: cannot create: {e}", path.display()),
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: cannot write: {e}", path.display()))
}

/// `hubsim firmware keygen`: the paths of the private and public key.
fn firmware_keygen(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
    let (private, public) = (dir.join("vendor.key"), dir.join("vendor.pub"));
    for path in [&private, &public] {
        if path.exists() {
            return Err(format!(
                "{}: already exists; not overwriting a key",
                path.display()
            ));
        }
    }
    let key = VendorKey::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    write_new(&private, key.seed_pem().as_bytes(), 0o600)?;
    write_new(&public, key.public_pem().as_bytes(), 0o644)?;
    Ok((private, public))
}

/// `hubsim firmware image`: the image's SHA-256.
fn firmware_image(model: &str, version: &str, out: &Path) -> Result<String, String> {
    check_model_version(model, version)?;
    let image = ota::simulated_image(model, version);
    std::fs::write(out, &image).map_err(|e| format!("{}: cannot write: {e}", out.display()))?;
    Ok(ota::sha256_hex(&image))
}

/// `hubsim firmware sign`: the image's SHA-256. `key` is the private key
/// file; `None` signs with the simulated maker's key.
fn firmware_sign(
    key: Option<&Path>,
    model: &str,
    version: &str,
    image: &Path,
    out: &Path,
) -> Result<String, String> {
    check_model_version(model, version)?;
    let key = match key {
        Some(path) => read_private_key(path)?,
        None => VendorKey::hubsim(),
    };
    let bytes =
        std::fs::read(image).map_err(|e| format!("{}: cannot read: {e}", image.display()))?;
    if bytes.is_empty() || bytes.len() as u64 > ota::MAX_IMAGE_SIZE {
        return Err(format!(
            "{}: {} bytes; an offered image is 1 to {} bytes",
            image.display(),
            bytes.len(),
            ota::MAX_IMAGE_SIZE
        ));
    }
    let signature = ota::base64_encode(&key.sign(model, version, &bytes));
    std::fs::write(out, format!("{signature}\n"))
        .map_err(|e| format!("{}: cannot write: {e}", out.display()))?;
    Ok(ota::sha256_hex(&bytes))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn keygen_image_and_sign_make_what_a_device_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let (private, public) = firmware_keygen(&keys).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = firmware_keygen(&keys).unwrap_err();
        assert!(err.contains("vendor.key: already exists"), "{err}");

        let image = dir.path().join("fw.bin");
        let sha = firmware_image("HS-SW10", "1.9.0", &image).unwrap();
        let bytes = std::fs::read(&image).unwrap();
        assert_eq!(sha, ota::sha256_hex(&bytes));
        let sig = dir.path().join("fw.sig");
        let signed = firmware_sign(Some(&private), "HS-SW10", "1.9.0", &image, &sig).unwrap();
        assert_eq!(signed, sha);
        let text = std::fs::read_to_string(&sig).unwrap();
        assert_eq!(text.len(), 89, "88 characters and a newline: {text:?}");
        let signature = ota::base64_decode(text.trim_end()).unwrap();
        let trusted = ota::public_from_pem(&std::fs::read_to_string(&public).unwrap()).unwrap();
        assert!(ota::verify(&trusted, "HS-SW10", "1.9.0", &sha, &signature));

        firmware_sign(None, "HS-SW10", "1.9.0", &image, &sig).unwrap();
        let signature =
            ota::base64_decode(std::fs::read_to_string(&sig).unwrap().trim_end()).unwrap();
        let hubsim = VendorKey::hubsim().public_key();
        assert!(ota::verify(&hubsim, "HS-SW10", "1.9.0", &sha, &signature));
    }

    #[test]
    fn errors_name_the_file_and_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fw.bin");
        firmware_image("HS-SW10", "1.9.0", &image).unwrap();
        let sig = dir.path().join("fw.sig");
        let sign = |key: &Path| firmware_sign(Some(key), "HS-SW10", "1.9.0", &image, &sig);

        let missing = dir.path().join("missing.key");
        let err = sign(&missing).unwrap_err();
        assert!(
            err.starts_with(&format!("{}: cannot read", missing.display())),
            "{err}"
        );
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let err = sign(&not_pem).unwrap_err();
        assert!(err.contains("not.pem: not a PEM"), "{err}");
        let public = dir.path().join("vendor.pub");
        std::fs::write(&public, VendorKey::hubsim().public_pem()).unwrap();
        let err = sign(&public).unwrap_err();
        assert!(err.contains("vendor.pub: wrong key type"), "{err}");
        let missing_image = dir.path().join("nope.bin");
        let err = firmware_sign(None, "HS-SW10", "1.9.0", &missing_image, &sig).unwrap_err();
        assert!(err.contains("nope.bin: cannot read"), "{err}");
        let err = firmware_image("HS/SW10", "1.9.0", &image).unwrap_err();
        assert!(err.contains("--model"), "{err}");
        let err = firmware_image("HS-SW10", "1.9 beta", &image).unwrap_err();
        assert!(err.contains("--version"), "{err}");
    }
}
