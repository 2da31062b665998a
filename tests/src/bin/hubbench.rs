//! `hubbench`: benchmarks hubd against Debian's Mosquitto 2.0 on the same
//! machine, with the same CA, the same device certificates and the same
//! client code.
//!
//! `hubbench throughput` runs hubd in this process ([`TestHub`]) and Mosquitto
//! as a child process, both on 127.0.0.1 with mutual TLS, and has publisher
//! devices send fixed-size messages through each broker at QoS 0 and QoS 1.
//! It prints one table: publisher-side ingest rate (identical client code on
//! both brokers), subscriber-side delivery rate, the hubd/Mosquitto ratios and
//! the resident memory of each broker.
//!
//! The subscriber paths differ, and the output says so: hubd's ACL lets no
//! device subscribe to another device's topics, so on hubd the subscriber is
//! the hub's own admin `Watch` stream (gRPC over the admin socket), while on
//! Mosquitto it is an MQTT client subscribed to the same filter.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hub_proto::v1 as pb;
use hub_tests::{DeviceIdentity, TestHub, loopback_name};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use rustls::ClientConfig;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// The topic filter every subscriber uses; publishers send to
/// `d/<own id>/event/bench`, which hubd's ACL allows a device.
const BENCH_FILTER: &str = "d/+/event/bench";

/// Longest any one connection, subscription or start-up may take.
const SETUP_WAIT: Duration = Duration::from_secs(15);

/// Longest one measured run may take before it is reported as incomplete.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// After the publishers are done, a subscriber that receives nothing for this
/// long is taken to have received everything it will (QoS 0 may drop).
const IDLE_LIMIT: Duration = Duration::from_secs(2);

/// Requests a publisher's `AsyncClient` may queue for its event loop; bounded
/// so that the publisher is paced by the connection, not by memory.
const REQUEST_CHANNEL: usize = 256;

/// Unacknowledged QoS 1 publishes per connection (both brokers' default).
const INFLIGHT: u16 = 100;

#[derive(Parser)]
#[command(name = "hubbench", about = "Benchmarks for hubd")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish throughput over mTLS: hubd versus Mosquitto, QoS 0 and 1.
    Throughput(ThroughputArgs),
}

#[derive(Args, Clone, Copy)]
struct ThroughputArgs {
    /// Publisher devices, each on its own connection.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Messages each publisher sends per run.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hubbench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Throughput(args) => throughput(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hubbench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Which broker a run goes through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Broker {
    Hubd,
    Mosquitto,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Hubd => "hubd",
            Broker::Mosquitto => "mosquitto",
        }
    }
}

/// What one measured run found.
struct RunResult {
    qos: QoS,
    broker: Broker,
    /// Messages the publishers sent.
    sent: u64,
    /// Messages the subscriber received.
    received: u64,
    /// From the start signal until the last publisher's final PUBACK.
    ingest: Duration,
    /// From the start signal until the subscriber's last message.
    delivery: Duration,
    /// The broker's resident set after the run, in KiB.
    rss_end_kib: u64,
    /// The broker's peak resident set during the run (or since it started, if
    /// the kernel refused to reset the high-water mark), in KiB.
    rss_peak_kib: u64,
    /// Whether `rss_peak_kib` covers only this run.
    peak_is_per_run: bool,
    /// This process's peak resident set during the run, in KiB: for Mosquitto
    /// runs, the idle hub plus the same bench clients, for comparison.
    bench_peak_kib: u64,
    /// hubd only: the `dropped_slow_subscriber` counter's growth in this run.
    hub_dropped: Option<u64>,
    /// hubd only: the `publishes_received` counter's growth in this run.
    hub_received: Option<u64>,
}

