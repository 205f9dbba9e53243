"""Persistence for SISA runs: the SQLite index and the checkpoint files. Knows nothing of training."""
from .checkpoints import load_checkpoint, save_checkpoint
from .index import Index, lineage_hash

__all__ = ["Index", "lineage_hash", "load_checkpoint", "save_checkpoint"]
