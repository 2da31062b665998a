//! `hubbench wipe`: how long the ownership-transfer wipe takes on a full
//! hub: `--devices` registered devices (1000) and `--records` stored state
//! and event records (1,000,000), against the 2 s target.
//!
//! The store is filled before hubd starts, through hubd's own store API
//! (sealed like any record): device and certificate records, one retained
//! state each, and history records spread over the devices. Then hubd runs
//! in this process on that state dir and the `Wipe` RPC is timed from the
//! client, with no device online (so no reset acknowledgement is waited
//! for: that wait is the householder's `--timeout`, not work), and so is the
//! time until the hub answers `Status` again as a fresh hub.

use std::time::{Duration, Instant};

use hub_proto::v1 as pb;
use hub_tests::TestHub;
use hubd::model::{DeviceId, Grants, Role};
use hubd::store::{CertRecord, DeviceRecord, DeviceState, HistoryRecord, RetainedKind};

#[derive(clap::Args, Clone, Copy)]
pub struct WipeArgs {
    /// Registered devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Stored state and event (history) records.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
}

/// The target from the issue.
const TARGET: Duration = Duration::from_secs(2);

pub async fn run(args: WipeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    hubd::daemon::prepare_state_dir(&state)?;

    // Fill the store as a hub that has run for a while would have.
    let fill_started = Instant::now();
    {
        let state = state.clone();
        let (devices, records) = (args.devices, args.records);
        tokio::task::spawn_blocking(move || fill(&state, devices, records)).await??;
    }
    let fill_time = fill_started.elapsed();
    let store_bytes = std::fs::metadata(state.join("hub.redb"))?.len();

    let hub = TestHub::start_with(|c| c.hub.state_dir = Some(state.clone())).await?;
    let before = hub.status().await?;
    anyhow::ensure!(
        before.devices_known == args.devices as u64,
        "the hub sees {} devices, not {}",
        before.devices_known,
        args.devices
    );
    let mut admin = hub.admin().await?;
    let started = Instant::now();
    let receipt = admin
        .wipe(pb::WipeRequest {
            confirm_name: before.hub_name.clone(),
            reset_timeout_seconds: 1,
        })
        .await?
        .into_inner()
        .receipt;
    let wipe_time = started.elapsed();
    let receipt = hub_proto::receipt::verify(receipt.as_bytes())?;
    // Fresh again: the API answers on the new state.
    let after = loop {
        if let Ok(mut admin) = hub.admin().await
            && let Ok(status) = admin.status(pb::StatusRequest {}).await
        {
            break status.into_inner();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the hub did not come back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let back_time = started.elapsed();
    anyhow::ensure!(after.devices_known == 0, "devices survived the wipe");
    anyhow::ensure!(
        after.ca_fingerprint != before.ca_fingerprint,
        "the CA survived the wipe"
    );
    let destroyed = |k: &str| receipt.destroyed.get(k).copied().unwrap_or(0);

    println!(
        "hubbench wipe: {} devices, {} history records ({:.0} MB store, filled in {:.1} s)",
        args.devices,
        args.records,
        store_bytes as f64 / 1e6,
        fill_time.as_secs_f64()
    );
    println!();
    println!("| measure | hubd | target | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| wipe RPC (marker, erase, new CA and store, signed receipt) | {:.3} s | {:.1} s | {:.2} |",
        wipe_time.as_secs_f64(),
        TARGET.as_secs_f64(),
        wipe_time.as_secs_f64() / TARGET.as_secs_f64()
    );
    println!(
        "| until the fresh hub answers | {:.3} s | - | - |",
        back_time.as_secs_f64()
    );
    println!();
    println!(
        "destroyed (receipt): devices {}, certificates {}, states {}, history records {}; \
         devices not acknowledged {}",
        destroyed("devices"),
        destroyed("certificates"),
        destroyed("states"),
        destroyed("history records"),
        receipt.devices_not_acknowledged.len()
    );
    hub.stop().await?;
    Ok(())
}

/// Writes `devices` device records (with a certificate record and a
/// retained state each) and `records` history records, in batches.
fn fill(state: &std::path::Path, devices: usize, records: usize) -> anyhow::Result<()> {
    let store = hubd::daemon::open_store(state)?;
    let ids: Vec<DeviceId> = (0..devices).map(|_| DeviceId::generate()).collect();
    for (i, id) in ids.iter().enumerate() {
        let serial = format!("{:032x}", i + 1);
        let device = DeviceRecord {
            id: id.clone(),
            name: format!("bench device {i}"),
            state: DeviceState::Active,
            created_at: 1_700_000_000,
            last_seen: 1_700_000_000,
            cert_serial: serial.clone(),
            cert_not_after: 1_900_000_000,
            role: Role::Device,
            isolation_reason: None,
            grants: Grants::default(),
            kind: Some("sensor".to_owned()),
            lifecycle: Default::default(),
        };
        let cert = CertRecord {
            serial_hex: serial,
            device: id.clone(),
            issued_at: 1_700_000_000,
            not_after: 1_900_000_000,
            revoked_at: None,
        };
        store.enroll(&device, &cert)?;
    }
    let states: Vec<_> = ids
        .iter()
        .map(|id| {
            (
                id.clone(),
                RetainedKind::State,
                br#"{"temperature":21.5,"humidity":40}"#.to_vec(),
            )
        })
        .collect();
    store.put_retained(&states)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let mut batch = Vec::with_capacity(10_000);
    for n in 0..records {
        let id = &ids[n % ids.len()];
        batch.push(HistoryRecord {
            device: id.clone(),
            // Spread over the last days, one device's records a second apart.
            at_ms: now_ms - ((n / ids.len()) as i64) * 1000,
            topic: if n % 5 == 0 { "motion" } else { "state" }.to_owned(),
            payload: format!(r#"{{"temperature":{}.5,"n":{n}}}"#, 15 + n % 10),
        });
        if batch.len() == batch.capacity() {
            store.append_history(&batch)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        store.append_history(&batch)?;
    }
    store.flush()?;
    Ok(())
}
