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
//!
//! `hubbench rules [--rules 200] [--rate 1000] [--seconds 10]` measures the
//! automation engine's latency. hubd (in this process, shipped config) gets
//! one rule per sensor/switch pair: sensor i's `d/<id>/event/motion` makes
//! the hub publish `{"seq": <the event's payload>}` to switch i's
//! `d/<id>/cmd/set`. Sensors publish their sequence numbers round robin at
//! `--rate` events per second in total, QoS 1; switches subscribe to their
//! own `d/<id>/cmd/#` at QoS 1. Then, in the same run, the same identities
//! and client code on Mosquitto make the bare hop: each sensor publishes
//! the command bytes straight to its switch's topic. Latency runs from each
//! message's *due* time on a fixed schedule (so a stalled sender cannot hide
//! delay: no coordinated omission) to the switch receiving it; a pacing
//! thread sends, since tokio's timer has a 1 ms grain. The first `--warmup`
//! is sent but not counted. It prints one table: p50, p90, p99, p99.9 and
//! max for each hop and their ratio, arrivals and losses, the sender's own
//! lag, CPU, hubd's automation status (runs, refused, events dropped) and
//! the targets (p99 <= 2 ms and <= 1.5x the bare hop). It fails if
//! more than 1% of either hop's messages are lost or hubd refused a run.
//!
//! `hubbench wipe [--devices 1000] [--records 1000000]` times the
//! ownership-transfer wipe on a full store against the 2 s target (see
//! `tests/src/bench_wipe.rs`).

// The wipe benchmark lives beside the library, in a file of its own.
#[path = "../bench_wipe.rs"]
mod bench_wipe;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Automation latency: sensor event -> rule -> switch command on hubd,
    /// beside a bare Mosquitto pub -> sub hop.
    Rules(RulesArgs),
    /// The ownership-transfer wipe on a full hub, against the 2 s target.
    Wipe(bench_wipe::WipeArgs),
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
            Command::Rules(args) => rules(args).await,
            Command::Wipe(args) => bench_wipe::run(args).await,
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
    subscribe(&client, &mut eventloop, &identity.id, BENCH_FILTER, qos).await?;
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

/// Subscribes `client` (device `id`) to `filter` and waits for the SUBACK;
/// fails if the broker refuses the subscription.
async fn subscribe(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    id: &str,
    filter: &str,
    qos: QoS,
) -> anyhow::Result<()> {
    client.subscribe(filter, qos).await?;
    tokio::time::timeout(SETUP_WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        bail!("{id}: subscription to {filter} refused");
                    }
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => bail!("{id}: subscriber: {e}"),
            }
        }
    })
    .await
    .with_context(|| format!("{id}: no SUBACK in time"))?
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

/// CPU time the whole machine has used so far (all CPUs, every state but
/// idle and iowait), from the first line of `/proc/stat`, in USER_HZ ticks
/// (100 per second).
fn machine_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("/proc/stat: no cpu line")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("/proc/stat: cpu line")?;
    // user nice system idle iowait irq softirq steal (guest time is already
    // in user and nice).
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    Ok(Duration::from_millis(busy * 10))
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
        updates_installed: after.updates_installed - before.updates_installed,
        updates_refused: after.updates_refused - before.updates_refused,
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

/// Most runs per second the bench gives one rule: a rule's
/// `max_runs_per_minute` is at most 600 (10/s), and a rule over it refuses
/// runs, which would be measured as lost commands.
const MAX_RULE_RATE: f64 = 8.0;

/// The rule hop's targets (the issue): p99 on this machine, and p99 against
/// the bare Mosquitto hop measured in the same run.
const TARGET_P99: Duration = Duration::from_millis(2);
const TARGET_RATIO: f64 = 1.5;

/// More commands lost than this share fails the bench.
const MAX_LOSS: f64 = 0.01;

/// Connections set up at once: within hubd's shipped admission burst (100),
/// and no connection waits near the 2 s hubd gives one for a token at 50/s.
const CONNECT_CONCURRENCY: usize = 8;

/// The rules subcommand's sensor event name.
const MOTION: &str = "motion";

#[derive(Args, Clone, Copy)]
struct RulesArgs {
    /// Rules loaded; each rule has a sensor and a switch of its own.
    #[arg(long, default_value_t = 200)]
    rules: usize,
    /// Sensor events per second, all sensors together (round robin).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Sent at the same rate before the measured seconds, not counted.
    #[arg(long, default_value = "1s", value_parser = duration)]
    warmup: Duration,
}

