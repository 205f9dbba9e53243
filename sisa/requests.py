"""Reading deletion-request files: a CSV with an `id` column, or an `owner` column.

The file is streamed row by row (a request may list millions of ids) straight into the index's
journal; cells are stripped, blank rows skipped, CRLF accepted; the index drops duplicates. An
error anywhere in the file (say, invalid UTF-8 on line 900,000) aborts the request's transaction,
so a bad file changes nothing.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SisaError, UsageError


@contextmanager
def open_request_file(path: Path | str) -> Iterator[tuple[str, Iterator[str]]]:
    """Yields (column, values): column is "id" or "owner", values a lazy iterator of keys."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not a CSV of ids")
    if not path.is_file():
        raise UsageError(f"request file not found: {path}")
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            raise SisaError(f"{path} is a binary file, not a CSV of ids")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next((row for row in reader if any(c.strip() for c in row)), None)
        except (UnicodeDecodeError, csv.Error) as e:
            raise _bad(path, e) from None
        if header is None:
            raise SisaError(f"{path} is empty: expected a header line with an `id` or `owner` column")
        names = [c.strip().lower() for c in header]
        column = "id" if "id" in names else "owner" if "owner" in names else None
        if column is None:
            raise SisaError(f"{path} has no `id` or `owner` column (header: {','.join(header)[:80]})")
        yield column, _values(path, reader, names.index(column), column)


def _values(path: Path, reader, at: int, column: str) -> Iterator[str]:
    count = 0
    try:
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            if at >= len(row) or not row[at].strip():
                raise SisaError(f"{path}:{reader.line_num}: empty {column}")
            count += 1
            yield row[at].strip()
    except (UnicodeDecodeError, csv.Error) as e:
        raise _bad(path, e) from None
    if count == 0:
        raise SisaError(f"{path} names no {column}s")


def _bad(path: Path, e: Exception) -> SisaError:
    if isinstance(e, UnicodeDecodeError):
        return SisaError(f"{path} is not UTF-8 text")
    return SisaError(f"{path} is not a valid CSV: {e}")
