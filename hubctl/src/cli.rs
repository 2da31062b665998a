//! The command line: clap definitions and the resolution of the admin socket path.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::builder::TypedValueParser;
use clap::parser::ValueSource;
use clap::{ArgGroup, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

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
    /// List, inspect, enroll, rename, remove and grant rights to devices.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Open a pairing window and print its setup code (or list and cancel
    /// windows, or enrol a device that cannot make its own key with --bundle).
    Pair(PairArgs),
    /// Cut a device off from commands; it can still report its state.
    Isolate {
        id: DeviceId,
        /// Why, shown in `devices list` and in the device's isolation notice.
        #[arg(long, value_name = "TEXT", value_parser = clap::builder::NonEmptyStringValueParser::new())]
        reason: String,
    },
    /// Let commands reach an isolated device again.
    Release { id: DeviceId },
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
    /// Manage automation rules: apply a rules file, list, show, enable,
    /// disable, remove, dry-run and see recent runs.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Show what personal data the hub holds, where, why and for how long.
    Privacy {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write all the personal data the hub holds to FILE as JSON (mode 0600).
    Export {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
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
    /// Show the product, version, support end date, security contact, and
    /// where the security policy and privacy notice are. Needs no running hub.
    About {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Erase everything the hub holds and its CA, for a new owner, and save
    /// the receipt the new CA signs; or check a saved receipt (`wipe verify`).
    Wipe(WipeArgs),
    /// Manage the signed firmware catalogue and offer updates to devices.
    Firmware {
        #[command(subcommand)]
        command: FirmwareCommand,
    },
    /// Show the security log (pairing, refused connections, isolation,
    /// firmware, admin changes, anomalies), or verify its hash chain.
    Events(EventsArgs),
    /// Audit the running hub and its files against the UK Code of Practice
    /// for consumer IoT security and ETSI EN 303 645: one line per check,
    /// with a fix for each problem; exits 1 if any check fails.
    Audit {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `events`: list (and follow) security events, or `events verify`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct EventsArgs {
    #[command(subcommand)]
    pub(crate) action: Option<EventsAction>,
    /// Keep running and print new events as they happen.
    #[arg(long)]
    pub(crate) follow: bool,
    /// Only this device's events.
    #[arg(long, value_name = "ID")]
    pub(crate) device: Option<DeviceId>,
    /// The most recent N events [default: 100].
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) limit: u32,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum EventsAction {
    /// Walk the security log's hash chain and report the first broken
    /// link; exits 1 if there is one.
    Verify {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum FirmwareCommand {
    /// Trust a vendor's Ed25519 public key for one model (PEM PUBLIC KEY,
    /// as `openssl pkey -pubout` writes, or the 32 bytes raw, hex or base64).
    TrustKey {
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        model: String,
        /// The public key file.
        #[arg(value_name = "KEYFILE")]
        key: PathBuf,
    },
    /// Add a signed image to the catalogue. The hub checks the Ed25519
    /// signature over (model, version, image SHA-256) with the vendor key,
    /// which must be trusted for the model; otherwise nothing is stored.
    Add {
        /// The firmware image file.
        #[arg(value_name = "IMAGE")]
        image: PathBuf,
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        model: String,
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        version: String,
        /// The signature file: 64 bytes raw, base64 or hex.
        #[arg(long, value_name = "SIGFILE")]
        signature: PathBuf,
        /// The vendor's public key file that made the signature.
        #[arg(long, value_name = "KEYFILE")]
        vendor_key: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the catalogue and the trusted vendor keys.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Offer a device an update over its own connection: VERSION, or the
    /// newest the catalogue has for its model. The device verifies and
    /// installs it, or refuses it; `devices show` and `events` say which.
    Push {
        id: DeviceId,
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        version: Option<String>,
        /// Offer it even if it is not newer than what the device runs
        /// (devices with anti-rollback refuse it anyway).
        #[arg(long)]
        force: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `wipe`: the wipe itself, or with a subcommand, something about wipes that
/// needs no hub.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct WipeArgs {
    #[command(subcommand)]
    pub(crate) action: Option<WipeAction>,
    /// Do not ask for the hub's name before wiping.
    #[arg(long)]
    pub(crate) yes: bool,
    /// Save the signed receipt to FILE (not on the hub's own state dir: it
    /// is wiped). The receipt is printed either way.
    #[arg(long, value_name = "FILE")]
    pub(crate) receipt: Option<PathBuf>,
    /// How long hubd waits for devices to acknowledge the reset, e.g. 10s
    /// or 1m [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) timeout: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum WipeAction {
    /// Check a saved wipe receipt offline: that it is unchanged and signed by
    /// the new CA it names. Needs no hub.
    Verify {
        /// The receipt file ("-" for standard input).
        receipt: PathBuf,
        /// Print the receipt as JSON instead of text.
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
    /// Give a device a new name.
    Rename {
        id: DeviceId,
        /// The new name, 1 to 64 characters.
        name: String,
    },
    /// Revoke a device, close its session and delete its records.
    Remove {
        id: DeviceId,
        /// First send the device a reset command and report whether it acknowledged.
        #[arg(long)]
        reset: bool,
        /// How long to wait for the acknowledgement, e.g. 10s or 1m [default: hubd's, 5s].
        #[arg(long, value_name = "DURATION", requires = "reset", value_parser = parse_duration)]
        timeout: Option<u32>,
    },
    /// Add topic filters to an integration's grants.
    #[command(group(ArgGroup::new("filters").required(true).multiple(true).args(["allow_pub", "allow_sub"])))]
    Grant {
        id: DeviceId,
        #[command(flatten)]
        grants: GrantArgs,
    },
    /// Set the date a device's support ends (YYYY-MM-DD), overriding what
    /// the device reports; --clear goes back to the device's own date.
    #[command(group(ArgGroup::new("when").required(true).args(["date", "clear"])))]
    SetSupport {
        id: DeviceId,
        /// The last day of support, such as 2030-12-31.
        date: Option<String>,
        /// Forget the owner's date.
        #[arg(long)]
        clear: bool,
    },
    /// Remove topic filters from an integration's grants.
    #[command(group(ArgGroup::new("filters").required(true).multiple(true).args(["allow_pub", "allow_sub"])))]
    RevokeGrant {
        id: DeviceId,
        #[command(flatten)]
        grants: GrantArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum RulesCommand {
    /// Check FILE and make it the whole rule set: all of it or, on any
    /// problem, none of it. Prints the rules added, changed and removed.
    Apply {
        /// A TOML rules file ("-" for standard input).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the rules with their trigger and last run.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one rule: its counters and its stored TOML.
    Show {
        #[arg(value_parser = parse_rule_name)]
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Let rules run again.
    Enable {
        #[arg(required = true, value_parser = parse_rule_name)]
        names: Vec<String>,
    },
    /// Keep rules stored but stop them from running.
    Disable {
        #[arg(required = true, value_parser = parse_rule_name)]
        names: Vec<String>,
    },
    /// Delete rules.
    Remove {
        #[arg(required = true, value_parser = parse_rule_name)]
        names: Vec<String>,
    },
    /// Dry run: which rules in FILE the events would trigger, and what they
    /// would do, against the hub's current device states. Sends nothing.
    Test {
        /// A TOML rules file ("-" for standard input).
        file: PathBuf,
        /// An event, in order (repeatable): d/ID/state=JSON,
        /// d/ID/event/NAME=JSON, online:ID, offline:ID, start, or time:WHEN
        /// (2026-11-23T07:30 local, or RFC 3339).
        #[arg(long = "event", value_name = "EVENT", required = true)]
        events: Vec<String>,
        /// When the events happen, for time conditions [default: now].
        #[arg(long, value_name = "WHEN")]
        at: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Recent rule runs, newest first, with what each action did.
    History {
        /// Only this rule's runs.
        #[arg(value_parser = parse_rule_name)]
        rule: Option<String>,
        /// How many runs to show.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A rule name as typed: 1 to 64 characters, no control characters.
fn parse_rule_name(s: &str) -> Result<String, &'static str> {
    if s.trim().is_empty() {
        Err("a rule name cannot be empty")
    } else if s.chars().count() > 64 {
        Err("a rule name has at most 64 characters")
    } else if s.chars().any(char::is_control) {
        Err("a rule name has no control characters")
    } else {
        Ok(s.to_owned())
    }
}

/// MQTT topic filters an integration may publish or subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
pub(crate) struct GrantArgs {
    /// A topic filter the integration may publish to, e.g. d/+/cmd/# (repeatable).
    #[arg(long = "allow-pub", value_name = "FILTER", value_parser = parse_filter)]
    pub(crate) allow_pub: Vec<String>,
    /// A topic filter the integration may subscribe to, e.g. d/+/state (repeatable).
    #[arg(long = "allow-sub", value_name = "FILTER", value_parser = parse_filter)]
    pub(crate) allow_sub: Vec<String>,
}

impl GrantArgs {
    pub(crate) fn is_empty(&self) -> bool {
        self.allow_pub.is_empty() && self.allow_sub.is_empty()
    }
}

/// The `pair` options that only go with --name.
const NAME_ONLY: [&str; 6] = [
    "role",
    "window",
    "allow_pub",
    "allow_sub",
    "bundle",
    "force",
];

/// `pair`: exactly one of --name (open a window, or enrol with --bundle),
/// --list and --cancel.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("mode").required(true).args(["name", "list", "cancel"])))]
pub(crate) struct PairArgs {
    /// Open a pairing window for a device to be called NAME (1 to 64 characters).
    #[arg(long)]
    pub(crate) name: Option<String>,
    // clap lets an arg `requires` a member of a group whose other member is
    // present, so the options of --name are refused here explicitly.
    /// List the open pairing windows.
    #[arg(long, conflicts_with_all = NAME_ONLY)]
    pub(crate) list: bool,
    /// Close a pairing window before it is used or expires.
    #[arg(long, value_name = "CLAIM_ID", conflicts_with_all = NAME_ONLY)]
    pub(crate) cancel: Option<ClaimId>,
    /// What pairs: a device (its own topics only) or an integration (the
    /// topics granted with --allow-pub and --allow-sub).
    #[arg(long, value_enum, requires = "name")]
    pub(crate) role: Option<RoleArg>,
    /// How long the window stays open, e.g. 90s, 5m or 1h [default: hubd's, 5m].
    #[arg(long, value_name = "DURATION", requires = "name", conflicts_with = "bundle", value_parser = parse_duration)]
    pub(crate) window: Option<u32>,
    #[command(flatten)]
    pub(crate) grants: GrantArgs,
    /// Instead of opening a window, have hubd make the device's key and
    /// certificate and write key.pem, cert.pem and ca.pem to DIR (mode 0600).
    /// Only for devices that cannot make their own key: the key travels.
    #[arg(long, value_name = "DIR", requires = "name")]
    pub(crate) bundle: Option<PathBuf>,
    /// With --bundle: replace key.pem, cert.pem and ca.pem if they exist.
    #[arg(long, requires = "bundle")]
    pub(crate) force: bool,
    /// Print JSON instead of text.
    #[arg(long, conflicts_with_all = ["bundle", "cancel"])]
    pub(crate) json: bool,
}

/// What `pair` was asked to do, once clap has checked the combination.
#[derive(Debug)]
pub(crate) enum PairMode {
    Open {
        name: String,
        role: RoleArg,
        window_seconds: u32,
        grants: GrantArgs,
        json: bool,
    },
    Bundle {
        name: String,
        role: RoleArg,
        grants: GrantArgs,
        dir: PathBuf,
        force: bool,
    },
    List {
        json: bool,
    },
    Cancel {
        claim: ClaimId,
    },
}

impl PairArgs {
    /// The mode; the `mode` group guarantees that exactly one was chosen.
    pub(crate) fn into_mode(self) -> PairMode {
        let role = self.role.unwrap_or(RoleArg::Device);
        match (self.name, self.cancel) {
            (Some(name), _) => match self.bundle {
                Some(dir) => PairMode::Bundle {
                    name,
                    role,
                    grants: self.grants,
                    dir,
                    force: self.force,
                },
                None => PairMode::Open {
                    name,
                    role,
                    window_seconds: self.window.unwrap_or(0),
                    grants: self.grants,
                    json: self.json,
                },
            },
            (None, Some(claim)) => PairMode::Cancel { claim },
            (None, None) => PairMode::List { json: self.json },
        }
    }
}

/// The role of a device being paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RoleArg {
    /// A device: its own d/<id>/ topics only.
    Device,
    /// Home Assistant, Node-RED and the like: the topic filters it was granted.
    Integration,
}

/// A duration as typed by the user: `90`, `90s`, `5m`, `1h`, `1h30m`; whole
/// seconds, more than zero.
pub(crate) fn parse_duration(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a duration like 90s, 5m or 1h");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let (number, tail) = rest.split_at(digits);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let mut chars = tail.chars();
        let (unit, tail) = match chars.next() {
            None => (1, ""),
            Some('s') => (1, chars.as_str()),
            Some('m') => (60, chars.as_str()),
            Some('h') => (3_600, chars.as_str()),
            Some(_) => return Err(bad()),
        };
        total = number
            .checked_mul(unit)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(bad)?;
        rest = tail;
    }
    if total == 0 {
        return Err("a duration must be longer than 0s".to_owned());
    }
    u32::try_from(total).map_err(|_| format!("{s:?} is too long"))
}

/// An MQTT topic filter as typed by the user: non-empty, no control characters.
/// hubd checks the rest (wildcard placement, what it allows).
fn parse_filter(s: &str) -> Result<String, &'static str> {
    if s.is_empty() {
        Err("a topic filter cannot be empty")
    } else if s.chars().any(char::is_control) {
        Err("a topic filter has no control characters")
    } else {
        Ok(s.to_owned())
    }
}

/// An id as typed by the user (`$what` in messages): non-empty, no
/// whitespace or control characters. One macro, so device and claim ids
/// cannot drift apart.
macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub(crate) struct $name(String);

        impl $name {
            pub(crate) fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = &'static str;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                if s.is_empty() {
                    Err(concat!("a ", $what, " cannot be empty"))
                } else if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    Err(concat!("a ", $what, " has no spaces or control characters"))
                } else {
                    Ok(Self(s.to_owned()))
                }
            }
        }
    };
}

typed_id!(
    /// A device id as typed by the user.
    DeviceId,
    "device id"
);
typed_id!(
    /// A pairing window's claim id as typed by the user.
    ClaimId,
    "claim id"
);

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
    if let Command::Pair(pair) = &cli.command
        && !pair.grants.is_empty()
        && pair.role != Some(RoleArg::Integration)
    {
        // The error names `pair`'s usage, as clap's own errors for it do.
        let mut pair_cmd = cmd.find_subcommand("pair").cloned().unwrap_or_default();
        return Err(pair_cmd.error(
            clap::error::ErrorKind::ArgumentConflict,
            "--allow-pub and --allow-sub need --role integration: a device has only its own topics",
        ));
    }
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
    fn durations() {
        for (text, secs) in [
            ("90", 90),
            ("90s", 90),
            ("5m", 300),
            ("1h", 3_600),
            ("1h30m", 5_400),
            ("2m5s", 125),
        ] {
            assert_eq!(parse_duration(text), Ok(secs), "{text}");
        }
        for text in [
            "",
            "0",
            "0s",
            "m",
            "5x",
            "1.5m",
            "-5m",
            "5 m",
            "99999999999999999999s",
            "1193047h",
        ] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
    }

    #[test]
    fn pair_modes() {
        let mode = |args: &[&str]| match parse_with(args, &[]).expect("parses").command {
            Command::Pair(pair) => pair.into_mode(),
            other => panic!("not pair: {other:?}"),
        };
        assert!(matches!(
            mode(&["hubctl", "pair", "--name", "x"]),
            PairMode::Open { role: RoleArg::Device, window_seconds: 0, json: false, ref grants, .. }
                if grants.is_empty()
        ));
        match mode(&[
            "hubctl",
            "pair",
            "--name",
            "ha",
            "--role",
            "integration",
            "--window",
            "2m",
            "--allow-sub",
            "d/+/state",
            "--allow-pub",
            "a/b",
            "--allow-sub",
            "x/#",
            "--json",
        ]) {
            PairMode::Open {
                name,
                role,
                window_seconds,
                grants,
                json,
            } => {
                assert_eq!(
                    (name.as_str(), role, window_seconds, json),
                    ("ha", RoleArg::Integration, 120, true)
                );
                assert_eq!(grants.allow_pub, ["a/b"]);
                assert_eq!(grants.allow_sub, ["d/+/state", "x/#"]);
            }
            other => panic!("not open: {other:?}"),
        }
        assert!(matches!(
            mode(&["hubctl", "pair", "--name", "x", "--bundle", "/b", "--force"]),
            PairMode::Bundle { force: true, ref dir, .. } if dir == Path::new("/b")
        ));
        assert!(matches!(
            mode(&["hubctl", "pair", "--list", "--json"]),
            PairMode::List { json: true }
        ));
        assert!(matches!(
            mode(&["hubctl", "pair", "--cancel", "c1"]),
            PairMode::Cancel { ref claim } if claim.as_str() == "c1"
        ));

        use clap::error::ErrorKind;
        for (args, kind) in [
            (&["hubctl", "pair"][..], ErrorKind::MissingRequiredArgument),
            (
                &["hubctl", "pair", "--name", "x", "--list"],
                ErrorKind::ArgumentConflict,
            ),
            (
                &["hubctl", "pair", "--list", "--cancel", "c"],
                ErrorKind::ArgumentConflict,
            ),
            (
                &["hubctl", "pair", "--list", "--role", "device"],
                ErrorKind::ArgumentConflict,
            ),
            (
                &["hubctl", "pair", "--list", "--window", "5m"],
                ErrorKind::ArgumentConflict,
            ),
            (
                &["hubctl", "pair", "--cancel", "c", "--bundle", "d"],
                ErrorKind::ArgumentConflict,
            ),
            (
                &["hubctl", "pair", "--cancel", "c", "--allow-pub", "a"],
                ErrorKind::ArgumentConflict,
            ),
            (
                &["hubctl", "pair", "--role", "device"],
                ErrorKind::MissingRequiredArgument,
            ),
            (
                &["hubctl", "pair", "--cancel", "c", "--json"],
                ErrorKind::ArgumentConflict,
            ),
            (
                &["hubctl", "pair", "--name", "x", "--bundle", "d", "--json"],
                ErrorKind::ArgumentConflict,
            ),
            (
                &[
                    "hubctl", "pair", "--name", "x", "--bundle", "d", "--window", "5m",
                ],
                ErrorKind::ArgumentConflict,
            ),
            (
                &["hubctl", "pair", "--name", "x", "--force"],
                ErrorKind::MissingRequiredArgument,
            ),
            (
                &["hubctl", "pair", "--name", "x", "--window", "0"],
                ErrorKind::ValueValidation,
            ),
            (
                &["hubctl", "pair", "--name", "x", "--role", "admin"],
                ErrorKind::InvalidValue,
            ),
            (
                &["hubctl", "pair", "--name", "x", "--allow-pub", "a"],
                ErrorKind::ArgumentConflict,
            ),
            (
                &[
                    "hubctl",
                    "pair",
                    "--name",
                    "x",
                    "--role",
                    "device",
                    "--allow-sub",
                    "a",
                ],
                ErrorKind::ArgumentConflict,
            ),
            (
                &[
                    "hubctl",
                    "pair",
                    "--name",
                    "x",
                    "--role",
                    "integration",
                    "--allow-sub",
                    "",
                ],
                ErrorKind::ValueValidation,
            ),
            (
                &["hubctl", "pair", "--cancel", "a b"],
                ErrorKind::ValueValidation,
            ),
        ] {
            let e = parse_with(args, &[]).expect_err(&format!("{args:?}"));
            assert_eq!(e.kind(), kind, "{args:?}");
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn device_commands_check_their_arguments() {
        use clap::error::ErrorKind;
        for (args, kind) in [
            (
                &["hubctl", "isolate", "x"][..],
                ErrorKind::MissingRequiredArgument,
            ),
            (
                &["hubctl", "isolate", "x", "--reason", ""],
                ErrorKind::InvalidValue,
            ),
            (&["hubctl", "release"], ErrorKind::MissingRequiredArgument),
            (
                &["hubctl", "devices", "grant", "x"],
                ErrorKind::MissingRequiredArgument,
            ),
            (
                &["hubctl", "devices", "revoke-grant", "x"],
                ErrorKind::MissingRequiredArgument,
            ),
            (
                &["hubctl", "devices", "remove", "x", "--timeout", "5s"],
                ErrorKind::MissingRequiredArgument,
            ),
            (
                &["hubctl", "devices", "rename", "x"],
                ErrorKind::MissingRequiredArgument,
            ),
        ] {
            let e = parse_with(args, &[]).expect_err(&format!("{args:?}"));
            assert_eq!(e.kind(), kind, "{args:?}");
        }
        let inv = parse_with(
            &[
                "hubctl",
                "devices",
                "remove",
                "x",
                "--reset",
                "--timeout",
                "1m",
            ],
            &[],
        )
        .expect("parses");
        assert!(matches!(
            inv.command,
            Command::Devices {
                command: DevicesCommand::Remove {
                    reset: true,
                    timeout: Some(60),
                    ..
                }
            }
        ));
        let inv = parse_with(
            &[
                "hubctl",
                "devices",
                "grant",
                "x",
                "--allow-sub",
                "d/+/state",
            ],
            &[],
        )
        .expect("parses");
        assert!(matches!(
            inv.command,
            Command::Devices { command: DevicesCommand::Grant { ref grants, .. } }
                if grants.allow_sub == ["d/+/state"] && grants.allow_pub.is_empty()
        ));
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
