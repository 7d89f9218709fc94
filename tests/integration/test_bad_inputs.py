"""The bad-input corpus (bad_inputs.py) and every real camera file of shared/realdata/exif through one real
worker, with landmark photos in the same batches: each input ends as a recorded failure whose reason names
the problem, or as a processed photo; its batch-mates are tagged with their landmark; the worker lives on."""

from __future__ import annotations

import collections
import http.server
import itertools
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from shared.errors import DecodeError
from shared.imaging import decode_image
from shared.stack import redis_client_url

import bad_inputs as bad
import ops_fleet as fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH_SIZE = 8
GOOD_EVERY = 3  # a landmark photo after every third input: each batch of 8 holds two or three
MODEL_SIZE = 96  # the input size of fleet.build_model's tiny model
SETTLE_S = 150.0
# What a worker logs when a task, not a photo, went wrong: an unhandled error, a batch handed back, a
# hostile input taken for a database outage (retried), or the worker giving up.
WORKER_ERRORS = re.compile(r"Traceback \(most recent call last\)|raised unexpected|failed unexpectedly|"
                           r"retrying in|still failing after|CRITICAL|WorkerLostError|exiting so the broker")


@dataclass
class Result:
    outcome: str  # failure | processed | failed (a failed photo without a failures row) | unsettled
    stage: str = ""
    reason: str = ""
    event_id: str | None = None  # of the failures row
    status: str | None = None  # of the photos row, if the event was valid
    landmark: int | None = None  # the best tag's landmark
    gps: tuple[float, float] | None = None


@dataclass
class Good:
    """A landmark photo sent between the bad inputs: it must come back tagged with its landmark."""
    item: bad.Item
    landmark: int


@dataclass
class Run:
    results: dict[str, Result]  # by item name
    items: list[bad.Item]
    goods: list[Good]  # batch-mates of the corpus
    real: dict[Path, bad.Item]
    good_landmark: int  # the landmark of ctx.good
    log: str  # the worker's log
    alive: bool
    seconds: float


# ---- a local HTTP server ----------------------------------------------------------------------------


# Requests the test's HTTP server answered, by path.
REQUESTS: collections.Counter[str] = collections.Counter()


