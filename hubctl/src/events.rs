//! `hubctl events` (the security log, optionally followed live) and
//! `hubctl events verify` (a walk of its hash chain).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use hub_proto::v1;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::cli::{DeviceId, EventsAction, EventsArgs};
use crate::commands::{call, call_within, connect, print, print_json};
use crate::output::{rfc3339, sanitize};

/// One security event as `events --json` prints it (one object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    pub seq: u64,
    pub at_ms: i64,
    pub at_rfc3339: Option<String>,
    pub kind: String,
    pub severity: String,
    pub device: Option<String>,
    pub actor: String,
    pub message: String,
    pub evidence: BTreeMap<String, String>,
    pub prev: String,
    pub hash: String,
}

impl From<v1::SecurityEvent> for EventView {
    fn from(e: v1::SecurityEvent) -> Self {
        EventView {
            seq: e.seq,
            at_ms: e.at_ms,
            at_rfc3339: rfc3339(e.at_ms.div_euclid(1000)),
            kind: e.kind,
            severity: e.severity,
            device: (!e.device.is_empty()).then_some(e.device),
            actor: e.actor,
            message: e.message,
            evidence: e.evidence.into_iter().collect(),
            prev: e.prev,
            hash: e.hash,
        }
    }
}

/// `events verify --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyView {
    pub ok: bool,
    pub entries: u64,
    pub first_seq: u64,
    /// The first broken entry, and what is wrong with it.
    pub broken_seq: Option<u64>,
    pub problem: Option<String>,
    pub head: String,
}

pub(crate) async fn execute(
    args: EventsArgs,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    match args.action {
        Some(EventsAction::Verify { json }) => verify(json, socket, out).await,
        None => list(args.device, args.limit, args.follow, args.json, socket, out).await,
    }
}

async fn list(
    device: Option<DeviceId>,
    limit: u32,
    follow: bool,
    json: bool,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let what = "events".to_owned();
    let mut client = connect(socket).await?;
    let request = v1::ListEventsRequest {
        device: device.map(|d| d.as_str().to_owned()).unwrap_or_default(),
        limit,
        follow,
    };
    let mut stream = call(&what, client.list_events(request)).await?;
    let mut shown = 0u64;
    loop {
        let event = match stream.message().await {
            Ok(Some(e)) => EventView::from(e),
            Ok(None) => break,
            Err(status) => return Err(Error::Rpc { what, status }),
        };
        let line = if json {
            let mut line = serde_json::to_string(&event).map_err(Error::Json)?;
            line.push('\n');
            line
        } else {
            event_line(&event)
        };
        print(out, &line)?;
        shown += 1;
    }
    if shown == 0 && !json {
        print(out, "no security events\n")?;
    }
    Ok(())
}

/// One event for people: time, severity, kind, device, message, evidence.
pub fn event_line(e: &EventView) -> String {
    let at = e.at_rfc3339.as_deref().unwrap_or("?");
    let mut line = format!(
        "{} #{} {:<7} {:<20} {:<14} {}",
        at,
        e.seq,
        sanitize(&e.severity),
        sanitize(&e.kind),
        e.device.as_deref().map_or("-".to_owned(), sanitize),
        sanitize(&e.message)
    );
    if !e.evidence.is_empty() {
        let ev: Vec<String> = e
            .evidence
            .iter()
            .map(|(k, v)| format!("{}={}", sanitize(k), sanitize(v)))
            .collect();
        line.push_str(&format!(" [{}]", ev.join(" ")));
    }
    line.push_str(&format!(" by {}\n", sanitize(&e.actor)));
    line
}

async fn verify(json: bool, socket: &Path, out: &mut dyn Write) -> Result<(), Error> {
    let what = "events verify".to_owned();
    let mut client = connect(socket).await?;
    // A long log takes a while to walk.
    let answer = call_within(
        &what,
        std::time::Duration::from_secs(120),
        client.verify_events(v1::VerifyEventsRequest {}),
    )
    .await?;
    let view = VerifyView {
        ok: answer.ok,
        entries: answer.entries,
        first_seq: answer.first_seq,
        broken_seq: (!answer.ok).then_some(answer.broken_seq),
        problem: (!answer.ok).then(|| answer.problem.clone()),
        head: answer.head.clone(),
    };
    if json {
        print_json(out, &view)?;
    } else if view.ok {
        print(
            out,
            &format!(
                "security log intact: {} entries from #{} chain to head {}\n",
                view.entries,
                view.first_seq,
                sanitize(&view.head)
            ),
        )?;
    }
    if view.ok {
        return Ok(());
    }
    Err(Error::Check {
        what,
        detail: format!(
            "entry #{} {} ({} entries before it verified)",
            answer.broken_seq,
            sanitize(&answer.problem),
            answer.entries
        ),
    })
}