async fn throughput(args: ThroughputArgs) -> anyhow::Result<()> {
    if args.publishers == 0 || args.messages == 0 {
        bail!("--publishers and --messages must be at least 1");
    }
    let mosquitto_bin = ensure_mosquitto()?;
    let mosquitto_version = mosquitto_version(&mosquitto_bin);

    let hub = TestHub::start().await.context("start hubd")?;
    let mut publishers = Vec::with_capacity(args.publishers);
    for i in 0..args.publishers {
        publishers.push(hub.enroll(&format!("bench-pub-{i}")).await?);
    }
    // Only Mosquitto's subscriber is an MQTT device; hubd's is the Watch stream.
    let subscriber = hub.enroll("bench-sub").await?;

    let mosquitto = Mosquitto::start(&mosquitto_bin, &hub.state_dir.join("ca"), &subscriber)
        .await
        .context("start mosquitto")?;
    let hub_tls = tls_version(hub.mqtt_addr, &subscriber.client_config()?).await?;
    let mosq_tls = tls_version(mosquitto.addr, &subscriber.client_config()?).await?;

    let payload = Bytes::from(vec![b'x'; args.payload]);
    let mut results = Vec::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        for broker in [Broker::Hubd, Broker::Mosquitto] {
            eprintln!(
                "hubbench: running qos {} through {}",
                qos as u8,
                broker.name()
            );
            let result = run_once(
                &hub,
                &mosquitto,
                broker,
                qos,
                &publishers,
                &subscriber,
                args.messages,
                &payload,
            )
            .await
            .with_context(|| format!("qos {} through {}", qos as u8, broker.name()))?;
            results.push(result);
        }
    }
    mosquitto.stop().await;
    hub.stop().await.context("stop hubd")?;

    print_table(&args, &mosquitto_version, &hub_tls, &mosq_tls, &results);
    Ok(())
}

