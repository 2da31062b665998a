//! Runs one parsed command against hubd: connect, call, print.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hub_proto::v1;
use hub_proto::v1::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::Error;
use crate::about::AboutView;
use crate::cli::{Command, DevicesCommand, GrantArgs, Invocation, PairMode, RoleArg};
use crate::output::{
    self, DeviceListView, DeviceView, PairingListView, PairingOpenedView, PairingWindowView,
    RoleView, StatusView, WatchMessageView,
};

/// How long to wait for the socket to accept. A Unix socket connects at once
/// or fails at once; this only bounds a hubd that is wedged.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one RPC may take. Every admin call is local and small, enrolment
/// included (one P-256 signature and a durable commit). For `Watch` it bounds
/// only the wait for the stream to start, never the stream itself.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest CSR file read: a P-256 CSR in PEM is well under 1 KiB.
const MAX_CSR_BYTES: u64 = 64 * 1024;

/// The largest payload file read. hubd enforces its own, smaller limit
/// (`max_packet_size`) and names it when refusing; this only stops hubctl from
/// reading a huge file to send what no gRPC server accepts (4 MiB a message).
const MAX_PAYLOAD_BYTES: u64 = 4 * 1024 * 1024;

/// What hubd waits for a reset acknowledgement when `--timeout` is not given
/// (admin.proto: 0 means 5 seconds).
const DEFAULT_RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Mode of the files of an offline bundle: the key is secret, and the
/// certificates need be read by no one else either.
const BUNDLE_FILE_MODE: u32 = 0o600;

/// Mode of the certificate files `devices enroll` writes (less the umask).
const CERT_FILE_MODE: u32 = 0o666;

/// Runs `inv`, printing its result to `out` and warnings to `err`.
pub(crate) async fn execute(
    inv: Invocation,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    match inv.command {
        Command::Status { json } => {
            let what = "status".to_owned();
            let mut client = connect(&inv.socket).await?;
            let status = call(&what, client.status(v1::StatusRequest {})).await?;
            let view = StatusView::from(&status);
            if json {
                print_json(out, &view)
            } else {
                print(out, &output::status_details(&view))
            }
        }
        Command::Devices { command } => devices(command, &inv.socket, out).await,
        Command::Pair(args) => pair(args.into_mode(), &inv.socket, out, err).await,
        Command::Isolate { id, reason } => {
            let what = format!("isolate {id}");
            let mut client = connect(&inv.socket).await?;
            let request = v1::IsolateDeviceRequest {
                id: id.as_str().to_owned(),
                reason,
            };
            let device = call(&what, client.isolate_device(request)).await?;
            print(out, &output::device_brief(&DeviceView::from(&device)))
        }
        Command::Release { id } => {
            let what = format!("release {id}");
            let mut client = connect(&inv.socket).await?;
            let request = v1::ReleaseDeviceRequest {
                id: id.as_str().to_owned(),
            };
            let device = call(&what, client.release_device(request)).await?;
            print(out, &output::device_brief(&DeviceView::from(&device)))
        }
        Command::Publish {
            topic,
            payload,
            file,
            retain,
            qos,
        } => publish(topic, payload, file, retain, qos, &inv.socket).await,
        Command::Watch {
            filter,
            count,
            json,
        } => watch(filter, count, json, &inv.socket, out).await,
        Command::Rules { command } => crate::rules::execute(command, &inv.socket, out).await,
        Command::Privacy { json } => crate::privacy::privacy(json, &inv.socket, out).await,
        Command::Export { out: path, force } => {
            crate::privacy::export(path, force, &inv.socket, out).await
        }
        Command::Wipe(args) => crate::wipe::execute(args, &inv.socket, out, err).await,
        Command::Firmware { command } => crate::lifecycle::execute(command, &inv.socket, out).await,
        Command::Events(args) => crate::events::execute(args, &inv.socket, out).await,
        Command::Audit { json } => crate::audit::audit(json, &inv.socket, out).await,
        Command::About { json } => {
            let view = AboutView::new(time::OffsetDateTime::now_utc().date());
            if json {
                print_json(out, &view)
            } else {
                print(out, &view.text())
            }
        }
    }
}

