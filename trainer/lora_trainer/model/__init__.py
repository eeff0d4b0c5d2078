"""Model room: the pinned base model (resolving, loading, quantizing), LoRA, and checkpoints.

Reads and writes object storage through `io.storage` only; knows nothing of data or evaluation.
"""