/// One measured run: subscribe, connect every publisher, then release them
/// together and time ingest (publisher side) and delivery (subscriber side).
#[allow(clippy::too_many_arguments)]
async fn run_once(
    hub: &TestHub,
    mosquitto: &Mosquitto,
    broker: Broker,
    qos: QoS,
    publishers: &[DeviceIdentity],
    subscriber: &DeviceIdentity,
    messages: u64,
    payload: &Bytes,
) -> anyhow::Result<RunResult> {
    let (addr, broker_pid) = match broker {
        Broker::Hubd => (hub.mqtt_addr, std::process::id()),
        Broker::Mosquitto => (mosquitto.addr, mosquitto.pid),
    };
    let max_packet = payload.len() + 1024;
    let progress = Arc::new(Progress::new());
    let sub_task = match broker {
        Broker::Hubd => hub_watch(hub, progress.clone()).await?,
        Broker::Mosquitto => {
            mqtt_subscriber(subscriber, addr, qos, max_packet, progress.clone()).await?
        }
    };

    let (go_tx, go_rx) = watch::channel(false);
    let mut pubs = Vec::with_capacity(publishers.len());
    for identity in publishers {
        pubs.push(
            Publisher::connect(
                identity,
                addr,
                qos,
                messages,
                payload.clone(),
                max_packet,
                go_rx.clone(),
            )
            .await?,
        );
    }

    let before = match broker {
        Broker::Hubd => Some(hub.status().await?.counters.unwrap_or_default()),
        Broker::Mosquitto => None,
    };
    let peak_is_per_run = reset_peak(broker_pid) && reset_peak(std::process::id());

    let start = Instant::now();
    progress.start(start);
    go_tx
        .send(true)
        .context("publishers gone before the start")?;

    let mut ingest_end = start;
    for publisher in pubs {
        let done = tokio::time::timeout_at((start + RUN_LIMIT).into(), publisher.finish())
            .await
            .context("publishers did not finish in time")??;
        ingest_end = ingest_end.max(done);
    }

    // Wait for the subscriber: all messages, or silence after the publishers.
    let sent = messages * publishers.len() as u64;
    loop {
        let received = progress.received.load(Ordering::Acquire);
        if received >= sent {
            break;
        }
        let quiet = progress.last_elapsed().max(ingest_end - start);
        if start.elapsed() > quiet + IDLE_LIMIT || start.elapsed() > RUN_LIMIT {
            break;
        }
        // Polling a counter another task advances; the wait ends as soon as
        // the last message arrives.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = progress.received.load(Ordering::Acquire);
    let delivery = progress.last_elapsed();
    sub_task.abort();

    let (rss_end_kib, rss_peak_kib) = rss_kib(broker_pid)?;
    let (_, bench_peak_kib) = rss_kib(std::process::id())?;
    let (hub_dropped, hub_received) = match before {
        Some(before) => {
            let after = hub.status().await?.counters.unwrap_or_default();
            (
                Some(after.dropped_slow_subscriber - before.dropped_slow_subscriber),
                Some(after.publishes_received - before.publishes_received),
            )
        }
        None => (None, None),
    };
    Ok(RunResult {
        qos,
        broker,
        sent,
        received,
        ingest: ingest_end - start,
        delivery,
        rss_end_kib,
        rss_peak_kib,
        peak_is_per_run,
        bench_peak_kib,
        hub_dropped,
        hub_received,
    })
}

/// What a subscriber has received, shared with the task that counts it.
struct Progress {
    /// Messages received so far.
    received: AtomicU64,
    /// Nanoseconds from `origin` to the start signal.
    start_nanos: AtomicU64,
    /// Nanoseconds from `origin` to the latest message.
    last_nanos: AtomicU64,
    /// A fixed point in time the two offsets count from.
    origin: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress {
            received: AtomicU64::new(0),
            start_nanos: AtomicU64::new(0),
            last_nanos: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    fn start(&self, at: Instant) {
        let nanos = (at - self.origin).as_nanos() as u64;
        self.start_nanos.store(nanos, Ordering::Release);
        self.last_nanos.store(nanos, Ordering::Release);
    }

    fn hit(&self) {
        let nanos = self.origin.elapsed().as_nanos() as u64;
        self.last_nanos.store(nanos, Ordering::Release);
        self.received.fetch_add(1, Ordering::AcqRel);
    }

    /// Time from the start signal to the latest message.
    fn last_elapsed(&self) -> Duration {
        let start = self.start_nanos.load(Ordering::Acquire);
        let last = self.last_nanos.load(Ordering::Acquire);
        Duration::from_nanos(last.saturating_sub(start))
    }
}

/// hubd's subscriber: the admin API's `Watch` on [`BENCH_FILTER`]. The call
/// answers only after the router acknowledged the subscription.
async fn hub_watch(hub: &TestHub, progress: Arc<Progress>) -> anyhow::Result<JoinHandle<()>> {
    let mut stream = hub
        .admin()
        .await?
        .watch(pb::WatchRequest {
            filter: BENCH_FILTER.to_owned(),
        })
        .await?
        .into_inner();
    Ok(tokio::spawn(async move {
        while let Ok(Some(_)) = stream.message().await {
            progress.hit();
        }
    }))
}

/// Mosquitto's subscriber: an MQTT device on [`BENCH_FILTER`] at `qos`.
async fn mqtt_subscriber(
    identity: &DeviceIdentity,
    addr: SocketAddr,
    qos: QoS,
    max_packet: usize,
    progress: Arc<Progress>,
) -> anyhow::Result<JoinHandle<()>> {
    let (client, mut eventloop) = mqtt_connect(identity, addr, max_packet).await?;
    client.subscribe(BENCH_FILTER, qos).await?;
    tokio::time::timeout(SETUP_WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => bail!("subscriber: {e}"),
            }
        }
    })
    .await
    .context("no SUBACK in time")??;
    Ok(tokio::spawn(async move {
        // Holding the client keeps the event loop's request channel open.
        let _client = client;
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(_)) = event {
                progress.hit();
            }
        }
    }))
}

