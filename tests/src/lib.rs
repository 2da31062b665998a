//! `hub-tests`: the harness for end-to-end tests and benchmarks.
//!
//! [`TestHub`] runs the real `hubd::run` on `127.0.0.1:0` with a temp state dir
//! and admin socket, and waits until the admin API answers (its readiness
//! signal). [`DeviceIdentity`] makes a device key and CSR locally and enrols
//! through the admin API, as a device maker's provisioning would.
//! [`SimDevice`] is a device on a maintained MQTT client (rumqttc) over mTLS.
//! The `raw` helpers speak TLS and MQTT bytes directly, for the cases a real
//! client library would refuse to produce.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use hub_proto::v1 as pb;
use hub_proto::v1::admin_client::AdminClient;
use hubd::Config;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub mod ota;
pub mod pair;
pub mod raw;
pub mod renew;
pub mod sim;

/// How long any single wait in a test may take before it fails. Generous:
/// CI machines are slow, and a wait ends as soon as its condition holds.
pub const WAIT: Duration = Duration::from_secs(10);

/// Logs from the hub under test, when `HUB_TEST_LOG` is set (e.g. `debug`).
pub fn init_test_logging() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("HUB_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// Runs hubctl in-process (it makes its own runtime, hence the blocking thread).
pub async fn hubctl(hub: &TestHub, args: &[&str]) -> (u8, String, String) {
    let mut argv = vec![
        "hubctl".to_owned(),
        "--socket".to_owned(),
        hub.socket.display().to_string(),
    ];
    argv.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = hubctl::run_with_env(argv, &|_| None, &mut out, &mut err);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    })
    .await
    .unwrap()
}

/// Every file under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// A hub running in this process on loopback and temp dirs.
pub struct TestHub {
    /// Holds the temp dir alive; `state_dir` and `socket` live under it.
    pub dir: Arc<TempDir>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub mqtt_addr: SocketAddr,
    pub config: Config,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), hubd::daemon::Error>>>,
}

impl TestHub {
    /// A hub with the default config (but loopback, port 0 and temp dirs).
    pub async fn start() -> anyhow::Result<TestHub> {
        Self::start_with(|_| {}).await
    }

    /// A hub whose config `tweak` may change first.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<TestHub> {
        init_test_logging();
        let dir = Arc::new(tempfile::tempdir()?);
        let mut config = Config::default_config();
        config.edge.listen = "127.0.0.1:0".parse()?;
        config.hub.state_dir = Some(dir.path().join("state"));
        config.admin.socket = Some(dir.path().join("run").join("hubd.sock"));
        tweak(&mut config);
        Self::launch(dir, config).await
    }

    async fn launch(dir: Arc<TempDir>, config: Config) -> anyhow::Result<TestHub> {
        let state_dir = config.hub.state_dir.clone().context("state_dir set")?;
        let socket = config.admin.socket.clone().context("socket set")?;
        let mqtt = hubd::bind_mqtt(config.edge.listen).await?;
        let mqtt_addr = mqtt.local_addr()?;
        let admin = hubd::bind_admin_socket(&socket, &config.admin.group).await?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(hubd::run(
            config.clone(),
            hubd::Listeners { mqtt, admin },
            shutdown.clone(),
        ));
        let hub = TestHub {
            dir,
            state_dir,
            socket,
            mqtt_addr,
            config,
            shutdown,
            task: Some(task),
        };
        hub.wait_ready().await?;
        Ok(hub)
    }

    /// Waits until `Status` answers: the API is served only after every
    /// listener is bound and the store is open.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(mut c) = hub_proto::admin_client(&self.socket).await
                && c.status(pb::StatusRequest {}).await.is_ok()
            {
                return Ok(());
            }
            if self.task.as_ref().is_some_and(|t| t.is_finished()) {
                bail!("hubd exited during start-up");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("hubd did not become ready within {WAIT:?}");
            }
            // Polling the readiness RPC, not sleeping for a guessed time.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn admin(&self) -> anyhow::Result<AdminClient<Channel>> {
        Ok(hub_proto::admin_client(&self.socket).await?)
    }

    pub async fn status(&self) -> anyhow::Result<pb::StatusResponse> {
        Ok(self
            .admin()
            .await?
            .status(pb::StatusRequest {})
            .await?
            .into_inner())
    }

    /// Stops the hub as SIGTERM would and returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<(Arc<TempDir>, Config)> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok((self.dir.clone(), self.config.clone()))
    }

    /// Stops and starts again on the same state dir (a new port).
    pub async fn restart(self) -> anyhow::Result<TestHub> {
        let (dir, mut config) = self.stop().await?;
        config.edge.listen = "127.0.0.1:0".parse()?;
        Self::launch(dir, config).await
    }

    /// Stops and starts again on the same state dir and the same MQTT
    /// address, as a power cut and reboot would: devices that retry the old
    /// address find the hub again.
    pub async fn restart_same_port(self) -> anyhow::Result<TestHub> {
        let addr = self.mqtt_addr;
        let (dir, mut config) = self.stop().await?;
        config.edge.listen = addr;
        Self::launch(dir, config).await
    }

    /// Stops the hub; [`TestHub::start_again`] brings it back later on the
    /// same state dir and address (for tests that need the hub away a while).
    pub async fn stop_for_restart(self) -> anyhow::Result<StoppedHub> {
        let addr = self.mqtt_addr;
        let (dir, mut config) = self.stop().await?;
        config.edge.listen = addr;
        Ok(StoppedHub { dir, config })
    }

    /// Makes a device key and CSR here and enrols it through the admin API.
    pub async fn enroll(&self, name: &str) -> anyhow::Result<DeviceIdentity> {
        DeviceIdentity::enroll(&mut self.admin().await?, name).await
    }

    /// Watches a filter as the hub, through the admin API.
    pub async fn watch(&self, filter: &str) -> anyhow::Result<Watch> {
        let stream = self
            .admin()
            .await?
            .watch(pb::WatchRequest {
                filter: filter.to_owned(),
            })
            .await?
            .into_inner();
        Ok(Watch { stream })
    }

    /// Publishes as the hub, at QoS 0.
    pub async fn publish(&self, topic: &str, payload: &[u8], retain: bool) -> anyhow::Result<()> {
        self.publish_qos(topic, payload, 0, retain).await
    }

    /// Publishes as the hub at `qos` (0 or 1).
    pub async fn publish_qos(
        &self,
        topic: &str,
        payload: &[u8],
        qos: u32,
        retain: bool,
    ) -> anyhow::Result<()> {
        self.admin()
            .await?
            .publish(pb::PublishRequest {
                topic: topic.to_owned(),
                payload: payload.to_vec(),
                retain,
                qos,
            })
            .await?;
        Ok(())
    }
}