def _handler(good: bytes, release: threading.Event) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            REQUESTS[self.path] += 1
            try:
                self._route()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the worker gave up on us, as it should

        def _route(self) -> None:
            flaky = self.path == "/flaky.jpg"
            if self.path == "/good.jpg" or (flaky and REQUESTS[self.path] > 1):
                self._send(200, good, "image/jpeg")
            elif flaky or self.path in ("/unavailable.jpg", "/preview-unavailable.jpg",
                                        "/preview-unavailable-too.jpg"):
                self._send(503, b"try later", "text/plain")
            elif self.path == "/stall":
                release.wait(bad.SERVER_HOLD_S)
            elif self.path == "/drip":
                self._head(200, "image/jpeg", length=1000)
                for _ in range(int(bad.SERVER_HOLD_S / 0.25)):
                    if release.wait(0.25):
                        break
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
            elif self.path == "/big":
                self._head(200, "image/jpeg", length=bad.FETCH_MAX_BYTES + 1024 * 1024)
                self.wfile.write(b"\0" * 65536)
            elif self.path == "/big-stream":
                self._head(200, "image/jpeg")
                for _ in range((bad.FETCH_MAX_BYTES + 1024 * 1024) // 65536):
                    self.wfile.write(b"\0" * 65536)
                self.close_connection = True
            elif self.path == "/page":
                self._send(200, bad.HTML, "image/jpeg")
            elif self.path == "/to-file":
                self._redirect("file:///etc/passwd")
            elif self.path == "/to-private":
                self._redirect("http://10.0.0.1/x.jpg")
            else:
                self._send(404, b"not here", "text/plain")

        def _head(self, code: int, content_type: str, length: int | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            if length is not None:
                self.send_header("Content-Length", str(length))
            self.end_headers()

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self._head(code, content_type, len(body))
            self.wfile.write(body)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    return Handler


@pytest.fixture(scope="module")
def http_base(photos):
    release = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(photos["firsts"][0].read_bytes(), release))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


# ---- the fleet --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    return fleet.photo_set(tmp_path_factory.mktemp("photos"), n_landmarks=3, n_everyday=1)


@pytest.fixture(scope="module")
def model_version(photos, engine, milvus_uri, tmp_path_factory) -> str:
    return fleet.publish_tiny_model(photos, engine, milvus_uri, tmp_path_factory.mktemp("models"), "bad")


@pytest.fixture(scope="module")
def exif_dir(request) -> Path | None:
    """shared/realdata/exif, or None where the real photos are absent (their test skips)."""
    try:
        return request.getfixturevalue("realdata") / "exif"
    except pytest.skip.Exception:
        return None


@pytest.fixture(scope="module")
def env(photos, exif_dir, database_url, broker_url, milvus_uri, tmp_path_factory) -> dict:
    roots = [str(photos["root"])] + ([str(exif_dir)] if exif_dir else [])
    # The test's HTTP server is on loopback: allowed by network, while 10.0.0.1 and friends stay refused.
    return fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path_factory.mktemp("home"),
                           LANDMARKS_FILE_ROOTS=":".join(roots), LANDMARKS_BATCH_SIZE=BATCH_SIZE,
                           LANDMARKS_FETCH_TIMEOUT_S=bad.FETCH_TIMEOUT_S,
                           LANDMARKS_FETCH_MAX_BYTES=bad.FETCH_MAX_BYTES,
                           LANDMARKS_FETCH_RETRIES=bad.FETCH_RETRIES,
                           LANDMARKS_FETCH_RETRY_DELAY_S=bad.FETCH_RETRY_DELAY_S,
                           LANDMARKS_FETCH_ALLOW_PRIVATE="false", LANDMARKS_FETCH_ALLOWED_NETWORKS="127.0.0.0/8",
                           LANDMARKS_VISIBILITY_TIMEOUT_S=120)


def _goods(ctx: bad.Ctx, photos: dict, count: int, label: str) -> list[Good]:
    pairs = itertools.islice(itertools.cycle(zip(photos["firsts"], photos["infos"])), count)
    return [Good(bad.Item(f"landmark photo {k} {label}", bad.Send([bad.upload(ctx, path.as_uri())], {}),
                          bad.processed(landmark=True)), info.id)
            for k, (path, info) in enumerate(pairs)]


def _interleave(items: list[bad.Item], goods: list[Good]) -> list[bad.Item]:
    out, spare = [], iter(goods)
    for k, item in enumerate(items, 1):
        out.append(item)
        if k % GOOD_EVERY == 0:
            out.append(next(spare).item)
    return out + [g.item for g in spare]


def _real_items(ctx: bad.Ctx, exif_dir: Path | None) -> dict[Path, bad.Item]:
    files = sorted(p for p in exif_dir.iterdir() if p.is_file()) if exif_dir else []
    return {p: bad.Item(p.name, bad.Send([bad.upload(ctx, p.as_uri())], {}), bad.processed()) for p in files}


def _results(engine, items: list[bad.Item]) -> dict[str, Result]:
    keys = [i.key for i in items]
    ids = [i.event_id for i in items if i.event_id]
    with engine.connect() as conn:
        failures = {r.event_key: r for r in conn.execute(sa.text(
            "SELECT event_key, event_id, stage, reason FROM failures WHERE event_key = ANY(:k)"), {"k": keys})}
        photos = {r.event_id: r for r in conn.execute(sa.text(
            "SELECT e.event_id, p.status, p.gps_lat, p.gps_lon, t.landmark_id FROM processed_events e "
            "JOIN photos p ON p.user_id = e.user_id AND p.photo_id = e.photo_id "
            "LEFT JOIN photo_tags t ON t.user_id = p.user_id AND t.photo_id = p.photo_id AND t.rank = 0 "
            "WHERE e.event_id = ANY(:i)"), {"i": ids})}
    return {i.name: _result(failures.get(i.key), photos.get(i.event_id)) for i in items}