/// Connects a rumqttc client with `identity` and waits for a successful CONNACK.
async fn mqtt_connect(
    identity: &DeviceIdentity,
    addr: SocketAddr,
    max_packet: usize,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut options = MqttOptions::new(&identity.id, addr.ip().to_string(), addr.port());
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(INFLIGHT)
        .set_max_packet_size(max_packet.max(10 * 1024), max_packet.max(10 * 1024))
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            identity.client_config()?,
        )));
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
    match tokio::time::timeout(SETUP_WAIT, eventloop.poll())
        .await
        .with_context(|| format!("{}: no CONNACK in time", identity.id))?
    {
        Ok(Event::Incoming(Packet::ConnAck(ack)))
            if ack.code == rumqttc::ConnectReturnCode::Success => {}
        Ok(other) => bail!("{}: unexpected first event {other:?}", identity.id),
        Err(e) => bail!("{}: connect failed: {e}", identity.id),
    }
    Ok((client, eventloop))
}

/// A connected publisher waiting for the start signal.
struct Publisher {
    /// Sends the messages, then the fence.
    sender: JoinHandle<anyhow::Result<()>>,
    /// Polls the connection; answers when the last PUBACK arrived.
    done: oneshot::Receiver<Instant>,
    /// The event loop's task, ended after the run.
    driver: JoinHandle<()>,
    client: AsyncClient,
}

impl Publisher {
    /// Connects and arms a publisher: on `go` it sends `messages` messages at
    /// `qos` to `d/<id>/event/bench`, then one QoS 1 "fence" to
    /// `d/<id>/event/fence`. Both brokers handle a connection's packets in
    /// order, so the fence's PUBACK means every earlier message was taken in;
    /// at QoS 1 the fence is simply the last of the PUBACKs.
    async fn connect(
        identity: &DeviceIdentity,
        addr: SocketAddr,
        qos: QoS,
        messages: u64,
        payload: Bytes,
        max_packet: usize,
        mut go: watch::Receiver<bool>,
    ) -> anyhow::Result<Publisher> {
        let (client, mut eventloop) = mqtt_connect(identity, addr, max_packet).await?;
        let want_acks = if qos == QoS::AtMostOnce {
            1
        } else {
            messages + 1
        };
        let (done_tx, done) = oneshot::channel();
        let driver = tokio::spawn(async move {
            let mut acks = 0;
            let mut done_tx = Some(done_tx);
            // Runs until the connection ends; an error before the last PUBACK
            // drops `done_tx`, which the publisher reports.
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = event {
                    acks += 1;
                    if acks == want_acks
                        && let Some(tx) = done_tx.take()
                    {
                        let _ = tx.send(Instant::now());
                    }
                }
            }
        });
        let id = identity.id.clone();
        let sender_client = client.clone();
        let sender = tokio::spawn(async move {
            go.wait_for(|go| *go).await?;
            let topic = format!("d/{id}/event/bench");
            for _ in 0..messages {
                sender_client
                    .publish_bytes(topic.clone(), qos, false, payload.clone())
                    .await?;
            }
            sender_client
                .publish_bytes(
                    format!("d/{id}/event/fence"),
                    QoS::AtLeastOnce,
                    false,
                    Bytes::from_static(b"fence"),
                )
                .await?;
            Ok(())
        });
        Ok(Publisher {
            sender,
            done,
            driver,
            client,
        })
    }

    /// Waits until the broker acknowledged everything; returns when, then
    /// disconnects.
    async fn finish(self) -> anyhow::Result<Instant> {
        self.sender.await??;
        let done = self
            .done
            .await
            .context("publisher connection ended before its last PUBACK")?;
        let _ = self.client.disconnect().await;
        if tokio::time::timeout(SETUP_WAIT, self.driver).await.is_err() {
            bail!("publisher did not disconnect");
        }
        Ok(done)
    }
}

/// Resets the peak-RSS mark (`VmHWM`) of process `pid`; false if the kernel
/// does not allow it, in which case peaks count from the process's start.
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// `(VmRSS, VmHWM)` of process `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{path}: no {name} line"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The TLS version a device handshake with `addr` negotiates.
async fn tls_version(addr: SocketAddr, config: &Arc<ClientConfig>) -> anyhow::Result<String> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(config.clone())
        .connect(loopback_name(), tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr}"))?;
    Ok(match tls.get_ref().1.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_owned(),
        other => format!("{other:?}"),
    })
}

