"""Weight sparsity: the weight layers and their reduction axes, masks (magnitude, Wanda,
N:M), SparseGPT, layer-wise allocation, sparse kernels and sparse storage.

The passes that use it live in ``graphopt.passes.sparsify`` (``sparsify``) and
``graphopt.passes.sparse_ops`` (``sparse-ops``, ``store-sparse``).
"""