/// Which hop a run measures. On both, message `seq` is sent by sensor
/// `seq % pairs` and ends at switch `seq % pairs` as `{"seq":<seq>}` on
/// `d/<switch>/cmd/set`, QoS 1 on every leg.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// hubd: the sensor publishes `<seq>` to `d/<sensor>/event/motion`; its
    /// rule publishes the command.
    Rule,
    /// Mosquitto: the sensor's client publishes the command itself.
    Bare,
}

impl Hop {
    fn name(self) -> &'static str {
        match self {
            Hop::Rule => "hubd (rule hop)",
            Hop::Bare => "mosquitto (bare hop)",
        }
    }
}

/// When each message is due: message `seq` at `start + seq / rate`.
#[derive(Clone, Copy)]
struct Schedule {
    /// Nanoseconds from [`Arrivals::origin`] to message 0.
    start: u64,
    rate: f64,
    /// Messages in the run, warm-up included.
    total: u64,
}

impl Schedule {
    fn due(&self, seq: u64) -> u64 {
        self.start + (seq as f64 * 1e9 / self.rate) as u64
    }
}

/// What the switches received, by sequence number; shared with the tasks
/// that drive their connections.
struct Arrivals {
    /// The instant every time in a run counts from.
    origin: Instant,
    pairs: usize,
    /// Per sequence number: nanoseconds from `origin` to its first arrival,
    /// plus one; 0 while none.
    at: Vec<AtomicU64>,
    /// Distinct sequence numbers received.
    received: AtomicU64,
    /// Nanoseconds from `origin` to the latest arrival.
    last: AtomicU64,
    /// Arrivals of a sequence number already received (QoS 1 resends).
    duplicates: AtomicU64,
    /// Arrivals at a switch other than the one the message was for.
    misrouted: AtomicU64,
    /// Commands without a readable sequence number.
    unreadable: AtomicU64,
    /// Connections that ended before the run's end.
    disconnects: AtomicU64,
    /// Set at the run's end: connections ending now are being closed.
    closing: AtomicBool,
}