/// A hub stopped by [`TestHub::stop_for_restart`].
pub struct StoppedHub {
    dir: Arc<TempDir>,
    config: Config,
}

impl StoppedHub {
    /// The hub's state dir, for tests that inspect or damage it.
    pub fn state_dir(&self) -> std::path::PathBuf {
        self.config
            .hub
            .state_dir
            .clone()
            .expect("TestHub always sets a state dir")
    }

    /// Starts it again on the same state dir and address.
    pub async fn start_again(self) -> anyhow::Result<TestHub> {
        TestHub::launch(self.dir, self.config).await
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A live `Watch` stream.
pub struct Watch {
    stream: tonic::Streaming<pb::WatchMessage>,
}

impl Watch {
    /// The next message, or an error after [`WAIT`].
    pub async fn next(&mut self) -> anyhow::Result<pb::WatchMessage> {
        match tokio::time::timeout(WAIT, self.stream.message()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => bail!("watch stream ended"),
            Ok(Err(e)) => bail!("watch stream failed: {e}"),
            Err(_) => bail!("no message within {WAIT:?}"),
        }
    }
}

/// A device's credentials: its own key (made here, never sent), its
/// certificate and the hub CA.
#[derive(Clone)]
pub struct DeviceIdentity {
    pub id: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

/// Shows the id only: the key is a secret even in test output.
impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A P-256 key and a PEM CSR for it, as a device would make them.
pub fn key_and_csr() -> anyhow::Result<(KeyPair, String)> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

impl DeviceIdentity {
    pub async fn enroll(admin: &mut AdminClient<Channel>, name: &str) -> anyhow::Result<Self> {
        let (key, csr_pem) = key_and_csr()?;
        let resp = admin
            .enroll_device(pb::EnrollDeviceRequest {
                name: name.to_owned(),
                csr_pem,
            })
            .await?
            .into_inner();
        Ok(DeviceIdentity {
            id: resp.device.context("enroll answer has a device")?.id,
            key_pem: key.serialize_pem(),
            cert_pem: resp.cert_pem,
            ca_pem: resp.ca_chain_pem,
        })
    }

    /// rustls client configuration presenting this device's certificate.
    pub fn client_config(&self) -> anyhow::Result<Arc<ClientConfig>> {
        client_config(&self.ca_pem, Some((&self.cert_pem, &self.key_pem)), None)
    }

    /// Writes key.pem (0600), cert.pem and ca.pem into `dir` for outside programs.
    pub fn write_to(&self, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let (key, cert, ca) = (
            dir.join("key.pem"),
            dir.join("cert.pem"),
            dir.join("ca.pem"),
        );
        std::fs::write(&key, &self.key_pem)?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        std::fs::write(&cert, &self.cert_pem)?;
        std::fs::write(&ca, &self.ca_pem)?;
        Ok((key, cert, ca))
    }
}

/// A rustls client configuration trusting `ca_pem`, optionally presenting a
/// client certificate, optionally limited to some protocol versions.
pub fn client_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
    versions: Option<&[&'static rustls::SupportedProtocolVersion]>,
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions.unwrap_or(rustls::DEFAULT_VERSIONS))?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The server name to verify when connecting to 127.0.0.1.
pub fn loopback_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into())
}

/// What a [`SimDevice`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// A message arrived.
    Message {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    /// A SUBACK with its return codes (0, 1, 2 or 0x80 as the broker sent them).
    SubAck(Vec<u8>),
    /// A PUBACK for a QoS 1 publish.
    PubAck(u16),
    /// The connection ended, with why.
    Disconnected(String),
}

/// A simulated device: rumqttc (MQTT 3.1.1) over mTLS with its own identity.
pub struct SimDevice {
    pub id: String,
    pub client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<DeviceEvent>,
    task: JoinHandle<()>,
}

impl SimDevice {
    /// Connects and waits for a successful CONNACK; fails with the broker's
    /// refusal or the TLS error otherwise.
    pub async fn connect(identity: &DeviceIdentity, addr: SocketAddr) -> anyhow::Result<SimDevice> {
        Self::connect_as(identity, &identity.id, addr).await
    }