/// `publish`: prints nothing on success, like other Unix tools that send.
async fn publish(
    topic: String,
    payload: Option<OsString>,
    file: Option<PathBuf>,
    retain: bool,
    qos: u32,
    socket: &Path,
) -> Result<(), Error> {
    let what = format!("publish {}", output::sanitize(&topic));
    // clap requires exactly one of PAYLOAD and --file. The payload is passed
    // on byte for byte, so it need not be UTF-8.
    let payload = match file {
        Some(path) => read_payload(&what, &path)?,
        None => payload.map(OsString::into_vec).unwrap_or_default(),
    };
    let mut client = connect(socket).await?;
    let request = v1::PublishRequest {
        topic,
        payload,
        retain,
        qos,
    };
    call(&what, client.publish(request)).await?;
    Ok(())
}

/// Reads a payload file, or standard input for `-`, up to [`MAX_PAYLOAD_BYTES`].
fn read_payload(what: &str, path: &Path) -> Result<Vec<u8>, Error> {
    read_limited(what, path, MAX_PAYLOAD_BYTES)
}

/// Reads a UTF-8 text file, or standard input for `-`, up to `max` bytes.
pub(crate) fn read_text_file(what: &str, path: &Path, max: u64) -> Result<String, Error> {
    let bytes = read_limited(what, path, max)?;
    String::from_utf8(bytes).map_err(|e| Error::File {
        what: what.to_owned(),
        path: path.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        ),
    })
}

/// Reads a file, or standard input for `-`, refusing more than `max` bytes.
pub(crate) fn read_file(what: &str, path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    read_limited(what, path, max)
}

fn read_limited(what: &str, path: &Path, max: u64) -> Result<Vec<u8>, Error> {
    let mut bytes = Vec::new();
    // One byte over the limit is enough to know the input is too large.
    let limit = max + 1;
    let read = if path == Path::new("-") {
        io::stdin().lock().take(limit).read_to_end(&mut bytes)
    } else {
        fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut bytes))
    };
    read.map_err(|source| Error::File {
        what: what.to_owned(),
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.len() as u64 > max {
        return Err(Error::TooLarge {
            what: what.to_owned(),
            path: path.to_path_buf(),
            max,
        });
    }
    Ok(bytes)
}

/// `watch`: one line per message, flushed at once so that a pipe or a script
/// sees each message as it arrives.
async fn watch(
    filter: String,
    count: Option<u64>,
    json: bool,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let what = format!("watch {}", output::sanitize(&filter));
    let mut client = connect(socket).await?;
    // hubd answers once its subscription is active, so only that wait is
    // bounded: after it a quiet topic may rightly stay silent for hours.
    let mut stream = call(&what, client.watch(v1::WatchRequest { filter })).await?;
    let mut received: u64 = 0;
    while count.is_none_or(|wanted| received < wanted) {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(status) => return Err(Error::Rpc { what, status }),
        };
        let line = if json {
            let mut line =
                serde_json::to_string(&WatchMessageView::from(&message)).map_err(Error::Json)?;
            line.push('\n');
            line
        } else {
            output::watch_line(&message)
        };
        print(out, &line)?;
        received += 1;
    }
    match count {
        // A script that asked for N messages must not take fewer for success.
        Some(wanted) if received < wanted => Err(Error::StreamEnded {
            what,
            received,
            wanted,
        }),
        Some(_) | None => Ok(()),
    }
}

