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

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hub_tests::DeviceEvent;
use hub_tests::pair::{self, PairError};

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

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pair(args) => run_pair(args).await,
        Command::Connect(args) => run_connect(args).await,
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
