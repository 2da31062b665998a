//! `hubctl wipe`: the ownership-transfer wipe, and `wipe verify`, which checks
//! a saved receipt offline.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use hub_proto::v1;

use hub_proto::receipt::{self, Receipt};

use crate::Error;
use crate::cli::{WipeAction, WipeArgs};
use crate::commands::{call, call_within, connect, print, print_json, read_text_file, write_new};
use crate::output::sanitize;

/// The largest receipt file read. A receipt is a few KiB: one certificate and
/// a device id per device.
const MAX_RECEIPT_BYTES: u64 = 1024 * 1024;

pub(crate) async fn execute(
    mut args: WipeArgs,
    socket: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    match args.action.take() {
        Some(WipeAction::Verify { receipt, json }) => verify(&receipt, json, out),
        None => wipe(args, socket, out, err).await,
    }
}

/// The wipe itself: asks for the hub's short name (unless `--yes`), asks
/// hubd to wipe, checks the receipt it answers with, saves it where the
/// user said and prints what it says.
pub(crate) async fn wipe(
    args: WipeArgs,
    socket: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    let what = "wipe".to_owned();
    // Refuse a receipt path that exists before anything is destroyed.
    if let Some(path) = &args.receipt
        && path.symlink_metadata().is_ok()
    {
        return Err(Error::Exists {
            what,
            path: path.clone(),
        });
    }
    let mut client = connect(socket).await?;
    let status = call(&what, client.status(v1::StatusRequest {})).await?;
    let name = status.hub_name;
    if !args.yes {
        let prompt = format!(
            "This destroys everything hub {:?} knows: devices, certificates, rules, history, \
             and its CA. Devices must be paired again.\nType the hub's name ({}) to wipe it: ",
            sanitize(&name),
            sanitize(&name)
        );
        err.write_all(prompt.as_bytes())
            .and_then(|()| err.flush())
            .map_err(Error::Output)?;
        let mut typed = String::new();
        std::io::stdin()
            .read_line(&mut typed)
            .map_err(|source| Error::File {
                what: what.clone(),
                path: "<stdin>".into(),
                source,
            })?;
        if typed.trim() != name {
            return Err(Error::Rpc {
                what,
                status: tonic::Status::cancelled("the name did not match: nothing was wiped"),
            });
        }
    }
    let timeout = args.timeout.unwrap_or(DEFAULT_RESET_SECS);
    let request = v1::WipeRequest {
        confirm_name: name,
        reset_timeout_seconds: timeout,
    };
    // The wipe waits for devices first; give it that long and then some.
    let limit = Duration::from_secs(u64::from(timeout) + 60);
    let answer = call_within(&what, limit, client.wipe(request)).await?;
    let receipt = receipt::verify(answer.receipt.as_bytes()).map_err(|source| Error::Receipt {
        what: what.clone(),
        source,
    })?;
    let mut text = String::new();
    if let Some(path) = &args.receipt {
        write_new(path, answer.receipt.as_bytes(), false, RECEIPT_MODE).map_err(|source| {
            Error::File {
                what: what.clone(),
                path: path.clone(),
                source,
            }
        })?;
        text.push_str(&format!(
            "receipt saved to {} (hubctl wipe verify checks it)\n",
            path.display()
        ));
    } else {
        text.push_str("the receipt (save it; hubctl wipe verify FILE checks it):\n");
        text.push_str(&answer.receipt);
    }
    text.push_str(&verified_text(&receipt).replacen("receipt valid: hub", "wiped: hub", 1));
    print(out, &text)
}

/// How long hubd waits for reset acknowledgements unless `--timeout` says.
const DEFAULT_RESET_SECS: u32 = 10;

/// A receipt is not secret, but it is the owner's record.
const RECEIPT_MODE: u32 = 0o644;

/// `wipe verify`: needs no hub, only the file.
fn verify(path: &Path, json: bool, out: &mut dyn Write) -> Result<(), Error> {
    let what = format!("wipe verify {}", path.display());
    let text = read_text_file(&what, path, MAX_RECEIPT_BYTES)?;
    let receipt =
        receipt::verify(text.as_bytes()).map_err(|source| Error::Receipt { what, source })?;
    if json {
        print_json(out, &receipt)
    } else {
        print(out, &verified_text(&receipt))
    }
}

/// What `wipe verify` prints for a receipt that verified. Everything in it
/// comes from the file, so all of it is sanitized.
fn verified_text(r: &Receipt) -> String {
    let destroyed = joined(
        r.destroyed
            .iter()
            .map(|(what, n)| format!("{} {n}", sanitize(what))),
    );
    let acknowledged = joined(r.devices_acknowledged.iter().map(|id| sanitize(id)));
    let not_acknowledged = joined(r.devices_not_acknowledged.iter().map(|id| sanitize(id)));
    format!(
        "receipt valid: hub \"{}\" wiped {} .. {}\n\
         old ca: {}\n\
         new ca: {}\n\
         destroyed: {destroyed}\n\
         devices that acknowledged the reset: {acknowledged}\n\
         devices that did not: {not_acknowledged}\n",
        sanitize(&r.hub),
        sanitize(&r.started_at),
        sanitize(&r.finished_at),
        sanitize(&r.old_ca_fingerprint),
        sanitize(&r.new_ca_fingerprint),
    )
}

/// `items` joined with `, `, or `none`.
fn joined(items: impl Iterator<Item = String>) -> String {
    let joined = items.collect::<Vec<_>>().join(", ");
    if joined.is_empty() {
        "none".to_owned()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_lists_read_none_and_text_is_sanitized() {
        let r = Receipt {
            format: receipt::FORMAT.to_owned(),
            hub: "ho\u{1b}me".to_owned(),
            started_at: "2026-11-22T10:00:00Z".to_owned(),
            finished_at: "2026-11-22T10:00:03Z".to_owned(),
            old_ca_fingerprint: "00".to_owned(),
            new_ca_fingerprint: "11".to_owned(),
            destroyed: Default::default(),
            devices_acknowledged: Vec::new(),
            devices_not_acknowledged: vec!["c\n".to_owned()],
            new_ca_pem: String::new(),
        };
        assert_eq!(
            verified_text(&r),
            "receipt valid: hub \"ho\\u{1b}me\" wiped 2026-11-22T10:00:00Z .. 2026-11-22T10:00:03Z\n\
             old ca: 00\n\
             new ca: 11\n\
             destroyed: none\n\
             devices that acknowledged the reset: none\n\
             devices that did not: c\\n\n"
        );
    }
}