/// Finds `mosquitto` on PATH or in the sbin directories (Debian installs it
/// in /usr/sbin, which an ordinary user's PATH often lacks).
fn find_mosquitto() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("mosquitto"))
        .find(|candidate| candidate.is_file())
}

/// Finds Mosquitto, installing Debian's package with apt-get if it is missing.
fn ensure_mosquitto() -> anyhow::Result<PathBuf> {
    if let Some(found) = find_mosquitto() {
        return Ok(found);
    }
    eprintln!("############################################################");
    eprintln!("## hubbench: mosquitto NOT FOUND on PATH or in /usr/sbin.");
    eprintln!("## hubbench: INSTALLING IT: apt-get install -y mosquitto");
    eprintln!("############################################################");
    let install = || {
        std::process::Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "mosquitto"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let installed = match install() {
        Ok(status) if status.success() => true,
        // A fresh machine may have no package lists yet: fetch them once.
        Ok(_) => {
            eprintln!("hubbench: install failed; running apt-get update and trying again");
            let _ = std::process::Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
            install().is_ok_and(|s| s.success())
        }
        Err(e) => {
            eprintln!("hubbench: cannot run apt-get: {e}");
            false
        }
    };
    match find_mosquitto() {
        Some(found) => Ok(found),
        None if installed => bail!("apt-get installed mosquitto but no mosquitto binary was found"),
        None => bail!(
            "mosquitto is not installed and `apt-get install -y mosquitto` failed \
             (it needs root); install Debian's mosquitto package and run again"
        ),
    }
}

/// Mosquitto's version line from `mosquitto -h`, e.g. "mosquitto version 2.0.11".
fn mosquitto_version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("-h")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|line| line.starts_with("mosquitto version"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "mosquitto (version unknown)".to_owned())
}

