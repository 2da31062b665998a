//! The composition root: opens the state, starts every subsystem in order,
//! supervises them, and shuts them down in reverse order.
//!
//! Start order: state dir, CA, store, registry, edge (router + MQTT listener),
//! admin API, then `READY=1`. Shutdown is the reverse: the admin API stops
//! taking requests, the edge ends every session (v5 clients are told
//! "server shutting down") and closes its listener, and the store is dropped
//! last. Any subsystem that stops on its own is a failure: the daemon shuts
//! down and `run` returns the error, so `main` exits non-zero and systemd
//! restarts it.

use std::future::Future;
use std::ops::ControlFlow;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::api::{self, ApiState};
use crate::automation;
use crate::bus;
use crate::ca::{self, Ca};
use crate::config::{self, Config};
use crate::edge::{self, EdgeHandle, TlsMaterial};
use crate::lifecycle;
use crate::model::Qos;
use crate::registry::{self, RegistryHandle};
use crate::seclog::SecLog;
use crate::store::{self, Store};
use crate::systemd;
use crate::telemetry::Telemetry;
use crate::wipe;

/// How long shutdown may take before the daemon gives up waiting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Device events in flight between the edge and the automation runner.
/// Beyond it events are dropped and counted rather than slowing the edge.
const BUS_CAPACITY: usize = 8192;

/// Device reports (meta, update messages) in flight to the lifecycle
/// service; beyond it they are dropped with a warning.
const REPORTS_CAPACITY: usize = 4096;

/// How often the server certificate's expiry is checked.
const RENEW_CHECK: Duration = Duration::from_secs(3600);

