//! The detector snapshot: the clusters, accounts and template keys as of one stored prompt id,
//! written at a checkpoint so that a start replays only the prompts stored since instead of the
//! whole store (which reads every stored record, embedding and parts included: ~11 KB a prompt).
//!
//! One file, written beside the store and renamed into place: a magic and version, a header
//! saying which prompt it ends at, the [`Detector`] and the [`KeyIndex`], then an xxh3 checksum
//! of everything before it. A file that is missing, truncated, corrupt, of another version or not
//! a prefix of the store is not used (the start replays the whole store, as before); it never
//! fails a start.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use xxhash_rust::xxh3::Xxh3;

use super::keys::KeyIndex;
use super::{Detector, DetectorConfig};

const MAGIC: &[u8; 8] = b"PRDETSNP";
/// 2: template keys take each Chinese or Japanese character as a word (keys of version 1 are
/// stale for such prompts, so its snapshots are replayed instead). 3: the template-key index
/// counts the accounts and texts seen under each key (see `keys::KEY_TEXTS`). 4: it keeps each
/// key's latest run of one account and the run before (see `keys::RUN`), and a prompt credits one
/// linked prompt of each other account (the prompts' `shared` marks changed meaning).
const VERSION: u32 = 4;
/// Bytes hashed and written, or read and hashed, at a time.
const CHUNK: usize = 1 << 20;

/// What a snapshot says of itself: where in the store it ends and what it was built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The last prompt id it holds; it holds every stored prompt up to it.
    pub last_id: u64,
    /// That prompt's text hash, to tell this store from another one with as many prompts.
    pub last_text_hash: u64,
    /// Prompts it holds.
    pub prompts: u64,
    /// Fingerprint of the allow-list the template keys were recorded under.
    pub allow: u64,
}

/// Writes `detector` and `keys` to `path` (through a temporary file, synced, then renamed, so a
/// crash leaves the old snapshot or the new one). Returns the bytes written.
pub fn save(
    path: &Path,
    header: &SnapshotHeader,
    detector: &Detector,
    keys: &KeyIndex,
) -> io::Result<u64> {
    let tmp = path.with_extension("tmp");
    let written =
        write_to(&tmp, header, detector, keys).and_then(|n| std::fs::rename(&tmp, path).map(|_| n));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let written = written?;
    if let Some(dir) = path.parent() {
        // The rename itself is durable once the directory is synced.
        File::open(dir)?.sync_all()?;
    }
    Ok(written)
}

/// Writes the snapshot to `tmp` and syncs it.
fn write_to(
    tmp: &Path,
    header: &SnapshotHeader,
    detector: &Detector,
    keys: &KeyIndex,
) -> io::Result<u64> {
    let file = File::create(tmp)?;
    let mut enc = Enc::new(BufWriter::with_capacity(CHUNK, file));
    enc.bytes(MAGIC);
    enc.u32(VERSION);
    enc.u64(header.last_id);
    enc.u64(header.last_text_hash);
    enc.u64(header.prompts);
    enc.u64(header.allow);
    detector.encode(&mut enc);
    keys.encode(&mut enc);
    let (file, written) = enc.finish()?;
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(written)
}

/// Reads the snapshot at `path`. `accept` judges its header before the rest is read (`Err` with
/// the reason to reject it). `Ok(None)` when there is no file; `Err` says why a file is unusable.
pub fn load(
    path: &Path,
    config: DetectorConfig,
    accept: impl FnOnce(&SnapshotHeader) -> Result<(), String>,
) -> Result<Option<(SnapshotHeader, Detector, KeyIndex)>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    let len = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?
        .len();
    // The whole file is checked before anything in it is believed, so that damage is reported as
    // such, whichever field it hit.
    let mut file = file;
    verify(&mut file, len).map_err(|e| e.to_string())?;
    let mut dec = Dec::new(file, len);
    let read = |dec: &mut Dec| -> io::Result<(SnapshotHeader, Detector, KeyIndex)> {
        // Magic and version, checked by `verify`.
        let mut prologue = [0u8; 12];
        dec.fill(&mut prologue)?;
        let header = SnapshotHeader {
            last_id: dec.u64()?,
            last_text_hash: dec.u64()?,
            prompts: dec.u64()?,
            allow: dec.u64()?,
        };
        accept(&header).map_err(invalid)?;
        let detector = Detector::decode(dec, config)?;
        let keys = KeyIndex::decode(dec)?;
        dec.finish()?;
        Ok((header, detector, keys))
    };
    let (header, detector, keys) = read(&mut dec).map_err(|e| e.to_string())?;
    if detector.prompts() != header.prompts {
        return Err(format!(
            "it says {} prompts but holds {}",
            header.prompts,
            detector.prompts()
        ));
    }
    Ok(Some((header, detector, keys)))
}

