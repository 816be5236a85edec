"""Released checkpoints of the reference implementations, read as data (nothing in a file executes).

- ``torch_pickle``: a restricted reader of PyTorch ``.pth`` files (zip and legacy formats);
- ``torch_port``: maps a score_sde_pytorch state dict onto our Flax parameter trees;
- ``jax_port``: maps a score_sde (JAX) flax msgpack checkpoint onto them;
- ``released``: the training state either gives ``checkpointing.import_checkpoint`` (``--mode=import``).
"""
