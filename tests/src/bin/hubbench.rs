//! `hubbench`: benchmarks hubd against Debian's Mosquitto 2.0 on the same
//! machine, with the same CA, the same device certificates and the same
//! client code.
//!
//! `hubbench throughput` runs hubd in this process ([`TestHub`]) and Mosquitto
//! as a child process, both on 127.0.0.1 with mutual TLS, and has publisher
//! devices send fixed-size messages through each broker at QoS 0 and QoS 1.
//! It prints one table: publisher-side ingest rate and subscriber-side
//! delivery rate (identical rumqttc client code on both brokers, for
//! publishers and subscriber alike), the hubd/Mosquitto ratios and the
//! resident memory of each broker.
//!
//! The subscriber is an MQTT client on `d/+/event/bench` on both brokers. On
//! hubd it is an *integration* (enrolled through the admin API's
//! `EnrollBundle` with a subscribe grant of `d/+/event/#`), the only kind of
//! client hubd's ACL lets read other devices' topics; on Mosquitto it is a
//! client with a certificate for an id of its own. hubd's slow-subscriber
//! drops (`dropped_slow_subscriber`) are reported, and so are messages the
//! subscriber never got that no counter shows. If hubd's subscriber missed
//! any, a second hub with a much larger outgoing queue is run as well, in rows
//! labelled as such: the shipped config stays the headline, and the extra rows
//! show whether the edge queue is what lost them.
//!
//! `hubbench storm [--devices 1000]` measures the return after a broker
//! restart (principle 9): a fleet of simulated devices ([`hub_tests::sim`],
//! full-jitter backoff) connected to hubd in this process, hubd stopped and
//! started again on the same state dir and address; then the same devices,
//! same client code and same backoff against Mosquitto, killed and started
//! again on the same port. It prints one table: time until every device is
//! back, connection attempts per second (peak), refusals, devices that gave
//! up, CPU and memory.

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
use hub_tests::sim::{self, Fleet, FleetConfig, FleetStats, Kind};
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

/// hubd's subscriber: an integration granted every device's events.
const INTEGRATION_GRANT: &str = "d/+/event/#";

/// `[edge] outgoing_queue` of the labelled second hub, run only when hubd's
/// subscriber missed messages with the shipped queue (1024 plus reserved
/// slots).
const BIG_QUEUE: usize = 100_000;

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
    /// Reconnect storm after a broker restart: hubd versus Mosquitto.
    Storm(StormArgs),
}

#[derive(Args, Clone, Copy)]
struct StormArgs {
    /// Simulated devices (half sensors, half switches).
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// State messages per second per sensor.
    #[arg(long, default_value_t = 0.1)]
    rate: f64,
    /// Reconnect backoff: the first window.
    #[arg(long, default_value = "1s", value_parser = duration)]
    backoff_base: Duration,
    /// Reconnect backoff: the largest window.
    #[arg(long, default_value = "60s", value_parser = duration)]
    backoff_cap: Duration,
    /// Power-on jitter for the first connection; default: the fleet over
    /// 80% of hubd's admission rate, so setting up does not itself storm.
    #[arg(long, value_parser = duration)]
    start_spread: Option<Duration>,
    /// Longest wait for the fleet to connect, and again to come back.
    #[arg(long, default_value = "150s", value_parser = duration)]
    limit: Duration,
}

/// Parses "500ms", "10s", "5m", "1h" as hubd's config does.
fn duration(text: &str) -> Result<Duration, String> {
    hubd::config::parse_duration(text)
        .ok_or_else(|| format!("{text:?}: expected a whole number and ms, s, m or h"))
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
            Command::Storm(args) => storm(args).await,
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

/// Which broker a run goes through; the order is the table's row order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Broker {
    Hubd,
    Mosquitto,
    /// hubd with `[edge] outgoing_queue = BIG_QUEUE`, not the shipped config.
    HubdBigQueue,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Hubd => "hubd",
            Broker::Mosquitto => "mosquitto",
            Broker::HubdBigQueue => "hubd q100k",
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
    /// hubd only: the `publishes_sent` counter's growth in this run.
    hub_sent: Option<u64>,
}