async fn devices(command: DevicesCommand, socket: &Path, out: &mut dyn Write) -> Result<(), Error> {
    match command {
        DevicesCommand::List { json } => {
            let what = "devices list".to_owned();
            let mut client = connect(socket).await?;
            let list = call(&what, client.list_devices(v1::ListDevicesRequest {})).await?;
            let devices: Vec<DeviceView> = list.devices.iter().map(DeviceView::from).collect();
            if json {
                print_json(out, &DeviceListView { devices })
            } else {
                print(out, &output::device_table(&devices))
            }
        }
        DevicesCommand::Show { id, json } => {
            let what = format!("devices show {id}");
            let mut client = connect(socket).await?;
            let request = v1::GetDeviceRequest {
                id: id.as_str().to_owned(),
            };
            let device = DeviceView::from(&call(&what, client.get_device(request)).await?);
            if json {
                print_json(out, &device)
            } else {
                print(out, &output::device_details(&device))
            }
        }
        DevicesCommand::Revoke { id } => {
            let what = format!("devices revoke {id}");
            let mut client = connect(socket).await?;
            let request = v1::RevokeDeviceRequest {
                id: id.as_str().to_owned(),
            };
            let answer = call(&what, client.revoke_device(request)).await?;
            let note = if answer.was_connected {
                " (its session was closed)"
            } else {
                ""
            };
            print(
                out,
                &format!("revoked {}{note}\n", output::sanitize(id.as_str())),
            )
        }
        DevicesCommand::Disconnect { id } => {
            let what = format!("devices disconnect {id}");
            let mut client = connect(socket).await?;
            let request = v1::DisconnectDeviceRequest {
                id: id.as_str().to_owned(),
            };
            let answer = call(&what, client.disconnect_device(request)).await?;
            let id = output::sanitize(id.as_str());
            if answer.was_connected {
                print(out, &format!("disconnected {id}\n"))
            } else {
                print(out, &format!("{id} was not connected\n"))
            }
        }
        DevicesCommand::Enroll {
            name,
            csr,
            out: dir,
            force,
        } => enroll(name, &csr, &dir, force, socket, out).await,
        DevicesCommand::Rename { id, name } => {
            let what = format!("devices rename {id}");
            let mut client = connect(socket).await?;
            let request = v1::RenameDeviceRequest {
                id: id.as_str().to_owned(),
                name,
            };
            let device = call(&what, client.rename_device(request)).await?;
            print(out, &output::device_brief(&DeviceView::from(&device)))
        }
        DevicesCommand::Remove { id, reset, timeout } => {
            let what = format!("devices remove {id}");
            let mut client = connect(socket).await?;
            let request = v1::RemoveDeviceRequest {
                id: id.as_str().to_owned(),
                reset,
                reset_timeout_seconds: timeout.unwrap_or(0),
            };
            // hubd may wait for the reset acknowledgement before it answers.
            let wait = if reset {
                timeout.map_or(DEFAULT_RESET_TIMEOUT, |s| Duration::from_secs(u64::from(s)))
            } else {
                Duration::ZERO
            };
            let answer =
                call_within(&what, RPC_TIMEOUT + wait, client.remove_device(request)).await?;
            print(out, &removed_line(id.as_str(), reset, &answer))
        }
        DevicesCommand::SetSupport { id, date, clear: _ } => {
            crate::lifecycle::set_support(id, date, socket, out).await
        }
        DevicesCommand::Grant { id, grants } => {
            update_grants(&id, grants, false, socket, out).await
        }
        DevicesCommand::RevokeGrant { id, grants } => {
            update_grants(&id, grants, true, socket, out).await
        }
    }
}

/// What `devices remove` did, e.g. `removed ID (was connected; reset acknowledged)`.
fn removed_line(id: &str, reset: bool, answer: &v1::RemoveDeviceResponse) -> String {
    let mut notes = vec![if answer.was_connected {
        "was connected"
    } else {
        "was not connected"
    }];
    if reset {
        notes.push(match (answer.reset_sent, answer.reset_acknowledged) {
            (_, true) => "reset acknowledged",
            (true, false) => "reset sent, not acknowledged",
            (false, false) => "reset not sent",
        });
    }
    let mut line = format!("removed {} ({})\n", output::sanitize(id), notes.join("; "));
    if !answer.rules_disabled.is_empty() {
        let names: Vec<String> = answer
            .rules_disabled
            .iter()
            .map(|n| output::sanitize(n))
            .collect();
        line.push_str(&format!(
            "disabled the rules that named it: {} (hubctl rules show NAME)\n",
            names.join(", ")
        ));
    }
    line
}

/// `devices grant` and `devices revoke-grant`.
async fn update_grants(
    id: &crate::cli::DeviceId,
    grants: GrantArgs,
    revoke: bool,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let verb = if revoke { "revoke-grant" } else { "grant" };
    let what = format!("devices {verb} {id}");
    let mut client = connect(socket).await?;
    let request = v1::UpdateGrantsRequest {
        id: id.as_str().to_owned(),
        grants: Some(wire_grants(grants)),
        revoke,
    };
    let device = call(&what, client.update_grants(request)).await?;
    print(out, &output::device_brief(&DeviceView::from(&device)))
}