def _result(failure, photo) -> Result:
    if failure is None and photo is None:
        return Result("unsettled")
    result = Result("failure", failure.stage, failure.reason, failure.event_id) if failure else Result("")
    if photo is not None:
        result.status, result.landmark = photo.status, photo.landmark_id
        result.gps = (photo.gps_lat, photo.gps_lon) if photo.gps_lat is not None else None
        if failure is None:
            result.outcome = "processed" if photo.status in ("tagged", "no_landmark") else photo.status
    return result


def _settled(engine, items: list[bad.Item]) -> bool:
    return all(r.outcome != "unsettled" for r in _results(engine, items).values())


def _send_all(env: dict, items: list[bad.Item]) -> None:
    """A plain Celery producer, as the upload pipeline runs it, sending the raw arguments (no schema)."""
    producer = Celery(broker=env["LANDMARKS_BROKER_URL"])
    producer.conf.update(task_serializer="json")
    try:
        for item in items:
            producer.send_task(item.send.task, args=item.send.args, kwargs=item.send.kwargs,
                               queue=env["LANDMARKS_QUEUE"])
    finally:
        producer.close()


@pytest.fixture(scope="module")
def run(photos, model_version, env, exif_dir, http_base, engine, tmp_path_factory) -> Run:
    """The corpus, the real files and landmark photos, interleaved, until every one is recorded."""
    started = time.monotonic()
    ctx = bad.Ctx(root=photos["root"], outside=_outside(tmp_path_factory), user=f"bad_{uuid.uuid4().hex[:6]}",
                  good=photos["firsts"][0], http=http_base)
    items = bad.build(ctx)
    real = _real_items(ctx, exif_dir)
    inputs = items + list(real.values())
    goods = _goods(ctx, photos, len(inputs) // GOOD_EVERY + 2, "beside the corpus")

    log = tmp_path_factory.mktemp("worker") / "worker.log"
    sent = _interleave(inputs, goods)
    _send_all(env, sent)
    worker = fleet.start_worker(env, log)
    try:
        fleet.wait(lambda: _settled(engine, sent), "every input recorded", timeout_s=SETTLE_S, worker=worker)
        alive = worker.poll() is None
    finally:
        fleet.stop(worker)
        _drop_queue(env)
    results = _results(engine, inputs + [g.item for g in goods])
    outcome = Run(results, items, goods, real, photos["infos"][0].id, log.read_text(errors="replace"), alive,
                  time.monotonic() - started)
    _print_table(outcome)
    return outcome


def _drop_queue(env: dict) -> None:
    # Leave no queue behind in a shared Redis (whatever the worker still held returns to it as it stops).
    client = redis.Redis.from_url(redis_client_url(env["LANDMARKS_BROKER_URL"]))
    client.delete(env["LANDMARKS_QUEUE"])
    client.close()


def _outside(tmp_path_factory) -> Path:
    """A sibling of the file root holding a real photo: what `..` and symlinks would reach."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "photo.jpg").write_bytes(bad.jpeg())
    return outside


def _print_table(run: Run) -> None:
    print(f"\nbad-input corpus through one worker ({run.seconds:.0f} s; worker alive: {run.alive})")
    print(f"{'input':<44} {'expected':<10} {'outcome':<10} {'stage':<9} reason")
    for item in run.items + list(run.real.values()):
        r = run.results[item.name]
        tag = f"landmark {r.landmark}" if r.landmark else ("no GPS" if r.outcome == "processed" and not r.gps else "")
        detail = r.reason or tag
        print(f"{item.name[:44]:<44} {item.expect.outcome:<10} {r.outcome:<10} {r.stage:<9} {detail[:90]}")
    tagged = sum(run.results[g.item.name].landmark == g.landmark for g in run.goods)
    print(f"landmark photos beside the corpus: {tagged}/{len(run.goods)} tagged with their landmark")


# ---- the checks ---------------------------------------------------------------------------------------


def _check(item: bad.Item, result: Result, good_landmark: int) -> None:
    expect = item.expect
    assert result.outcome == expect.outcome, f"{item.name}: expected {expect.outcome}, got {result}"
    if expect.outcome == "failure":
        assert result.stage == expect.stage, f"{item.name}: {result}"
        assert result.event_id == item.event_id, f"{item.name}: {result}"
        # A valid event that failed at fetch or decode leaves its photo marked failed, not pending.
        assert result.status == ("failed" if expect.stage != "validate" else None), f"{item.name}: {result}"
        assert result.reason and "\n" not in result.reason, f"{item.name}: {result.reason!r}"
        missing = [w for w in expect.words if w.lower() not in result.reason.lower()]
        assert not missing, f"{item.name}: {missing} not in {result.reason!r}"
    if expect.landmark:
        assert result.landmark == good_landmark, f"{item.name}: {result}"
    if expect.no_gps:
        assert result.gps is None, f"{item.name}: {result}"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in bad.CASES])
def test_each_bad_input_is_recorded_with_its_reason_or_processed(case: bad.Case, run: Run) -> None:
    item = next(i for i in run.items if i.name == case.name)
    _check(item, run.results[item.name], run.good_landmark)


def test_a_photo_the_storage_did_not_serve_is_asked_for_again_before_it_fails(run: Run) -> None:
    """503 is "not now": the flaky photo was tagged at its second fetch, the unavailable one recorded as failed
    only once its retry was spent; a 404 is asked for once. A preview's 503 is tried again as a photo's is,
    and the original fetched in its place on the last attempt (once), where its own failure is recorded."""
    assert REQUESTS["/flaky.jpg"] == 2
    assert REQUESTS["/unavailable.jpg"] == 1 + bad.FETCH_RETRIES
    assert REQUESTS["/missing.jpg"] == 1
    assert REQUESTS["/preview-unavailable.jpg"] == 1 + bad.FETCH_RETRIES
    assert REQUESTS["/preview-unavailable-too.jpg"] == 1 + bad.FETCH_RETRIES
    assert REQUESTS["/missing-original.jpg"] == 1


def test_landmark_photos_beside_bad_inputs_are_tagged(run: Run) -> None:
    wrong = {g.item.name: run.results[g.item.name] for g in run.goods
             if run.results[g.item.name].landmark != g.landmark}
    assert not wrong, f"batch-mates of bad inputs not tagged with their landmark: {wrong}"


def test_worker_survives_every_input_without_an_unhandled_error(run: Run) -> None:
    assert run.alive, "the worker died"
    errors = [line for line in run.log.splitlines() if WORKER_ERRORS.search(line)]
    assert not errors, "worker log:\n" + "\n".join(errors[:20])


def test_real_camera_files_are_processed_like_the_decoder_says(realdata: Path, run: Run) -> None:
    """Each real file ends as decode_image here says: processed with its EXIF position, or a decode failure."""
    wrong = {}
    for path, item in run.real.items():
        result = run.results[item.name]
        try:
            decoded = decode_image(path.read_bytes(), size=MODEL_SIZE, max_pixels=100_000_000)
        except DecodeError as exc:
            if (result.outcome, result.stage, result.reason) != ("failure", "decode", exc.reason):
                wrong[path.name] = (exc.reason, result)
            continue
        gps = (decoded.gps.lat, decoded.gps.lon) if decoded.gps and not decoded.gps.is_null_island else None
        if result.outcome != "processed" or (gps and result.gps != pytest.approx(gps)) or (not gps and result.gps):
            wrong[path.name] = (f"processed, gps {gps}", result)
    assert run.real, f"no files in {realdata / 'exif'}"
    assert not wrong, f"real files not as decode_image says: {wrong}"