    /// Like [`connect`](Self::connect) but with any MQTT client id.
    pub async fn connect_as(
        identity: &DeviceIdentity,
        client_id: &str,
        addr: SocketAddr,
    ) -> anyhow::Result<SimDevice> {
        let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(identity.client_config()?),
        ));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        // The first poll drives TLS and CONNECT/CONNACK.
        let first = tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .context("no CONNACK in time")?;
        match first {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)))
                if ack.code == rumqttc::ConnectReturnCode::Success => {}
            Ok(other) => bail!("unexpected first event {other:?}"),
            Err(e) => bail!("connect failed: {e}"),
        }
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        DeviceEvent::Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(s))) => {
                        DeviceEvent::SubAck(
                            s.return_codes
                                .iter()
                                .map(|c| match c {
                                    rumqttc::SubscribeReasonCode::Success(q) => *q as u8,
                                    rumqttc::SubscribeReasonCode::Failure => 0x80,
                                })
                                .collect(),
                        )
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a))) => {
                        DeviceEvent::PubAck(a.pkid)
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(DeviceEvent::Disconnected(e.to_string()));
                        // Do not reconnect: tests decide what happens next.
                        return;
                    }
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        Ok(SimDevice {
            id: client_id.to_owned(),
            client,
            events,
            task,
        })
    }

    /// The next event, or an error after [`WAIT`].
    pub async fn next(&mut self) -> anyhow::Result<DeviceEvent> {
        match tokio::time::timeout(WAIT, self.events.recv()).await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => bail!("device event loop ended"),
            Err(_) => bail!("no device event within {WAIT:?}"),
        }
    }

    /// The next event within `limit`, or None.
    pub async fn next_within(&mut self, limit: Duration) -> Option<DeviceEvent> {
        tokio::time::timeout(limit, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Subscribes and returns the SUBACK codes.
    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) -> anyhow::Result<Vec<u8>> {
        self.client.subscribe(filter, qos).await?;
        loop {
            match self.next().await? {
                DeviceEvent::SubAck(codes) => return Ok(codes),
                DeviceEvent::Disconnected(why) => bail!("disconnected while subscribing: {why}"),
                _ => continue,
            }
        }
    }

    pub async fn publish(&self, topic: &str, payload: &[u8], retain: bool) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtMostOnce, retain, payload.to_vec())
            .await?;
        Ok(())
    }

    /// Waits for the next message, skipping acks.
    pub async fn next_message(&mut self) -> anyhow::Result<(String, Vec<u8>)> {
        loop {
            match self.next().await? {
                DeviceEvent::Message { topic, payload, .. } => return Ok((topic, payload)),
                DeviceEvent::Disconnected(why) => bail!("disconnected: {why}"),
                _ => continue,
            }
        }
    }

    /// Waits until the connection ends and returns why.
    pub async fn disconnected(&mut self) -> anyhow::Result<String> {
        loop {
            if let DeviceEvent::Disconnected(why) = self.next().await? {
                return Ok(why);
            }
        }
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}