fn wire_grants(grants: GrantArgs) -> v1::Grants {
    v1::Grants {
        publish: grants.allow_pub,
        subscribe: grants.allow_sub,
    }
}

fn wire_role(role: RoleArg) -> v1::Role {
    match role {
        RoleArg::Device => v1::Role::Device,
        RoleArg::Integration => v1::Role::Integration,
    }
}

/// Grants go only with an integration (the command line makes sure there
/// are none for a device).
fn role_grants(role: RoleArg, grants: GrantArgs) -> Option<v1::Grants> {
    (role == RoleArg::Integration).then(|| wire_grants(grants))
}

/// `pair` in its four modes.
async fn pair(
    mode: PairMode,
    socket: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    match mode {
        PairMode::Open {
            name,
            role,
            window_seconds,
            grants,
            json,
        } => {
            let what = format!("pair {}", output::sanitize(&name));
            let mut client = connect(socket).await?;
            let request = v1::OpenPairingRequest {
                name: name.clone(),
                role: wire_role(role).into(),
                window_seconds,
                grants: role_grants(role, grants),
            };
            let window = call(&what, client.open_pairing(request)).await?;
            for (field, value) in [
                ("claim_id", &window.claim_id),
                ("code", &window.code),
                ("uri", &window.uri),
            ] {
                if value.is_empty() {
                    return Err(Error::Incomplete { what, field });
                }
            }
            let view = PairingOpenedView::from(&window);
            if json {
                return print_json(out, &view);
            }
            let shown_name = if window.name.is_empty() {
                &name
            } else {
                &window.name
            };
            // hubd echoes the role; what was asked for stands in if it does not.
            let role = match RoleView::from_wire(window.role) {
                RoleView::Unknown => match role {
                    RoleArg::Device => RoleView::Device,
                    RoleArg::Integration => RoleView::Integration,
                },
                known => known,
            };
            let qr = output::qr_text(&window.uri);
            print(
                out,
                &output::pairing_opened(shown_name, role, &view, qr.as_deref()),
            )
        }
        PairMode::Bundle {
            name,
            role,
            grants,
            dir,
            force,
        } => {
            let request = v1::EnrollBundleRequest {
                name,
                role: wire_role(role).into(),
                grants: role_grants(role, grants),
            };
            bundle(request, &dir, force, socket, out, err).await
        }
        PairMode::List { json } => {
            let what = "pair --list".to_owned();
            let mut client = connect(socket).await?;
            let list = call(&what, client.list_pairing(v1::ListPairingRequest {})).await?;
            let windows: Vec<PairingWindowView> =
                list.windows.iter().map(PairingWindowView::from).collect();
            if json {
                print_json(out, &PairingListView { windows })
            } else {
                print(out, &output::pairing_table(&windows))
            }
        }
        PairMode::Cancel { claim } => {
            let what = format!("pair --cancel {claim}");
            let mut client = connect(socket).await?;
            let request = v1::CancelPairingRequest {
                claim_id: claim.as_str().to_owned(),
            };
            let window = call(&what, client.cancel_pairing(request)).await?;
            let name = if window.name.is_empty() {
                String::new()
            } else {
                format!(" for {}", output::sanitize(&window.name))
            };
            print(
                out,
                &format!(
                    "cancelled pairing window {}{name}\n",
                    output::sanitize(claim.as_str())
                ),
            )
        }
    }
}

/// What `pair --bundle` says on stderr once the files are written.
fn bundle_warning(key_path: &Path) -> String {
    format!(
        "hubctl: warning: the hub made this device's private key and it travelled \
         to {}: copy it to the device only over a channel you trust, then delete \
         every other copy. A device that can make its own key should pair with \
         `hubctl pair` instead, so that its key never leaves it.\n",
        output::sanitize(&key_path.display().to_string())
    )
}

