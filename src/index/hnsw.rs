//! One HNSW graph (`hnsw_rs`) over L2-normalised vectors with [`DistDotClamped`], plus a
//! crash-safe dump and a reload that never panics on a damaged file.
//!
//! A dump is three files in `dir`: `{basename}.hnsw.graph` and `{basename}.hnsw.data` (hnsw_rs's
//! own format, written under a temporary name and then renamed) and `{basename}.hnsw.meta.json`
//! (written last, atomically), which records the parameters and each file's size and xxh3 hash.
//! hnsw_rs's loader `assert!`s, `unwrap()`s and even calls `process::exit` on malformed input, so
//! [`HnswIndex::load`] only hands it files whose size and hash match the metadata.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use hnsw_rs::api::AnnT;
use hnsw_rs::hnsw::Hnsw;
use hnsw_rs::hnswio::{HnswIo, ReloadOptions};
use serde::{Deserialize, Serialize};

use super::brute::{by_similarity, check_vector};
use super::{DistDotClamped, IndexError, Neighbour, VectorInsert, VectorSearch};

/// hnsw_rs's `NB_LAYER_MAX`: its dump refuses a graph created with any other layer count.
const MAX_LAYERS: usize = 16;
/// Version of the metadata file written next to a dump.
const META_FORMAT: u32 = 1;

/// Parameters of one HNSW graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Links per node and layer (layer 0 keeps twice as many). At most 255.
    pub m: usize,
    /// Candidate list size while inserting: higher builds a better graph, more slowly.
    pub ef_construction: usize,
    /// Candidate list size while searching (raised to `k` when `k` is larger).
    pub ef_search: usize,
    /// Expected number of points: a hint for pre-allocation, not a limit.
    pub max_elements: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 100,
            ef_search: 64,
            max_elements: 200_000,
        }
    }
}

/// An HNSW index of L2-normalised vectors; similarity is `1 − distance` (cosine).
pub struct HnswIndex {
    // `'static`: a reloaded graph borrows its `HnswIo`, which `load` leaks (see there).
    hnsw: Hnsw<'static, f32, DistDotClamped>,
    params: HnswParams,
    dim: usize,
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex")
            .field("params", &self.params)
            .field("dim", &self.dim)
            .field("len", &self.hnsw.get_nb_point())
            .finish()
    }
}

/// Size and hash of one dumped file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    xxh3: u64,
}

/// Contents of `{basename}.hnsw.meta.json`.
#[derive(Debug, Serialize, Deserialize)]
struct DumpMeta {
    format: u32,
    dim: usize,
    count: usize,
    params: HnswParams,
    graph: FileSum,
    data: FileSum,
}

impl HnswIndex {
    /// The vector held under `id`, looked up among all points (not searched for: a graph
    /// search can miss a point). Linear in the index's size.
    pub fn vector_of(&self, id: u64) -> Option<Vec<f32>> {
        let id = usize::try_from(id).ok()?;
        self.hnsw
            .get_point_indexation()
            .into_iter()
            .find(|p| p.get_origin_id() == id)
            .map(|p| p.get_v().to_vec())
    }

    /// An empty index for vectors of dimension `dim`. `params.m` is capped at 255.
    pub fn new(params: HnswParams, dim: usize) -> Self {
        let params = HnswParams {
            m: params.m.clamp(2, 255),
            ..params
        };
        let hnsw = Hnsw::new(
            params.m,
            params.max_elements.max(1),
            MAX_LAYERS,
            params.ef_construction.max(1),
            DistDotClamped,
        );
        HnswIndex { hnsw, params, dim }
    }

    /// The parameters this index was built (or reloaded) with.
    pub fn params(&self) -> HnswParams {
        self.params
    }

    /// The vector dimension this index accepts.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Changes the search-time candidate list size.
    pub fn set_ef_search(&mut self, ef_search: usize) {
        self.params.ef_search = ef_search.max(1);
    }

