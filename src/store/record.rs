//! The stored form of one prompt and its compact binary encoding (little-endian, versioned).

use super::StoreError;

/// Version 2 added `parts`; version 1 records (no parts) still decode.
const VERSION: u8 = 2;

/// One accepted prompt as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRecord {
    /// Unique, increasing id assigned at ingest.
    pub id: u64,
    /// Sending account.
    pub account_id: String,
    /// When the prompt was sent (ms since the epoch).
    pub timestamp_ms: i64,
    /// The prompt text.
    pub text: String,
    /// xxh3 of the whitespace-normalised, lower-cased text (verbatim repeats share it).
    pub text_hash: u64,
    /// The L2-normalised embedding.
    pub embedding: Vec<f32>,
    /// Cluster the prompt joined at ingest (its root may change later as clusters merge).
    pub cluster_id: u64,
    /// Earlier prompts it was linked to at ingest; replaying these links rebuilds the clusters
    /// exactly, without searching the index again.
    pub links: Vec<u64>,
    /// Embeddings of the prompt's parts (see `detect::keys::parts`), each as long as `embedding`;
    /// kept so the part index can be rebuilt on start.
    pub parts: Vec<Vec<f32>>,
}

/// What a [`PromptRecord`] holds, borrowed: ingest stores a batch's prompts while their vectors,
/// which it does not copy, go into the index on another thread.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// See [`PromptRecord`]'s fields.
    pub id: u64,
    pub account_id: &'a str,
    pub timestamp_ms: i64,
    pub text: &'a str,
    pub text_hash: u64,
    pub embedding: &'a [f32],
    pub cluster_id: u64,
    pub links: &'a [u64],
    pub parts: &'a [Vec<f32>],
}

impl RecordRef<'_> {
    /// Appends the record's encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(VERSION);
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&self.text_hash.to_le_bytes());
        out.extend_from_slice(&self.cluster_id.to_le_bytes());
        put_bytes(out, self.account_id.as_bytes());
        put_bytes(out, self.text.as_bytes());
        out.extend_from_slice(&(self.links.len() as u32).to_le_bytes());
        for l in self.links {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(&(self.embedding.len() as u32).to_le_bytes());
        for x in self.embedding {
            out.extend_from_slice(&x.to_le_bytes());
        }
        let parts: Vec<&Vec<f32>> = self
            .parts
            .iter()
            .filter(|p| p.len() == self.embedding.len())
            .collect();
        out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
        for p in parts {
            for x in p {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

impl PromptRecord {
    /// A record; computes the text hash.
    pub fn new(
        id: u64,
        account_id: String,
        timestamp_ms: i64,
        text: String,
        embedding: Vec<f32>,
        cluster_id: u64,
        links: Vec<u64>,
    ) -> Self {
        let text_hash = text_hash(&text);
        Self {
            id,
            account_id,
            timestamp_ms,
            text,
            text_hash,
            embedding,
            cluster_id,
            links,
            parts: Vec::new(),
        }
    }

    /// Appends the encoding of `self` to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.borrowed().encode_into(out);
    }

    /// The record as a [`RecordRef`].
    pub fn borrowed(&self) -> RecordRef<'_> {
        RecordRef {
            id: self.id,
            account_id: &self.account_id,
            timestamp_ms: self.timestamp_ms,
            text: &self.text,
            text_hash: self.text_hash,
            embedding: &self.embedding,
            cluster_id: self.cluster_id,
            links: &self.links,
            parts: &self.parts,
        }
    }

    /// Decodes a record stored under `id`.
    pub fn decode(id: u64, bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            id,
            reason: reason.to_string(),
        };
        let mut r = Reader { bytes, pos: 0 };
        let version = r.take(1).ok_or_else(|| corrupt("empty"))?[0];
        if version != VERSION && version != 1 {
            return Err(corrupt(&format!("unknown record version {version}")));
        }
        let short = || corrupt("truncated");
        let timestamp_ms = i64::from_le_bytes(r.array().ok_or_else(short)?);
        let text_hash = u64::from_le_bytes(r.array().ok_or_else(short)?);
        let cluster_id = u64::from_le_bytes(r.array().ok_or_else(short)?);
        let account_id = r.string().ok_or_else(|| corrupt("bad account id"))?;
        let text = r.string().ok_or_else(|| corrupt("bad text"))?;
        let n_links = u32::from_le_bytes(r.array().ok_or_else(short)?) as usize;
        let mut links = Vec::with_capacity(n_links.min(1024));
        for _ in 0..n_links {
            links.push(u64::from_le_bytes(r.array().ok_or_else(short)?));
        }
        let dim = u32::from_le_bytes(r.array().ok_or_else(short)?) as usize;
        let raw = r.take(dim * 4).ok_or_else(short)?;
        let floats = |raw: &[u8]| -> Vec<f32> {
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let embedding = floats(raw);
        let mut parts = Vec::new();
        if version >= 2 {
            let n = u32::from_le_bytes(r.array().ok_or_else(short)?) as usize;
            for _ in 0..n {
                parts.push(floats(r.take(dim * 4).ok_or_else(short)?));
            }
        }
        Ok(Self {
            id,
            account_id,
            timestamp_ms,
            text,
            text_hash,
            embedding,
            cluster_id,
            links,
            parts,
        })
    }
}

/// Hash of a prompt's text after trimming, collapsing whitespace and lower-casing, so verbatim
/// repeats (up to spacing and case) share it.
pub fn text_hash(text: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (i, word) in text.split_whitespace().enumerate() {
        if i > 0 {
            h.update(b" ");
        }
        h.update(word.to_lowercase().as_bytes());
    }
    h.digest()
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn string(&mut self) -> Option<String> {
        let n = u32::from_le_bytes(self.array()?) as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let r = PromptRecord::new(
            7,
            "acct-é".into(),
            -5,
            "héllo\nworld 🌍".into(),
            vec![0.25, -1.0],
            3,
            vec![1, 2],
        );
        let mut buf = vec![];
        r.encode_into(&mut buf);
        assert_eq!(PromptRecord::decode(7, &buf).unwrap(), r);
        let with_parts = PromptRecord {
            parts: vec![vec![0.5, 0.5], vec![-0.5, 1.0]],
            ..r.clone()
        };
        buf.clear();
        with_parts.encode_into(&mut buf);
        assert_eq!(PromptRecord::decode(7, &buf).unwrap(), with_parts);
        // A version-1 record (before parts) still decodes, with no parts.
        buf.clear();
        r.encode_into(&mut buf);
        buf[0] = 1;
        buf.truncate(buf.len() - 4);
        assert_eq!(PromptRecord::decode(7, &buf).unwrap(), r);
    }

    #[test]
    fn truncated_and_garbage_are_errors_not_panics() {
        let r = PromptRecord::new(1, "a".into(), 0, "t".into(), vec![1.0; 8], 1, vec![]);
        let mut buf = vec![];
        r.encode_into(&mut buf);
        for cut in 0..buf.len() {
            assert!(
                PromptRecord::decode(1, &buf[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        assert!(PromptRecord::decode(1, &[9, 9, 9]).is_err());
        // A huge declared length must not allocate or panic.
        let mut bad = vec![VERSION];
        bad.extend_from_slice(&[0; 24]);
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(PromptRecord::decode(1, &bad).is_err());
    }

    #[test]
    fn hash_ignores_spacing_and_case() {
        assert_eq!(text_hash("  Hello   World "), text_hash("hello world"));
        assert_ne!(text_hash("hello world"), text_hash("hello there"));
    }
}
