"""`sisa serve` (issue 17): a real uvicorn process spoken to over HTTP (predict, forget until done
with a receipt, a SIGKILL after a 202, concurrent predictions around a forget), and the
fine-grained refusals through FastAPI's TestClient. Runs are small public-backbone runs
(`--trainable fc`), whose forgets take about a second."""
from __future__ import annotations

import copy
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason='the serve extra is not installed (pip install -e ".[test]")')
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import sisa  # noqa: E402
from sisa.audit import audit  # noqa: E402
from sisa.backbone import pretrain  # noqa: E402
from sisa.data import read_image  # noqa: E402
from sisa.errors import SisaError, UsageError  # noqa: E402
from sisa.run import writer, writer_lock  # noqa: E402
from sisa.serve import create_app, decode_image, predict_with, serve  # noqa: E402
from store.index import Index  # noqa: E402

from .conftest import _link_checkpoints, small_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# What `sisa serve` does, minus typer: one line on stderr and the error's exit code.
LAUNCH = """
import json, sys
from sisa.errors import SisaError
from sisa.serve import serve
try:
    serve(**json.loads(sys.argv[1]))
except SisaError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
"""


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory, digits_manifest) -> Path:
    """A trained public-backbone run (fc heads on a width-16 trunk pretrained on the test split)."""
    train_csv, test_csv = digits_manifest
    folder = tmp_path_factory.mktemp("serve")
    pretrain(str(test_csv), "data", folder / "backbone.pt", epochs=2, seed=3, batch_size=16, width=16)
    run_dir = folder / "run"
    sisa.train(run_dir, small_config(train_csv, trainable="fc", crop_pad=0, flip=False), test_manifest=test_csv,
               init_from=folder / "backbone.pt").close()
    return run_dir


@pytest.fixture
def run_dir(tmp_path, template) -> Path:
    path = tmp_path / "run"
    shutil.copytree(template, path, copy_function=_link_checkpoints)
    return path


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "token.txt"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def images(digits_manifest) -> list[Path]:
    return sorted((digits_manifest[1].parent / "img").glob("test-*.png"))[:6]


def state(run_dir: Path) -> dict:
    """What a refused request must not change: requests, sample statuses, checkpoints, generation."""
    index = Index(run_dir / "index.sqlite")
    try:
        return {"requests": [(r.public_id, r.status) for r in index.requests()], "samples": index.counts(),
                "checkpoints": {k: c.sha256 for k, c in index.checkpoints().items()},
                "generation": index.run().generation}
    finally:
        index.close()


def request_row(run_dir: Path, public_id: str):
    index = Index(run_dir / "index.sqlite")
    try:
        return next(r for r in index.requests() if r.public_id == public_id)
    finally:
        index.close()


def files(paths) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"], body
    for w in words:
        assert w in body["error"], body


# --- a real server -----------------------------------------------------------------------------

def _can_listen() -> bool:
    import socket

    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
        return True
    except OSError:
        return False


# The only reason to skip a real-server test: this machine lets no process listen on loopback.
needs_port = pytest.mark.skipif(not _can_listen(), reason="no port can be bound on 127.0.0.1 here")


