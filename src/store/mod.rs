//! The durable record of every accepted prompt, in redb (embedded, ACID, copy-on-write B-trees,
//! fsync on commit). It is the source of truth: the HNSW index and the detector state are derived
//! from it, and a start rebuilds from it whatever their checkpoint (index dumps, detector
//! snapshot) lacks. It knows nothing of HNSW or scoring.
//!
//! A prompt's verdict is returned only after the transaction holding it has committed
//! ([`Store::append`] commits with `Durability::Immediate`), so a crash never loses an acknowledged
//! prompt. Many prompts share one commit (group commit), which keeps fsyncs off the per-prompt path.

mod record;

pub use record::{PromptRecord, RecordRef, text_hash};

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// id → encoded [`PromptRecord`].
const PROMPTS: TableDefinition<u64, &[u8]> = TableDefinition::new("prompts");
/// Small named values (schema version, allow-list, …).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "prompts.redb";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written. (The message shows redb's error; it
    /// is not also given as the source, which would print it twice in an error chain.)
    #[error("store: {0}")]
    Db(redb::Error),
    /// Another process (or another store in this one) holds the data directory.
    #[error(
        "store: {path} is in use by another process (a running `serve`, `reindex` or `eval`?); one process at a time opens a data directory"
    )]
    InUse { path: String },
    /// The data directory could not be created.
    #[error("store: {path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// A stored record could not be decoded (corruption or a newer format).
    #[error("store: record {id}: {reason}")]
    Corrupt { id: u64, reason: String },
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

/// The prompt store. Cheap to share behind an `Arc`; redb serialises writers itself.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        if dir.exists() && !dir.is_dir() {
            return Err(StoreError::Io {
                path: dir.display().to_string(),
                error: std::io::Error::other(
                    "not a directory: --data-dir names the directory the data lives in",
                ),
            });
        }
        std::fs::create_dir_all(dir).map_err(|error| StoreError::Io {
            path: dir.display().to_string(),
            error,
        })?;
        let file = dir.join(DB_FILE);
        let db = Database::create(&file).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                path: dir.display().to_string(),
            },
            // "Permission denied" or "Is a directory" alone would not say of what.
            redb::DatabaseError::Storage(redb::StorageError::Io(error)) => StoreError::Io {
                path: file.display().to_string(),
                error,
            },
            e => db_err(e),
        })?;
        // Create the tables so that read transactions never meet a missing table.
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(PROMPTS).map_err(db_err)?;
            txn.open_table(META).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    /// Writes `records` in one transaction and returns once it is durable on disk.
    pub fn append(&self, records: &[PromptRecord]) -> Result<(), StoreError> {
        self.append_refs(records.iter().map(PromptRecord::borrowed))
    }

    /// [`Self::append`] of borrowed records, in one transaction.
    pub fn append_refs<'a>(
        &self,
        records: impl IntoIterator<Item = RecordRef<'a>>,
    ) -> Result<(), StoreError> {
        let mut records = records.into_iter().peekable();
        if records.peek().is_none() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(PROMPTS).map_err(db_err)?;
            let mut buf = Vec::new();
            for r in records {
                buf.clear();
                r.encode_into(&mut buf);
                table.insert(r.id, buf.as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }

    /// The record with this id, if stored.
    pub fn get(&self, id: u64) -> Result<Option<PromptRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PROMPTS).map_err(db_err)?;
        match table.get(id).map_err(db_err)? {
            Some(v) => PromptRecord::decode(id, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// The records with these ids that exist, in the order given (one read transaction).
    pub fn get_many(&self, ids: &[u64]) -> Result<Vec<PromptRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PROMPTS).map_err(db_err)?;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(v) = table.get(id).map_err(db_err)? {
                out.push(PromptRecord::decode(id, v.value())?);
            }
        }
        Ok(out)
    }

    /// Calls `f` on every record with id ≥ `from`, in id order; returns how many were visited.
    pub fn for_each_from(
        &self,
        from: u64,
        mut f: impl FnMut(PromptRecord) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PROMPTS).map_err(db_err)?;
        let mut n = 0;
        for item in table.range(from..).map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            f(PromptRecord::decode(k.value(), v.value())?)?;
            n += 1;
        }
        Ok(n)
    }

    /// The highest stored id (0 when empty).
    pub fn last_id(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PROMPTS).map_err(db_err)?;
        Ok(table
            .last()
            .map_err(db_err)?
            .map(|(k, _)| k.value())
            .unwrap_or(0))
    }

    /// Number of stored prompts.
    pub fn len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        txn.open_table(PROMPTS)
            .map_err(db_err)?
            .len()
            .map_err(db_err)
    }

    /// True when no prompt is stored.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Reads a named meta value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(META).map_err(db_err)?;
        Ok(table.get(key).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Writes a named meta value durably.
    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(META).map_err(db_err)?;
            table.insert(key, value).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, account: &str, text: &str) -> PromptRecord {
        PromptRecord::new(
            id,
            account.into(),
            1_700_000_000_000 + id as i64,
            text.into(),
            vec![0.5; 4],
            id,
            vec![],
        )
    }

    #[test]
    fn a_data_dir_that_is_a_file_is_refused_saying_so() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("traffic.jsonl");
        std::fs::write(&file, "{}\n").unwrap();
        let e = Store::open(&file).err().unwrap().to_string();
        assert!(e.contains("not a directory"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"{}\n");
    }

    #[test]
    fn a_store_file_that_cannot_be_opened_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(DB_FILE);
        std::fs::create_dir(&file).unwrap();
        let e = Store::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.starts_with(&format!("store: {}: ", file.display())),
            "{e}"
        );
    }

    #[test]
    fn append_get_scan_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.last_id().unwrap(), 0);
            store
                .append(&[rec(1, "a", "one"), rec(2, "b", "two"), rec(3, "a", "three")])
                .unwrap();
            assert_eq!(store.get(2).unwrap().unwrap().text, "two");
            assert!(store.get(9).unwrap().is_none());
        }
        // Reopen: everything committed is there.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.len().unwrap(), 3);
        assert_eq!(store.last_id().unwrap(), 3);
        let mut seen = vec![];
        store
            .for_each_from(2, |r| {
                seen.push((r.id, r.account_id));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, vec![(2, "b".to_string()), (3, "a".to_string())]);
        let many = store.get_many(&[3, 7, 1]).unwrap();
        assert_eq!(many.iter().map(|r| r.id).collect::<Vec<_>>(), vec![3, 1]);
    }

    #[test]
    fn meta_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.meta("k").unwrap().is_none());
        store.set_meta("k", b"v").unwrap();
        assert_eq!(store.meta("k").unwrap().unwrap(), b"v");
    }
}