    /// Inserts many vectors at once, on all cores (rayon). Nothing is inserted unless every
    /// vector is valid. Worth it from about a thousand vectors; results of a parallel build may
    /// differ slightly from a serial one (thread races in hnsw_rs), not in quality.
    pub fn parallel_insert(&mut self, items: &[(u64, &[f32])]) -> Result<(), IndexError> {
        let mut batch: Vec<(&[f32], usize)> = Vec::with_capacity(items.len());
        for &(id, v) in items {
            check_vector(self.dim, id, v)?;
            batch.push((v, to_data_id(id)?));
        }
        self.hnsw.parallel_insert_slice(&batch);
        Ok(())
    }

    /// Every vector with its id, in no particular order (to rebuild or merge graphs).
    pub fn points(&self) -> Vec<(u64, Vec<f32>)> {
        let points = self.hnsw.get_point_indexation();
        points
            .into_iter()
            .map(|p| (p.get_origin_id() as u64, p.get_v().to_vec()))
            .collect()
    }

    /// Dumps the index to `dir` (created if missing) as `{basename}.hnsw.{graph,data,meta.json}`,
    /// replacing a previous dump of that name. Crash-safe: files are written under temporary
    /// names, synced and renamed, and the metadata (the commit point) is written last.
    pub fn dump(&self, dir: &Path, basename: &str) -> Result<(), IndexError> {
        if self.is_empty() {
            return Err(IndexError::Io(format!(
                "{basename}: cannot dump an empty index"
            )));
        }
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let tmp = format!("{basename}.tmp");
        // hnsw_rs panics when it cannot create its files; it may also pick another name.
        let written = catch_unwind(AssertUnwindSafe(|| self.hnsw.file_dump(dir, &tmp)))
            .map_err(|_| IndexError::Io(format!("{basename}: hnsw_rs panicked while dumping")))?
            .map_err(|e| IndexError::Io(format!("{basename}: dump: {e:#}")))?;
        let mut sums = Vec::with_capacity(2);
        for ext in ["graph", "data"] {
            let from = dir.join(format!("{written}.hnsw.{ext}"));
            let to = dir.join(format!("{basename}.hnsw.{ext}"));
            File::open(&from)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_err(&from, e))?;
            sums.push(file_sum(&from)?);
            fs::rename(&from, &to).map_err(|e| io_err(&to, e))?;
        }
        let meta = DumpMeta {
            format: META_FORMAT,
            dim: self.dim,
            count: self.len(),
            params: self.params,
            graph: sums[0],
            data: sums[1],
        };
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| IndexError::Io(format!("{basename}: metadata: {e}")))?;
        write_atomic(&meta_path(dir, basename), &json)
    }

    /// Reloads a dump written by [`HnswIndex::dump`]. Returns an error, never panics, when a
    /// file is missing, truncated or altered (checked against the sizes and hashes recorded in
    /// the metadata before hnsw_rs reads anything).
    ///
    /// The reloaded graph borrows the `HnswIo` that read it, for as long as the graph lives
    /// (hnsw_rs keeps an optional mmap of the data file there). To make the index an owned
    /// `'static` value the `HnswIo` is boxed and leaked. mmap is off, so the `HnswIo` holds no
    /// mapping and no open file: the leak is about a hundred bytes (a path, a name, options)
    /// per reload, and segments are reloaded once per process start.
    pub fn load(dir: &Path, basename: &str) -> Result<Self, IndexError> {
        let meta_file = meta_path(dir, basename);
        let raw = fs::read(&meta_file).map_err(|e| io_err(&meta_file, e))?;
        let meta: DumpMeta = serde_json::from_slice(&raw)
            .map_err(|e| IndexError::Io(format!("{}: {e}", meta_file.display())))?;
        if meta.format != META_FORMAT || meta.count == 0 {
            return Err(IndexError::Io(format!(
                "{}: unsupported",
                meta_file.display()
            )));
        }
        for (ext, want) in [("graph", meta.graph), ("data", meta.data)] {
            let path = dir.join(format!("{basename}.hnsw.{ext}"));
            let got = file_sum(&path)?;
            if got != want {
                return Err(IndexError::Io(format!(
                    "{}: size or checksum mismatch (damaged or replaced file)",
                    path.display()
                )));
            }
        }
        let hnsw: Hnsw<'static, f32, DistDotClamped> =
            catch_unwind(AssertUnwindSafe(|| load_leaked(dir, basename)))
                .map_err(|_| IndexError::Io(format!("{basename}: hnsw_rs panicked on reload")))?
                .map_err(|e| IndexError::Io(format!("{basename}: reload: {e:#}")))?;
        let got_dim = hnsw.get_point_indexation().get_data_dimension();
        if hnsw.get_nb_point() != meta.count || got_dim != meta.dim {
            return Err(IndexError::Io(format!(
                "{basename}: reloaded {} points of dimension {got_dim}, metadata says {} of {}",
                hnsw.get_nb_point(),
                meta.count,
                meta.dim
            )));
        }
        Ok(HnswIndex {
            hnsw,
            params: meta.params,
            dim: meta.dim,
        })
    }
}