async fn throughput(args: ThroughputArgs) -> anyhow::Result<()> {
    if args.publishers == 0 || args.messages == 0 {
        bail!("--publishers and --messages must be at least 1");
    }
    let mosquitto_bin = ensure_mosquitto()?;
    let mosquitto_version = mosquitto_version(&mosquitto_bin);

    let hub = TestHub::start().await.context("start hubd")?;
    let (publishers, hub_subscriber) = enroll_bench_clients(&hub, args.publishers).await?;
    // Mosquitto's subscriber: the same client code with an id of its own.
    let mosq_subscriber = hub.enroll("bench-sub").await?;

    let mosquitto = Mosquitto::start(&mosquitto_bin, &hub.state_dir.join("ca"), &mosq_subscriber)
        .await
        .context("start mosquitto")?;
    let hub_tls = tls_version(hub.mqtt_addr, &hub_subscriber.client_config()?).await?;
    let mosq_tls = tls_version(mosquitto.addr, &mosq_subscriber.client_config()?).await?;

    let hub_target = Target {
        broker: Broker::Hubd,
        addr: hub.mqtt_addr,
        pid: std::process::id(),
        hub: Some(&hub),
        publishers: &publishers,
        subscriber: &hub_subscriber,
    };
    let mosq_target = Target {
        broker: Broker::Mosquitto,
        addr: mosquitto.addr,
        pid: mosquitto.pid,
        hub: None,
        publishers: &publishers,
        subscriber: &mosq_subscriber,
    };
    let payload = Bytes::from(vec![b'x'; args.payload]);
    let mut results = Vec::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        for target in [&hub_target, &mosq_target] {
            results.push(run_once(target, qos, args.messages, &payload).await?);
        }
    }
    mosquitto.stop().await;
    hub.stop().await.context("stop hubd")?;

    // hubd's subscriber missed messages: measure again with a hub whose edge
    // queue holds a whole run, labelled as such, to show whether the queue
    // is what lost them.
    let lossy: Vec<QoS> = results
        .iter()
        .filter(|r| r.hub_dropped.is_some() && r.received < r.sent)
        .map(|r| r.qos)
        .collect();
    if !lossy.is_empty() {
        let hub = TestHub::start_with(|c| c.edge.outgoing_queue = BIG_QUEUE)
            .await
            .context("start hubd with a larger outgoing queue")?;
        let (publishers, subscriber) = enroll_bench_clients(&hub, args.publishers).await?;
        let target = Target {
            broker: Broker::HubdBigQueue,
            addr: hub.mqtt_addr,
            pid: std::process::id(),
            hub: Some(&hub),
            publishers: &publishers,
            subscriber: &subscriber,
        };
        for qos in lossy {
            results.push(run_once(&target, qos, args.messages, &payload).await?);
        }
        hub.stop().await.context("stop hubd")?;
    }
    results.sort_by_key(|r| (r.qos as u8, r.broker));

    print_table(&args, &mosquitto_version, &hub_tls, &mosq_tls, &results);
    Ok(())
}

/// Enrols `n` publisher devices on `hub` and its subscriber, an integration
/// with a subscribe grant of [`INTEGRATION_GRANT`].
async fn enroll_bench_clients(
    hub: &TestHub,
    n: usize,
) -> anyhow::Result<(Vec<DeviceIdentity>, DeviceIdentity)> {
    let mut publishers = Vec::with_capacity(n);
    for i in 0..n {
        publishers.push(hub.enroll(&format!("bench-pub-{i}")).await?);
    }
    let subscriber = enroll_integration(hub, "bench-integration")
        .await
        .context("enrol the subscriber integration")?;
    Ok((publishers, subscriber))
}

/// Enrols an integration through the admin API's `EnrollBundle` (the hub
/// makes the key; fine for a bench), allowed to subscribe to
/// [`INTEGRATION_GRANT`] and to publish nothing.
async fn enroll_integration(hub: &TestHub, name: &str) -> anyhow::Result<DeviceIdentity> {
    let bundle = hub
        .admin()
        .await?
        .enroll_bundle(pb::EnrollBundleRequest {
            name: name.to_owned(),
            role: pb::Role::Integration as i32,
            grants: Some(pb::Grants {
                publish: vec![],
                subscribe: vec![INTEGRATION_GRANT.to_owned()],
            }),
        })
        .await?
        .into_inner();
    Ok(DeviceIdentity {
        id: bundle
            .device
            .context("EnrollBundle answer has a device")?
            .id,
        key_pem: bundle.key_pem,
        cert_pem: bundle.cert_pem,
        ca_pem: bundle.ca_chain_pem,
    })
}

