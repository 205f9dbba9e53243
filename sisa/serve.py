"""`sisa serve`: predictions and deletion requests over HTTP, from one long-lived process.

    POST /forget          {"ids": [...]} or {"owners": [...]}    -> 202 {"request": "r-...", "status": "queued"}
    POST /add             {"manifest": "/abs/path/new.csv"}       -> 202 {"request": "a-...", "status": "queued"}
    GET  /requests/{id}   queued | running | done (+ the receipt) | failed (+ why); an add: queued | done | failed
    POST /predict         multipart, field "file" (repeatable)    -> labels, classes, probabilities, generation
    GET  /status          the run's status, the generation served, the queue
    GET  /health          {"ok": true, "generation": N}

How it keeps the promises of issue 17:
- Nothing acknowledged is lost: /forget journals the request (Run.record_request: one SQL
  transaction, synchronous=FULL) in the handler, before the 202; /add takes in the new samples
  the same way (Run.record_addition). A server killed after that finishes the request when it
  starts again, as `sisa forget --resume` would.
- One writer: a background thread holds the run's writer lock for the server's life. It waits
  `batch_window` seconds after the first queued request, retrains once for every request
  journaled by then (Run.complete: the SISA paper's batching, a receipt per request), loads the
  new ensemble and swaps it in, waits for the predictions still running on the old one, and only
  then marks the requests done (Run.finish_requests). So once a request says "done", no
  prediction is computed by a model that saw its samples.
- Predictions never stop: each takes one reference to the live ensemble and answers from it with
  its generation; a swap replaces the reference, so no prediction mixes two generations.
- Who may do what: /forget, /add, /requests and /status need `Authorization: Bearer <token>` (compared
  in constant time); /predict too when the server listens beyond loopback, unless public_predict.
  The token is checked before any request body is read; bodies have a size limit.
- Every error is a 4xx JSON {"error": "one line"} and changes nothing.

FastAPI and uvicorn are the optional `serve` extra, imported only when a server is built, so
`import sisa.serve` stays light.
"""
# No `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime, and
# their names (Request, ...) are imported inside _build_app, where only real objects can be seen.
import functools
import hmac
import io
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConflictError, SisaError, UsageError

if TYPE_CHECKING:
    import torch

    from .aggregate import Ensemble

SERVE_HINT = 'sisa serve needs the serve extra: pip install "sisa[serve]"'
FORGET_BODY_LIMIT = 1 << 20  # bytes of a /forget body: ~50,000 ids
PREDICT_BODY_LIMIT = 32 << 20  # bytes of a /predict body, all files together
MAX_IMAGES = 1024  # files in one /predict
MAX_PIXELS = 40_000_000  # per image, checked from its header before it is decoded
IDLE_CHECK_S = 1.0  # how often an idle writer looks for a generation it does not serve
ROUNDS_BEFORE_HOLDING = 2  # see Service._batch
DRAIN_TIMEOUT_S = 300.0

log = logging.getLogger("uvicorn.error")  # uvicorn prints this logger; ours would be silent


class ApiError(Exception):
    """An answer other than success: an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, one_line(message)


def one_line(message: object) -> str:
    lines = [x.strip() for x in str(message).splitlines() if x.strip()]
    return " ".join(lines)[:500] or "error"


def require_extra() -> None:
    """The serve extra's packages, or one line saying how to install them."""
    import importlib.util

    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise UsageError(SERVE_HINT)
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        raise UsageError(SERVE_HINT)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


def read_token(path: Path | str) -> str:
    path = Path(path)
    how = f"put one long random token in it, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UsageError(f"token file not found: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"token file {path} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read token file {path}: {e.strerror or e}") from None
    if not token:
        raise UsageError(f"token file {path} is empty: {how}")
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise UsageError(f"token file {path} must hold one token of printable ASCII without spaces: {how}")
    return token


