//! Exact similarities within a batch of vectors, by matrix product: what a batch's prompts are
//! compared with besides the index, which does not hold them yet.
//!
//! Comparing each of a batch's `n` rows with every earlier row one dot product at a time streams
//! every earlier vector through the cache once per row: at `n` = 4,096 prompts and their ~7,000
//! parts that is ~30 million dot products, seconds of CPU per batch. The same products as blocks
//! of a matrix product (`gemm`, register-tiled, each vector loaded once per block of rows) cost a
//! small fraction of that.

use std::ops::Range;

use rayon::prelude::*;

use crate::matmul::matmul;

/// Rows of a block: `gemm` packs the columns (every row before the block's end) once per block,
/// so more rows amortise that; fewer make more blocks to spread over the cores. On 4,096 vectors
/// of 384 dimensions (`cargo bench --bench index -- batch_pairs`, 2 threads), blocks of 64 rows
/// took 87 ms, 128 took 63 ms and 256 took 65 ms.
pub const BLOCK_ROWS: usize = 128;

/// Row-major vectors of one dimension, copied into one buffer for the matrix product.
#[derive(Debug, Clone)]
pub struct Rows {
    dim: usize,
    len: usize,
    data: Vec<f32>,
}

impl Rows {
    /// Packs `vectors`, each of dimension `dim`. A vector of another dimension is packed as zeros,
    /// so its similarity to everything is 0 (callers only keep similarities above a positive
    /// threshold; the index refuses such vectors anyway).
    pub fn new<'a>(dim: usize, vectors: impl IntoIterator<Item = &'a [f32]>) -> Self {
        let mut data = Vec::new();
        let mut len = 0;
        for v in vectors {
            if v.len() == dim {
                data.extend_from_slice(v);
            } else {
                data.resize(data.len() + dim, 0.0);
            }
            len += 1;
        }
        Rows { dim, len, data }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// For each of `blocks` (consecutive, increasing row ranges), computes the dot product of
    /// every row of the block with every row before the block's end, and hands them to
    /// `f(b, block sims)` (`b` indexes `blocks`); returns what the calls return, in block order.
    /// Blocks run on the rayon pool when `parallel`, else on this thread.
    pub fn earlier_similarities<T, F>(
        &self,
        blocks: &[Range<usize>],
        parallel: bool,
        f: F,
    ) -> Vec<T>
    where
        T: Send,
        F: Fn(usize, BlockSims<'_>) -> Vec<T> + Sync,
    {
        let one = |(b, block): (usize, &Range<usize>)| {
            let rows = block.start.min(self.len)..block.end.min(self.len);
            let sims = self.block_products(rows.clone());
            f(b, BlockSims { rows, sims: &sims })
        };
        if parallel {
            blocks.par_iter().enumerate().flat_map_iter(one).collect()
        } else {
            blocks.iter().enumerate().flat_map(one).collect()
        }
    }

    /// `rows[block] · rows[..block.end]ᵀ`, row-major.
    fn block_products(&self, block: Range<usize>) -> Vec<f32> {
        let (m, n, k) = (block.len(), block.end, self.dim);
        let mut sims = vec![0f32; m * n];
        if k > 0 {
            let lhs = &self.data[block.start * k..block.end * k];
            matmul(&mut sims, lhs, &self.data[..n * k], m, k, n, 1);
        }
        sims
    }
}

/// The similarities of one block of rows with every row before the block's end.
#[derive(Debug, Clone)]
pub struct BlockSims<'a> {
    /// The block's rows.
    pub rows: Range<usize>,
    /// `rows.len()` × `rows.end`, row-major.
    sims: &'a [f32],
}

impl<'a> BlockSims<'a> {
    /// Similarities of row `r` (in the block) with rows `0..rows.end`.
    pub fn row(&self, r: usize) -> &'a [f32] {
        let width = self.rows.end;
        &self.sims[(r - self.rows.start) * width..][..width]
    }
}

/// Consecutive ranges of `0..len` of `rows` rows (the last may be shorter).
pub fn even_blocks(len: usize, rows: usize) -> Vec<Range<usize>> {
    let rows = rows.max(1);
    (0..len)
        .step_by(rows)
        .map(|a| a..(a + rows).min(len))
        .collect()
}

/// Blocks of `0..group_starts.last()` that never split a group: whole groups (group g is rows
/// `group_starts[g]..group_starts[g + 1]`) while a block holds at most `rows` rows (a larger
/// group is a block of its own). Returns the row ranges and, for each, the range of groups it
/// holds.
pub fn group_blocks(group_starts: &[usize], rows: usize) -> Vec<(Range<usize>, Range<usize>)> {
    let groups = group_starts.len().saturating_sub(1);
    let mut out = Vec::new();
    let mut g = 0;
    while g < groups {
        let (first, row) = (g, group_starts[g]);
        while g < groups && (g == first || group_starts[g + 1] - row <= rows) {
            g += 1;
        }
        out.push((row..group_starts[g], first..g));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::index::dot;
    use crate::index::testdata::unit_vectors;

    #[test]
    fn block_products_match_dot_products_for_every_earlier_row() {
        // 150 rows: three blocks, the last one short; dimension 384 like the model's.
        let vectors = unit_vectors(7, 150, 384);
        let rows = Rows::new(384, vectors.iter().map(Vec::as_slice));
        let blocks = even_blocks(rows.len(), 64);
        assert_eq!(blocks, vec![0..64, 64..128, 128..150]);
        for parallel in [false, true] {
            let checked = rows.earlier_similarities(&blocks, parallel, |b, block| {
                assert_eq!(block.rows, blocks[b]);
                block
                    .rows
                    .clone()
                    .inspect(|&r| {
                        let row = block.row(r);
                        assert_eq!(row.len(), block.rows.end);
                        for (c, &got) in row.iter().enumerate() {
                            let want = dot(&vectors[r], &vectors[c]);
                            assert!(
                                (got - want).abs() < 1e-5,
                                "row {r} col {c}: {got} vs {want}"
                            );
                        }
                    })
                    .collect()
            });
            assert_eq!(checked, (0..150).collect::<Vec<_>>(), "rows in order");
        }
    }

    #[test]
    fn a_vector_of_another_dimension_is_similar_to_nothing() {
        let a = [1.0, 0.0, 0.0];
        let short = [1.0, 0.0];
        let rows = Rows::new(3, [&a[..], &short[..], &a[..]]);
        let sims = rows.earlier_similarities(&even_blocks(3, 64), false, |_, block| {
            block.rows.clone().map(|r| block.row(r).to_vec()).collect()
        });
        assert_eq!(
            sims,
            vec![
                vec![1.0, 0.0, 1.0],
                vec![0.0, 0.0, 0.0],
                vec![1.0, 0.0, 1.0]
            ]
        );
    }

    #[test]
    fn group_blocks_keep_groups_whole_and_cover_every_row() {
        // Groups of 30, 30, 10, 70 (larger than a block), 0, 5 rows.
        let starts = [0, 30, 60, 70, 140, 140, 145];
        let blocks = group_blocks(&starts, 64);
        assert_eq!(
            blocks,
            vec![
                (0..60, 0..2),
                (60..70, 2..3),
                (70..140, 3..4),
                (140..145, 4..6)
            ],
            "a block takes whole groups up to 64 rows; a larger group is a block of its own"
        );
        assert!(group_blocks(&[0], 64).is_empty());
        assert_eq!(group_blocks(&[0, 0, 0], 64), vec![(0..0, 0..2)]);
    }
}