/// Checks the magic and version, then the checksum of everything before it; leaves `file` at
/// its start.
fn verify(file: &mut File, len: u64) -> io::Result<()> {
    if len < 8 + 12 {
        return Err(invalid("truncated"));
    }
    let mut payload = len - 8;
    let mut buf = vec![0u8; CHUNK.min(payload as usize)];
    let mut hash = Xxh3::new();
    let mut first = true;
    while payload > 0 {
        let n = (payload as usize).min(CHUNK);
        file.read_exact(&mut buf[..n])?;
        if first {
            first = false;
            if &buf[..8] != MAGIC {
                return Err(invalid("not a detector snapshot"));
            }
            let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
            if version != VERSION {
                return Err(invalid(format!(
                    "format version {version}, this build reads {VERSION}"
                )));
            }
        }
        hash.update(&buf[..n]);
        payload -= n as u64;
    }
    let mut sum = [0u8; 8];
    file.read_exact(&mut sum)?;
    if u64::from_le_bytes(sum) != hash.digest() {
        return Err(invalid("corrupt (checksum mismatch)"));
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(())
}

pub(super) fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Little-endian encoder that hashes what it writes.
pub(super) struct Enc<W: Write> {
    out: W,
    buf: Vec<u8>,
    hash: Xxh3,
    written: u64,
    error: Option<io::Error>,
}

impl<W: Write> Enc<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            buf: Vec::with_capacity(CHUNK + 64),
            hash: Xxh3::new(),
            written: 0,
            error: None,
        }
    }

    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.flush();
        }
    }

    pub(super) fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }

    pub(super) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    pub(super) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    pub(super) fn i64(&mut self, v: i64) {
        self.bytes(&v.to_le_bytes());
    }

    pub(super) fn len(&mut self, n: usize) {
        self.u64(n as u64);
    }

    pub(super) fn str(&mut self, s: &str) {
        self.len(s.len());
        self.bytes(s.as_bytes());
    }

    fn flush(&mut self) {
        self.hash.update(&self.buf);
        if self.error.is_none()
            && let Err(e) = self.out.write_all(&self.buf)
        {
            self.error = Some(e);
        }
        self.written += self.buf.len() as u64;
        self.buf.clear();
    }

    /// Writes the checksum; returns the writer and the bytes written.
    fn finish(mut self) -> io::Result<(W, u64)> {
        self.flush();
        let sum = self.hash.digest();
        self.buf.extend_from_slice(&sum.to_le_bytes());
        self.flush();
        match self.error {
            Some(e) => Err(e),
            None => Ok((self.out, self.written)),
        }
    }
}

/// Decoder of what [`Enc`] wrote, once [`verify`] has checked the file: reads a chunk at a time.
/// Lengths are checked against the bytes left, so a corrupt file cannot make it
/// allocate more than the file's size.
pub(super) struct Dec {
    file: File,
    buf: Vec<u8>,
    pos: usize,
    /// Payload bytes (before the checksum) not yet read from the file.
    unread: u64,
}

impl Dec {
    /// `len` is the file's, checksum included: [`verify`] has made sure it holds one.
    fn new(file: File, len: u64) -> Self {
        Self {
            file,
            buf: Vec::new(),
            pos: 0,
            unread: len - 8,
        }
    }

