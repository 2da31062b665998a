//! The command line: clap definitions and the resolution of the admin socket path.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::builder::TypedValueParser;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::socket;

/// Administer a hubd smart-home hub over its local admin socket.
#[derive(Debug, Parser)]
#[command(name = "hubctl", bin_name = "hubctl", version)]
pub(crate) struct Cli {
    /// The hubd admin socket [default: $RUNTIME_DIRECTORY/hubd.sock, /run/hubd/hubd.sock,
    /// $XDG_RUNTIME_DIR/hubd/hubd.sock or ~/.local/share/hubd/hubd.sock]
    #[arg(
        long,
        global = true,
        env = "HUBD_SOCKET",
        hide_env_values = true,
        value_name = "PATH",
        // Accepts empty values so that `HUBD_SOCKET=` means unset, as in
        // `parse`; an empty `--socket` is refused there.
        value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from)
    )]
    pub(crate) socket: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show hubd's version, uptime, device and message counts.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List, inspect, enroll, revoke and disconnect devices.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Publish a message as the hub itself, e.g. a command to d/<id>/cmd/on.
    Publish {
        /// The topic to publish on; it may not contain wildcards.
        topic: String,
        /// The payload, taken literally (an empty string is an empty payload).
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        payload: Option<OsString>,
        /// Read the payload from FILE instead ("-" for standard input).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Ask hubd to retain the message for later subscribers.
        #[arg(long)]
        retain: bool,
        /// Quality of service: 0 (at most once) or 1 (at least once).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1))]
        qos: u32,
    },
    /// Print the messages hubd routes on topics matching FILTER, one line each.
    Watch {
        /// An MQTT topic filter, e.g. d/+/state or '#'.
        filter: String,
        /// Exit after N messages (otherwise run until hubd ends the stream or Ctrl-C).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Print one JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DevicesCommand {
    /// List all known devices.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one device.
    Show {
        id: DeviceId,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Issue a certificate for a new device from its CSR; prints the new device's id.
    Enroll {
        /// The device's name, 1 to 64 characters.
        #[arg(long)]
        name: String,
        /// The device's PEM certificate signing request (ECDSA P-256).
        #[arg(long, value_name = "FILE")]
        csr: PathBuf,
        /// Directory to write cert.pem and ca.pem to (created with mode 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace cert.pem and ca.pem if they already exist.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a device's certificate and close its session.
    Revoke { id: DeviceId },
    /// Close a device's live session; it may reconnect.
    Disconnect { id: DeviceId },
}

/// A device id as typed by the user: non-empty, no whitespace or control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceId(String);

impl DeviceId {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DeviceId {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            Err("a device id cannot be empty")
        } else if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Err("a device id has no spaces or control characters")
        } else {
            Ok(Self(s.to_owned()))
        }
    }
}

/// A parsed command line with its socket path resolved.
#[derive(Debug)]
pub(crate) struct Invocation {
    pub(crate) socket: PathBuf,
    pub(crate) command: Command,
}

/// Parses `args` (the first is the program name).
///
/// The socket comes from `--socket`, else `$HUBD_SOCKET`, else
/// [`socket::default_path`]. clap's `env` attribute documents and reads
/// `$HUBD_SOCKET` from the process; a value clap took from the process
/// environment is looked up again in `env`, so that tests with an injected
/// environment are not affected by the one they run in. With `env` =
/// `std::env::var_os` the two agree.
pub(crate) fn parse<I, T>(
    args: I,
    env: &dyn Fn(&str) -> Option<OsString>,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Invocation, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut cmd = Cli::command();
    let matches = cmd.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
    let from_command_line = matches!(
        matches.value_source("socket"),
        Some(ValueSource::CommandLine)
    );
    let socket = if from_command_line {
        if cli
            .socket
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(cmd.error(
                clap::error::ErrorKind::InvalidValue,
                "--socket: the path cannot be empty",
            ));
        }
        cli.socket
    } else {
        env("HUBD_SOCKET")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let socket = socket.unwrap_or_else(|| socket::default_path(env, exists));
    Ok(Invocation {
        socket,
        command: cli.command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_with(args: &[&str], vars: &[(&str, &str)]) -> Result<Invocation, clap::Error> {
        let env = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        };
        parse(args, &env, &|_| false)
    }

    #[test]
    fn definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn socket_sources_in_order() {
        let env = [("HUBD_SOCKET", "/e.sock"), ("RUNTIME_DIRECTORY", "/rd")];
        let inv = parse_with(&["hubctl", "--socket", "/c.sock", "status"], &env).expect("parses");
        assert_eq!(inv.socket, Path::new("/c.sock"));
        // A global option may also follow the subcommand.
        let inv = parse_with(&["hubctl", "devices", "list", "--socket", "/c.sock"], &env)
            .expect("parses");
        assert_eq!(inv.socket, Path::new("/c.sock"));
        let inv = parse_with(&["hubctl", "status"], &env).expect("parses");
        assert_eq!(inv.socket, Path::new("/e.sock"));
        let inv = parse_with(&["hubctl", "status"], &env[1..]).expect("parses");
        assert_eq!(inv.socket, Path::new("/rd/hubd.sock"));
    }

    #[test]
    fn bad_device_ids_are_usage_errors() {
        for id in ["", "a b", "a\u{1b}b"] {
            let e = parse_with(&["hubctl", "devices", "show", id], &[]).expect_err(id);
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{id:?}");
        }
        let e = parse_with(&["hubctl", "--socket", "", "status"], &[]).expect_err("empty");
        assert_eq!(e.exit_code(), 2);
        // An empty HUBD_SOCKET is unset, not an error.
        let inv = parse_with(
            &["hubctl", "status"],
            &[("HUBD_SOCKET", ""), ("HOME", "/h")],
        )
        .expect("parses");
        assert_eq!(inv.socket, Path::new("/h/.local/share/hubd/hubd.sock"));
    }

    #[test]
    fn publish_takes_a_payload_or_a_file() {
        let inv = parse_with(&["hubctl", "publish", "t", "-", "--retain"], &[]).expect("parses");
        match inv.command {
            Command::Publish {
                topic,
                payload,
                file,
                retain,
                qos,
            } => {
                assert_eq!(qos, 0);
                assert_eq!(topic, "t");
                assert_eq!(payload, Some(OsString::from("-")));
                assert_eq!(file, None);
                assert!(retain);
            }
            other => panic!("not publish: {other:?}"),
        }
        let inv = parse_with(&["hubctl", "publish", "t", "--file", "-"], &[]).expect("parses");
        assert!(
            matches!(inv.command, Command::Publish { payload: None, file: Some(f), .. } if f == Path::new("-"))
        );
        let e = parse_with(&["hubctl", "publish", "t"], &[]).expect_err("no payload");
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let e = parse_with(&["hubctl", "publish", "t", "x", "--file", "f"], &[]).expect_err("both");
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn watch_count_is_positive() {
        let inv = parse_with(&["hubctl", "watch", "#", "--count", "2"], &[]).expect("parses");
        assert!(matches!(
            inv.command,
            Command::Watch {
                count: Some(2),
                json: false,
                ..
            }
        ));
        let e = parse_with(&["hubctl", "watch", "#", "--count", "0"], &[]).expect_err("zero");
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
    }
}