/// `pair --bundle`: like `devices enroll`, every local check runs before hubd
/// is asked, so a key is never made only to find it cannot be written.
async fn bundle(
    request: v1::EnrollBundleRequest,
    dir: &Path,
    force: bool,
    socket: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), Error> {
    let what = format!("pair {} --bundle", output::sanitize(&request.name));
    let key_path = dir.join("key.pem");
    let cert_path = dir.join("cert.pem");
    let ca_path = dir.join("ca.pem");
    if !force {
        refuse_existing(&what, &[&key_path, &cert_path, &ca_path])?;
    }
    create_private_dir(&what, dir)?;

    let mut client = connect(socket).await?;
    let answer = call(&what, client.enroll_bundle(request)).await?;
    let device = answer.device.ok_or_else(|| Error::Incomplete {
        what: what.clone(),
        field: "device",
    })?;
    if answer.key_pem.is_empty() {
        return Err(Error::Incomplete {
            what,
            field: "key_pem",
        });
    }
    for (path, pem) in [
        (&key_path, &answer.key_pem),
        (&cert_path, &answer.cert_pem),
        (&ca_path, &answer.ca_chain_pem),
    ] {
        write_new(path, pem.as_bytes(), force, BUNDLE_FILE_MODE).map_err(|source| {
            Error::NotWritten {
                what: what.clone(),
                id: output::sanitize(&device.id),
                path: path.clone(),
                source,
            }
        })?;
    }
    // Warned first, so that a closed stdout cannot swallow the warning; a
    // lost stderr changes nothing about the files already written.
    let _ = err
        .write_all(bundle_warning(&key_path).as_bytes())
        .and_then(|()| err.flush());
    print(out, &format!("{}\n", output::sanitize(&device.id)))
}

/// Fails with [`Error::Exists`] on the first of `paths` that exists (a
/// dangling symlink included).
fn refuse_existing(what: &str, paths: &[&PathBuf]) -> Result<(), Error> {
    match paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(path) => Err(Error::Exists {
            what: what.to_owned(),
            path: (*path).clone(),
        }),
        None => Ok(()),
    }
}

/// Creates `dir` and its missing parents with mode 0700 unless it exists.
fn create_private_dir(what: &str, dir: &Path) -> Result<(), Error> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::File {
            what: what.to_owned(),
            path: dir.to_path_buf(),
            source,
        })
}

/// `devices enroll`: every local check runs before hubd is asked, so a
/// certificate is never issued only to find that it cannot be written.
async fn enroll(
    name: String,
    csr: &Path,
    dir: &Path,
    force: bool,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let what = format!("devices enroll {}", output::sanitize(&name));
    let csr_pem = read_csr(&what, csr)?;
    let cert_path = dir.join("cert.pem");
    let ca_path = dir.join("ca.pem");
    if !force {
        refuse_existing(&what, &[&cert_path, &ca_path])?;
    }
    create_private_dir(&what, dir)?;

    let mut client = connect(socket).await?;
    let answer = call(
        &what,
        client.enroll_device(v1::EnrollDeviceRequest { name, csr_pem }),
    )
    .await?;
    let device = answer.device.ok_or_else(|| Error::Incomplete {
        what: what.clone(),
        field: "device",
    })?;

    for (path, pem) in [
        (&cert_path, &answer.cert_pem),
        (&ca_path, &answer.ca_chain_pem),
    ] {
        write_new(path, pem.as_bytes(), force, CERT_FILE_MODE).map_err(|source| {
            Error::NotWritten {
                what: what.clone(),
                id: output::sanitize(&device.id),
                path: path.clone(),
                source,
            }
        })?;
    }
    print(out, &format!("{}\n", output::sanitize(&device.id)))
}