    /// Payload bytes left, read or not.
    fn left(&self) -> u64 {
        (self.buf.len() - self.pos) as u64 + self.unread
    }

    fn refill(&mut self) -> io::Result<()> {
        self.buf.drain(..self.pos);
        self.pos = 0;
        let n = (self.unread as usize).min(CHUNK);
        let start = self.buf.len();
        self.buf.resize(start + n, 0);
        self.file.read_exact(&mut self.buf[start..])?;
        self.unread -= n as u64;
        Ok(())
    }

    fn take<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        if self.buf.len() - self.pos < N {
            self.refill()?;
            if self.buf.len() - self.pos < N {
                return Err(invalid("truncated"));
            }
        }
        let out = self.buf[self.pos..self.pos + N]
            .try_into()
            .expect("N bytes");
        self.pos += N;
        Ok(out)
    }

    fn fill(&mut self, out: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            if self.pos == self.buf.len() {
                if self.unread == 0 {
                    return Err(invalid("truncated"));
                }
                self.refill()?;
            }
            let n = (out.len() - done).min(self.buf.len() - self.pos);
            out[done..done + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            done += n;
        }
        Ok(())
    }

    pub(super) fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take::<1>()?[0])
    }

    pub(super) fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    pub(super) fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    pub(super) fn i64(&mut self) -> io::Result<i64> {
        Ok(i64::from_le_bytes(self.take()?))
    }

    /// A length of items at least `item_bytes` each, checked against the bytes left.
    pub(super) fn len(&mut self, item_bytes: u64) -> io::Result<usize> {
        let n = self.u64()?;
        if n.saturating_mul(item_bytes.max(1)) > self.left() {
            return Err(invalid("truncated or corrupt (a length beyond the file)"));
        }
        Ok(n as usize)
    }

    pub(super) fn str(&mut self) -> io::Result<String> {
        let n = self.len(1)?;
        let mut b = vec![0u8; n];
        self.fill(&mut b)?;
        String::from_utf8(b).map_err(|_| invalid("corrupt (an account id is not UTF-8)"))
    }

    /// Checks that everything was read.
    fn finish(&mut self) -> io::Result<()> {
        if self.left() != 0 {
            return Err(invalid("corrupt (bytes after the end)"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Observation;
    use crate::detect::keys::Source;

    /// A stream with what the state holds: campaigns across accounts (links to other accounts'
    /// prompts, varying texts), merges of clusters, verbatim repeats, lone prompts.
    fn stream(from: u64, to: u64) -> Vec<(u64, String, u64, Vec<u64>)> {
        (from..to)
            .map(|id| {
                let account = format!("acct-{}", id % 13);
                let links = match id % 5 {
                    0 => vec![],
                    1 => vec![id - 1],
                    2 => vec![id / 2, id - 2],
                    3 => vec![id - 3, id - 1],
                    _ => vec![id / 3],
                };
                // Mostly distinct texts (slots vary), some verbatim repeats.
                let hash = if id % 7 == 0 { 7 } else { id * 31 };
                (id, account, hash, links)
            })
            .collect()
    }

    fn source(hash: u64) -> Source {
        Source {
            account: hash % 3,
            text: hash % 5,
        }
    }

    fn observe_all(d: &mut Detector, k: &mut KeyIndex, s: &[(u64, String, u64, Vec<u64>)]) {
        for (id, account, hash, links) in s {
            d.observe(Observation {
                id: *id,
                account_id: account,
                timestamp_ms: *id as i64 * 1_000,
                text_hash: *hash,
                links,
                // Every tenth prompt a known app's: the flag is part of the state restored.
                allowed: id % 10 == 0,
            });
            k.link(*id, source(*hash), &[hash % 7, 100 + id % 4]);
        }
    }

    fn header(d: &Detector, last_id: u64) -> SnapshotHeader {
        SnapshotHeader {
            last_id,
            last_text_hash: d.text_hash(last_id).unwrap(),
            prompts: d.prompts(),
            allow: 7,
        }
    }

    #[test]
    fn a_loaded_snapshot_goes_on_exactly_like_the_state_it_was_written_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("detector.snapshot");
        let (mut d, mut k) = (
            Detector::new(DetectorConfig::default()),
            KeyIndex::default(),
        );
        observe_all(&mut d, &mut k, &stream(1, 400));
        let h = header(&d, 399);
        let bytes = save(&path, &h, &d, &k).unwrap();
        assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
        assert!(!path.with_extension("tmp").exists());

        let (h2, mut d2, mut k2) = load(&path, DetectorConfig::default(), |_| Ok(()))
            .unwrap()
            .unwrap();
        assert_eq!(h2, h);
        assert_eq!(d2.accounts(), d.accounts());
        assert_eq!(d2.campaigns(0.0), d.campaigns(0.0));
        assert!(!d.campaigns(0.5).is_empty(), "the stream has campaigns");
        assert_eq!(k2.len(), k.len());
        assert!((0..400).any(|id| d.closed(id)));
        assert!((0..400).all(|id| d2.closed(id) == d.closed(id)));
        // The same further prompts give the same verdicts and template-key links.
        let mut key_links = 0;
        for (id, account, hash, links) in stream(400, 600) {
            let o = Observation {
                id,
                account_id: &account,
                timestamp_ms: id as i64 * 1_000,
                text_hash: hash,
                links: &links,
                allowed: id % 10 == 0,
            };
            assert_eq!(d2.observe(o), d.observe(o));
            let keys = [hash % 7, 100 + id % 4, 200 + id];
            let links = k.link(id, source(hash), &keys);
            key_links += links.len();
            assert_eq!(k2.link(id, source(hash), &keys), links);
        }
        assert!(key_links > 100, "template keys link: {key_links}");
        assert_eq!(d2.accounts(), d.accounts());
    }

    #[test]
    fn a_damaged_snapshot_is_refused_with_a_reason_and_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("detector.snapshot");
        let load_it =
            |p: &Path| load(p, DetectorConfig::default(), |_| Ok(())).map(|s| s.is_some());
        assert_eq!(load_it(&path), Ok(false), "no file: nothing to use");

        let (mut d, mut k) = (
            Detector::new(DetectorConfig::default()),
            KeyIndex::default(),
        );
        observe_all(&mut d, &mut k, &stream(1, 40));
        save(&path, &header(&d, 39), &d, &k).unwrap();
        assert_eq!(load_it(&path), Ok(true));
        let good = std::fs::read(&path).unwrap();
        let bad = dir.path().join("bad");
        // Every single flipped byte and every truncation is caught, without a panic or a huge
        // allocation; damage past the magic and version is reported as what it is, whichever
        // field it hit.
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x41;
            std::fs::write(&bad, &b).unwrap();
            let err = load_it(&bad).unwrap_err();
            if i >= 12 {
                assert_eq!(err, "corrupt (checksum mismatch)", "byte {i} flipped");
            }
        }
        for n in [
            0,
            7,
            8,
            20,
            44,
            good.len() / 2,
            good.len() - 8,
            good.len() - 1,
        ] {
            std::fs::write(&bad, &good[..n]).unwrap();
            assert!(load_it(&bad).is_err(), "{n} bytes");
        }
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 16]);
        std::fs::write(&bad, &longer).unwrap();
        assert!(load_it(&bad).is_err(), "trailing bytes");

        // The caller's verdict on the header is the reason given.
        let refused = load(&path, DetectorConfig::default(), |h| {
            Err(format!("ends at {}", h.last_id))
        });
        assert_eq!(refused.map(|s| s.is_some()), Err("ends at 39".to_string()));
        let mut versioned = good.clone();
        versioned[8] = 9;
        std::fs::write(&bad, &versioned).unwrap();
        let err = load_it(&bad).unwrap_err();
        assert!(err.contains("format version 9"), "{err}");
    }
}