/// One broker under test and the identities the bench uses on it.
struct Target<'a> {
    broker: Broker,
    addr: SocketAddr,
    /// The broker's process (hubd: this one).
    pid: u32,
    /// hubd only: the hub, for its status counters.
    hub: Option<&'a TestHub>,
    publishers: &'a [DeviceIdentity],
    /// The MQTT subscriber on [`BENCH_FILTER`].
    subscriber: &'a DeviceIdentity,
}

/// One measured run through `target`, said on stderr and named in errors.
async fn run_once(
    target: &Target<'_>,
    qos: QoS,
    messages: u64,
    payload: &Bytes,
) -> anyhow::Result<RunResult> {
    let broker = target.broker;
    eprintln!(
        "hubbench: running qos {} through {}",
        qos as u8,
        broker.name()
    );
    run_measured(target, qos, messages, payload)
        .await
        .with_context(|| format!("qos {} through {}", qos as u8, broker.name()))
}

/// One measured run: subscribe, connect every publisher, then release them
/// together and time ingest (publisher side) and delivery (subscriber side).
async fn run_measured(
    target: &Target<'_>,
    qos: QoS,
    messages: u64,
    payload: &Bytes,
) -> anyhow::Result<RunResult> {
    let Target {
        broker,
        addr,
        pid: broker_pid,
        hub,
        publishers,
        subscriber,
    } = *target;
    let max_packet = payload.len() + 1024;
    let progress = Arc::new(Progress::new());
    let sub_task = mqtt_subscriber(subscriber, addr, qos, max_packet, progress.clone()).await?;

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

    let before = match hub {
        Some(hub) => Some(hub.status().await?.counters.unwrap_or_default()),
        None => None,
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
    let (hub_dropped, hub_received, hub_sent) = match (hub, before) {
        (Some(hub), Some(before)) => {
            let after = hub.status().await?.counters.unwrap_or_default();
            (
                Some(after.dropped_slow_subscriber - before.dropped_slow_subscriber),
                Some(after.publishes_received - before.publishes_received),
                Some(after.publishes_sent - before.publishes_sent),
            )
        }
        _ => (None, None, None),
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
        hub_sent,
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

/// The subscriber, the same code on both brokers: an MQTT client on
/// [`BENCH_FILTER`] at `qos` that counts the messages it receives. Fails if
/// the broker refuses the subscription.
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
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        bail!("{}: subscription to {BENCH_FILTER} refused", identity.id);
                    }
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => bail!("{}: subscriber: {e}", identity.id),
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
    bin: PathBuf,
    conf_path: PathBuf,
    log_path: PathBuf,
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
        let mut child = Self::spawn(bin, &conf_path, &log_path)?;
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
            bin: bin.to_owned(),
            conf_path,
            log_path,
            _dir: dir,
        })
    }

    /// Spawns the broker with its output appended to `log_path`.
    fn spawn(
        bin: &Path,
        conf_path: &Path,
        log_path: &Path,
    ) -> anyhow::Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        tokio::process::Command::new(bin)
            .arg("-c")
            .arg(conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))
    }

    /// Kills the broker (SIGKILL, as a crash or power cut would end it) and
    /// starts it again on the same port at once. Returns the killed
    /// process's CPU time; the new process's `pid` replaces the old one.
    async fn kill_and_restart(&mut self) -> anyhow::Result<Duration> {
        let cpu = cpu_time(self.pid).unwrap_or_default();
        self.child.start_kill()?;
        self.child.wait().await?;
        self.child = Self::spawn(&self.bin, &self.conf_path, &self.log_path)?;
        self.pid = self.child.id().context("mosquitto has a pid")?;
        Ok(cpu)
    }

    /// Fails if the broker has exited, with its log.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            bail!("mosquitto exited with {status}:\n{log}");
        }
        Ok(())
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
            (Broker::Hubd | Broker::HubdBigQueue, Some(m)) => (
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
        "  deliver: subscriber side, same rumqttc subscriber code on both brokers on \
         \"{BENCH_FILTER}\" at the run's QoS; time until its last message. On hubd it is an \
         integration with a {INTEGRATION_GRANT} grant, on mosquitto a client with its own id"
    );
    for r in results.iter().filter(|r| r.hub_dropped.is_some()) {
        let dropped = r.hub_dropped.unwrap_or(0);
        let sent = r.hub_sent.unwrap_or(0);
        println!(
            "  {} qos {}: dropped_slow_subscriber +{dropped}, publishes_received +{} (incl. {} \
             fences), publishes_sent +{sent}",
            r.broker.name(),
            r.qos as u8,
            r.hub_received.unwrap_or(0),
            args.publishers,
        );
        // Every message the router forwards to a session is either sent or
        // counted as dropped; the rest never left the router.
        let unforwarded = r.sent.saturating_sub(sent + dropped);
        if unforwarded > 0 {
            println!(
                "    {unforwarded} of {} never reached the subscriber's session and are in no \
                 counter: the router's per-filter log (4 x 1 MiB) evicts what a lagging \
                 subscriber has not read yet (ARCHITECTURE.md, \"Slow QoS 1 subscribers\")",
                r.sent
            );
        }
    }
    if results
        .iter()
        .any(|r| r.hub_dropped.is_some() && r.received < r.sent)
    {
        println!(
            "  deliver msg/s counts only the messages that arrived: where hubd's subscriber missed \
             some, its rate and ratio are not like for like"
        );
    }
    if results.iter().any(|r| r.broker == Broker::HubdBigQueue) {
        println!(
            "  hubd q100k: NOT the shipped config: a second hub with [edge] outgoing_queue = \
             {BIG_QUEUE} (shipped: 1024), run because hubd's subscriber missed messages; the same \
             process, after the first hub stopped"
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

/// CPU time (user + system, all threads) process `pid` has used so far, from
/// `/proc/<pid>/stat`. The kernel reports it in USER_HZ ticks, which Linux
/// fixes at 100 per second for every user-space interface.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name in parentheses may contain spaces; fields follow the
    // last ')': state is field 3, utime 14 and stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path}: no ')'"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {} is not a number", i + 3))
    };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// What one broker's storm found.
struct StormResult {
    broker: Broker,
    /// From starting the fleet until every device had its first session.
    connect_all: Duration,
    /// From the stop until the broker listened again (hubd: ready).
    down: Duration,
    /// From the stop until every device had a new session, if they all did.
    back: Option<Duration>,
    /// Devices with a new session at the end.
    back_count: usize,
    /// Connection attempts per second from the stop on.
    histogram: Vec<u64>,
    /// Fleet counters from the stop until the end.
    delta: FleetStats,
    /// hubd only: its admission counters after the restart.
    hub_counters: Option<pb::MessageCounters>,
    /// hubd only: TLS handshakes completed per second, between status
    /// samples taken about a second apart after the restart.
    hub_handshakes: Option<Vec<f64>>,
    /// hubd only: the longest a Status call took during the storm.
    slowest_status: Option<Duration>,
    /// CPU of the broker process from the stop until the end (Mosquitto:
    /// the killed process's share plus the new one's).
    broker_cpu: Option<Duration>,
    /// CPU of this process (hubd: hub and clients; Mosquitto: clients and
    /// the idle hub) over the same span.
    bench_cpu: Duration,
    /// Broker `(VmRSS, VmHWM)` at the end, KiB (Mosquitto: the new process).
    broker_rss: Option<(u64, u64)>,
    /// This process's `(VmRSS, VmHWM)` at the end; the peak covers the storm
    /// when `peak_is_per_run`.
    bench_rss: (u64, u64),
    peak_is_per_run: bool,
}

fn stats_delta(after: &FleetStats, before: &FleetStats) -> FleetStats {
    FleetStats {
        devices: after.devices,
        connected: after.connected,
        ever_connected: after.ever_connected,
        connects: after.connects - before.connects,
        reconnects: after.reconnects - before.reconnects,
        attempts: after.attempts - before.attempts,
        failures: after.failures - before.failures,
        busy: after.busy - before.busy,
        blocked: after.blocked - before.blocked,
        disconnects: after.disconnects - before.disconnects,
        published: after.published - before.published,
        received: after.received - before.received,
        commands: after.commands - before.commands,
        gave_up: after.gave_up,
        forgot: after.forgot,
    }
}

/// Starts the fleet against `addr` and waits until every device connected.
async fn connect_fleet(
    devices: &[(DeviceIdentity, Kind)],
    addr: SocketAddr,
    cfg: &FleetConfig,
    limit: Duration,
) -> anyhow::Result<(Fleet, Duration)> {
    let started = Instant::now();
    let fleet = Fleet::start(devices.to_vec(), addr, cfg.clone());
    fleet
        .wait_connected(devices.len(), limit)
        .await
        .context("initial connection of the fleet")?;
    Ok((fleet, started.elapsed()))
}

/// Waits (up to `limit`) until every device has a session begun after `t0`;
/// returns how long that took, if it happened, and how many are back.
async fn wait_back(fleet: &Fleet, t0: Instant, limit: Duration) -> (Option<Duration>, usize) {
    let n = fleet.len();
    let all = fleet
        .wait_until("every device back", limit, |f| f.connected_since(t0) == n)
        .await;
    let back = match all {
        Ok(()) => fleet.last_connected_at().map(|at| at - t0),
        Err(e) => {
            eprintln!("hubbench: {e:#}");
            None
        }
    };
    (back, fleet.connected_since(t0))
}

async fn storm(args: StormArgs) -> anyhow::Result<()> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let mosquitto_bin = ensure_mosquitto()?;
    let mosquitto_version = mosquitto_version(&mosquitto_bin);
    let hub = TestHub::start_with(|c| {
        // Room for the whole fleet; everything else as shipped.
        c.edge.max_connections = c.edge.max_connections.max(args.devices + 64);
    })
    .await
    .context("start hubd")?;
    let (admission_rate, admission_burst) = (
        hub.config.edge.admission_rate,
        hub.config.edge.admission_burst,
    );
    let enrol_started = Instant::now();
    let devices = sim::enroll_devices(&hub, args.devices, &Kind::ALL)
        .await
        .context("enrol the fleet")?;
    eprintln!(
        "hubbench: enrolled {} devices in {:.1} s",
        devices.len(),
        enrol_started.elapsed().as_secs_f64()
    );
    let spread = args.start_spread.unwrap_or_else(|| {
        Duration::from_secs_f64(args.devices as f64 / (0.8 * f64::from(admission_rate)))
    });
    let cfg = FleetConfig {
        rate: args.rate,
        backoff_base: args.backoff_base,
        backoff_cap: args.backoff_cap,
        start_spread: spread,
        ..FleetConfig::default()
    };
    let idle_rss = rss_kib(std::process::id())?;

    let (hub, hubd) = storm_hubd(hub, &devices, &cfg, args.limit)
        .await
        .context("storm against hubd")?;
    let mut mosquitto = Mosquitto::start(&mosquitto_bin, &hub.state_dir.join("ca"), &devices[0].0)
        .await
        .context("start mosquitto")?;
    let mosq = storm_mosquitto(&mut mosquitto, &devices, &cfg, args.limit)
        .await
        .context("storm against mosquitto");
    mosquitto.stop().await;
    let mosq = mosq?;
    hub.stop().await.context("stop hubd")?;

    print_storm_table(
        &args,
        &cfg,
        &mosquitto_version,
        (admission_rate, admission_burst),
        idle_rss,
        &[hubd, mosq],
    );
    Ok(())
}

