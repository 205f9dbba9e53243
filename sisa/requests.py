"""Reading deletion-request files: a CSV with an `id` column, or an `owner` column.

The file is streamed row by row (a request may list millions of ids); cells are stripped, blank
rows skipped, CRLF accepted and duplicates dropped, keeping first-seen order.
"""
from __future__ import annotations

import csv
from pathlib import Path

from .errors import SisaError, UsageError


def read_request_file(path: Path | str) -> tuple[list[str], list[str]]:
    """(ids, owners) named by the file; exactly one of them is non-empty."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"request file not found: {path}")
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            raise SisaError(f"{path} is a binary file, not a CSV of ids")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next((row for row in reader if any(c.strip() for c in row)), None)
            if header is None:
                raise SisaError(f"{path} is empty: expected a header line with an `id` or `owner` column")
            names = [c.strip().lower() for c in header]
            column = "id" if "id" in names else "owner" if "owner" in names else None
            if column is None:
                raise SisaError(f"{path} has no `id` or `owner` column (header: {','.join(header)[:80]})")
            at = names.index(column)
            values: dict[str, None] = {}
            for line, row in enumerate(reader, start=2):
                if not any(c.strip() for c in row):
                    continue
                if at >= len(row) or not row[at].strip():
                    raise SisaError(f"{path}:{line}: empty {column}")
                values[row[at].strip()] = None
    except UnicodeDecodeError:
        raise SisaError(f"{path} is not UTF-8 text") from None
    except csv.Error as e:
        raise SisaError(f"{path} is not a valid CSV: {e}") from None
    if not values:
        raise SisaError(f"{path} names no {column}s")
    return (list(values), []) if column == "id" else ([], list(values))
