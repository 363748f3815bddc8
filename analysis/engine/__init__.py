"""The engine under the statistics: how the work is done fast, not what is computed.

- `kernels`: numba kernels (row sums by group, within-group shuffles, the IVF re-ranking), cached on disk;
- `jit`: numba's disk cache for umap-learn's kernels, and the warm-up that compiles or loads them all;
- `blas`: BLAS and LAPACK thread limits for small products and d x d decompositions;
- `groups`: group sums, row norms and float64 blocks over float32 rows;
- `neighbours`: exact and approximate nearest neighbours, and a view's `Workspace`.

The maths in `analysis` call these; nothing here knows about position, tokens or removal.
"""