impl Arrivals {
    fn new(total: u64, pairs: usize) -> Self {
        Arrivals {
            origin: Instant::now(),
            pairs,
            at: (0..total).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicU64::new(0),
            last: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            unreadable: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        (at - self.origin).as_nanos() as u64
    }

    /// Records a command that switch `switch` received at `at`.
    fn arrive(&self, switch: usize, payload: &[u8], at: Instant) {
        let at = self.nanos(at);
        let seq = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64));
        let Some((seq, slot)) = seq.and_then(|seq| {
            let i = usize::try_from(seq).ok()?;
            Some((i, self.at.get(i)?))
        }) else {
            self.unreadable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if seq % self.pairs != switch {
            self.misrouted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if slot
            .compare_exchange(0, at + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.last.fetch_max(at, Ordering::AcqRel);
        self.received.fetch_add(1, Ordering::AcqRel);
    }

    /// The arrival time of `seq` (ns from `origin`), if it arrived.
    fn arrival(&self, seq: u64) -> Option<u64> {
        let slot = self.at.get(usize::try_from(seq).ok()?)?;
        slot.load(Ordering::Acquire).checked_sub(1)
    }
}

/// Polls one connection until it ends. A switch (`Some(index)`) records the
/// commands it receives; an end before the run's end is counted.
async fn drive(mut eventloop: EventLoop, switch: Option<usize>, arrivals: Arc<Arrivals>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let at = Instant::now();
                if let Some(k) = switch {
                    arrivals.arrive(k, &p.payload, at);
                }
            }
            Ok(_) => {}
            Err(_) => {
                if !arrivals.closing.load(Ordering::Acquire) {
                    arrivals.disconnects.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
}

/// Connects every identity to `addr`, [`CONNECT_CONCURRENCY`] at a time, in
/// order; with `commands`, each also subscribes to its own `d/<id>/cmd/#`
/// at QoS 1 and has its SUBACK before this returns.
async fn connect_many(
    identities: &[DeviceIdentity],
    addr: SocketAddr,
    commands: bool,
) -> anyhow::Result<Vec<(AsyncClient, EventLoop)>> {
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..CONNECT_CONCURRENCY.min(identities.len()) {
        let mine: Vec<(usize, DeviceIdentity)> = identities
            .iter()
            .cloned()
            .enumerate()
            .skip(worker)
            .step_by(CONNECT_CONCURRENCY)
            .collect();
        workers.spawn(async move {
            let mut connected = Vec::with_capacity(mine.len());
            for (i, identity) in mine {
                let (client, mut eventloop) = mqtt_connect(&identity, addr, 1024).await?;
                if commands {
                    let filter = format!("d/{}/cmd/#", identity.id);
                    subscribe(
                        &client,
                        &mut eventloop,
                        &identity.id,
                        &filter,
                        QoS::AtLeastOnce,
                    )
                    .await?;
                }
                connected.push((i, client, eventloop));
            }
            anyhow::Ok(connected)
        });
    }
    let mut all = Vec::with_capacity(identities.len());
    while let Some(done) = workers.join_next().await {
        all.extend(done.context("connection task")??);
    }
    all.sort_by_key(|(i, _, _)| *i);
    Ok(all.into_iter().map(|(_, c, e)| (c, e)).collect())
}

/// Sends message `seq` through sender `seq % senders.len()` at its due time
/// and returns when each publish call was made (ns from `origin`).
///
/// Runs on a thread of its own, not a tokio timer: tokio's timer wakes on a
/// 1 ms grain, as coarse as the latencies measured, where a thread's sleep
/// wakes within tens of microseconds. The publish call only queues the
/// message for the connection's event loop (a tokio task).
fn pace(
    runtime: &tokio::runtime::Handle,
    senders: &[(AsyncClient, String)],
    hop: Hop,
    schedule: Schedule,
    origin: Instant,
) -> anyhow::Result<Vec<u64>> {
    let mut calls = Vec::with_capacity(usize::try_from(schedule.total)?);
    for seq in 0..schedule.total {
        let due = origin + Duration::from_nanos(schedule.due(seq));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let (client, topic) = &senders[seq as usize % senders.len()];
        let payload = match hop {
            Hop::Rule => seq.to_string(),
            Hop::Bare => format!("{{\"seq\":{seq}}}"),
        };
        calls.push((Instant::now() - origin).as_nanos() as u64);
        runtime.block_on(client.publish_bytes(
            topic.clone(),
            QoS::AtLeastOnce,
            false,
            Bytes::from(payload),
        ))?;
    }
    Ok(calls)
}

/// hubd's automation status and counters, before or after a run.
struct HubSnapshot {
    automation: pb::AutomationStatus,
    counters: pb::MessageCounters,
}

async fn hub_snapshot(hub: &TestHub) -> anyhow::Result<HubSnapshot> {
    let status = hub.status().await?;
    Ok(HubSnapshot {
        automation: status
            .automation
            .context("Status answer has no automation status")?,
        counters: status.counters.unwrap_or_default(),
    })
}

/// What one hop's run found.
struct HopResult {
    hop: Hop,
    /// Messages sent, warm-up included.
    sent: u64,
    /// Distinct messages that arrived, warm-up included.
    received: u64,
    /// Messages sent after the warm-up.
    measured_sent: u64,
    /// Per message after the warm-up that arrived: from its due time to its
    /// arrival, ns, sorted.
    latencies: Vec<u64>,
    /// Per message after the warm-up: from its due time to the publish
    /// call, ns, sorted (the generator's own lateness).
    lag: Vec<u64>,
    duplicates: u64,
    misrouted: u64,
    unreadable: u64,
    disconnects: u64,
    /// From the first message's due time until the last arrival was waited
    /// for.
    span: Duration,
    /// This process's CPU over `span` (hubd: hub and clients).
    bench_cpu: Duration,
    /// Mosquitto only: its CPU over `span`.
    broker_cpu: Option<Duration>,
    /// Every other process's CPU over `span`: other work on the machine
    /// competing with the run.
    other_cpu: Duration,
    /// hubd only: status before and after.
    hub: Option<(HubSnapshot, HubSnapshot)>,
}

impl HopResult {
    fn lost(&self) -> u64 {
        self.sent - self.received
    }

    fn percentile(&self, p: f64) -> Option<u64> {
        percentile(&self.latencies, p)
    }
}

/// The nearest-rank percentile `p` (0 to 1) of `sorted`.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = ((p * sorted.len() as f64).ceil() as usize).saturating_sub(1);
    sorted.get(rank.min(last)).copied()
}

/// One run through one broker: connect the switches (subscribed) and the
/// sensors, send on schedule, wait for the commands, close.
async fn run_hop(
    hop: Hop,
    addr: SocketAddr,
    pairs: (&[DeviceIdentity], &[DeviceIdentity]),
    args: &RulesArgs,
    broker_pid: Option<u32>,
    hub: Option<&TestHub>,
) -> anyhow::Result<HopResult> {
    let (sensors, switches) = pairs;
    let warmup = (args.warmup.as_secs_f64() * args.rate).round() as u64;
    let total = warmup + (args.seconds as f64 * args.rate).round() as u64;
    let arrivals = Arc::new(Arrivals::new(total, switches.len()));

    eprintln!(
        "hubbench: {}: connecting {} switches and {} sensors",
        hop.name(),
        switches.len(),
        sensors.len()
    );
    let mut clients = Vec::with_capacity(sensors.len() + switches.len());
    let mut drivers = Vec::with_capacity(sensors.len() + switches.len());
    for (k, (client, eventloop)) in connect_many(switches, addr, true)
        .await?
        .into_iter()
        .enumerate()
    {
        clients.push(client);
        drivers.push(tokio::spawn(drive(eventloop, Some(k), arrivals.clone())));
    }
    let mut senders = Vec::with_capacity(sensors.len());
    for ((client, eventloop), (sensor, switch)) in connect_many(sensors, addr, false)
        .await?
        .into_iter()
        .zip(sensors.iter().zip(switches))
    {
        let topic = match hop {
            Hop::Rule => format!("d/{}/event/{MOTION}", sensor.id),
            Hop::Bare => format!("d/{}/cmd/set", switch.id),
        };
        senders.push((client.clone(), topic));
        clients.push(client);
        drivers.push(tokio::spawn(drive(eventloop, None, arrivals.clone())));
    }

    let before = match hub {
        Some(hub) => Some(hub_snapshot(hub).await?),
        None => None,
    };
    let me = std::process::id();
    let cpu0 = cpu_time(me)?;
    let broker_cpu0 = broker_pid.map(cpu_time).transpose()?;
    let machine_cpu0 = machine_cpu()?;
    eprintln!(
        "hubbench: {}: {total} messages at {}/s ({warmup} of them warm-up)",
        hop.name(),
        args.rate
    );
    let schedule = Schedule {
        // A moment for the pacing thread to start.
        start: arrivals.nanos(Instant::now()) + 50_000_000,
        rate: args.rate,
        total,
    };
    let origin = arrivals.origin;
    let runtime = tokio::runtime::Handle::current();
    let (calls_tx, calls_rx) = oneshot::channel();
    let pacer_senders = senders.clone();
    std::thread::Builder::new()
        .name("hubbench-pacer".to_owned())
        .spawn(move || {
            let calls = pace(&runtime, &pacer_senders, hop, schedule, origin);
            let _ = calls_tx.send(calls);
        })
        .context("start the pacing thread")?;
    let calls = calls_rx.await.context("the pacing thread panicked")??;

    // Wait for the commands: all of them, or silence after the last send.
    let sent_all = arrivals.nanos(Instant::now());
    loop {
        if arrivals.received.load(Ordering::Acquire) >= total {
            break;
        }
        let quiet = arrivals.last.load(Ordering::Acquire).max(sent_all);
        let now = arrivals.nanos(Instant::now());
        if now.saturating_sub(quiet) > IDLE_LIMIT.as_nanos() as u64
            || now.saturating_sub(schedule.start) > RUN_LIMIT.as_nanos() as u64
        {
            break;
        }
        // Polling a counter the switches' tasks advance; the wait ends as
        // soon as the last command arrives.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    arrivals.closing.store(true, Ordering::Release);
    let span = Duration::from_nanos(
        arrivals
            .nanos(Instant::now())
            .saturating_sub(schedule.start),
    );
    let bench_cpu = cpu_time(me)?.saturating_sub(cpu0);
    let broker_cpu = match (broker_pid, broker_cpu0) {
        (Some(pid), Some(cpu0)) => Some(cpu_time(pid)?.saturating_sub(cpu0)),
        _ => None,
    };
    let other_cpu = machine_cpu()?
        .saturating_sub(machine_cpu0)
        .saturating_sub(bench_cpu + broker_cpu.unwrap_or_default());
    let hub = match (hub, before) {
        (Some(hub), Some(before)) => Some((before, hub_snapshot(hub).await?)),
        _ => None,
    };

    for client in &clients {
        let _ = client.disconnect().await;
    }
    for driver in drivers {
        let abort = driver.abort_handle();
        if tokio::time::timeout(SETUP_WAIT, driver).await.is_err() {
            abort.abort();
        }
    }

    let mut latencies = Vec::new();
    let mut lag = Vec::new();
    for seq in warmup..total {
        let due = schedule.due(seq);
        if let Some(at) = arrivals.arrival(seq) {
            latencies.push(at.saturating_sub(due));
        }
        if let Some(call) = calls.get(seq as usize) {
            lag.push(call.saturating_sub(due));
        }
    }
    latencies.sort_unstable();
    lag.sort_unstable();
    Ok(HopResult {
        hop,
        sent: total,
        received: arrivals.received.load(Ordering::Acquire),
        measured_sent: total - warmup,
        latencies,
        lag,
        duplicates: arrivals.duplicates.load(Ordering::Acquire),
        misrouted: arrivals.misrouted.load(Ordering::Acquire),
        unreadable: arrivals.unreadable.load(Ordering::Acquire),
        disconnects: arrivals.disconnects.load(Ordering::Acquire),
        span,
        bench_cpu,
        broker_cpu,
        other_cpu,
        hub,
    })
}

/// The rules file: rule `bench-<i>` turns sensor i's motion event into a
/// `set` command to switch i carrying the event's payload.
fn bench_rules(sensors: &[DeviceIdentity], switches: &[DeviceIdentity], per_minute: u32) -> String {
    let mut text = String::new();
    for (i, (sensor, switch)) in sensors.iter().zip(switches).enumerate() {
        text.push_str(&format!(
            "[[rule]]\n\
             name = \"bench-{i}\"\n\
             max_runs_per_minute = {per_minute}\n\
             trigger = {{ event = \"{}\", name = \"{MOTION}\" }}\n\
             actions = [{{ command = \"{}\", name = \"set\", payload = {{ seq = \"{{{{trigger.value}}}}\" }} }}]\n\n",
            sensor.id, switch.id
        ));
    }
    text
}

async fn rules(args: RulesArgs) -> anyhow::Result<()> {
    if args.rules == 0 || args.seconds == 0 || !args.rate.is_finite() || args.rate <= 0.0 {
        bail!("--rules, --seconds and --rate must be more than 0");
    }
    if args.rate / args.rules as f64 > MAX_RULE_RATE {
        bail!(
            "{} events/s over {} rules is more than {MAX_RULE_RATE} runs/s per rule \
             (max_runs_per_minute is at most 600): use more --rules",
            args.rate,
            args.rules
        );
    }
    let mosquitto_bin = ensure_mosquitto()?;
    let mosquitto_version = mosquitto_version(&mosquitto_bin);

    // The shipped config: the bench connects within its admission pacing.
    let hub = TestHub::start().await.context("start hubd")?;
    let enrol_started = Instant::now();
    let devices = sim::enroll_devices(&hub, 2 * args.rules, &Kind::ALL)
        .await
        .context("enrol the sensors and switches")?;
    let (sensors, switches): (Vec<DeviceIdentity>, Vec<DeviceIdentity>) = (
        devices
            .iter()
            .filter(|(_, k)| *k == Kind::Sensor)
            .map(|(d, _)| d.clone())
            .collect(),
        devices
            .iter()
            .filter(|(_, k)| *k == Kind::Switch)
            .map(|(d, _)| d.clone())
            .collect(),
    );
    eprintln!(
        "hubbench: enrolled {} sensors and {} switches in {:.1} s",
        sensors.len(),
        switches.len(),
        enrol_started.elapsed().as_secs_f64()
    );
    let applied = hub
        .admin()
        .await?
        .apply_rules(pb::ApplyRulesRequest {
            text: bench_rules(&sensors, &switches, 600),
            file: "bench-rules.toml".to_owned(),
        })
        .await
        .context("apply the bench rules")?
        .into_inner();
    if applied.added.len() != args.rules {
        bail!(
            "ApplyRules added {} rules, not {}",
            applied.added.len(),
            args.rules
        );
    }
    let hub_tls = tls_version(hub.mqtt_addr, &sensors[0].client_config()?).await?;

    let hubd = run_hop(
        Hop::Rule,
        hub.mqtt_addr,
        (&sensors, &switches),
        &args,
        None,
        Some(&hub),
    )
    .await
    .context("rule hop through hubd")?;

    let mosquitto = Mosquitto::start(&mosquitto_bin, &hub.state_dir.join("ca"), &sensors[0])
        .await
        .context("start mosquitto")?;
    let mosq_tls = tls_version(mosquitto.addr, &sensors[0].client_config()?).await?;
    let mosq = run_hop(
        Hop::Bare,
        mosquitto.addr,
        (&sensors, &switches),
        &args,
        Some(mosquitto.pid),
        None,
    )
    .await
    .context("bare hop through mosquitto");
    mosquitto.stop().await;
    let mosq = mosq?;
    hub.stop().await.context("stop hubd")?;

    let tls = if hub_tls == mosq_tls {
        hub_tls
    } else {
        format!("hubd {hub_tls}, mosquitto {mosq_tls}")
    };
    print_rules_table(&args, &mosquitto_version, &tls, &hubd, &mosq);

    let mut failures = Vec::new();
    for r in [&hubd, &mosq] {
        if r.lost() as f64 > MAX_LOSS * r.sent as f64 {
            failures.push(format!(
                "{}: {} of {} messages lost (more than {:.0}%)",
                r.hop.name(),
                r.lost(),
                r.sent,
                MAX_LOSS * 100.0
            ));
        }
    }
    if let Some((before, after)) = &hubd.hub {
        let refused = after.automation.refused - before.automation.refused;
        if refused > 0 {
            failures.push(format!(
                "hubd refused {refused} rule runs (loop protection)"
            ));
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

fn ms(nanos: u64) -> String {
    format!("{:.3} ms", nanos as f64 / 1e6)
}

fn print_rules_table(
    args: &RulesArgs,
    mosquitto_version: &str,
    tls: &str,
    hubd: &HopResult,
    mosq: &HopResult,
) {
    println!(
        "rules: {n} rules (rule i: sensor i's \"{MOTION}\" event -> \"set\" command to switch i), \
         {rate} events/s round robin ({per:.1}/s per rule), {secs} s measured after {warm:?} warm-up, \
         QoS 1 on every leg; loopback, mTLS ({tls}); {mosquitto_version}",
        n = args.rules,
        rate = args.rate,
        per = args.rate / args.rules as f64,
        secs = args.seconds,
        warm = args.warmup,
    );
    println!(
        "{:<44} {:>20} {:>20} {:>8}",
        "",
        hubd.hop.name(),
        mosq.hop.name(),
        "ratio"
    );
    let row = |name: &str, h: String, m: String, ratio: String| {
        println!("{name:<44} {h:>20} {m:>20} {ratio:>8}");
    };
    let none = || "none".to_owned();
    for (name, p) in [
        ("latency p50", 0.50),
        ("latency p90", 0.90),
        ("latency p99", 0.99),
        ("latency p99.9", 0.999),
        ("latency max", 1.0),
    ] {
        let (h, m) = (hubd.percentile(p), mosq.percentile(p));
        let ratio = match (h, m) {
            (Some(h), Some(m)) if m > 0 => format!("{:.2}x", h as f64 / m as f64),
            _ => String::new(),
        };
        row(
            name,
            h.map_or_else(none, ms),
            m.map_or_else(none, ms),
            ratio,
        );
    }
    let both = |f: &dyn Fn(&HopResult) -> String| (f(hubd), f(mosq));
    let (h, m) = both(&|r| format!("{}/{}", r.latencies.len(), r.measured_sent));
    row("received / sent (measured)", h, m, String::new());
    let (h, m) = both(&|r| format!("{}/{}", r.lost(), r.sent));
    row("lost / sent (whole run, warm-up too)", h, m, String::new());
    let (h, m) = both(&|r| format!("{}/{}/{}", r.duplicates, r.misrouted, r.unreadable));
    row("duplicates / misrouted / unreadable", h, m, String::new());
    let (h, m) = both(&|r| r.disconnects.to_string());
    row("connections ended during the run", h, m, String::new());
    let (h, m) = both(&|r| {
        format!(
            "{} / {}",
            percentile(&r.lag, 0.99).map_or_else(none, ms),
            percentile(&r.lag, 1.0).map_or_else(none, ms)
        )
    });
    row("send lag p99 / max (call - due)", h, m, String::new());
    let cpu = |d: Duration, span: Duration| {
        format!(
            "{} ({:.0}%)",
            secs(d),
            100.0 * d.as_secs_f64() / span.as_secs_f64().max(1e-9)
        )
    };
    let (h, m) = both(&|r| {
        r.broker_cpu
            .map_or_else(|| "n/a".to_owned(), |c| cpu(c, r.span))
    });
    row("CPU: broker process", h, m, String::new());
    let (h, m) = both(&|r| cpu(r.bench_cpu, r.span));
    row("CPU: hubbench process", h, m, String::new());
    let (h, m) = both(&|r| cpu(r.other_cpu, r.span));
    row("CPU: every other process", h, m, String::new());

    if let Some((before, after)) = &hubd.hub {
        let (a, b) = (&after.automation, &before.automation);
        println!(
            "hubd automation: {} rules ({} enabled); in the run: runs +{} (events sent {}), \
             refused +{}, events_dropped +{}{}",
            a.rules,
            a.rules_enabled,
            a.runs - b.runs,
            hubd.sent,
            a.refused - b.refused,
            a.events_dropped - b.events_dropped,
            if a.problem.is_empty() {
                String::new()
            } else {
                format!(", problem: {}", a.problem)
            }
        );
        println!(
            "hubd counters in the run: publishes_received +{}, publishes_sent +{}, \
             dropped_slow_subscriber +{}",
            after.counters.publishes_received - before.counters.publishes_received,
            after.counters.publishes_sent - before.counters.publishes_sent,
            after.counters.dropped_slow_subscriber - before.counters.dropped_slow_subscriber,
        );
    }
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    match (hubd.percentile(0.99), mosq.percentile(0.99)) {
        (Some(h), Some(m)) => {
            let target = TARGET_P99.as_nanos() as u64;
            let by = if h > target {
                format!(", over by {}", ms(h - target))
            } else {
                String::new()
            };
            let ratio = h as f64 / m.max(1) as f64;
            println!(
                "targets: hubd p99 <= {}: {} ({}{by}); hubd p99 <= {TARGET_RATIO}x bare hop: {} \
                 ({ratio:.2}x, limit {})",
                ms(target),
                verdict(h <= target),
                ms(h),
                verdict(ratio <= TARGET_RATIO),
                ms((m as f64 * TARGET_RATIO) as u64),
            );
        }
        _ => println!("targets: not judged, a hop received nothing"),
    }
    println!("notes:");
    println!(
        "  latency: from the message's due time on a fixed schedule (message k due at start + \
         k/rate) to the switch's rumqttc event loop returning the command; measuring from the \
         due time, not the publish call, keeps a stalled sender from hiding delay (coordinated \
         omission). 'send lag' is the sender's own share: one thread sleeping until each due \
         time, then handing the message to the sensor's connection"
    );
    println!(
        "  hubd: sensor -> hubd -> rule -> hubd's QoS 1 command publish -> switch; the \
         sensor sends <k>, the switch gets {{\"seq\":<k>}}. mosquitto: the same {} sensor \
         identities publish {{\"seq\":<k>}} straight to the same switches' d/<switch>/cmd/set \
         (one publisher per subscriber, same pairs, same payload bytes at the switch)",
        args.rules
    );
    println!(
        "  same process, same rumqttc client code, same certificates on both; hubd runs in this \
         process with its shipped config, so 'CPU: hubbench process' on hubd is hub + {} \
         clients, on mosquitto the same clients (and an idle hub). CPU % is of one CPU over the \
         run; this machine has {} CPUs, and 'every other process' is load the run competed with",
        2 * args.rules,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!(
        "  each rule has max_runs_per_minute = 600 and gets {:.1} runs/s; the measured window \
         starts after {:?} of the same load; lost counts every message sent, counted once \
         arrived at its own switch; a run waits up to {:?} of silence after the last send",
        args.rate / args.rules as f64,
        args.warmup,
        IDLE_LIMIT
    );
}
