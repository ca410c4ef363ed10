//! Exact nearest-neighbour search by scanning every stored vector: the reference that recall
//! tests measure HNSW against, and a fine index for small sets.

use std::cmp::Ordering;

use super::distance::dot;
use super::{IndexError, Neighbour, VectorInsert, VectorSearch};

/// Exact index over L2-normalised vectors kept in one flat `Vec<f32>` (row-major).
#[derive(Debug, Clone)]
pub struct BruteForceIndex {
    dim: usize,
    ids: Vec<u64>,
    data: Vec<f32>,
}

impl BruteForceIndex {
    /// An empty index for vectors of dimension `dim`.
    pub fn new(dim: usize) -> Self {
        BruteForceIndex {
            dim,
            ids: Vec::new(),
            data: Vec::new(),
        }
    }

    /// The vector dimension this index accepts.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Similarity of `query` to every stored vector, in insertion order, with its id.
    fn scores<'a>(&'a self, query: &'a [f32]) -> impl Iterator<Item = Neighbour> + 'a {
        self.ids
            .iter()
            .zip(self.data.chunks_exact(self.dim.max(1)))
            .map(|(&id, v)| Neighbour {
                id,
                similarity: dot(query, v),
            })
    }
}

/// Most similar first; ties broken by the smaller id.
pub(crate) fn by_similarity(a: &Neighbour, b: &Neighbour) -> Ordering {
    b.similarity
        .total_cmp(&a.similarity)
        .then_with(|| a.id.cmp(&b.id))
}

/// Checks that `vector` has dimension `dim` and only finite components (hnsw_rs panics on a
/// NaN distance, and a NaN would make every similarity meaningless).
pub(crate) fn check_vector(dim: usize, id: u64, vector: &[f32]) -> Result<(), IndexError> {
    if vector.len() != dim {
        return Err(IndexError::Dimension {
            got: vector.len(),
            want: dim,
        });
    }
    if !vector.iter().all(|x| x.is_finite()) {
        return Err(IndexError::NonFinite { id });
    }
    Ok(())
}

impl VectorSearch for BruteForceIndex {
    fn search(&self, query: &[f32], k: usize) -> Vec<Neighbour> {
        if k == 0 || query.len() != self.dim {
            return Vec::new();
        }
        let mut all: Vec<Neighbour> = self.scores(query).collect();
        if all.len() > k {
            all.select_nth_unstable_by(k - 1, by_similarity);
            all.truncate(k);
        }
        all.sort_unstable_by(by_similarity);
        all
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

impl VectorInsert for BruteForceIndex {
    fn insert(&mut self, id: u64, vector: &[f32]) -> Result<(), IndexError> {
        check_vector(self.dim, id, vector)?;
        self.ids.push(id);
        self.data.extend_from_slice(vector);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::distance::testdata::unit_vectors;
    use super::*;

    #[test]
    fn finds_itself_first_and_sorts_by_similarity() {
        let vs = unit_vectors(10, 300, 32);
        let mut idx = BruteForceIndex::new(32);
        assert!(idx.is_empty());
        for (i, v) in vs.iter().enumerate() {
            idx.insert(i as u64 * 3, v).unwrap();
        }
        assert_eq!(idx.len(), 300);
        let found = idx.search(&vs[42], 10);
        assert_eq!(found.len(), 10);
        assert_eq!(found[0].id, 126);
        assert!((found[0].similarity - 1.0).abs() < 1e-5);
        assert!(found.windows(2).all(|w| w[0].similarity >= w[1].similarity));
        // Agrees with a full sort.
        let mut full: Vec<Neighbour> = idx.scores(&vs[42]).collect();
        full.sort_by(by_similarity);
        assert_eq!(found, full[..10].to_vec());
    }

    #[test]
    fn small_k_large_k_and_empty() {
        let vs = unit_vectors(11, 5, 8);
        let mut idx = BruteForceIndex::new(8);
        assert!(idx.search(&vs[0], 3).is_empty());
        for (i, v) in vs.iter().enumerate() {
            idx.insert(i as u64, v).unwrap();
        }
        assert_eq!(idx.search(&vs[0], 100).len(), 5);
        assert!(idx.search(&vs[0], 0).is_empty());
        assert!(idx.search(&[0.0; 3], 3).is_empty());
    }

    #[test]
    fn duplicates_tie_break_by_id() {
        let v = unit_vectors(12, 1, 16).remove(0);
        let mut idx = BruteForceIndex::new(16);
        for id in [9, 4, 7] {
            idx.insert(id, &v).unwrap();
        }
        let ids: Vec<u64> = idx.search(&v, 3).iter().map(|n| n.id).collect();
        assert_eq!(ids, vec![4, 7, 9]);
    }

    #[test]
    fn rejects_wrong_dimension_and_nan() {
        let mut idx = BruteForceIndex::new(4);
        assert!(matches!(
            idx.insert(1, &[1.0, 0.0]),
            Err(IndexError::Dimension { got: 2, want: 4 })
        ));
        assert!(matches!(
            idx.insert(2, &[f32::NAN, 0.0, 0.0, 0.0]),
            Err(IndexError::NonFinite { id: 2 })
        ));
        assert!(idx.is_empty());
    }
}