impl VectorSearch for HnswIndex {
    fn search(&self, query: &[f32], k: usize) -> Vec<Neighbour> {
        // A NaN query would make hnsw_rs panic while ordering distances.
        if k == 0 || self.is_empty() || check_vector(self.dim, 0, query).is_err() {
            return Vec::new();
        }
        let ef = self.params.ef_search.max(k);
        let mut found: Vec<Neighbour> = self
            .hnsw
            .search(query, k, ef)
            .into_iter()
            .map(|n| Neighbour {
                id: n.d_id as u64,
                similarity: 1.0 - n.distance,
            })
            .collect();
        found.sort_unstable_by(by_similarity);
        found
    }

    fn len(&self) -> usize {
        self.hnsw.get_nb_point()
    }
}

impl VectorInsert for HnswIndex {
    fn insert(&mut self, id: u64, vector: &[f32]) -> Result<(), IndexError> {
        check_vector(self.dim, id, vector)?;
        self.hnsw.insert_slice((vector, to_data_id(id)?));
        Ok(())
    }
}

/// Reads a dump through an `HnswIo` that is leaked, so the graph borrowing it is `'static`.
fn load_leaked(dir: &Path, basename: &str) -> anyhow::Result<Hnsw<'static, f32, DistDotClamped>> {
    let options = ReloadOptions::new(false); // no mmap: the leaked HnswIo holds no mapping
    let io: &'static mut HnswIo =
        Box::leak(Box::new(HnswIo::new_with_options(dir, basename, options)));
    io.load_hnsw::<f32, DistDotClamped>()
}

/// hnsw_rs ids are `usize`.
fn to_data_id(id: u64) -> Result<usize, IndexError> {
    usize::try_from(id).map_err(|_| IndexError::Io(format!("id {id} does not fit in usize")))
}

fn meta_path(dir: &Path, basename: &str) -> PathBuf {
    dir.join(format!("{basename}.hnsw.meta.json"))
}

/// An `IndexError::Io` naming the file.
pub(super) fn io_err(path: &Path, e: io::Error) -> IndexError {
    IndexError::Io(format!("{}: {e}", path.display()))
}

/// Size and xxh3-64 of a file, read in 1 MiB blocks.
fn file_sum(path: &Path) -> Result<FileSum, IndexError> {
    let mut file = File::open(path).map_err(|e| io_err(path, e))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum {
        bytes,
        xxh3: hasher.digest(),
    })
}

