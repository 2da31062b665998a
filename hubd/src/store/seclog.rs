//! The security log's table: append-only entries keyed by sequence number,
//! and the anchor that pruning leaves behind.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::{DbContext, Error, META, META_SECLOG_ANCHOR, SECLOG, SeclogAnchor, SeclogEntry, Store};

/// Each stored entry's key, and the entry or why it cannot be read.
pub type RawEntries = Vec<(String, Result<SeclogEntry, Error>)>;

fn seq_key(seq: u64) -> String {
    format!("{seq:016x}")
}

impl Store {
    /// Appends entries in one durable transaction. An entry whose sequence
    /// number is taken is refused ([`Error::Exists`]) and nothing is
    /// written: the log is append-only.
    pub fn append_seclog(&self, entries: &[SeclogEntry]) -> Result<(), Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        {
            let mut table = txn.open_table(SECLOG).ctx(path)?;
            for entry in entries {
                let key = seq_key(entry.seq);
                let bytes = self.encode("seclog", &key, entry)?;
                if table
                    .insert(key.as_str(), bytes.as_slice())
                    .ctx(path)?
                    .is_some()
                {
                    return Err(self.exists("seclog", &key));
                }
            }
        }
        txn.commit().ctx(path)
    }

    /// The last entry, if any: where the chain goes on.
    pub fn seclog_last(&self) -> Result<Option<SeclogEntry>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let table = txn.open_table(SECLOG).ctx(path)?;
        match table.last().ctx(path)? {
            Some((k, v)) => self.decode("seclog", k.value(), v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Entries from `from_seq` on, oldest first, at most `limit`. An entry
    /// that cannot be decrypted is an error naming its key.
    pub fn seclog(&self, from_seq: u64, limit: usize) -> Result<Vec<SeclogEntry>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let table = txn.open_table(SECLOG).ctx(path)?;
        let from = seq_key(from_seq);
        let mut out = Vec::new();
        for entry in table.range(from.as_str()..).ctx(path)?.take(limit) {
            let (k, v) = entry.ctx(path)?;
            out.push(self.decode("seclog", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Every entry as stored, decrypted or not: `(key, Ok(entry))`, or the
    /// error that names why the value cannot be read. For verification,
    /// which must report a damaged entry rather than stop at it.
    pub fn seclog_raw(&self) -> Result<RawEntries, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let table = txn.open_table(SECLOG).ctx(path)?;
        let mut out = Vec::new();
        for entry in table.iter().ctx(path)? {
            let (k, v) = entry.ctx(path)?;
            let key = k.value().to_owned();
            let decoded = self.decode("seclog", &key, v.value());
            out.push((key, decoded));
        }
        Ok(out)
    }

    /// How many entries the log holds.
    pub fn seclog_len(&self) -> Result<u64, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        txn.open_table(SECLOG).ctx(path)?.len().ctx(path)
    }

    /// Where the kept chain starts (the default, seq 0 and an empty hash,
    /// until something was pruned).
    pub fn seclog_anchor(&self) -> Result<SeclogAnchor, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let meta = txn.open_table(META).ctx(path)?;
        Ok(self
            .meta_get::<SeclogAnchor>(&meta, META_SECLOG_ANCHOR)?
            .unwrap_or_default())
    }

    /// Deletes the oldest entries: those before `cutoff_ms` (Unix ms), and
    /// beyond that as many as keep the log at `max_entries`. The anchor
    /// moves to the last deleted entry in the same durable transaction, so
    /// the kept chain still verifies. Returns how many went.
    pub fn prune_seclog(&self, cutoff_ms: i64, max_entries: u64) -> Result<u64, Error> {
        let path = &*self.path;
        let txn = self.db.begin_write().ctx(path)?;
        let pruned = {
            let mut table = txn.open_table(SECLOG).ctx(path)?;
            let mut excess = table.len().ctx(path)?.saturating_sub(max_entries);
            let mut last: Option<SeclogEntry> = None;
            let mut doomed = Vec::new();
            for entry in table.iter().ctx(path)? {
                let (k, v) = entry.ctx(path)?;
                let e: SeclogEntry = self.decode("seclog", k.value(), v.value())?;
                if e.at_ms >= cutoff_ms && excess == 0 {
                    break;
                }
                excess = excess.saturating_sub(1);
                doomed.push(k.value().to_owned());
                last = Some(e);
            }
            for key in &doomed {
                table.remove(key.as_str()).ctx(path)?;
            }
            if let Some(last) = last {
                let anchor = SeclogAnchor {
                    first_seq: last.seq + 1,
                    prev: last.hash,
                };
                let mut meta = txn.open_table(META).ctx(path)?;
                self.meta_put(&mut meta, META_SECLOG_ANCHOR, &anchor)?;
            }
            doomed.len() as u64
        };
        txn.commit().ctx(path)?;
        Ok(pruned)
    }

    /// Overwrites one stored entry as given, chain or not. Only for tests
    /// that prove an edited entry is detected; hubd never calls it.
    #[doc(hidden)]
    pub fn overwrite_seclog_entry_for_tests(&self, entry: &SeclogEntry) -> Result<(), Error> {
        let path = &*self.path;
        let key = seq_key(entry.seq);
        let bytes = self.encode("seclog", &key, entry)?;
        let txn = self.db.begin_write().ctx(path)?;
        txn.open_table(SECLOG)
            .ctx(path)?
            .insert(key.as_str(), bytes.as_slice())
            .ctx(path)?;
        txn.commit().ctx(path)
    }
}
