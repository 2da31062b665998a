//! The firmware catalogue, its images and the trusted vendor keys.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    DbContext, Error, FIRMWARE, FIRMWARE_IMAGES, FirmwareRecord, Store, VENDOR_KEYS,
    VendorKeyRecord,
};

impl Store {
    /// Adds a catalogue entry and its image in one durable transaction.
    /// An entry for the same model and version is refused
    /// ([`Error::Exists`]) and nothing is written.
    pub fn add_firmware(&self, record: &FirmwareRecord, image: &[u8]) -> Result<(), Error> {
        let path = &*self.path;
        let key = record.key();
        let bytes = self.encode("firmware", &key, record)?;
        let sealed_image = self.seal("firmware_images", &record.sha256, image)?;
        let txn = self.db.begin_write().ctx(path)?;
        {
            let mut table = txn.open_table(FIRMWARE).ctx(path)?;
            if table.get(key.as_str()).ctx(path)?.is_some() {
                return Err(self.exists("firmware", &key));
            }
            table.insert(key.as_str(), bytes.as_slice()).ctx(path)?;
            let mut images = txn.open_table(FIRMWARE_IMAGES).ctx(path)?;
            images
                .insert(record.sha256.as_str(), sealed_image.as_slice())
                .ctx(path)?;
        }
        txn.commit().ctx(path)
    }

    /// Every catalogue entry, in no particular order.
    pub fn firmware(&self) -> Result<Vec<FirmwareRecord>, Error> {
        self.all_of(FIRMWARE, "firmware")
    }

    /// The image with this SHA-256 (hex), if the catalogue has it.
    pub fn firmware_image(&self, sha256: &str) -> Result<Option<Vec<u8>>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let table = txn.open_table(FIRMWARE_IMAGES).ctx(path)?;
        let Some(bytes) = table.get(sha256).ctx(path)? else {
            return Ok(None);
        };
        self.open_sealed("firmware_images", sha256, bytes.value())
            .map(Some)
    }

    /// Records a trusted vendor key; trusting a key twice changes nothing.
    /// Durable on return.
    pub fn trust_vendor_key(&self, record: &VendorKeyRecord) -> Result<bool, Error> {
        let path = &*self.path;
        let key = record.key();
        let bytes = self.encode("vendor_keys", &key, record)?;
        let txn = self.db.begin_write().ctx(path)?;
        let added = {
            let mut table = txn.open_table(VENDOR_KEYS).ctx(path)?;
            if table.get(key.as_str()).ctx(path)?.is_some() {
                false
            } else {
                table.insert(key.as_str(), bytes.as_slice()).ctx(path)?;
                true
            }
        };
        txn.commit().ctx(path)?;
        Ok(added)
    }

    /// Every trusted vendor key.
    pub fn vendor_keys(&self) -> Result<Vec<VendorKeyRecord>, Error> {
        self.all_of(VENDOR_KEYS, "vendor_keys")
    }

    fn all_of<T: serde::de::DeserializeOwned>(
        &self,
        def: TableDefinition<'static, &'static str, &'static [u8]>,
        name: &'static str,
    ) -> Result<Vec<T>, Error> {
        let path = &*self.path;
        let txn = self.db.begin_read().ctx(path)?;
        let table = txn.open_table(def).ctx(path)?;
        let mut out = Vec::new();
        for entry in table.iter().ctx(path)? {
            let (k, v) = entry.ctx(path)?;
            out.push(self.decode(name, k.value(), v.value())?);
        }
        Ok(out)
    }
}