/// Replaces `path` with `bytes` atomically: writes `path.tmp`, syncs it, renames it over `path`
/// and syncs the directory, so a crash leaves either the old or the new file.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IndexError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| io_err(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// Best-effort fsync of a directory (makes renames in it durable; not possible on every OS).
pub(super) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::BruteForceIndex;
    use super::super::distance::testdata::unit_vectors;
    use super::*;

    fn small() -> HnswParams {
        HnswParams {
            max_elements: 2_000,
            ..HnswParams::default()
        }
    }

    fn recall(hnsw: &HnswIndex, brute: &BruteForceIndex, queries: &[Vec<f32>]) -> f64 {
        let mut hits = 0;
        for q in queries {
            let want: Vec<u64> = brute.search(q, 10).iter().map(|n| n.id).collect();
            hits += hnsw
                .search(q, 10)
                .iter()
                .filter(|n| want.contains(&n.id))
                .count();
        }
        hits as f64 / (queries.len() * 10) as f64
    }

    #[test]
    fn serial_and_parallel_insert_reach_high_recall() {
        let vs = unit_vectors(20, 2_000, 48);
        let mut serial = HnswIndex::new(small(), 48);
        let mut parallel = HnswIndex::new(small(), 48);
        let mut brute = BruteForceIndex::new(48);
        for (i, v) in vs.iter().enumerate() {
            serial.insert(i as u64 + 1, v).unwrap();
            brute.insert(i as u64 + 1, v).unwrap();
        }
        let items: Vec<(u64, &[f32])> = (0..)
            .map(|i| i + 1)
            .zip(vs.iter().map(|v| &v[..]))
            .collect();
        parallel.parallel_insert(&items).unwrap();
        assert_eq!((serial.len(), parallel.len()), (2_000, 2_000));
        let queries = unit_vectors(21, 50, 48);
        assert!(recall(&serial, &brute, &queries) >= 0.9);
        assert!(recall(&parallel, &brute, &queries) >= 0.9);
        let top = serial.search(&vs[5], 3);
        assert_eq!(top[0].id, 6);
        assert!((top[0].similarity - 1.0).abs() < 1e-5);
    }

    #[test]
    fn rejects_bad_vectors_and_ignores_bad_queries() {
        let mut idx = HnswIndex::new(small(), 4);
        assert!(idx.search(&[1.0, 0.0, 0.0, 0.0], 5).is_empty());
        assert!(idx.insert(1, &[1.0, 0.0]).is_err());
        assert!(idx.insert(1, &[f32::INFINITY, 0.0, 0.0, 0.0]).is_err());
        let bad: Vec<(u64, &[f32])> = vec![(1, &[1.0, 0.0, 0.0, 0.0]), (2, &[f32::NAN; 4])];
        assert!(idx.parallel_insert(&bad).is_err());
        assert!(idx.is_empty());
        idx.insert(1, &[1.0, 0.0, 0.0, 0.0]).unwrap();
        assert!(idx.search(&[f32::NAN; 4], 5).is_empty());
        assert!(idx.search(&[1.0, 0.0], 5).is_empty());
        assert_eq!(idx.search(&[1.0, 0.0, 0.0, 0.0], 5).len(), 1);
    }

    #[test]
    fn dump_reload_gives_identical_results_and_accepts_inserts() {
        let dir = tempfile::tempdir().unwrap();
        let vs = unit_vectors(22, 1_500, 32);
        let mut idx = HnswIndex::new(small(), 32);
        assert!(idx.dump(dir.path(), "empty").is_err());
        for (i, v) in vs.iter().enumerate() {
            idx.insert(i as u64, v).unwrap();
        }
        idx.dump(dir.path(), "seg").unwrap();
        let mut back = HnswIndex::load(dir.path(), "seg").unwrap();
        assert_eq!(
            (back.len(), back.dim(), back.params()),
            (1_500, 32, idx.params())
        );
        for q in unit_vectors(23, 30, 32) {
            assert_eq!(idx.search(&q, 10), back.search(&q, 10));
        }
        let extra = unit_vectors(24, 1, 32).remove(0);
        back.insert(99_999, &extra).unwrap();
        assert_eq!(back.search(&extra, 1)[0].id, 99_999);
        // Dumping again under the same name replaces the previous dump.
        back.dump(dir.path(), "seg").unwrap();
        assert_eq!(HnswIndex::load(dir.path(), "seg").unwrap().len(), 1_501);
    }

    #[test]
    fn damaged_dumps_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut idx = HnswIndex::new(small(), 16);
        for (i, v) in unit_vectors(25, 200, 16).iter().enumerate() {
            idx.insert(i as u64, v).unwrap();
        }
        for name in ["a", "b", "c", "d"] {
            idx.dump(dir.path(), name).unwrap();
        }
        let p = |n: &str, ext: &str| dir.path().join(format!("{n}.hnsw.{ext}"));
        let graph = fs::read(p("a", "graph")).unwrap();
        fs::write(p("a", "graph"), &graph[..graph.len() / 2]).unwrap();
        let mut data = fs::read(p("b", "data")).unwrap();
        data[100] ^= 0xff;
        fs::write(p("b", "data"), data).unwrap();
        fs::remove_file(p("c", "graph")).unwrap();
        fs::write(p("d", "meta.json"), b"{ not json").unwrap();
        for name in ["a", "b", "c", "d", "never-dumped"] {
            assert!(HnswIndex::load(dir.path(), name).is_err(), "{name}");
        }
    }
}