/// How often informational writes (last seen) are made durable. redb also
/// reuses freed pages only after a durable commit.
const FLUSH_EVERY: Duration = Duration::from_secs(60);

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state dir {path} has mode {mode:04o}: it must not be accessible by group or others (chmod 700 {path})"
    )]
    StateDirMode { path: PathBuf, mode: u32 },
    #[error(transparent)]
    Ca(#[from] ca::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error("edge: {0}")]
    Edge(#[from] edge::Error),
    #[error(transparent)]
    Api(#[from] api::Error),
    #[error("automation: {0}")]
    Automation(#[from] automation::Error),
    #[error("lifecycle: {0}")]
    Lifecycle(#[from] Box<lifecycle::Error>),
    /// The bound sockets could not be handed to a new start of the hub.
    #[error("cannot take over the listening sockets: {0}")]
    Sockets(std::io::Error),
    #[error(transparent)]
    WipeFiles(#[from] wipe::Error),
    #[error("wipe failed (it is finished on the next start): {0}")]
    Wipe(String),
    #[error("{0} stopped unexpectedly")]
    Subsystem(&'static str),
}

/// The sockets `run` serves, bound by the caller (`main`, or a test on port 0).
#[derive(Debug)]
pub struct Listeners {
    /// The MQTT-over-TLS listener.
    pub mqtt: TcpListener,
    /// The admin API's Unix socket (see [`api::bind_admin_socket`]).
    pub admin: UnixListener,
}

/// Binds the MQTT listener. A function of its own so `main` and the tests bind
/// the same way.
pub async fn bind_mqtt(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Creates the state dir 0700 if missing; refuses one that group or others can
/// enter. `main` calls it before binding the admin socket, which may live in it.
pub fn prepare_state_dir(path: &Path) -> Result<(), Error> {
    let err = |source| Error::StateDir {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(err)?;
        // `recursive` may leave the leaf with the umask's mode; make sure.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    let mode = std::fs::metadata(path).map_err(err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::StateDirMode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Opens the store sealed under `keys/data.key`. The key is created only
/// for a new store or one from before encryption at rest (schema 1, values
/// in clear, sealed as it opens); a sealed store whose key is gone is an
/// error naming the key file, never a silently new key.
pub fn open_store(state_dir: &Path) -> Result<Store, Error> {
    let store_path = state_dir.join("hub.redb");
    let key_path = state_dir.join("keys").join("data.key");
    let may_create =
        !key_path.exists() && matches!(Store::peek_schema(&store_path)?, None | Some(1));
    let key = store::DataKey::open_or_create(&key_path, may_create)?;
    Ok(Store::open(&store_path, key)?)
}

/// Runs the hub until `shutdown` is cancelled (Ok) or a subsystem fails (Err).
///
/// `config.hub.state_dir` must be set (the caller resolves it, see
/// [`Config::resolve_state_dir`]).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let started = Instant::now();
    let state_dir = match &config.hub.state_dir {
        Some(dir) => dir.clone(),
        None => config.resolve_state_dir(&|k| std::env::var_os(k))?,
    };
    prepare_state_dir(&state_dir)?;
    // The sockets outlive a wipe: each start of the hub gets its own handles
    // on the same bound sockets.
    let listen_err = Error::Sockets;
    let mqtt = listeners.mqtt.into_std().map_err(listen_err)?;
    let admin = listeners.admin.into_std().map_err(listen_err)?;
    let mut wiped_before: Option<String> = None;
    loop {
        let incarnation = Listeners {
            mqtt: TcpListener::from_std(mqtt.try_clone().map_err(listen_err)?)
                .map_err(listen_err)?,
            admin: UnixListener::from_std(admin.try_clone().map_err(listen_err)?)
                .map_err(listen_err)?,
        };
        let previous = wiped_before.take();
        match run_once(
            &config,
            &state_dir,
            incarnation,
            &shutdown,
            started,
            previous,
        )
        .await?
        {
            Exit::Stopped => return Ok(()),
            Exit::Wiped(old_ca) => {
                info!("wiped: starting afresh, as on first start");
                wiped_before = Some(old_ca);
            }
        }
    }
}

/// How one start of the hub ended.
enum Exit {
    Stopped,
    /// The state was wiped: start again on the fresh state. The old CA's
    /// fingerprint goes into the new hub's first security event.
    Wiped(String),
}

/// One start of the hub, from opening the state to shutting down.
async fn run_once(
    config: &Config,
    state_dir: &Path,
    listeners: Listeners,
    shutdown: &CancellationToken,
    started: Instant,
    wiped_before: Option<String>,
) -> Result<Exit, Error> {
    let state_dir = state_dir.to_owned();
    // A wipe a crash or power cut interrupted is finished before anything
    // of the old state is opened.
    let interrupted = {
        let dir = state_dir.clone();
        tokio::task::spawn_blocking(move || -> Result<_, wipe::Error> {
            let pending = wipe::pending(&dir)?;
            if pending.is_some() {
                wipe::erase(&dir)?;
            }
            Ok(pending)
        })
        .await
        .map_err(|_| Error::Subsystem("wipe recovery"))??
    };
    if let Some(marker) = &interrupted {
        warn!(
            started_at = %marker.started_at,
            old_ca = %marker.old_ca_fingerprint,
            "an interrupted wipe was finished: everything of the old hub is destroyed"
        );
    }

    let ca = {
        let dir = state_dir.join("ca");
        let names = config.edge.server_names.clone();
        let days = config.ca.server_validity_days;
        tokio::task::spawn_blocking(move || Ca::open_or_create(&dir, &names, days))
            .await
            .map_err(|_| Error::Subsystem("ca setup"))??
    };
    let store = open_store(&state_dir)?;
    if interrupted.is_some() {
        wipe::finish(&state_dir)?;
    }
    let registry = RegistryHandle::new(store, ca, config.ca.clone());
    // A server certificate that expired while the hub was off is renewed before
    // the edge starts with it.
    registry.renew_server_if_due()?;
    let material = TlsMaterial {
        ca_der: registry.ca_der(),
        server: registry.server_identity(),
        crl: registry.crl()?,
        allow_tls12: config.edge.allow_tls12,
    };

    // Subsystems report an unexpected stop here.
    let (failed_tx, mut failed_rx) = mpsc::channel::<Error>(4);

    let edge_stop = CancellationToken::new();
    let edge_tasks = TaskTracker::new();
    let (bus_tx, bus_rx) = bus::channel(BUS_CAPACITY);
    // The security log starts first and stops last: every other subsystem
    // records into it.
    let seclog_stop = CancellationToken::new();
    let seclog_tasks = TaskTracker::new();
    let seclog = SecLog::start(registry.store().clone(), &seclog_tasks, seclog_stop.clone())?;
    // A wiped hub's log starts with the wipe (the old log went with it).
    let old_ca =
        wiped_before.or_else(|| interrupted.as_ref().map(|m| m.old_ca_fingerprint.clone()));
    if let Some(old_ca) = old_ca {
        seclog.record(
            crate::seclog::Event::new(
                crate::seclog::Kind::Wipe,
                crate::seclog::Severity::Info,
                "this hub was wiped for a new owner; everything of the old one was destroyed",
            )
            .evidence("old_ca", old_ca)
            .evidence("new_ca", registry.ca_fingerprint()),
        );
    }
    let (reports_tx, reports_rx) = mpsc::channel(REPORTS_CAPACITY);
    let setup = edge::Setup {
        cfg: config.edge.clone(),
        material,
        listener: listeners.mqtt,
        registry: registry.clone(),
        isolated: registry.isolated()?,
        pairing_cfg: config.pairing.clone(),
        bus: Some(bus_tx.clone()),
        keep_history: config.privacy.history_days > 0,
        reports: Some(reports_tx),
        seclog: seclog.clone(),
        telemetry: Arc::new(Telemetry::new(config.telemetry.clone())),
    };
    let edge = edge::start(setup, &edge_tasks, edge_stop.clone()).await?;

    // Automation runs next to the router: events come from the edge over
    // the bus, commands go back through the edge's hub publish.
    let automation_stop = CancellationToken::new();
    let automation_tasks = TaskTracker::new();
    let automation = automation::start(
        automation::Setup {
            registry: registry.clone(),
            events: bus_rx,
            publish: command_publisher(edge.clone()),
            tz: config.automation.time_zone()?,
            history: config.automation.history,
            clock: automation::Clock::system(),
        },
        &automation_tasks,
        automation_stop.clone(),
    )
    .await?;

    // Lifecycle reads devices' meta and update messages from the edge,
    // publishes offers and chunks through it, and isolates through it.
    let lifecycle_stop = CancellationToken::new();
    let lifecycle_tasks = TaskTracker::new();
    let lifecycle = lifecycle::start(
        lifecycle::Setup {
            registry: registry.clone(),
            seclog: seclog.clone(),
            cfg: config.lifecycle.clone(),
            reports: reports_rx,
            publish: hub_publisher(edge.clone()),
            isolate: isolator(edge.clone()),
            clock: lifecycle::Clock::system(),
        },
        &lifecycle_tasks,
        lifecycle_stop.clone(),
    )
    .await
    .map_err(Box::new)?;

    let api_stop = CancellationToken::new();
    let api_tasks = TaskTracker::new();
    let (wipe_tx, mut wipe_rx) = mpsc::channel::<wipe::Job>(1);
    let wiping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let state = ApiState {
            registry: registry.clone(),
            edge: edge.clone(),
            automation: automation.clone(),
            bus: bus_tx,
            hub_name: config.hub.name.clone(),
            history_days: config.privacy.history_days,
            wipe: wipe_tx,
            wiping: wiping.clone(),
            started,
            max_payload: config.edge.max_packet_size,
            lifecycle: lifecycle.clone(),
            lifecycle_cfg: (
                config.lifecycle.isolate_after_support_end,
                config.lifecycle.support_warning_days,
            ),
            seclog: seclog.clone(),
            seclog_days: config.seclog.retention_days,
            max_image_size: config.lifecycle.max_image_size,
            state_dir: state_dir.clone(),
            allow_tls12: config.edge.allow_tls12,
        };
        let group = config.admin.group.clone();
        let stop = api_stop.clone();
        let failed = failed_tx.clone();
        api_tasks.spawn(async move {
            let result = api::serve(listeners.admin, state, group, stop.clone()).await;
            if !stop.is_cancelled() {
                let e = match result {
                    Err(e) => Error::Api(e),
                    Ok(()) => Error::Subsystem("admin api"),
                };
                let _ = failed.send(e).await;
            }
        });
    }

    let aux_stop = CancellationToken::new();
    let aux_tasks = TaskTracker::new();
    aux_tasks.spawn(systemd::watchdog(aux_stop.clone()));
    aux_tasks.spawn(renew_server_cert(
        registry.clone(),
        edge.clone(),
        aux_stop.clone(),
        failed_tx.clone(),
    ));
    aux_tasks.spawn(flush_store(registry.clone(), aux_stop.clone()));
    aux_tasks.spawn(prune_history(
        registry.clone(),
        config.privacy.history_days,
        aux_stop.clone(),
    ));
    aux_tasks.spawn(publish_alerts(
        seclog.clone(),
        edge.clone(),
        aux_stop.clone(),
    ));
    aux_tasks.spawn(prune_seclog(
        registry.clone(),
        config.seclog.clone(),
        aux_stop.clone(),
    ));

    aux_tasks.spawn(retire_superseded(
        registry.clone(),
        edge.clone(),
        i64::from(config.ca.renewal_grace_days) * 86_400,
        aux_stop.clone(),
    ));
    drop(failed_tx);

    let status = format!(
        "serving mqtt on {}, ca {}",
        edge.local_addr(),
        &registry.ca_fingerprint()[..16]
    );
    info!(state_dir = %state_dir.display(), "{status}");
    aux_tasks.spawn(watch_clock(status.clone(), aux_stop.clone()));
    let status = match crate::clock::warning() {
        Some(warning) => {
            warn!("{warning}");
            format!("{status}; clock not set")
        }
        None => status,
    };
    systemd::ready(&status);

    let mut wipe_job = None;
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        Some(e) = failed_rx.recv() => {
            error!(error = %e, "subsystem failed; shutting down");
            Err(e)
        }
        Some(job) = wipe_rx.recv() => {
            wipe_job = Some(job);
            Ok(())
        }
    };

    if let Some(job) = wipe_job {
        // The admin API keeps serving (the wipe's own request waits on it)
        // but refuses everything else; the rest stops inside `wipe_now`.
        wiping.store(true, std::sync::atomic::Ordering::SeqCst);
        let old_ca = registry.ca_fingerprint().to_owned();
        let stops = [
            ("aux", &aux_stop, &aux_tasks),
            ("lifecycle", &lifecycle_stop, &lifecycle_tasks),
            ("automation", &automation_stop, &automation_tasks),
            ("edge", &edge_stop, &edge_tasks),
            ("security log", &seclog_stop, &seclog_tasks),
        ];
        let result = wipe_now(
            config,
            &state_dir,
            &registry,
            &edge,
            &automation,
            job.request,
            &stops,
        )
        .await;
        let failed = result.as_ref().err().cloned();
        let _ = job.reply.send(result);
        // The receipt is on its way; the API ends once it has been sent.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        stop_one(("admin api", &api_stop, &api_tasks), deadline).await;
        drop(lifecycle);
        drop(automation);
        drop(edge);
        drop(seclog);
        drop(registry);
        return match failed {
            // The marker is on disk: the next start finishes the wipe.
            Some(why) => Err(Error::Wipe(why)),
            None => Ok(Exit::Wiped(old_ca)),
        };
    }

    systemd::stopping();
    info!("shutting down");
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    for (name, stop, tasks) in [
        ("aux", &aux_stop, &aux_tasks),
        ("admin api", &api_stop, &api_tasks),
        ("lifecycle", &lifecycle_stop, &lifecycle_tasks),
        ("automation", &automation_stop, &automation_tasks),
        ("edge", &edge_stop, &edge_tasks),
        ("security log", &seclog_stop, &seclog_tasks),
    ] {
        stop_one((name, stop, tasks), deadline).await;
    }
    // Last: every change was committed durably when it was made; this makes
    // the informational last-seen times durable too.
    if let Err(e) = registry.store().flush() {
        warn!(error = %e, "final store flush failed");
    }
    drop(lifecycle);
    drop(automation);
    drop(edge);
    drop(seclog);
    drop(registry);
    info!("stopped");
    outcome.map(|()| Exit::Stopped)
}

type Stop<'a> = (&'static str, &'a CancellationToken, &'a TaskTracker);

/// Tells a subsystem to stop and waits for its tasks until `deadline`,
/// saying so if they outlast it.
async fn stop_one((name, stop, tasks): Stop<'_>, deadline: tokio::time::Instant) {
    stop.cancel();
    tasks.close();
    if tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_err()
    {
        warn!(subsystem = name, "did not stop in time");
    }
}

/// The wipe (see [`wipe`] for the order and why it survives a crash):
/// marker, reset commands, stop the subsystems, erase, new CA and store,
/// marker gone. Returns the report for the receipt.
async fn wipe_now(
    config: &Config,
    state_dir: &Path,
    registry: &RegistryHandle,
    edge: &EdgeHandle,
    automation: &automation::AutomationHandle,
    request: wipe::Request,
    stops: &[Stop<'_>],
) -> Result<wipe::Report, String> {
    let now = || {
        jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .map_or_else(|_| String::new(), |t| t.to_string())
    };
    let started_at = now();
    let old_ca_fingerprint = registry.ca_fingerprint().to_owned();
    warn!(target: "security", old_ca = %old_ca_fingerprint, "wipe requested: destroying everything this hub knows");
    let marker = wipe::Marker {
        started_at: started_at.clone(),
        old_ca_fingerprint: old_ca_fingerprint.clone(),
    };
    {
        let dir = state_dir.to_owned();
        tokio::task::spawn_blocking(move || wipe::begin(&dir, &marker))
            .await
            .map_err(|_| "writing the wipe marker panicked".to_owned())?
            .map_err(|e| e.to_string())?;
    }

    // Every online device is told to reset; each acknowledgement is awaited
    // in parallel, all within the timeout.
    let online = edge.connected();
    let mut waits = Vec::new();
    for id in &online {
        // Isolated devices get no commands, not even this one.
        let reason = "the hub is being wiped: forget your credentials";
        let Ok(mut acks) = edge.send_reset(id, reason).await else {
            continue;
        };
        let id = id.clone();
        waits.push(async move {
            tokio::time::timeout(request.reset_timeout, acks.recv())
                .await
                .ok()
                .flatten()
                .map(|_| id)
        });
    }
    let mut acknowledged: Vec<String> = futures::future::join_all(waits)
        .await
        .into_iter()
        .flatten()
        .map(|id| id.to_string())
        .collect();
    acknowledged.sort();

    // What is about to be destroyed, for the receipt.
    let mut destroyed = std::collections::BTreeMap::new();
    let variables = automation.variables().await.map(|v| v.len()).unwrap_or(0);
    let (counts, devices) = {
        let r = registry.clone();
        tokio::task::spawn_blocking(move || {
            let store = r.store();
            Ok::<_, store::Error>((store.counts()?, store.devices()?))
        })
        .await
        .map_err(|_| "counting the store panicked".to_owned())?
        .map_err(|e| e.to_string())?
    };
    for (table, n) in counts {
        let category = match table {
            "devices" => "devices",
            "certs" => "certificates",
            "retained" => "states",
            "history" => "history records",
            "rules" => "rules",
            "automation" => continue,
            other => other,
        };
        destroyed.insert(category.to_owned(), n);
    }
    destroyed.insert("variables".to_owned(), variables as u64);
    destroyed.insert("keys".to_owned(), wipe::SECRETS.len() as u64);
    let mut not_acknowledged: Vec<String> = devices
        .iter()
        .map(|d| d.id.to_string())
        .filter(|id| !acknowledged.contains(id))
        .collect();
    not_acknowledged.sort();

    // Nothing may use the old state while it goes; each has the full grace.
    for &subsystem in stops {
        stop_one(subsystem, tokio::time::Instant::now() + SHUTDOWN_GRACE).await;
    }

    let dir = state_dir.to_owned();
    let names = config.edge.server_names.clone();
    let days = config.ca.server_validity_days;
    let (new_ca_fingerprint, new_ca_pem, new_ca_key_pkcs8) =
        tokio::task::spawn_blocking(move || -> Result<_, String> {
            wipe::erase(&dir).map_err(|e| e.to_string())?;
            let ca =
                Ca::open_or_create(&dir.join("ca"), &names, days).map_err(|e| e.to_string())?;
            let store = open_store(&dir).map_err(|e| e.to_string())?;
            store.flush().map_err(|e| e.to_string())?;
            drop(store);
            wipe::finish(&dir).map_err(|e| e.to_string())?;
            Ok((ca.fingerprint(), ca.ca_pem().to_owned(), ca.key_pkcs8_der()))
        })
        .await
        .map_err(|_| "the wipe panicked".to_owned())??;
    let finished_at = now();
    warn!(target: "security", old_ca = %old_ca_fingerprint, new_ca = %new_ca_fingerprint, acknowledged = acknowledged.len(), not_acknowledged = not_acknowledged.len(), "wipe finished");
    Ok(wipe::Report {
        hub: config.hub.name.clone(),
        started_at,
        finished_at,
        old_ca_fingerprint,
        new_ca_fingerprint,
        new_ca_pem,
        new_ca_key_pkcs8,
        destroyed,
        acknowledged,
        not_acknowledged,
    })
}

/// How a rule's command reaches a device: the hub's own publish at QoS 1,
/// which refuses commands to isolated devices.
fn command_publisher(edge: EdgeHandle) -> automation::Publisher {
    Arc::new(move |topic: String, payload| {
        let edge = edge.clone();
        Box::pin(async move {
            edge.publish(&topic, payload, Qos::AtLeastOnce, false)
                .await
                .map_err(|e| match e {
                    edge::Error::Isolated(id) => automation::SendError::Isolated(id),
                    other => automation::SendError::Failed(other.to_string()),
                })
        })
    })
}

/// Publishes as the hub for the lifecycle service (offers, chunks).
fn hub_publisher(edge: EdgeHandle) -> lifecycle::Publisher {
    Arc::new(move |topic: String, payload, retain| {
        let edge = edge.clone();
        Box::pin(async move {
            edge.publish(&topic, payload, Qos::AtLeastOnce, retain)
                .await
                .map_err(|e| e.to_string())
        })
    })
}

/// Isolates a device for the lifecycle service's policies.
fn isolator(edge: EdgeHandle) -> lifecycle::Isolator {
    Arc::new(move |id, reason: String| {
        let edge = edge.clone();
        Box::pin(async move {
            edge.isolate(&id, &reason, "lifecycle policy")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    })
}

/// Publishes every alert of the security log on `$hub/alerts` (QoS 1, not
/// retained), for integrations granted it: anomalies, integrity failures,
/// support ends, throttled addresses.
async fn publish_alerts(seclog: SecLog, edge: EdgeHandle, stop: CancellationToken) {
    let mut entries = seclog.subscribe();
    loop {
        let entry = tokio::select! {
            _ = stop.cancelled() => return,
            e = entries.recv() => match e {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(skipped = n, "alerts publisher fell behind the security log");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        };
        if entry.severity != crate::seclog::Severity::Alert.as_str() {
            continue;
        }
        let payload = serde_json::json!({
            "seq": entry.seq,
            "at_ms": entry.at_ms,
            "kind": entry.kind,
            "device": entry.device,
            "message": entry.message,
            "evidence": entry.evidence,
        })
        .to_string();
        if let Err(e) = edge
            .publish("$hub/alerts", payload.into(), Qos::AtLeastOnce, false)
            .await
        {
            warn!(error = %e, "cannot publish an alert on $hub/alerts");
        }
    }
}

/// Deletes security events past `[seclog] retention_days` or beyond
/// `max_entries`, at start and hourly.
async fn prune_seclog(
    registry: RegistryHandle,
    cfg: config::SeclogSection,
    stop: CancellationToken,
) {
    let prune = move || {
        let registry = registry.clone();
        let cfg = cfg.clone();
        async move {
            let cutoff = crate::clock::trusted_now().unix_timestamp() * 1000
                - i64::from(cfg.retention_days) * 86_400_000;
            let max = cfg.max_entries;
            match on_registry(&registry, move |r| {
                r.store()
                    .prune_seclog(cutoff, max)
                    .map_err(registry::Error::from)
            })
            .await
            {
                Ok(0) => {}
                Ok(n) => info!(pruned = n, "security events past their retention deleted"),
                Err(e) => warn!(error = %e, "cannot prune the security log"),
            }
            ControlFlow::Continue(())
        }
    };
    let _ = prune().await;
    every(Duration::from_secs(3600), stop, prune).await;
}

/// Runs `job` every `period`, the first time one period after start, until
/// `stop` or until the job breaks.
async fn every<F, Fut>(period: Duration, stop: CancellationToken, mut job: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ControlFlow<()>>,
{
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if job().await.is_break() {
            return;
        }
    }
}

/// Runs registry work on the blocking pool; a panic there becomes an error
/// message, since these periodic jobs only log.
async fn on_registry<T: Send + 'static>(
    registry: &RegistryHandle,
    work: impl FnOnce(&RegistryHandle) -> Result<T, registry::Error> + Send + 'static,
) -> Result<T, String> {
    let r = registry.clone();
    match tokio::task::spawn_blocking(move || work(&r)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("the task panicked".to_owned()),
    }
}

/// Hourly: revokes device certificates replaced by a renewal more than the
/// grace period ago, for devices that never came back with the new one.
async fn retire_superseded(
    registry: RegistryHandle,
    edge: EdgeHandle,
    grace: i64,
    stop: CancellationToken,
) {
    every(RENEW_CHECK, stop, || async {
        match on_registry(&registry, move |r| r.retire_superseded(grace)).await {
            Ok(Some(crl)) => {
                if let Err(e) = edge.set_crl(crl) {
                    error!(error = %e, "cannot install the CRL retiring superseded certificates");
                }
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "retiring superseded certificates failed"),
        }
        ControlFlow::Continue(())
    })
    .await
}

/// Every minute: says when a clock that was behind has been set (status
/// stops warning by itself; this is for the journal).
async fn watch_clock(status: String, stop: CancellationToken) {
    let mut behind = crate::clock::warning().is_some();
    every(FLUSH_EVERY, stop, || {
        let now_behind = crate::clock::warning().is_some();
        if behind && !now_behind {
            info!("the system clock has been set: certificates are checked against it again");
            systemd::status(&status);
        }
        behind = now_behind;
        std::future::ready(ControlFlow::Continue(()))
    })
    .await
}

/// At start and hourly: deletes device history older than `days` (all of
/// it when `days` is 0, so turning history off also clears it).
async fn prune_history(registry: RegistryHandle, days: u32, stop: CancellationToken) {
    let prune = || async {
        let cutoff = jiff::Timestamp::now().as_millisecond() - i64::from(days) * 86_400_000;
        match on_registry(&registry, move |r| {
            r.store()
                .prune_history(cutoff)
                .map_err(registry::Error::from)
        })
        .await
        {
            Ok(0) => {}
            Ok(pruned) => info!(
                pruned,
                days, "device history older than the retention pruned"
            ),
            Err(e) => warn!(error = %e, "pruning device history failed"),
        }
        ControlFlow::Continue(())
    };
    let _ = prune().await;
    every(RENEW_CHECK, stop, prune).await
}

/// Every minute: makes informational writes durable.
async fn flush_store(registry: RegistryHandle, stop: CancellationToken) {
    every(FLUSH_EVERY, stop, || async {
        let flushed = on_registry(&registry, |r| {
            r.store().flush().map_err(registry::Error::from)
        })
        .await;
        if let Err(e) = flushed {
            warn!(error = %e, "periodic store flush failed");
        }
        ControlFlow::Continue(())
    })
    .await
}

/// Hourly: renews the edge's server certificate when it is due.
async fn renew_server_cert(
    registry: RegistryHandle,
    edge: EdgeHandle,
    stop: CancellationToken,
    failed: mpsc::Sender<Error>,
) {
    every(RENEW_CHECK, stop, || async {
        match on_registry(&registry, |r| r.renew_server_if_due()).await {
            Ok(Some(identity)) => {
                if let Err(e) = edge.set_server_identity(identity) {
                    let _ = failed.send(Error::Edge(e)).await;
                    return ControlFlow::Break(());
                }
            }
            Ok(None) => {}
            // Renewal failing is serious but not yet fatal: the current
            // certificate is still valid for days. Say so loudly and retry.
            Err(e) => error!(error = %e, "server certificate renewal failed"),
        }
        ControlFlow::Continue(())
    })
    .await
}
