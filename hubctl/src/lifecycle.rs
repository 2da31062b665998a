//! `hubctl firmware` (the signed catalogue, trusted vendor keys, offering
//! an update) and `hubctl devices set-support`.

use std::io::Write;
use std::path::Path;

use hub_proto::v1;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::cli::{DeviceId, FirmwareCommand};
use crate::commands::{call, call_within, connect, print, print_json, read_file};
use crate::output::{DeviceView, human_time, sanitize, table};

/// The largest image hubctl sends; hubd's own limit is
/// `[lifecycle] max_image_size` (32 MiB by default).
const MAX_IMAGE_BYTES: u64 = 256 * 1024 * 1024;
/// Key and signature files are small.
const MAX_SMALL_FILE: u64 = 16 * 1024;

/// A catalogue entry as `firmware list --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareView {
    pub model: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub key_id: String,
    pub added_at: i64,
}

impl From<&v1::Firmware> for FirmwareView {
    fn from(f: &v1::Firmware) -> Self {
        FirmwareView {
            model: f.model.clone(),
            version: f.version.clone(),
            sha256: f.sha256.clone(),
            size: f.size,
            key_id: f.key_id.clone(),
            added_at: f.added_at,
        }
    }
}

/// A trusted vendor key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VendorKeyView {
    pub model: String,
    pub key_id: String,
    pub added_at: i64,
}

/// `firmware list --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogueView {
    pub firmware: Vec<FirmwareView>,
    pub keys: Vec<VendorKeyView>,
}

/// `firmware push --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushView {
    pub device: String,
    pub offer: String,
    pub from_version: Option<String>,
    pub firmware: FirmwareView,
}

pub(crate) async fn execute(
    command: FirmwareCommand,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    match command {
        FirmwareCommand::TrustKey { model, key } => {
            let what = format!("firmware trust-key {}", key.display());
            let key_bytes = read_file(&what, &key, MAX_SMALL_FILE)?;
            let mut client = connect(socket).await?;
            let answer = call(
                &what,
                client.trust_vendor_key(v1::TrustVendorKeyRequest {
                    model: model.clone(),
                    key: key_bytes,
                }),
            )
            .await?;
            let verb = if answer.added {
                "trusted"
            } else {
                "was already trusted"
            };
            print(
                out,
                &format!(
                    "vendor key {} {verb} for model {}\n",
                    sanitize(&answer.key_id),
                    sanitize(&model)
                ),
            )
        }
        FirmwareCommand::Add {
            image,
            model,
            version,
            signature,
            vendor_key,
            json,
        } => {
            let what = format!("firmware add {}", image.display());
            let request = v1::AddFirmwareRequest {
                model,
                version,
                image: read_file(&what, &image, MAX_IMAGE_BYTES)?,
                signature: read_file(&what, &signature, MAX_SMALL_FILE)?,
                vendor_key: read_file(&what, &vendor_key, MAX_SMALL_FILE)?,
            };
            let mut client = connect(socket).await?;
            // A large image takes a while to travel and to hash.
            let added = call_within(
                &what,
                std::time::Duration::from_secs(120),
                client.add_firmware(request),
            )
            .await?;
            let view = FirmwareView::from(&added);
            if json {
                return print_json(out, &view);
            }
            print(
                out,
                &format!(
                    "added {} {} ({} bytes, sha256 {}), signed by {}\n",
                    sanitize(&view.model),
                    sanitize(&view.version),
                    view.size,
                    sanitize(&view.sha256),
                    sanitize(&view.key_id)
                ),
            )
        }
        FirmwareCommand::List { json } => {
            let mut client = connect(socket).await?;
            let list = call(
                "firmware list",
                client.list_firmware(v1::ListFirmwareRequest {}),
            )
            .await?;
            let view = CatalogueView {
                firmware: list.firmware.iter().map(FirmwareView::from).collect(),
                keys: list
                    .keys
                    .iter()
                    .map(|k| VendorKeyView {
                        model: k.model.clone(),
                        key_id: k.key_id.clone(),
                        added_at: k.added_at,
                    })
                    .collect(),
            };
            if json {
                return print_json(out, &view);
            }
            print(out, &catalogue_text(&view))
        }
        FirmwareCommand::Push {
            id,
            version,
            force,
            json,
        } => push(id, version, force, json, socket, out).await,
    }
}

