//! `hubctl`: the command-line admin client for hubd.
//!
//! Everything lives behind [`run`] (and [`run_with_env`] for tests with an
//! injected environment), which returns the process exit code and never exits
//! the process itself: 0 ok, 1 the command failed, 2 usage error, 3 hubd could
//! not be reached. `main.rs` only passes the real arguments, streams and
//! environment.

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

mod about;
mod audit;
mod cli;
mod commands;
mod docs;
mod events;
mod lifecycle;
mod output;
mod privacy;
mod rules;
mod socket;
mod wipe;

pub use docs::write as write_docs;

/// Exit code: the command succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit code: the command failed (hubd refused it, or a local file could not be used).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: the command line is wrong.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: hubd's admin socket could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;

/// What to tell a user whom hubd's access control refused.
pub const PERMISSION_HINT: &str = "you are not allowed to administer this hub: \
                                   run as root or as a member of the hubadmin group";

/// Why a hubctl command failed. Each variant knows its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket is missing, refused the connection, or the transport failed.
    #[error("cannot reach hubd at {}: is it running?", path.display())]
    Unreachable { path: PathBuf },
    /// The socket exists but its mode or group does not let us connect.
    #[error("cannot connect to hubd at {}: permission denied", path.display())]
    SocketDenied { path: PathBuf },
    /// hubd answered the RPC with an error status.
    #[error("{what}: {}", status_text(status))]
    Rpc { what: String, status: tonic::Status },
    /// hubd did not answer in time.
    #[error("{what}: hubd did not answer within {} s", after.as_secs())]
    TimedOut { what: String, after: Duration },
    /// hubd's answer lacks a field the protocol promises.
    #[error("{what}: hubd's answer has no {field}")]
    Incomplete { what: String, field: &'static str },
    /// A local file or directory could not be read or created.
    #[error("{what}: {}: {source}", path.display())]
    File {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An output file exists and `--force` was not given.
    #[error("{what}: {}: already exists (use --force to replace it)", path.display())]
    Exists { what: String, path: PathBuf },
    /// The CSR file is not something to send to hubd.
    #[error("{what}: {}: {reason}", path.display())]
    BadCsr {
        what: String,
        path: PathBuf,
        reason: &'static str,
    },
    /// A payload file is larger than hubctl will send.
    #[error("{what}: {}: larger than {max} bytes", path.display())]
    TooLarge {
        what: String,
        path: PathBuf,
        max: u64,
    },
    /// hubd ended a watch stream before `--count` messages arrived.
    #[error("{what}: hubd ended the stream after {received} of {wanted} messages")]
    StreamEnded {
        what: String,
        received: u64,
        wanted: u64,
    },
    /// hubd enrolled the device but its certificate could not be saved.
    #[error(
        "{what}: device {id} is enrolled but its files were not written \
         (revoke it or rerun with --force): {}: {source}",
        path.display()
    )]
    NotWritten {
        what: String,
        id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Standard output could not be written.
    #[error("writing output: {0}")]
    Output(#[source] io::Error),
    /// A JSON view could not be serialized.
    #[error("writing json: {0}")]
    Json(#[source] serde_json::Error),
    /// A wipe receipt does not verify. The reason may quote the file, so it
    /// is sanitized for the terminal.
    #[error("{what}: {}", output::sanitize(&source.to_string()))]
    Receipt {
        what: String,
        #[source]
        source: hub_proto::receipt::ReceiptError,
    },
    /// A check found a problem (the security log's chain, the audit).
    #[error("{what}: {detail}")]
    Check { what: String, detail: String },
    /// The tokio runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] io::Error),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Unreachable { .. } => EXIT_UNREACHABLE,
            Error::SocketDenied { .. }
            | Error::Rpc { .. }
            | Error::TimedOut { .. }
            | Error::Incomplete { .. }
            | Error::File { .. }
            | Error::Exists { .. }
            | Error::BadCsr { .. }
            | Error::TooLarge { .. }
            | Error::StreamEnded { .. }
            | Error::NotWritten { .. }
            | Error::Output(_)
            | Error::Json(_)
            | Error::Receipt { .. }
            | Error::Check { .. }
            | Error::Runtime(_) => EXIT_FAILED,
        }
    }

    /// A second line of advice, where there is one.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::SocketDenied { .. } => Some(PERMISSION_HINT),
            Error::Rpc { status, .. } if status.code() == tonic::Code::PermissionDenied => {
                Some(PERMISSION_HINT)
            }
            Error::Unreachable { .. }
            | Error::Rpc { .. }
            | Error::TimedOut { .. }
            | Error::Incomplete { .. }
            | Error::File { .. }
            | Error::Exists { .. }
            | Error::BadCsr { .. }
            | Error::TooLarge { .. }
            | Error::StreamEnded { .. }
            | Error::NotWritten { .. }
            | Error::Output(_)
            | Error::Json(_)
            | Error::Receipt { .. }
            | Error::Check { .. }
            | Error::Runtime(_) => None,
        }
    }
}

/// hubd's message, or the code's description if hubd sent none. Control
/// characters are escaped: the message is printed to a terminal.
fn status_text(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        status.code().description().to_owned()
    } else {
        // A message of several lines (every problem in a rules file) keeps
        // its lines, each sanitised, the later ones indented under the first.
        status
            .message()
            .lines()
            .map(output::sanitize)
            .collect::<Vec<_>>()
            .join("\n  ")
    }
}

/// Runs hubctl with `args` (the first is the program name) and the process
/// environment, writing results to `out` and diagnostics to `err`. Returns the
/// exit code.
pub fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    run_with_env(args, &|name| std::env::var_os(name), out, err)
}

/// [`run`] with the environment (`$HUBD_SOCKET`, `$RUNTIME_DIRECTORY`,
/// `$XDG_*`, `$HOME`) read through `env` instead of the process's.
///
/// Builds its own current-thread tokio runtime, so it must not be called from
/// inside an async context (use `spawn_blocking`).
pub fn run_with_env<I, T>(
    args: I,
    env: &dyn Fn(&str) -> Option<OsString>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    // A path we may not look at counts as there: the packaged /run/hubd is
    // open to the hubadmin group only, and anyone else should hear
    // "permission denied" there, not that no hub runs somewhere else.
    let invocation = match cli::parse(args, env, &|p| p.try_exists().unwrap_or(true)) {
        Ok(invocation) => invocation,
        Err(e) => return clap_error(&e, out, err),
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
        .and_then(|rt| rt.block_on(commands::execute(invocation, out, &mut *err)));
    match result {
        Ok(()) => EXIT_OK,
        // `hubctl devices list | head`: the reader left, which is not a failure.
        Err(Error::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            // Nothing sensible is left to do if stderr itself is gone.
            let _ = writeln!(err, "hubctl: {e}");
            if let Some(hint) = e.hint() {
                let _ = writeln!(err, "hubctl: {hint}");
            }
            e.exit_code()
        }
    }
}

/// Prints a clap error or help text where clap would, returning its exit code
/// (0 for `--help`/`--version`, 2 for usage errors).
fn clap_error(e: &clap::Error, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    // Plain text: `Display` of the rendered message carries no ANSI styling.
    let text = e.render().to_string();
    if e.use_stderr() {
        let _ = err.write_all(text.as_bytes());
        EXIT_USAGE
    } else {
        let _ = out.write_all(text.as_bytes());
        EXIT_OK
    }
}