/// Reads and sanity-checks the CSR file. A private key is refused outright:
/// sending it to the hub would defeat the point of a CSR.
fn read_csr(what: &str, path: &Path) -> Result<String, Error> {
    let file_error = |source| Error::File {
        what: what.to_owned(),
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason| Error::BadCsr {
        what: what.to_owned(),
        path: path.to_path_buf(),
        reason,
    };
    let len = fs::metadata(path).map_err(file_error)?.len();
    if len > MAX_CSR_BYTES {
        return Err(bad("too large for a certificate signing request"));
    }
    let bytes = fs::read(path).map_err(file_error)?;
    let text = String::from_utf8(bytes).map_err(|_| bad("not a PEM file"))?;
    if text.contains("PRIVATE KEY-----") {
        return Err(bad(
            "holds a private key: give the CSR, the key stays on the device",
        ));
    }
    if !text.contains("-----BEGIN CERTIFICATE REQUEST-----") {
        return Err(bad("no PEM certificate signing request in it"));
    }
    Ok(text)
}

/// Writes `path`, created with `mode` (less the umask). Without `force` the
/// file must not exist (checked atomically by `create_new`); with it, a
/// temporary file is renamed over the old one, so a reader never sees half a
/// certificate. The temporary file is always new, so it never inherits the
/// mode of a leftover one.
pub(crate) fn write_new(path: &Path, contents: &[u8], force: bool, mode: u32) -> io::Result<()> {
    let create = |p: &Path| {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
    };
    if !force {
        let mut f = create(path)?;
        f.write_all(contents)?;
        return f.sync_all();
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let result = (|| {
        let mut f = create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Connects to hubd, telling "not running" (exit 3) from "not allowed" (exit 1).
pub(crate) async fn connect(socket: &Path) -> Result<AdminClient<Channel>, Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, hub_proto::admin_client(socket)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) if is_permission_denied(&e) => Err(Error::SocketDenied {
            path: socket.to_path_buf(),
        }),
        Ok(Err(_)) | Err(_) => Err(Error::Unreachable {
            path: socket.to_path_buf(),
        }),
    }
}

/// Whether connecting failed because the socket's mode or group refused us.
fn is_permission_denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::PermissionDenied
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Awaits one RPC with [`RPC_TIMEOUT`], naming `what` in any error.
pub(crate) async fn call<T>(
    what: &str,
    rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Error> {
    call_within(what, RPC_TIMEOUT, rpc).await
}

/// Awaits one RPC for at most `limit`, naming `what` in any error.
pub(crate) async fn call_within<T>(
    what: &str,
    limit: Duration,
    rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, rpc).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(Error::Rpc {
            what: what.to_owned(),
            status,
        }),
        Err(_) => Err(Error::TimedOut {
            what: what.to_owned(),
            after: limit,
        }),
    }
}

pub(crate) fn print(out: &mut dyn Write, text: &str) -> Result<(), Error> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(Error::Output)
}

pub(crate) fn print_json(out: &mut dyn Write, value: &impl serde::Serialize) -> Result<(), Error> {
    let mut text = serde_json::to_string_pretty(value).map_err(Error::Json)?;
    text.push('\n');
    print(out, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.pem");
        let check = |text: &str| {
            fs::write(&path, text).expect("write");
            read_csr("devices enroll x", &path)
        };
        let ok = "-----BEGIN CERTIFICATE REQUEST-----\nAA==\n-----END CERTIFICATE REQUEST-----\n";
        assert_eq!(check(ok).expect("a csr"), ok);
        let e = check("-----BEGIN PRIVATE KEY-----\n").expect_err("a key");
        assert!(e.to_string().contains("holds a private key"), "{e}");
        let e = check("hello").expect_err("not pem");
        assert!(
            e.to_string().contains("no PEM certificate signing request"),
            "{e}"
        );
        let missing = read_csr("devices enroll x", &dir.path().join("nope")).expect_err("missing");
        assert!(
            missing.to_string().starts_with("devices enroll x: "),
            "{missing}"
        );
    }

    #[test]
    fn write_new_refuses_to_overwrite_unless_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cert.pem");
        write_new(&path, b"one", false, 0o600).expect("first write");
        let e = write_new(&path, b"two", false, 0o600).expect_err("exists");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        write_new(&path, b"three", true, 0o600).expect("forced");
        assert_eq!(fs::read(&path).expect("read"), b"three");
        assert!(!dir.path().join("cert.pem.tmp").exists());
    }

    #[test]
    fn payload_files_are_read_whole_up_to_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("payload");
        fs::write(&path, [0u8, 0xff, b'\n']).expect("write");
        assert_eq!(
            read_payload("publish t", &path).expect("read"),
            [0u8, 0xff, b'\n']
        );
        let big = fs::File::create(&path).expect("create");
        big.set_len(MAX_PAYLOAD_BYTES + 1).expect("grow");
        let e = read_payload("publish t", &path).expect_err("too large");
        assert_eq!(
            e.to_string(),
            format!("publish t: {}: larger than 4194304 bytes", path.display())
        );
        let e = read_payload("publish t", &dir.path().join("nope")).expect_err("missing");
        assert!(e.to_string().starts_with("publish t: "), "{e}");
    }
}
