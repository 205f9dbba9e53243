"""Request files as users (and attackers) write them: each bad one is one clear line and no change."""
from __future__ import annotations

import json
import tracemalloc

import pytest
from typer.testing import CliRunner

from cli import app
from sisa.errors import SisaError, UsageError
from sisa.requests import open_request_file

from .conftest import file_hashes

runner = CliRunner()


def read_all(path):
    with open_request_file(path) as (column, values):
        return column, list(values)


def test_normalisation(tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes(b"\xef\xbb\xbf Id ,note\r\n  a  ,x\r\n\r\nb,y\r\na,z\r\n")  # BOM, CRLF, spaces, blank line
    assert read_all(p) == ("id", ["a", "b", "a"])  # the index drops the duplicate
    p.write_text("owner\nalice\n")
    assert read_all(p) == ("owner", ["alice"])


@pytest.mark.parametrize("content,error,match", [
    (b"", SisaError, "empty"),
    (b"\n\n  \n", SisaError, "empty"),
    (b"name,label\nx,1\n", SisaError, "no `id` or `owner` column"),
    (b"id\n", SisaError, "names no ids"),
    (b"id,x\n,1\n", SisaError, "r.csv:2: empty id"),
    (b"\x00\x01\x02binary", SisaError, "binary"),
    (b"id\na\n\xc3\x28\n", SisaError, "not UTF-8"),
])
def test_bad_files(tmp_path, content, error, match):
    p = tmp_path / "r.csv"
    p.write_bytes(content)
    with pytest.raises(error, match=match):
        read_all(p)


def test_missing_path():
    with pytest.raises(UsageError, match="not found"):
        read_all("/nonexistent/ids.csv")


def test_a_million_ids_are_streamed(trained_run, tmp_path):
    """A million unknown ids: a clear error listing the first few, no change; with
    --ignore-missing the one real id is forgotten. The ids never sit in a Python list."""
    p = tmp_path / "million.csv"
    with open(p, "w") as f:
        f.write("id\n")
        f.writelines(f"ghost-{i:07d}\n" for i in range(1_000_000))
        f.write("train-0004\n")
    before = file_hashes(trained_run)
    tracemalloc.start()
    r = runner.invoke(app, ["forget", "--ids", str(p), "--run-dir", str(trained_run), "--device", "cpu"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert r.exit_code == 1
    assert r.stderr.strip().endswith("1000000 ids not in the index: 'ghost-0000000', 'ghost-0000001', 'ghost-0000002', "
                                     "'ghost-0000003', 'ghost-0000004' and 999995 more (pass --ignore-missing to forget the rest)")
    assert peak < 40 * 2**20, f"peak Python memory {peak / 2**20:.0f} MiB: the file was slurped"
    assert file_hashes(trained_run) == before
    ok = runner.invoke(app, ["forget", "--ids", str(p), "--ignore-missing", "--run-dir", str(trained_run),
                             "--device", "cpu", "--json"])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["samples_removed"] == 1


def test_an_error_late_in_the_file_rolls_back_the_request(trained_run, tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes(b"id\ntrain-0001\ntrain-0002\n" + b"train-0003\n" * 5000 + b"\xff\xfe\n")
    r = runner.invoke(app, ["forget", "--ids", str(p), "--run-dir", str(trained_run), "--device", "cpu"])
    assert r.exit_code == 1 and "not UTF-8" in r.stderr
    st = json.loads(runner.invoke(app, ["status", "--run-dir", str(trained_run), "--json"]).stdout)
    assert st["samples"]["deleted"] == 0 and st["requests"]["total"] == 0