async fn storm_hubd(
    hub: TestHub,
    devices: &[(DeviceIdentity, Kind)],
    cfg: &FleetConfig,
    limit: Duration,
) -> anyhow::Result<(TestHub, StormResult)> {
    eprintln!(
        "hubbench: connecting {} devices to hubd (power-on spread {:?})",
        devices.len(),
        cfg.start_spread
    );
    let (fleet, connect_all) = connect_fleet(devices, hub.mqtt_addr, cfg, limit).await?;
    let me = std::process::id();
    let before = fleet.stats();
    let peak_is_per_run = reset_peak(me);
    let cpu0 = cpu_time(me)?;
    eprintln!("hubbench: restarting hubd on {}", hub.mqtt_addr);
    let t0 = Instant::now();
    let stopped = hub.stop_for_restart().await.context("stop hubd")?;
    let hub = stopped.start_again().await.context("start hubd again")?;
    let down = t0.elapsed();
    // Meanwhile, the hub's completed handshakes per second (its side of the
    // pacing), from its status counters, and how long Status takes to answer.
    let mut samples: Vec<(Instant, u64)> = vec![(t0, 0)];
    let mut slowest_status = Duration::ZERO;
    let sample = async {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let asked = Instant::now();
            if let Ok(status) = hub.status().await {
                slowest_status = slowest_status.max(asked.elapsed());
                let ok = status.counters.unwrap_or_default().handshakes_ok;
                samples.push((Instant::now(), ok));
            }
        }
    };
    let (back, back_count) = tokio::select! {
        result = wait_back(&fleet, t0, limit) => result,
        () = sample => unreachable!("the sampler loops until the fleet is back"),
    };
    let bench_cpu = cpu_time(me)?.saturating_sub(cpu0);
    let bench_rss = rss_kib(me)?;
    let delta = stats_delta(&fleet.stats(), &before);
    let histogram = fleet.attempt_histogram(t0, Duration::from_secs(1));
    let hub_counters = Some(hub.status().await?.counters.unwrap_or_default());
    // Rates between consecutive samples, which are about a second apart
    // unless Status was slow to answer.
    let handshakes = samples
        .windows(2)
        .map(|w| {
            let (t1, ok1) = w[0];
            let (t2, ok2) = w[1];
            ok2.saturating_sub(ok1) as f64 / (t2 - t1).as_secs_f64().max(1e-3)
        })
        .collect();
    fleet.stop().await;
    Ok((
        hub,
        StormResult {
            broker: Broker::Hubd,
            connect_all,
            down,
            back,
            back_count,
            histogram,
            delta,
            hub_counters,
            hub_handshakes: Some(handshakes),
            slowest_status: Some(slowest_status),
            broker_cpu: None,
            bench_cpu,
            broker_rss: None,
            bench_rss,
            peak_is_per_run,
        },
    ))
}

