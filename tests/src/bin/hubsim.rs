//! `hubsim`: a simulated device for developers and tests.
//!
//! `hubsim pair --uri URI --code CODE --out DIR` does the device half of
//! pairing ([`hub_tests::pair`]): it makes its own P-256 key and CSR, pins
//! the hub CA by the URI's fingerprint, proves the code and writes key.pem
//! (0600), cert.pem, ca.pem and device.json into DIR. It prints the device
//! id on stdout. On failure it prints `hubsim: <reason>` on stderr and exits
//! 1; a refusal reads `hubsim: pairing refused: <message> (<error code>)`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
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