def decode_image(data: bytes, channels: int, size: tuple[int, int] | None) -> "torch.Tensor":
    """An uploaded image as uint8 (C, H, W), converted and resized exactly as `sisa predict`
    does (sisa.data.read_image); ValueError with a one-line reason when it is not one."""
    from PIL import Image

    from .data import read_image

    if not data:
        raise ValueError("it is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            pixels = im.width * im.height
    except Exception:  # PIL raises several types for bytes it does not know
        raise ValueError("it is not an image (PNG, JPEG, BMP, GIF, TIFF, WebP, ...)") from None
    if pixels > MAX_PIXELS:
        raise ValueError(f"it has {pixels:,} pixels, more than the {MAX_PIXELS:,} accepted")
    try:
        return read_image(io.BytesIO(data), channels, size)
    except Exception as e:  # truncated or corrupt after a valid header
        reason = str(e).split(": ", 1)[-1] if isinstance(e, SisaError) else str(e)
        raise ValueError(f"it cannot be decoded ({one_line(reason)})") from None


# --- the service: the run, the served ensemble, the writer thread ----------------------------------

class _Live:
    """The ensemble being served, and how many predictions are using it now."""

    def __init__(self, ensemble: "Ensemble"):
        self.ensemble, self.users = ensemble, 0


class Service:
    """What the HTTP API stands on, usable without HTTP (and tested so).

    `writer=True` (the server): holds the writer lock, journals requests and retrains. `writer=False`
    (a prediction replica, e.g. under Ray Serve): only predicts, and reloads whenever the index's
    generation moves on.
    """

    def __init__(self, run_dir: Path | str, batch_window: float = 0.0, device: str = "cpu", writer: bool = True):
        from .run import Run

        if batch_window < 0:
            raise UsageError(f"--batch-window must be 0 or more seconds, got {batch_window}")
        self.run_dir = Path(run_dir)
        Run.open(self.run_dir).close()  # no run there: a UsageError now, not at start-up
        self.batch_window, self.device_name, self.writer = float(batch_window), device, writer
        self.failed: dict[int, str] = {}  # request id -> why its batch failed (until it is done)
        self.failed_additions: dict[int, str] = {}  # the same for additions
        self.run = self.reader = self.device = None
        self._live: _Live | None = None
        self._live_changed = threading.Condition()
        self._db = threading.RLock()  # index writes from handlers and the writer thread, one at a time
        self._gate = threading.Lock()  # journaling vs the writer's "nothing stale? then done" step
        self._reload_lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._stack: ExitStack | None = None
        self._checked = 0.0

    # --- life --------------------------------------------------------------------------------
    def start(self) -> None:
        """Take the writer lock, open the run, load the ensemble, start the writer thread. Idempotent."""
        if self._stack is not None:
            return
        from store.index import Index

        from .aggregate import Ensemble
        from .run import INDEX_FILE, Run, pick_device, writer_lock

        stack = ExitStack()
        try:
            if self.writer:
                stack.enter_context(writer_lock(self.run_dir, "sisa serve"))
            self.device = pick_device(self.device_name)
            self.run = Run(self.run_dir, _locked_index_class()(self.run_dir / INDEX_FILE, self._db))
            stack.callback(self.run.close)
            self.reader = Index(self.run_dir / INDEX_FILE)
            stack.callback(self.reader.close)
            self.image_size = tuple(self.run.config.image_size) or tuple(self.run.dataset().image_size)  # older runs
            # Loaded before the writer resumes anything: nothing changes the index meanwhile.
            self._live = _Live(Ensemble.load(self.run_dir, "vote", self.device))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self._stop.clear()
        if self.writer:
            self._thread = threading.Thread(target=self._write_loop, name="sisa-serve-writer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the writer thread and release the lock. A batch still training is left to the
        next start (the journal has it); the lock then goes with the process."""
        if self._stack is None:
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("sisa serve: stopping in the middle of a batch; the next start finishes it")
                return
        self._stack.close()
        self._stack = None

    @property
    def ensemble(self) -> "Ensemble":
        return self._live.ensemble

    @contextmanager
    def using(self):
        """The live ensemble, held for one prediction: a swap waits for it before any "done"."""
        with self._live_changed:
            live = self._live
            live.users += 1
        try:
            yield live.ensemble
        finally:
            with self._live_changed:
                live.users -= 1
                self._live_changed.notify_all()

    def _serve(self, ensemble: "Ensemble") -> None:
        """Make `ensemble` live, then wait until no prediction uses the one it replaces."""
        with self._live_changed:
            old, self._live = self._live, _Live(ensemble)
            if not self._live_changed.wait_for(lambda: old.users == 0, DRAIN_TIMEOUT_S):
                log.warning("sisa serve: predictions on generation %d still running after %.0f s",
                            old.ensemble.generation, DRAIN_TIMEOUT_S)
        log.info("sisa serve: serving generation %d", ensemble.generation)

    # --- requests ------------------------------------------------------------------------------
    def journal(self, ids: list[str] | None, owners: list[str] | None, ignore_missing: bool = False,
                receipt_ids: bool = False) -> str:
        """Record a deletion request durably; its public id. Unknown ids: ApiError 404, nothing recorded."""
        with self._gate:
            try:
                req = self.run.record_request(ids=ids, owners=owners, ignore_missing=ignore_missing,
                                              receipt_ids=receipt_ids)
            except UsageError as e:
                raise ApiError(400, str(e)) from None
            except SisaError as e:  # the ids or owners not in the index (the transaction rolled back)
                raise ApiError(404, str(e).replace("(pass --ignore-missing", '(send "ignore_missing": true')) from None
        self._wake.set()
        return req.public_id

    def journal_addition(self, manifest: str) -> str:
        """Take in new samples durably, in one transaction; their public id. A manifest (or an image
        in it) that cannot be read: ApiError 400; ids already in the run: 409; nothing recorded."""
        path = Path(manifest)
        if not path.is_absolute():
            raise ApiError(400, f"the manifest must be an absolute path on the server, got {manifest!r}")
        if not path.is_file():
            raise ApiError(400, f"manifest not found: {manifest}")
        with self._gate:
            try:
                _, _, public_id = self.run.record_addition(path)
            except ConflictError as e:
                raise ApiError(409, str(e)) from None
            except SisaError as e:
                raise ApiError(400, str(e)) from None
        self._wake.set()
        return public_id

    def request_state(self, public_id: str) -> dict | None:
        from sqlalchemy import select

        from store.index import DONE, PENDING, Addition, Request

        from .receipts import verify_receipt

        if public_id.startswith("a-"):
            with self.reader.transaction() as s:
                add = s.scalars(select(Addition).where(Addition.public_id == public_id)).first()
            if add is None:
                return None
            state = {"request": add.public_id, "kind": "add", "created_at": add.created_at.isoformat() + "Z",
                     "samples_added": add.n_samples, "placed": json.loads(add.placed_json or "{}")}
            if add.status == DONE:
                state.update(status="done", finished_at=add.finished_at.isoformat() + "Z")
            elif add.id in self.failed_additions:
                state.update(status="failed", error=self.failed_additions[add.id])
            else:
                state["status"] = "queued"
            return state
        with self.reader.transaction() as s:
            req = s.scalars(select(Request).where(Request.public_id == public_id)).first()
        if req is None:
            return None
        state = {"request": req.public_id, "kind": "forget", "created_at": req.created_at.isoformat() + "Z",
                 "samples_deleted": req.n_samples, "already_deleted": req.n_already_deleted,
                 "ids_not_found": req.n_unknown}
        if req.status == DONE:
            path = self.run_dir / req.receipt_path
            problem = verify_receipt(path, req.receipt_sha256)
            state.update(status="done", finished_at=req.finished_at.isoformat() + "Z")
            if problem:
                state["error"] = problem.replace(str(self.run_dir), "<run>")
            else:
                state["receipt"] = json.loads(path.read_text())
        elif req.id in self.failed:
            state.update(status="failed", error=self.failed[req.id])
        else:
            state["status"] = "queued" if req.status == PENDING else "running"
        return state

    def queue(self) -> dict:
        from sqlalchemy import func, select

        from store.index import DONE, PENDING, RETRAINING, Addition, Request

        with self.reader.transaction() as s:
            counts = dict(s.execute(select(Request.status, func.count()).group_by(Request.status)).all())
            adds = s.scalar(select(func.count()).select_from(Addition).where(Addition.status != DONE))
        failed = len(self.failed)
        return {"queued": counts.get(PENDING, 0), "running": counts.get(RETRAINING, 0) - failed, "failed": failed,
                "additions_pending": adds - len(self.failed_additions), "additions_failed": len(self.failed_additions)}

    def status(self) -> dict:
        return {**self.run.status(), "served_generation": self.ensemble.generation, "queue": self.queue()}

    # --- predictions ---------------------------------------------------------------------------
    def predict(self, blobs: list[tuple[str, bytes]], aggregation: str = "vote") -> dict:
        import torch

        if not blobs:
            raise ApiError(400, 'no image: send multipart/form-data with one or more "file" fields')
        cfg = self.run.config
        images = []
        for i, (name, data) in enumerate(blobs):
            try:
                images.append(decode_image(data, cfg.channels, self.image_size))
            except ValueError as e:
                raise ApiError(400, f"file {i + 1} ({name!r}): {e}") from None
        batch = torch.stack(images)
        if not self.writer:
            self._reload_if_stale(every=0.0)  # a replica: another process swaps the models
        with self.using() as ens:
            labels, proba = predict_with(ens, batch, aggregation)
            generation, names = ens.generation, list(ens.config.class_names)
        labels = labels.tolist()
        return {"labels": labels, "classes": [names[k] if k < len(names) else str(k) for k in labels],
                "probabilities": [[round(p, 6) for p in row] for row in proba.tolist()],
                "class_names": names, "aggregation": aggregation, "generation": generation}

    # --- the writer thread ---------------------------------------------------------------------
    def _write_loop(self) -> None:
        startup = True
        while not self._stop.is_set():
            try:
                if startup:  # first, whatever a killed server (or an interrupted command) left
                    startup = False
                    if self.run.shard_jobs() or self._unfinished():
                        self._batch()
                    continue
                if not self._wake.wait(IDLE_CHECK_S):
                    self._reload_if_stale()
                    continue
                if self._stop.is_set() or (self.batch_window and self._stop.wait(self.batch_window)):
                    return
                self._wake.clear()  # requests journaled from here on wake the next batch
                if self._unfinished():
                    self._batch()
            except Exception:  # never die silently, and go on serving the next requests
                log.exception("sisa serve: the writer thread hit an error")
                self._stop.wait(IDLE_CHECK_S)

    def _unfinished(self) -> bool:
        from sqlalchemy import func, select

        from store.index import DONE, Addition, Request

        with self.reader.transaction() as s:
            return bool(s.scalar(select(func.count()).select_from(Request).where(Request.status != DONE))
                        or s.scalar(select(func.count()).select_from(Addition).where(Addition.status != DONE)))

    def _batch(self) -> None:
        """Retrain for every request journaled so far, serve the result, then mark them done.

        finish_requests() refuses while any shard is stale, and a request journaled while the
        shards retrain makes some stale again, so: retrain, then under the gate (no journaling)
        check that nothing is stale and finish; if something is, go round again. After
        ROUNDS_BEFORE_HOLDING rounds the gate is held for a whole round, so a steady stream of
        requests delays their 202s once rather than this batch forever."""
        from store.index import RETRAINING

        start = time.perf_counter()
        try:
            for rounds in range(1, ROUNDS_BEFORE_HOLDING + 2):
                hold = rounds > ROUNDS_BEFORE_HOLDING
                with self._gate if hold else nullcontext():
                    report = self.run.complete(self.device)
                    fresh = None
                    if self.run.index.run().generation != self.ensemble.generation:
                        fresh = self.ensemble.reload()  # outside the gate (unless held): it takes a while
                    with nullcontext() if hold else self._gate:
                        if not hold and self.run.shard_jobs():
                            continue
                        if fresh is not None:
                            self._serve(fresh)
                        finished = self.run.finish_requests()
                        added = self.run.finish_additions()
                for req in finished:
                    self.failed.pop(req.id, None)
                for add in added:
                    self.failed_additions.pop(add.id, None)
                log.info("sisa serve: finished %d requests and %d additions in %.2f s (retrained shards %s)",
                         len(finished), len(added), time.perf_counter() - start, report.shards_retrained)
                return
        except Exception as e:
            reason = one_line(e if isinstance(e, SisaError) else f"{type(e).__name__}: {e}")
            log.exception("sisa serve: batch failed")
            for req in self.run.index.requests():
                if req.status == RETRAINING:
                    self.failed[req.id] = reason
            for add_id in self._pending_additions():
                self.failed_additions[add_id] = reason

    def _pending_additions(self) -> list[int]:
        from sqlalchemy import select

        from store.index import DONE, Addition

        with self.reader.transaction() as s:
            return list(s.scalars(select(Addition.id).where(Addition.status != DONE)))

    def _reload_if_stale(self, every: float = IDLE_CHECK_S) -> None:
        """Serve the index's generation if it is not the one served (at most once per `every` s)."""
        if time.monotonic() - self._checked < every:
            return
        with self._reload_lock:  # replicas check from many threads; one reloads, the others wait for it
            self._checked = time.monotonic()
            if self.reader.run().generation != self.ensemble.generation:
                self._serve(self.ensemble.reload())


def predict_with(ens: "Ensemble", images: "torch.Tensor", aggregation: str) -> "tuple[torch.Tensor, torch.Tensor]":
    """(labels, probabilities) of Ensemble.predict and predict_proba under `aggregation`, from one
    pass through the constituents (the tie rule is Ensemble.predict's; a test holds them equal)."""
    import copy

    view = copy.copy(ens)  # shares the models; only the aggregation differs
    view.aggregation = aggregation
    logits = view.constituent_logits(images)
    proba = view.aggregate(logits)
    ranked = proba + 1e-6 * logits.softmax(-1).mean(0) if aggregation == "vote" else proba
    return ranked.argmax(-1), proba


@functools.cache
def _locked_index_class():
    from store.index import Index

    class LockedIndex(Index):
        """An Index whose transactions take a process-wide lock. SQLite refuses a write that
        upgrades a read snapshot another connection has changed since, so the request handlers
        and the writer thread take turns rather than fail."""

        def __init__(self, path: Path, lock):
            super().__init__(path)
            self._lock = lock

        @contextmanager
        def transaction(self):
            with self._lock, super().transaction() as session:
                yield session

    return LockedIndex


# --- the HTTP API ----------------------------------------------------------------------------------

def create_app(run_dir: Path | str, token: str | None = None, batch_window: float = 0.0, public_predict: bool = False,
               local_only: bool = True, device: str = "cpu", writer: bool = True):
    """The FastAPI app of `sisa serve` over `run_dir`. `token`: the bearer token /forget, /requests
    and /status require (None: those answer 403); /predict requires it too unless `local_only`
    (the server listens on loopback only) or `public_predict`. The service starts with the app's
    lifespan (or earlier, by `app.state.service.start()`). `writer=False`: a prediction replica
    (only /predict and /health; another process writes)."""
    require_extra()
    if token is not None and not token:
        raise UsageError("the token is empty")
    if not local_only and token is None and writer:
        raise UsageError("a server reachable from other machines needs a token (--token-file)")
    service = Service(run_dir, batch_window, device, writer)
    return _build_app(service, token, predict_open=local_only or public_predict)


def _build_app(service: Service, token: str | None, predict_open: bool):
    from contextlib import asynccontextmanager
    from typing import Any, Literal, Optional

    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    class ForgetBody(BaseModel):
        """A deletion request: sample ids, or owners (every sample of each)."""

        model_config = ConfigDict(extra="forbid")
        ids: Optional[list[str]] = Field(None, min_length=1, description="Sample ids to forget.")
        owners: Optional[list[str]] = Field(None, min_length=1, description="Owners whose every sample to forget.")
        ignore_missing: bool = Field(False, description="Forget the known ids and skip unknown ones (else 404, nothing recorded).")
        receipt_ids: bool = Field(False, description="Put the raw ids in the receipt (default: only keyed hashes).")

        @model_validator(mode="after")
        def _one_kind(self):
            if (self.ids is None) == (self.owners is None):
                raise ValueError('name either "ids" or "owners"')
            return self

    class AddBody(BaseModel):
        """New training samples: a manifest (id,path,label[,owner]) on the server's filesystem, as
        `sisa add --dataset` takes. It stays part of the run's data: keep it where it is."""

        model_config = ConfigDict(extra="forbid")
        manifest: str = Field(description="Absolute path of the CSV manifest on the server.")

    class Accepted(BaseModel):
        request: str = Field(description="The request's id: poll GET /requests/{id}.")
        status: Literal["queued"]

    class RequestState(BaseModel):
        request: str
        kind: Literal["forget", "add"]
        status: Literal["queued", "running", "done", "failed"]
        created_at: str
        finished_at: Optional[str] = None
        samples_deleted: Optional[int] = Field(None, description="A forget: samples it deleted (not counting ones deleted before).")
        already_deleted: Optional[int] = None
        ids_not_found: Optional[int] = None
        samples_added: Optional[int] = Field(None, description="An add: samples it took in.")
        placed: Optional[dict[str, int]] = Field(None, description="An add: samples placed in each shard.")
        receipt: Optional[dict[str, Any]] = Field(None, description="The deletion receipt, once done.")
        error: Optional[str] = Field(None, description="Why it failed (it is retried when the server restarts).")

    class Prediction(BaseModel):
        labels: list[int] = Field(description="Each image's class index.")
        classes: list[str] = Field(description="Each image's class name.")
        probabilities: list[list[float]] = Field(description="Per image, per class (in class_names order): vote share or mean softmax.")
        class_names: list[str]
        aggregation: Literal["vote", "mean"]
        generation: int = Field(description="The generation of the models that answered.")

    class Health(BaseModel):
        ok: bool
        generation: int

    class Error(BaseModel):
        error: str

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="sisa serve", version="1",
                  description="Predictions and exact deletion requests for a SISA run. Errors are {\"error\": \"...\"}.",
                  lifespan=lifespan)
    app.state.service = service
    bearer = HTTPBearer(auto_error=False, description="The token in the server's --token-file.")
    errors = {code: {"model": Error} for code in (400, 401, 403, 404, 413, 422)}

    def check_token(credentials: Optional[HTTPAuthorizationCredentials]) -> None:
        if token is None:
            raise ApiError(403, "this server was started without --token-file, so it accepts no requests here")
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, token.encode()):
            raise ApiError(401, "missing or wrong token: send the header Authorization: Bearer <token>")

    def needs_token(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        check_token(credentials)

    def predict_token(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if not predict_open:
            check_token(credentials)

    # --- errors: one line of JSON, never a traceback ----------------------------------------------
    async def read_body(request: Request, model, example: str):
        """The request's body read as JSON (whatever its content type: curl -d sends form-encoded)
        and validated against `model`; each problem a one-line 4xx."""
        raw = await request.body()
        if not raw.strip():
            raise ApiError(400, f"empty body: send JSON such as {example}")
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"malformed JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(422, f"the body must be a JSON object such as {example}")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise ApiError(422, describe_errors(e.errors())) from None

    def error(status: int, message: str):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": one_line(message)}, status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e.status, e.message)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return error(e.status_code, e.detail if isinstance(e.detail, str) else str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return error(422, describe_errors(e.errors()))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # a bug, not the client's fault; the log has the traceback
        return error(500, f"internal error ({type(e).__name__}); the server log has the details")

    app.add_middleware(_BodyLimit, limits={"/forget": FORGET_BODY_LIMIT, "/add": FORGET_BODY_LIMIT,
                                           "/predict": PREDICT_BODY_LIMIT},
                       default=FORGET_BODY_LIMIT)

    # --- routes -----------------------------------------------------------------------------------
    if service.writer:
        @app.post("/forget", status_code=202, response_model=Accepted, responses=errors,
                  dependencies=[Depends(needs_token)],
                  openapi_extra={"requestBody": {"required": True, "content": {
                      "application/json": {"schema": ForgetBody.model_json_schema()}}}})
        async def forget(request: Request):
            """Journal a deletion request (durably, before this answers) and queue it for the next batch.

            Unknown ids: 404 and nothing recorded, unless "ignore_missing". The body may be sent with
            any content type (curl -d sends form-encoded): it is read as JSON."""
            body = await read_body(request, ForgetBody, '{"ids": ["train-00042"]}')
            public_id = await run_in_threadpool(service.journal, body.ids, body.owners, body.ignore_missing,
                                                body.receipt_ids)
            return {"request": public_id, "status": "queued"}

        @app.post("/add", status_code=202, response_model=Accepted, responses=errors,
                  dependencies=[Depends(needs_token)],
                  openapi_extra={"requestBody": {"required": True, "content": {
                      "application/json": {"schema": AddBody.model_json_schema()}}}})
        async def add(request: Request):
            """Take in new training samples (durably, before this answers) and queue their training.

            Each goes to the shard with the fewest live samples, at the end of its last slice, as
            `sisa add` does; only those shards retrain. Ids already in the run: 409, nothing recorded."""
            body = await read_body(request, AddBody, '{"manifest": "/data/new.csv"}')
            public_id = await run_in_threadpool(service.journal_addition, body.manifest)
            return {"request": public_id, "status": "queued"}

        @app.get("/requests/{request_id}", response_model=RequestState, response_model_exclude_none=True,
                 responses=errors, dependencies=[Depends(needs_token)])
        async def request_state(request_id: str):
            """A request's state: queued, running, done (with its receipt) or failed (with why)."""
            state = await run_in_threadpool(service.request_state, request_id)
            if state is None:
                raise ApiError(404, "unknown request id")
            return state

        @app.get("/status", responses=errors, dependencies=[Depends(needs_token)])
        async def status() -> dict[str, Any]:
            """The run's status (as `sisa status --json`), the generation served and the queue."""
            return await run_in_threadpool(service.status)

    @app.post("/predict", response_model=Prediction, responses=errors, dependencies=[Depends(predict_token)],
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["file"], "properties": {"file": {
                      "type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "Image files (any mode and size: converted and resized as `sisa predict` does)."}}}}}}})
    async def predict(request: Request, aggregation: Literal["vote", "mean"] = Query(
            "vote", description="vote (majority, SISA's default) or mean (of softmax).")):
        """Classify images with the live ensemble; the answer names the generation that gave it."""
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise ApiError(400, 'send multipart/form-data with one or more "file" fields (curl -F file=@img.png)')
        try:
            form = await request.form(max_files=MAX_IMAGES, max_fields=MAX_IMAGES)
        except (HTTPException, _TooLarge):
            raise
        except Exception as e:
            raise ApiError(400, f"malformed multipart body: {e}") from None
        try:
            blobs = []
            for item in form.getlist("file"):
                if isinstance(item, str):
                    raise ApiError(400, '"file" must be a file upload (curl -F file=@img.png), not a text field')
                blobs.append((item.filename or "", await item.read()))
        finally:
            await form.close()
        return await run_in_threadpool(service.predict, blobs, aggregation)

    @app.get("/health", response_model=Health)
    async def health():
        """Liveness, and the generation being served. Open to anyone."""
        return {"ok": True, "generation": service.ensemble.generation}

    return app


def describe_errors(errors: list[dict]) -> str:
    """Pydantic's validation errors as one line: where, what."""
    parts = []
    for err in errors[:3]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


class _TooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: a body over its path's limit gets 413 before it is read (by Content-Length)
    or as soon as it passes the limit (chunked)."""

    def __init__(self, app, limits: dict[str, int], default: int):
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(send, limit)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, limit)

    @staticmethod
    async def _refuse(send, limit: int):
        body = json.dumps({"error": f"request body too large (the limit here is {limit:,} bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# --- scale-out: prediction replicas behind Ray Serve ----------------------------------------------

def deployment(run_dir: Path | str, token: str | None = None, replicas: int = 2, public_predict: bool = False,
               device: str = "cpu", ray_actor_options: dict | None = None):
    """A Ray Serve application of `replicas` prediction replicas: the same app (/predict, /health)
    through `serve.ingress`, each replica with its own copy of the ensemble. Use it when one
    process cannot keep up with predictions (many clients, big batches, several GPUs or hosts).

    Replicas never write: deletion requests still go to the one `sisa serve` process (the writer),
    run beside them on the same run directory (a filesystem every replica mounts). Each replica
    reads the index's generation before every prediction and reloads when it moved on, so a
    prediction that arrives after a request is done never comes from the models that held its
    samples. (A replica that reloads while the writer is mid-batch may load some shards' new
    models under the old generation number: a state whose requests are not done yet, so the
    guarantee holds; the single-process server never does this.) `token`: /predict then needs
    it, unless `public_predict`.

        from ray import serve
        serve.run(sisa.serve.deployment("run", replicas=4), route_prefix="/")
    """
    require_extra()
    try:
        from ray import serve as ray_serve
    except ImportError:
        raise UsageError('prediction replicas need Ray Serve: pip install "sisa[ray,serve]"') from None
    if replicas < 1:
        raise UsageError(f"replicas must be at least 1, got {replicas}")
    run_dir = str(Path(run_dir).resolve())  # replicas need not share this process's cwd
    from .run import Run

    Run.open(run_dir).close()  # no run: refused here, not in every replica

    def build_app():  # called in each replica: the app holds locks and models, which do not pickle
        app = create_app(run_dir, token, public_predict=public_predict, local_only=token is None, device=device,
                         writer=False)
        app.state.service.start()
        return app

    ingress = ray_serve.deployment(ray_serve.ingress(build_app)(), name="sisa-predict", num_replicas=replicas,
                                   ray_actor_options=ray_actor_options or {"num_cpus": 1})
    return ingress.bind()


# --- the command ---------------------------------------------------------------------------------

def serve(run_dir: Path | str, host: str = "127.0.0.1", port: int = 8000, token_file: Path | str | None = None,
          batch_window: float = 0.0, public_predict: bool = False, device: str = "auto",
          log_level: str = "info") -> None:
    """Run the service until interrupted (Ctrl-C or SIGTERM). Everything a user can get wrong is
    refused, in one line, before the models load; then the port is bound and the writer lock taken."""
    token = read_token(token_file) if token_file is not None else None
    local = is_loopback(host)
    if not local and token is None:
        raise UsageError(f"--host {host} is reachable from other machines: pass --token-file FILE (the bearer "
                         "token clients must send), or bind 127.0.0.1")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {port}")
    require_extra()
    import uvicorn

    app = create_app(run_dir, token, batch_window, public_predict, local_only=local, device=device)
    sock = _listen(host, port)
    service = app.state.service
    try:
        service.start()  # the writer lock and the models, before the first request
        bound = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"sisa serve: http://{shown}:{bound} (run {service.run_dir}, generation {service.ensemble.generation}, "
              f"batch window {batch_window:g} s, predict {'open' if local or public_predict else 'needs the token'}"
              f"{', forget disabled: no --token-file' if token is None else ''})", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=10)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # Ctrl-C: uvicorn has shut down cleanly, then re-raised it
    finally:
        sock.close()
        service.stop()


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
