"""Checkpoint files: written atomically, verified by sha256 before they are unpickled.

A save streams the serialised bytes into a temp file in the destination folder, hashing them on
the way, fsyncs it, renames it to its final (content-addressed) name and fsyncs the folder: a
crash leaves either the old file, or the new one, complete, plus at worst a stray `*.tmp` that
`clean_temp` removes.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from sisa.errors import IntegrityError
from sisa.faults import fault_point


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point("temp-written")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _HashingWriter:
    """A file that hashes what passes through it: torch.save streams into the temp file and
    the sha256 comes out of the same pass (no in-memory copy of a ResNet-18's 89 MB)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(state: dict, folder: Path, stem: str) -> tuple[Path, str]:
    """Atomically write `state` (tensors and plain Python values only) to `<stem>-<sha>.pt`.

    The name carries the content hash, so a replacement never overwrites the file it replaces:
    the old one stays valid until the index points elsewhere. The bytes are exactly those
    torch.save writes to memory; serialising, hashing and writing are one pass.
    """
    import torch

    folder = Path(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        fault_point("temp-written")
        sha = writer.sha.hexdigest()
        path = folder / f"{stem}-{sha[:16]}.pt"
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return path, sha


def load_checkpoint(path: Path, sha256: str, map_location: "str | torch.device" = "cpu") -> dict:
    """Read a checkpoint, refusing it unless its bytes hash to the sha256 the index recorded."""
    import torch

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"checkpoint missing: {path}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise IntegrityError(f"checkpoint {path} is corrupt: sha256 {actual[:12]}, index says {sha256[:12]} "
                             "(`sisa audit --repair` rebuilds it)")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def read_staged(path: Path) -> tuple[dict | None, str]:
    """(the "meta" dict a self-describing checkpoint carries, its sha256), or (None, sha) when
    the file's bytes do not hash to the content address in its name or do not load."""
    data = Path(path).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if not Path(path).stem.endswith(f"-{sha[:16]}"):
        return None, sha
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001: any unreadable file is simply not reusable
        return None, sha
    meta = state.get("meta") if isinstance(state, dict) else None
    return (meta if isinstance(meta, dict) else None), sha


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def clean_temp(folder: Path) -> int:
    """Remove temp files left by an interrupted save; returns how many."""
    stray = list(Path(folder).glob(".*.tmp"))
    for p in stray:
        p.unlink(missing_ok=True)
    return len(stray)
