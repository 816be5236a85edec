"""Infrastructure shared by training, sampling and evaluation.

- ``parallel``: the 1-D device mesh, batch sharding and host gathers (``jax.jit``, no pmap);
- ``resumable``: atomic file writes and per-unit resumable outputs;
- ``images``: sample grids and PNG writing.
"""