async fn push(
    id: DeviceId,
    version: Option<String>,
    force: bool,
    json: bool,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let what = format!("firmware push {id}");
    let mut client = connect(socket).await?;
    let answer = call(
        &what,
        client.push_firmware(v1::PushFirmwareRequest {
            id: id.as_str().to_owned(),
            version: version.unwrap_or_default(),
            force,
        }),
    )
    .await?;
    let firmware = answer.firmware.as_ref().ok_or(Error::Incomplete {
        what: what.clone(),
        field: "firmware",
    })?;
    let view = PushView {
        device: id.as_str().to_owned(),
        offer: answer.offer.clone(),
        from_version: (!answer.from_version.is_empty()).then(|| answer.from_version.clone()),
        firmware: FirmwareView::from(firmware),
    };
    if json {
        return print_json(out, &view);
    }
    print(
        out,
        &format!(
            "offered {} {} to {} (it runs {}); the device fetches and verifies it itself.\n\
             Follow it with: hubctl devices show {}  or  hubctl events --device {} --follow\n",
            sanitize(&view.firmware.model),
            sanitize(&view.firmware.version),
            sanitize(&view.device),
            view.from_version
                .as_deref()
                .map_or("an unknown version".to_owned(), sanitize),
            sanitize(&view.device),
            sanitize(&view.device),
        ),
    )
}

fn catalogue_text(view: &CatalogueView) -> String {
    let mut text = String::new();
    if view.firmware.is_empty() {
        text.push_str("no firmware in the catalogue\n");
    } else {
        let rows: Vec<Vec<String>> = view
            .firmware
            .iter()
            .map(|f| {
                vec![
                    sanitize(&f.model),
                    sanitize(&f.version),
                    f.size.to_string(),
                    sanitize(&f.sha256[..f.sha256.len().min(16)]),
                    sanitize(&f.key_id),
                    human_time(f.added_at),
                ]
            })
            .collect();
        text.push_str(&table(
            &["MODEL", "VERSION", "SIZE", "SHA256", "SIGNED BY", "ADDED"],
            &rows,
        ));
    }
    text.push('\n');
    if view.keys.is_empty() {
        text.push_str("no trusted vendor keys (hubctl firmware trust-key --model M KEYFILE)\n");
    } else {
        let rows: Vec<Vec<String>> = view
            .keys
            .iter()
            .map(|k| {
                vec![
                    sanitize(&k.model),
                    sanitize(&k.key_id),
                    human_time(k.added_at),
                ]
            })
            .collect();
        text.push_str(&table(&["MODEL", "TRUSTED KEY", "ADDED"], &rows));
    }
    text
}

/// `devices set-support ID DATE` or `--clear`.
pub(crate) async fn set_support(
    id: DeviceId,
    date: Option<String>,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let what = format!("devices set-support {id}");
    let mut client = connect(socket).await?;
    let device = call(
        &what,
        client.set_support(v1::SetSupportRequest {
            id: id.as_str().to_owned(),
            date: date.unwrap_or_default(),
        }),
    )
    .await?;
    let view = DeviceView::from(&device);
    let l = &view.lifecycle;
    let mut text = match (&l.support_end, &l.support_source) {
        (Some(end), Some(source)) => format!(
            "{}: support until {} (from the {}): {}\n",
            sanitize(&view.id),
            sanitize(end),
            sanitize(source),
            sanitize(&l.support_status)
        ),
        _ => format!("{}: support end unknown\n", sanitize(&view.id)),
    };
    if let Some(reason) = &view.isolation_reason {
        text.push_str(&format!("isolated: {}\n", sanitize(reason)));
    }
    print(out, &text)
}