async fn storm_mosquitto(
    mosquitto: &mut Mosquitto,
    devices: &[(DeviceIdentity, Kind)],
    cfg: &FleetConfig,
    limit: Duration,
) -> anyhow::Result<StormResult> {
    eprintln!(
        "hubbench: connecting {} devices to mosquitto (power-on spread {:?})",
        devices.len(),
        cfg.start_spread
    );
    let (fleet, connect_all) = connect_fleet(devices, mosquitto.addr, cfg, limit).await?;
    let me = std::process::id();
    let before = fleet.stats();
    let peak_is_per_run = reset_peak(me);
    let cpu0 = cpu_time(me)?;
    let broker_cpu0 = cpu_time(mosquitto.pid)?;
    eprintln!(
        "hubbench: killing and restarting mosquitto on {}",
        mosquitto.addr
    );
    let t0 = Instant::now();
    let killed_cpu = mosquitto.kill_and_restart().await?;
    wait_listening(mosquitto.addr, SETUP_WAIT).await?;
    let down = t0.elapsed();
    let (back, back_count) = wait_back(&fleet, t0, limit).await;
    mosquitto.check_alive()?;
    let bench_cpu = cpu_time(me)?.saturating_sub(cpu0);
    let broker_cpu = killed_cpu.saturating_sub(broker_cpu0) + cpu_time(mosquitto.pid)?;
    let broker_rss = Some(rss_kib(mosquitto.pid)?);
    let bench_rss = rss_kib(me)?;
    let delta = stats_delta(&fleet.stats(), &before);
    let histogram = fleet.attempt_histogram(t0, Duration::from_secs(1));
    fleet.stop().await;
    Ok(StormResult {
        broker: Broker::Mosquitto,
        connect_all,
        down,
        back,
        back_count,
        histogram,
        delta,
        hub_counters: None,
        hub_handshakes: None,
        slowest_status: None,
        broker_cpu: Some(broker_cpu),
        bench_cpu,
        broker_rss,
        bench_rss,
        peak_is_per_run,
    })
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn print_storm_table(
    args: &StormArgs,
    cfg: &FleetConfig,
    mosquitto_version: &str,
    (admission_rate, admission_burst): (u32, u32),
    idle_rss: (u64, u64),
    results: &[StormResult],
) {
    let n = args.devices;
    println!(
        "storm: {n} devices ({} sensors at {} msg/s, {} switches), full-jitter backoff base {:?} \
         cap {:?} reset after {:?} stable, power-on spread {:?}; loopback, mTLS (TLS 1.3); {mosquitto_version}",
        n.div_ceil(2),
        cfg.rate,
        n / 2,
        cfg.backoff_base,
        cfg.backoff_cap,
        cfg.backoff_stable,
        cfg.start_spread
    );
    print!("{:<40}", "");
    for r in results {
        print!(" {:>16}", r.broker.name());
    }
    println!();
    let line = |name: &str, cell: &dyn Fn(&StormResult) -> String| {
        print!("{name:<40}");
        for r in results {
            print!(" {:>16}", cell(r));
        }
        println!();
    };
    let na = || "n/a".to_owned();
    line("initial connect, all devices", &|r| secs(r.connect_all));
    line("broker away (stop -> accepting)", &|r| secs(r.down));
    line("time until 100% back (from stop)", &|r| {
        r.back.map_or_else(|| "NOT BACK".to_owned(), secs)
    });
    line("devices back", &|r| format!("{}/{n}", r.back_count));
    line("connection attempts", &|r| r.delta.attempts.to_string());
    line("peak attempts/s (device side)", &|r| {
        r.histogram.iter().max().copied().unwrap_or(0).to_string()
    });
    line("failed attempts", &|r| r.delta.failures.to_string());
    line("refused busy (CONNACK 3)", &|r| r.delta.busy.to_string());
    line("hub: admitted / deferred / refused", &|r| {
        r.hub_counters.as_ref().map_or_else(na, |c| {
            format!(
                "{}/{}/{}",
                c.connections_admitted, c.connections_deferred, c.connections_refused
            )
        })
    });
    line("peak handshakes/s (broker side)", &|r| {
        r.hub_handshakes.as_ref().map_or_else(
            || "= attempts".to_owned(),
            |h| format!("{:.0}", h.iter().copied().fold(0.0, f64::max)),
        )
    });
    line("hub: TLS handshakes ok / failed", &|r| {
        r.hub_counters.as_ref().map_or_else(na, |c| {
            format!("{}/{}", c.handshakes_ok, c.handshakes_failed)
        })
    });
    line("devices that gave up", &|r| r.delta.gave_up.to_string());
    line("CPU: broker process", &|r| {
        r.broker_cpu.map_or_else(na, secs)
    });
    line("CPU: hubbench process", &|r| secs(r.bench_cpu));
    line("RSS: broker process end / peak", &|r| {
        r.broker_rss
            .map_or_else(na, |(end, peak)| format!("{}/{}", mib0(end), mib0(peak)))
    });
    line("RSS: hubbench process end / peak", &|r| {
        let star = if r.peak_is_per_run { "" } else { "*" };
        format!("{}/{}{star}", mib0(r.bench_rss.0), mib0(r.bench_rss.1))
    });
    println!("attempts per second from the stop on:");
    for r in results {
        let shown: Vec<String> = r.histogram.iter().take(40).map(u64::to_string).collect();
        let more = if r.histogram.len() > 40 { " ..." } else { "" };
        println!("  {:<10} [{}]{more}", r.broker.name(), shown.join(" "));
    }
    for r in results {
        if let Some(h) = &r.hub_handshakes {
            let shown: Vec<String> = h.iter().take(40).map(|x| format!("{x:.0}")).collect();
            println!(
                "  {:<10} handshakes/s (hub side) [{}]",
                r.broker.name(),
                shown.join(" ")
            );
        }
    }
    println!("notes:");
    for r in results {
        if let Some(slowest) = r.slowest_status {
            println!(
                "  {}: the slowest Status answer during the storm took {:.2} s",
                r.broker.name(),
                slowest.as_secs_f64()
            );
        }
    }
    println!(
        "  hubd runs in this process with its shipped admission settings ({admission_rate}/s, burst \
         {admission_burst}; a connection waits up to 2 s for a token, else it is closed before the \
         handshake); mosquitto has no pacing"
    );
    println!(
        "  hubd 'CPU: hubbench process' is hub + {n} clients; on the mosquitto run the same process \
         is the clients (and an idle hub), so hubd's own share is roughly the difference"
    );
    println!(
        "  hubd restart = graceful stop (sessions told) + start on the same state dir and address, \
         retained state restored; mosquitto restart = SIGKILL + start on the same port"
    );
    println!(
        "  hubbench RSS before any fleet (hub idle, {n} devices enrolled): {}",
        mib0(idle_rss.0)
    );
    if results.iter().any(|r| !r.peak_is_per_run) {
        println!("  * peak since process start (the kernel refused to reset VmHWM)");
    }
}

fn mib0(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// Waits until `addr` accepts TCP connections (a plain connect, closed at
/// once: no TLS, so it is not one of the devices' attempts).
async fn wait_listening(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} within {limit:?}");
        }
        // Polling the readiness condition; a restarted broker binds within
        // milliseconds.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
