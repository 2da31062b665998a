//! `hubctl privacy` (what personal data the hub holds, where, why, for how
//! long) and `hubctl export` (all of it as one JSON file for its owner).

use std::io::Write;
use std::path::{Path, PathBuf};

use hub_proto::v1;
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::commands::{call, connect, print, print_json, write_new};
use crate::output::sanitize;

/// The export holds personal data: readable by its owner alone.
const EXPORT_MODE: u32 = 0o600;

/// One line of `privacy --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivacyItemView {
    pub place: String,
    pub holds: String,
    pub why: String,
    pub retention: String,
    /// Records held now; `null` where the hub does not count them.
    pub count: Option<u64>,
    /// The key of this data in `hubctl export`; `null` if not exported.
    pub export_key: Option<String>,
}

pub(crate) async fn privacy(json: bool, socket: &Path, out: &mut dyn Write) -> Result<(), Error> {
    let mut client = connect(socket).await?;
    let answer = call("privacy", client.privacy(v1::PrivacyRequest {})).await?;
    let items: Vec<PrivacyItemView> = answer
        .items
        .into_iter()
        .map(|i| PrivacyItemView {
            place: i.place,
            holds: i.holds,
            why: i.why,
            retention: i.retention,
            count: u64::try_from(i.count).ok(),
            export_key: (!i.export_key.is_empty()).then_some(i.export_key),
        })
        .collect();
    if json {
        return print_json(out, &items);
    }
    let mut text = String::from(
        "What this hub holds about your home. Nothing of it leaves the hub: it has no cloud.\n",
    );
    for item in &items {
        text.push('\n');
        text.push_str(&format!("{}\n", sanitize(&item.place)));
        text.push_str(&format!("  holds:     {}\n", sanitize(&item.holds)));
        text.push_str(&format!("  why:       {}\n", sanitize(&item.why)));
        text.push_str(&format!("  kept:      {}\n", sanitize(&item.retention)));
        if let Some(count) = item.count {
            text.push_str(&format!("  records:   {count}\n"));
        }
    }
    text.push_str(
        "\nhubctl export --out FILE writes all of it as JSON; hubctl devices remove ID deletes a \
         device and its data; hubctl wipe deletes everything.\n",
    );
    print(out, &text)
}

pub(crate) async fn export(
    out_path: PathBuf,
    force: bool,
    socket: &Path,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let what = format!("export {}", out_path.display());
    if !force && out_path.symlink_metadata().is_ok() {
        return Err(Error::Exists {
            what,
            path: out_path,
        });
    }
    let mut client = connect(socket).await?;
    let answer = call(&what, client.export(v1::ExportRequest {})).await?;
    write_new(&out_path, &answer.json, force, EXPORT_MODE).map_err(|source| Error::File {
        what: what.clone(),
        path: out_path.clone(),
        source,
    })?;
    print(
        out,
        &format!(
            "wrote {} ({} bytes, mode 0600): it holds personal data, keep it safe\n",
            out_path.display(),
            answer.json.len()
        ),
    )
}