class Server:
    """`sisa serve` in a subprocess on a free port (port 0: the kernel picks one, the server says which)."""

    def __init__(self, tmp_path: Path, run_dir: Path, **options):
        self.log = tmp_path / f"server-{time.monotonic_ns()}.log"
        args = {"run_dir": str(run_dir), "port": 0, "device": "cpu", **options}
        with open(self.log, "w") as log:  # a file, not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, json.dumps(args, default=str)], cwd=ROOT,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (found := re.search(r"sisa serve: http://127\.0\.0\.1:(\d+)", self.log.read_text())):
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {self.log.read_text()}"
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{found.group(1)}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        while True:  # the port is bound; uvicorn listens a moment later
            try:
                self.http.get("/health")
                break
            except httpx.TransportError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.1)

    def wait_done(self, public_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            r = self.http.get(f"/requests/{public_id}", headers=AUTH)
            assert r.status_code == 200, r.text
            if r.json()["status"] in ("done", "failed"):
                return r.json()
            assert time.monotonic() < deadline, (r.json(), self.log.read_text())
            time.sleep(0.02)

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def start(tmp_path):
    servers = []

    def start_server(run_dir, **options) -> Server:
        servers.append(Server(tmp_path, run_dir, **options))
        return servers[-1]

    yield start_server
    for s in servers:
        s.close()


@needs_port
def test_real_server_predicts_forgets_and_reports(run_dir, token_file, images, start):
    server = start(run_dir, token_file=token_file)
    http = server.http
    g0 = http.get("/health").json()["generation"]
    assert http.get("/health").json() == {"ok": True, "generation": g0}

    # predictions: what `sisa predict` answers for the same files, and the generation that gave them
    r = http.post("/predict", files=files(images[:3]))
    assert r.status_code == 200, r.text
    body = r.json()
    ens = sisa.Ensemble.load(run_dir)
    batch = torch.stack([read_image(p, 1, (8, 8)) for p in images[:3]])
    assert body["labels"] == ens.predict(batch).tolist() and body["generation"] == g0
    assert torch.allclose(torch.tensor(body["probabilities"]), ens.predict_proba(batch), atol=1e-5)
    assert body["classes"] == [ens.config.class_names[k] for k in body["labels"]]
    r = http.post("/predict", params={"aggregation": "mean"}, files=files(images[:1]))
    assert r.json()["aggregation"] == "mean" and len(r.json()["probabilities"][0]) == 10

    # a forget: 202 at once, then done with its receipt; the served generation moved on
    sent = time.perf_counter()
    r = http.post("/forget", json={"ids": ["train-0005"]}, headers=AUTH)
    assert r.status_code == 202, r.text
    assert set(r.json()) == {"request", "status"} and r.json()["status"] == "queued"
    public_id = r.json()["request"]
    assert public_id.startswith("r-") and len(public_id) > 16
    done = server.wait_done(public_id)
    seconds = time.perf_counter() - sent
    print(f"one-id forget, 202 -> done: {seconds:.2f} s")
    assert done["status"] == "done" and done["samples_deleted"] == 1, done
    row = request_row(run_dir, public_id)
    assert done["receipt"]["receipt_sha256"] == row.receipt_sha256 and done["receipt"]["samples_deleted"] == 1
    assert http.get("/health").json()["generation"] == g0 + 1
    assert http.post("/predict", files=files(images[:1])).json()["generation"] == g0 + 1

    st = http.get("/status", headers=AUTH).json()
    assert st["served_generation"] == st["generation"] == g0 + 1
    assert st["queue"] == {"queued": 0, "running": 0, "failed": 0, "additions_pending": 0, "additions_failed": 0} and st["samples"]["deleted"] == 1
    assert st["writer"]["command"] == "sisa serve" and st["writer"]["pid"] == server.proc.pid

    # curl -d sends the JSON form-encoded: it is accepted all the same
    r = http.post("/forget", content=b'{"owners": ["user03"]}', headers={**AUTH, "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 202 and server.wait_done(r.json()["request"])["samples_deleted"] == 6

    # SIGTERM: a clean stop that gives the writer lock back (uvicorn then re-raises the signal)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) in (0, -signal.SIGTERM), server.log.read_text()
    assert "Application shutdown complete" in server.log.read_text()
    assert writer(run_dir) is None
    assert audit(sisa.Run.open(run_dir)).ok


@needs_port
def test_sigkill_after_202_then_restart_finishes_the_request(run_dir, token_file, start):
    server = start(run_dir, token_file=token_file, batch_window=600)  # acknowledged, not trained
    g0 = server.http.get("/health").json()["generation"]
    r = server.http.post("/forget", json={"ids": ["train-0007", "train-0100"]}, headers=AUTH)
    assert r.status_code == 202
    public_id = r.json()["request"]
    assert server.http.get(f"/requests/{public_id}", headers=AUTH).json()["status"] == "queued"
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    row = request_row(run_dir, public_id)
    assert row.status == "pending" and row.n_samples == 2, "the 202 came after the journal was committed"

    again = start(run_dir, token_file=token_file, batch_window=600)  # the window is for new requests only
    done = again.wait_done(public_id, timeout=60)
    assert done["status"] == "done" and done["samples_deleted"] == 2, done
    assert again.http.get("/health").json()["generation"] == g0 + 1
    assert audit(sisa.Run.open(run_dir)).ok


@needs_port
def test_concurrent_predictions_during_a_forget_all_succeed_and_see_one_generation_change(run_dir, token_file,
                                                                                         images, start):
    server = start(run_dir, token_file=token_file, batch_window=1.0)
    g0 = server.http.get("/health").json()["generation"]
    stop, done_at = threading.Event(), []
    seen: list[list[tuple[float, int, int]]] = [[] for _ in range(4)]  # per client: (sent, status, generation)

    def client(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                r = http.post("/predict", files=files(images[k:k + 2]))
                seen[k].append((sent, r.status_code, r.json().get("generation", -1)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        while min(len(s) for s in seen) < 3:
            time.sleep(0.05)
        accepted = time.monotonic()
        r = server.http.post("/forget", json={"ids": ["train-0011"]}, headers=AUTH)
        assert r.status_code == 202
        assert server.wait_done(r.json()["request"])["status"] == "done"
        done_at.append(time.monotonic())
        while min(sum(sent > done_at[0] for sent, _, _ in s) for s in seen) < 3:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    for answers in seen:
        assert all(status == 200 for _, status, _ in answers), answers
        generations = [g for _, _, g in answers]
        assert generations == sorted(generations), "a client saw the generation go back"
        assert all(g == g0 + 1 for sent, _, g in answers if sent > done_at[0]), "answered from a forgotten model"
    assert {g for s in seen for _, _, g in s} == {g0, g0 + 1}
    assert any(accepted < sent < done_at[0] for s in seen for sent, _, _ in s), "no prediction during the forget"



def test_refuses_a_public_host_without_a_token_file_in_one_line(run_dir):
    proc = subprocess.run([sys.executable, "-c", LAUNCH, json.dumps({"run_dir": str(run_dir), "host": "0.0.0.0"})],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--token-file" in proc.stderr, proc.stderr
    assert writer(run_dir) is None


# --- refusals before anything starts -------------------------------------------------------------

def test_serve_refuses_bad_options_in_one_line(run_dir, tmp_path, token_file, monkeypatch):
    def refused(match: str, **kw):
        with pytest.raises(SisaError, match=match) as e:
            serve(run_dir, port=0, **kw)
        assert "\n" not in str(e.value)
        return e.value

    assert isinstance(refused("--token-file", host="0.0.0.0"), UsageError)
    assert isinstance(refused("--token-file", host="my-host.example"), UsageError)
    refused("token file not found", token_file=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    refused("is empty", token_file=tmp_path / "empty.txt")
    with pytest.raises(UsageError, match="no SISA run"):
        serve(tmp_path / "nothing", port=0)
    with pytest.raises(UsageError, match="batch-window"):
        serve(run_dir, port=0, batch_window=-1)
    with writer_lock(run_dir, "sisa forget"):  # another writer: the server does not start
        refused("another sisa command is writing", token_file=token_file)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as when the extra is not installed
    with pytest.raises(UsageError, match=re.escape('pip install "sisa[serve]"')):
        serve(run_dir, port=0)


def test_import_is_light():
    code = "import sys, sisa.serve; print(sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out


# --- the API in process --------------------------------------------------------------------------

@pytest.fixture
def api(run_dir):
    with TestClient(create_app(run_dir, TOKEN)) as client:
        yield client


def wait_state(client, public_id: str, states=("done", "failed"), timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (body := client.get(f"/requests/{public_id}", headers=AUTH).json())["status"] not in states:
        assert time.monotonic() < deadline, body
        time.sleep(0.02)
    return body


def test_missing_or_wrong_token_gets_401_and_changes_nothing(api, run_dir, images):
    before = state(run_dir)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}):
        r = api.post("/forget", json={"ids": ["train-0001"]}, headers=headers)
        assert_error(r, 401, "token")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(api.get("/requests/r-whatever", headers=headers), 401)  # no oracle for request ids
        assert_error(api.get("/status", headers=headers), 401)
    assert state(run_dir) == before
    assert api.post("/predict", files=files(images[:1])).status_code == 200  # open on loopback


def test_bad_input_gets_a_one_line_4xx_and_changes_nothing(api, run_dir, images, tmp_path):
    before = state(run_dir)
    forget = lambda **kw: api.post("/forget", headers={**AUTH, **kw.pop("headers", {})}, **kw)  # noqa: E731
    assert_error(forget(content=b'{"ids": ["train-0001"'), 400, "malformed JSON")
    assert_error(forget(content=b""), 400, "empty body")
    assert_error(forget(content=b"\xff\xfe garbage"), 400, "malformed JSON")
    assert_error(forget(json=["train-0001"]), 422, "JSON object")
    assert_error(forget(json={}), 422, '"ids" or "owners"')
    assert_error(forget(json={"ids": ["train-0001"], "owners": ["user01"]}), 422, '"ids" or "owners"')
    assert_error(forget(json={"ids": []}), 422, "ids")
    assert_error(forget(json={"ids": [1, 2]}), 422, "ids.0")
    assert_error(forget(json={"idz": ["train-0001"]}), 422, "idz: unknown field")
    assert_error(forget(json={"ids": ["train-0001", "nobody-1", "nobody-2"]}), 404, "2 ids not in the index",
                 "'nobody-1'", "ignore_missing")
    assert_error(forget(json={"owners": ["no-such-owner"]}), 404, "owners not in the index")
    assert_error(forget(content=b"x" * ((1 << 20) + 1)), 413, "too large")
    assert_error(forget(content=iter([b'{"ids": ["'] + [b"a" * 65536] * 20 + [b'"]}'])), 413, "too large")  # chunked
    assert_error(api.get("/requests/r-doesnotexist", headers=AUTH), 404, "unknown request id")

    not_image = tmp_path / "notes.png"
    not_image.write_text("hello, not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(images[0].read_bytes()[:60])
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 6000)).save(huge)
    predict = api.post
    assert_error(predict("/predict", files=files([images[0], not_image])), 400, "file 2", "not an image")
    assert_error(predict("/predict", files=files([truncated])), 400, "file 1")
    assert_error(predict("/predict", files=files([huge])), 400, "pixels")
    assert_error(predict("/predict", files=[("file", ("empty.png", b"", "image/png"))]), 400, "empty")
    assert_error(predict("/predict", files=[("picture", ("a.png", images[0].read_bytes(), "image/png"))]), 400, "no image")
    assert_error(predict("/predict", data={"file": "text"}, files=files([images[0]])), 400, "file upload")
    assert_error(predict("/predict", content=images[0].read_bytes(), headers={"content-type": "image/png"}), 400, "multipart")
    assert_error(predict("/predict", params={"aggregation": "median"}, files=files(images[:1])), 422, "aggregation")
    assert_error(api.get("/nowhere"), 404)
    assert_error(api.delete("/health"), 405)
    assert state(run_dir) == before


def test_images_of_other_modes_and_sizes_are_converted_as_sisa_predict_does(api, images, tmp_path):
    rgb = tmp_path / "big-rgb.jpg"
    Image.open(images[0]).convert("RGB").resize((37, 23)).save(rgb)
    pal = tmp_path / "palette.gif"
    Image.open(images[1]).resize((16, 16)).convert("P").save(pal)
    for path in (rgb, pal):
        assert torch.equal(decode_image(path.read_bytes(), 1, (8, 8)), read_image(path, 1, (8, 8)))
    r = api.post("/predict", files=files([rgb, pal, images[2]]))
    assert r.status_code == 200 and len(r.json()["labels"]) == 3, r.text


def test_one_pass_prediction_equals_ensemble_predict(run_dir, digits_manifest):
    from sisa.data import load_manifest

    ens = sisa.Ensemble.load(run_dir)
    batch = load_manifest(digits_manifest[1])[0].images
    for aggregation in ("vote", "mean"):
        view = copy.copy(ens)
        view.aggregation = aggregation
        labels, proba = predict_with(ens, batch, aggregation)
        assert torch.equal(labels, view.predict(batch)) and torch.equal(proba, view.predict_proba(batch))


def test_forget_by_owner_and_ignore_missing(api, run_dir):
    r = api.post("/forget", json={"ids": ["train-0002", "nobody"], "ignore_missing": True, "receipt_ids": True},
                 headers=AUTH)
    assert r.status_code == 202, r.text
    done = wait_state(api, r.json()["request"])
    assert done["status"] == "done" and done["ids_not_found"] == 1 and done["receipt"]["deleted_ids"] == ["train-0002"]
    r = api.post("/forget", json={"owners": ["user05"]}, headers=AUTH)
    assert r.status_code == 202
    done = wait_state(api, r.json()["request"])
    assert done["samples_deleted"] == 6 and "deleted_ids" not in done["receipt"]  # hashes only, unless asked
    assert api.get("/status", headers=AUTH).json()["samples"]["deleted"] == 7
    assert audit(sisa.Run.open(run_dir)).ok


def test_a_failed_batch_is_reported_then_finished_at_the_next_start(run_dir, monkeypatch):
    monkeypatch.setenv("SISA_FAULT", "retrained")  # the shards are retrained, then the batch raises
    monkeypatch.setenv("SISA_FAULT_ACTION", "raise")
    monkeypatch.setattr("sisa.faults._hits", {})
    with TestClient(create_app(run_dir, TOKEN)) as client:
        public_id = client.post("/forget", json={"ids": ["train-0003"]}, headers=AUTH).json()["request"]
        failed = wait_state(client, public_id)
        assert failed["status"] == "failed" and "injected fault" in failed["error"] and "\n" not in failed["error"]
        assert client.get("/status", headers=AUTH).json()["queue"]["failed"] == 1
    monkeypatch.delenv("SISA_FAULT")
    with TestClient(create_app(run_dir, TOKEN)) as client:
        assert wait_state(client, public_id)["status"] == "done"
    assert audit(sisa.Run.open(run_dir)).ok


def test_who_may_predict_and_forget(run_dir, images):
    with pytest.raises(UsageError, match="token"):
        create_app(run_dir, None, local_only=False)
    with TestClient(create_app(run_dir, None)) as local:  # loopback without a token: predictions only
        assert local.post("/predict", files=files(images[:1])).status_code == 200
        assert_error(local.post("/forget", json={"ids": ["train-0001"]}, headers=AUTH), 403, "--token-file")
    with TestClient(create_app(run_dir, TOKEN, local_only=False)) as public:
        assert_error(public.post("/predict", files=files(images[:1])), 401)
        assert public.post("/predict", files=files(images[:1]), headers=AUTH).status_code == 200
    with TestClient(create_app(run_dir, TOKEN, local_only=False, public_predict=True)) as public:
        assert public.post("/predict", files=files(images[:1])).status_code == 200
        assert_error(public.get("/status"), 401)


def test_openapi_documents_the_endpoints(api):
    spec = api.get("/openapi.json").json()
    assert {"/forget", "/requests/{request_id}", "/predict", "/status", "/health"} <= set(spec["paths"])
    body = spec["paths"]["/forget"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"ids", "owners", "ignore_missing", "receipt_ids"} <= set(body["properties"])
    assert "file" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert spec["paths"]["/forget"]["post"]["security"]


# --- scale-out -----------------------------------------------------------------------------------

@needs_port
def test_ray_serve_replicas_predict_and_follow_a_forget(run_dir, images):
    import socket

    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[test,ray]")')
    ray_serve = pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "ray[serve]")')

    from sisa.serve import deployment

    with socket.socket() as s:  # Ray Serve binds its own proxy: find it a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_serve.run(deployment(run_dir, replicas=1), name="sisa", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            g0 = http.get("/health").json()["generation"]
            r = http.post("/predict", files=files(images[:2]))
            assert r.status_code == 200 and r.json()["generation"] == g0, r.text
            assert http.post("/forget", json={"ids": ["train-0001"]}).status_code == 404  # replicas never write
            sisa.forget(run_dir, ids=["train-0001"])  # the writer is another process (here: this one)
            r = http.post("/predict", files=files(images[:2]))
            assert r.status_code == 200 and r.json()["generation"] == g0 + 1, r.text
    finally:
        ray_serve.shutdown()
        ray.shutdown()


# --- POST /add ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def new_manifest(tmp_path_factory) -> Path:
    """Five unseen digits with new ids (rows the run's fixtures never use)."""
    from sisa.data import load_digits

    from .conftest import N_TRAIN, write_manifest

    d = load_digits().train
    tail = type(d)(d.ids[N_TRAIN:N_TRAIN + 5], d.images[N_TRAIN:N_TRAIN + 5], d.labels[N_TRAIN:N_TRAIN + 5], [None] * 5)
    return write_manifest(tmp_path_factory.mktemp("new"), tail, 5, "new", owners=False)


def additions(run_dir: Path) -> list[tuple]:
    from store.index import Addition

    index = Index(run_dir / "index.sqlite")
    try:
        with index.transaction() as s:
            return [(a.public_id, a.status, a.n_samples) for a in s.query(Addition).order_by(Addition.id)]
    finally:
        index.close()


def test_add_over_http_trains_the_new_samples_in_exactly_and_says_done(api, run_dir, new_manifest, images):
    g0 = api.get("/health").json()["generation"]
    r = api.post("/add", json={"manifest": str(new_manifest)}, headers=AUTH)
    assert r.status_code == 202, r.text
    public_id = r.json()["request"]
    assert r.json()["status"] == "queued" and public_id.startswith("a-") and len(public_id) > 16
    done = wait_state(api, public_id)
    assert done["status"] == "done" and done["kind"] == "add" and done["samples_added"] == 5, done
    assert sum(done["placed"].values()) == 5 and "samples_deleted" not in done
    assert api.get("/health").json()["generation"] == g0 + 1  # one batch, one new generation
    assert api.post("/predict", files=files(images[:1])).json()["generation"] == g0 + 1
    st = api.get("/status", headers=AUTH).json()
    assert st["samples"]["active"] == 245 and st["queue"]["additions_pending"] == 0
    assert additions(run_dir) == [(public_id, "done", 5)]
    result = audit(sisa.Run.open(run_dir), retrain=[0, 1, 2])  # the heads bitwise, the new features against the trunk
    assert result.ok, result.failures


def test_bad_additions_get_a_one_line_4xx_and_change_nothing(api, run_dir, new_manifest, tmp_path):
    before = state(run_dir)
    add = lambda **kw: api.post("/add", headers={**AUTH, **kw.pop("headers", {})}, **kw)  # noqa: E731
    shutil.copytree(new_manifest.parent / "img", tmp_path / "img")
    taken = tmp_path / "taken.csv"
    taken.write_text(new_manifest.read_text().replace("new-0002,", "train-0002,"))
    missing_image = tmp_path / "missing.csv"
    missing_image.write_text("id,path,label\nx-1,img/nope.png,3\n")
    assert_error(add(json={"manifest": str(taken)}), 409, "ids already in the run", "train-0002")
    assert_error(add(json={"manifest": str(missing_image)}), 400, "image not found")
    assert_error(add(json={"manifest": str(tmp_path / "absent.csv")}), 400, "manifest not found")
    assert_error(add(json={"manifest": "new.csv"}), 400, "absolute path")
    assert_error(add(content=b'{"manifest": '), 400, "malformed JSON")
    assert_error(add(content=b""), 400, "empty body")
    assert_error(add(json={"manifest": str(new_manifest), "shard": 2}), 422, "unknown field")
    assert_error(add(json={}), 422, "manifest")
    assert_error(api.post("/add", json={"manifest": str(new_manifest)}), 401, "token")
    assert_error(api.get("/requests/a-unknown", headers=AUTH), 404, "unknown request id")
    assert state(run_dir) == before and additions(run_dir) == []


def test_an_addition_journaled_before_a_crash_is_trained_at_the_next_start(run_dir, new_manifest):
    run = sisa.Run.open(run_dir)
    _, placed, public_id = run.record_addition(new_manifest)  # what a server killed right after the 202 leaves
    run.close()
    assert additions(run_dir) == [(public_id, "pending", 5)]
    with TestClient(create_app(run_dir, TOKEN)) as client:
        done = wait_state(client, public_id)
        assert done["status"] == "done" and done["placed"] == {str(k): v for k, v in sorted(placed.items())}
    assert audit(sisa.Run.open(run_dir)).ok