/// A Mosquitto broker running as a child of this process.
struct Mosquitto {
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
    /// Holds the config, certificates and log alive until the broker stops.
    _dir: TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto on a free loopback port with hubd's CA and server
    /// certificate, and waits until a device's TLS handshake succeeds.
    async fn start(bin: &Path, ca_dir: &Path, probe: &DeviceIdentity) -> anyhow::Result<Mosquitto> {
        let dir = tempfile::tempdir()?;
        for name in ["ca.pem", "server.pem", "server.key"] {
            std::fs::copy(ca_dir.join(name), dir.path().join(name))
                .with_context(|| format!("copy {}", ca_dir.join(name).display()))?;
        }
        // Ask the kernel for a free port, then hand it to Mosquitto. Another
        // process could take it in between; Mosquitto would then fail to
        // start, which is reported below.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let d = dir.path().display();
        // Started as root, Mosquitto would switch to the `mosquitto` user,
        // which cannot read the private temp dir; stay as the caller instead.
        let user = if nix::unistd::geteuid().is_root() {
            "user root\n"
        } else {
            ""
        };
        let config = format!(
            "{user}per_listener_settings false\n\
             allow_anonymous false\n\
             persistence false\n\
             max_queued_messages 100000\n\
             max_inflight_messages {INFLIGHT}\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             listener {port} 127.0.0.1\n\
             cafile {d}/ca.pem\n\
             certfile {d}/server.pem\n\
             keyfile {d}/server.key\n\
             tls_version tlsv1.3\n\
             require_certificate true\n\
             use_identity_as_username true\n"
        );
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, config)?;
        let log_path = dir.path().join("mosquitto.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = tokio::process::Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let pid = child.id().context("mosquitto has a pid")?;

        let config = probe.client_config()?;
        let deadline = Instant::now() + SETUP_WAIT;
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("mosquitto exited with {status} during start-up:\n{log}");
            }
            if tls_version(addr, &config).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("mosquitto did not accept TLS on {addr} within {SETUP_WAIT:?}:\n{log}");
            }
            // Polling the readiness condition (a successful handshake).
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Mosquitto {
            child,
            pid,
            addr,
            _dir: dir,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn rate(messages: u64, elapsed: Duration) -> f64 {
    messages as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn print_table(
    args: &ThroughputArgs,
    mosquitto_version: &str,
    hub_tls: &str,
    mosq_tls: &str,
    results: &[RunResult],
) {
    let tls = if hub_tls == mosq_tls {
        hub_tls.to_owned()
    } else {
        format!("hubd {hub_tls}, mosquitto {mosq_tls}")
    };
    println!(
        "workload: {} publishers x {} msgs, {} B payload, loopback, mTLS ({tls}); {mosquitto_version}",
        args.publishers, args.messages, args.payload
    );
    println!(
        "{:<4} {:<10} {:>12} {:>7} {:>14} {:>7} {:>13} {:>10} {:>10}",
        "qos",
        "broker",
        "ingest msg/s",
        "ratio",
        "deliver msg/s",
        "ratio",
        "received",
        "rss_end",
        "rss_peak"
    );
    let find =
        |qos: QoS, broker: Broker| results.iter().find(|r| r.qos == qos && r.broker == broker);
    for r in results {
        let ingest = rate(r.sent, r.ingest);
        let deliver = rate(r.received, r.delivery);
        let (ingest_ratio, deliver_ratio) = match (r.broker, find(r.qos, Broker::Mosquitto)) {
            (Broker::Hubd, Some(m)) => (
                format!("{:.2}x", ingest / rate(m.sent, m.ingest)),
                format!("{:.2}x", deliver / rate(m.received, m.delivery)),
            ),
            _ => (String::new(), String::new()),
        };
        let peak = if r.peak_is_per_run {
            mib(r.rss_peak_kib)
        } else {
            format!("{}*", mib(r.rss_peak_kib))
        };
        println!(
            "{:<4} {:<10} {:>12.0} {:>7} {:>14.0} {:>7} {:>13} {:>10} {:>10}",
            r.qos as u8,
            r.broker.name(),
            ingest,
            ingest_ratio,
            deliver,
            deliver_ratio,
            format!("{}/{}", r.received, r.sent),
            mib(r.rss_end_kib),
            peak
        );
    }
    println!("notes:");
    println!(
        "  ingest: publisher side, same rumqttc code on both brokers; time until the broker \
         acked everything (QoS 1: every PUBACK; QoS 0: a QoS 1 fence sent after the last message)"
    );
    println!(
        "  deliver: subscriber side, and the paths differ: hubd = admin gRPC Watch(\"{BENCH_FILTER}\") \
         (hubd's ACL lets no device read another's topics), mosquitto = MQTT client on the same filter"
    );
    for r in results.iter().filter(|r| r.broker == Broker::Hubd) {
        println!(
            "  hubd qos {}: dropped_slow_subscriber +{}, publishes_received +{} (incl. {} fences)",
            r.qos as u8,
            r.hub_dropped.unwrap_or(0),
            r.hub_received.unwrap_or(0),
            args.publishers
        );
    }
    let client_peaks: Vec<String> = results
        .iter()
        .filter(|r| r.broker == Broker::Mosquitto)
        .map(|r| format!("qos {}: {}", r.qos as u8, mib(r.bench_peak_kib)))
        .collect();
    println!(
        "  hubd RSS is the whole hubbench process (hub + bench clients + tokio); during the \
         mosquitto runs the same process (hub idle, same clients) peaked at {}",
        client_peaks.join(", ")
    );
    if results.iter().any(|r| !r.peak_is_per_run) {
        println!("  * peak since process start (the kernel refused to reset VmHWM)");
    } else {
        println!("  rss_peak is VmHWM during that run (reset through /proc/<pid>/clear_refs)");
    }
}
