"""The worker's in-process search replica: built from the published checkpoint, and giving the same tags as
searching Milvus. A checkpoint whose gallery is not the one Milvus publishes is refused, replica or not."""

from __future__ import annotations

import gc
import threading
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from shared import health
from shared.device_decode import DeviceJpegDecoder
from shared.errors import InfrastructureError
from shared.events import PhotoUploaded
from shared.index import FINGERPRINT_KEY, STATE_KEY, LandmarkIndex, centroid_collection, reference_collection
from shared.local_index import LocalIndex
from shared.model import load_checkpoint
from shared.outcomes import PhotoStatus
from shared.pipeline import RecognitionPipeline
from shared.publish import gallery_rows, publish_model
from shared.runtime import local_replica
from shared.settings import Settings

from ops_fleet import build_model, event, photo_set

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def published(tmp_path_factory, engine, milvus_uri) -> dict:
    photos = photo_set(tmp_path_factory.mktemp("replica_photos"))
    version = f"replica_{uuid.uuid4().hex[:6]}"
    model = build_model(photos, tmp_path_factory.mktemp("replica_models"), version)
    index = LandmarkIndex(milvus_uri)
    publish_model(model, engine, index)
    return {"photos": photos, "model": model, "version": version, "index": index}


def _pipeline(engine, index, photos, max_centroids: int, precision: str = "fp32") -> RecognitionPipeline:
    settings = Settings(file_roots=str(photos["root"]), search_replica_max_centroids=max_centroids,
                        precision=precision)
    return RecognitionPipeline(settings, engine, index)


def _uploads(photos, user: str) -> list[PhotoUploaded]:
    """Every other photo with GPS (its landmark's place, or somewhere for everyday photos): both the
    geo-filtered and the global search run."""
    places = [(info.lat, info.lon) for info in photos["infos"]] + [(48.85, 2.35)] * len(photos["everyday"])
    paths = photos["firsts"] + photos["everyday"]
    return [PhotoUploaded.model_validate(event(user, p, gps=place if k % 2 else None))
            for k, (p, place) in enumerate(zip(paths, places))]


def test_the_worker_searches_in_process_with_the_same_tags_as_milvus(published, engine):
    index, photos = published["index"], published["photos"]
    local = _pipeline(engine, index, photos, max_centroids=1000)
    remote = _pipeline(engine, index, photos, max_centroids=0)
    assert isinstance(local.runtime().replica, LocalIndex)
    assert remote.runtime().replica is None
    by_local, by_milvus = _through_both(local, remote, photos)
    assert _tags(by_local.outcomes) == _tags(by_milvus.outcomes)
    assert sum(o.status == PhotoStatus.TAGGED for o in by_local.outcomes) == len(photos["firsts"])


def test_a_worker_told_bf16_runs_its_forward_in_bf16_and_tags_as_in_fp32(published, engine):
    """LANDMARKS_PRECISION reaches the worker's model (on a CPU without bf16 in hardware it is emulated):
    the gallery, built in fp32, still finds each landmark's photo above the fixture's 0.999."""
    index, photos = published["index"], published["photos"]
    half, full = (_pipeline(engine, index, photos, 1000, precision) for precision in ("bf16", "fp32"))
    assert (half.runtime().embedder.bf16, full.runtime().embedder.bf16) == (True, False)
    by_half, by_full = _through_both(half, full, photos)
    assert _tags(by_half.outcomes) == _tags(by_full.outcomes)
    assert sum(o.status == PhotoStatus.TAGGED for o in by_half.outcomes) == len(photos["firsts"])


def _through_both(first: RecognitionPipeline, second: RecognitionPipeline, photos):
    """The fixture's photos through each pipeline as a user of its own, then both closed: their reports."""
    try:
        return (first.process(_uploads(photos, f"r1_{uuid.uuid4().hex[:6]}")),
                second.process(_uploads(photos, f"r2_{uuid.uuid4().hex[:6]}")))
    finally:
        first.close()
        second.close()


def _tags(outcomes) -> list[list[str]]:
    return [[t.landmark_id for t in o.tags] for o in outcomes]


class _MeetInTheModel:
    """An embedder's embed whose first two calls wait inside it, up to ``timeout_s``, for each other: they
    meet only if two batches' forward passes run at once. It records that, and the torch threads each call
    ran on."""

    def __init__(self, embed, timeout_s: float) -> None:
        self._embed, self._calls, self._count = embed, 0, threading.Lock()
        self._both_in = threading.Barrier(2, timeout=timeout_s)
        self.met: bool | None = None
        self.threads: set[int] = set()

    def __call__(self, pixels):
        with self._count:
            self._calls += 1
            first_two = self._calls <= 2
            self.threads.add(torch.get_num_threads())
        if first_two:
            try:
                self._both_in.wait()
                self.met = True
            except threading.BrokenBarrierError:  # the first waited alone; the second finds the barrier broken
                self.met = False
        return self._embed(pixels)


def _two_at_a_time(pipeline: RecognitionPipeline, photos, timeout_s: float):
    """The fixture's photos in four batches, each delivered twice, through ``pipeline`` on two threads, then
    through a pipeline of its own one batch after another; the model watched (_MeetInTheModel). Both
    pipelines closed afterwards."""
    try:
        watch = _MeetInTheModel(pipeline.runtime().embedder.embed, timeout_s)
        pipeline.runtime().embedder.embed = watch
        uploads = _uploads(photos, f"rc_{uuid.uuid4().hex[:6]}")
        batches = [uploads[i::4] for i in range(4)]
        with ThreadPoolExecutor(2) as threads:
            reports = list(threads.map(pipeline.process, batches * 2))  # each batch twice: redelivered
        serial = RecognitionPipeline(pipeline.settings, pipeline.engine, pipeline.index)
        try:
            expected = [serial.process(b) for b in _as_user(batches, f"rs_{uuid.uuid4().hex[:6]}")]
        finally:
            serial.close()
    finally:
        pipeline.close()
    assert [_tags(r.outcomes) for r in reports[:4]] == [_tags(r.outcomes) for r in expected]
    # Each batch was delivered twice, perhaps at the same time: its rows were written once.
    assert [reports[i].applied + reports[i + 4].applied for i in range(4)] == [len(b) for b in batches]
    return watch


@pytest.mark.parametrize("decode_pool", ["processes", "threads"])
def test_batches_processed_in_two_threads_at_once_tag_as_one_after_another(published, engine, decode_pool,
                                                                           two_cores):
    """A worker runs LANDMARKS_BATCHES_IN_FLIGHT batches at once on one pipeline (shared decode pool; on 2
    cores, with a light model, two forward passes at once, one torch thread each): the tags and the rows
    written are those of running them in turn."""
    two_cores(1)
    photos = published["photos"]
    settings = Settings(file_roots=str(photos["root"]), decode_pool=decode_pool, decode_workers=2)
    watch = _two_at_a_time(RecognitionPipeline(settings, engine, published["index"]), photos, timeout_s=30)
    assert watch.met
    assert watch.threads == {1}


def test_a_heavy_models_forward_runs_on_every_core_one_batch_at_a_time(published, engine, two_cores, monkeypatch):
    """Where the forward is the worker's heavy stage (here every model is: the threshold at 0 ms; WRN-50-2
    at 224 px is, on any CPU), the batches take turns at it, each forward on both cores."""
    two_cores(1)
    monkeypatch.setattr("shared.runtime.HEAVY_FORWARD_CPU_MS", 0.0)
    photos = published["photos"]
    settings = Settings(file_roots=str(photos["root"]), decode_workers=2)
    watch = _two_at_a_time(RecognitionPipeline(settings, engine, published["index"]), photos, timeout_s=3)
    assert watch.met is False
    assert watch.threads == {2}


def _as_user(batches: list[list[PhotoUploaded]], user: str) -> list[list[PhotoUploaded]]:
    return [[e.model_copy(update={"user_id": user, "event_id": uuid.uuid4().hex}) for e in b] for b in batches]


def test_no_replica_when_the_gallery_is_too_large_to_keep(published):
    _, _, gallery = load_checkpoint(published["model"])
    version, index = published["version"], published["index"]
    assert local_replica(version, gallery, index, max_centroids=1000) is not None
    assert local_replica(version, gallery, index, max_centroids=1) is None  # too large to keep
    assert local_replica(version, gallery, index, max_centroids=0) is None  # none kept
    assert np.asarray(gallery["centroids"]["embeddings"]).shape[0] == index.row_counts(version)[0]


@pytest.mark.parametrize("max_centroids", [1000, 1, 0])
def test_a_checkpoint_that_disagrees_with_milvus_is_refused_whether_replicated_or_not(published, max_centroids):
    """Its weights and thresholds are not the published version's: searching Milvus with them tags wrongly too."""
    _, _, gallery = load_checkpoint(published["model"])
    version, index = published["version"], published["index"]
    fewer = {**gallery, "centroids": {k: v[:-1] for k, v in gallery["centroids"].items()}}
    # As many rows, another gallery (`build --version` run twice): Milvus's fingerprint tells them apart.
    for other in (fewer, _flipped(gallery)):
        with pytest.raises(InfrastructureError, match=f"does not hold the gallery published as {version}"):
            local_replica(version, other, index, max_centroids=max_centroids)
    with pytest.raises(InfrastructureError, match="holds no gallery"):
        local_replica(version, {}, index, max_centroids=max_centroids)


def _flipped(gallery: dict) -> dict:
    return {**gallery, "centroids": {**gallery["centroids"], "embeddings": -gallery["centroids"]["embeddings"]}}


@pytest.mark.parametrize("max_centroids", [1000, 0])
def test_a_worker_whose_model_file_was_replaced_under_the_same_version_tags_nothing(published, engine, tmp_path,
                                                                                  max_centroids):
    """`landmarks build --version V --out SAME.pt` run again: publishing it is refused, but the file at the
    registered path is the new build. The worker refuses it (its batches go back to the queue, and it is not
    ready) instead of tagging with its weights and thresholds."""
    photos, index = published["photos"], published["index"]
    version = f"replica_rebuilt_{uuid.uuid4().hex[:6]}"
    model = build_model(photos, tmp_path / "first", version, slice(0, 2))
    publish_model(model, engine, index, activate=False)
    model.write_bytes(build_model(photos, tmp_path / "again", version).read_bytes())
    pipeline = _pipeline(engine, index, photos, max_centroids)
    try:
        with pytest.raises(InfrastructureError, match=f"does not hold the gallery published as {version}"):
            pipeline._load_runtime(version)  # as when the alias moves to it
        assert pipeline.loaded_version is None
        # Readiness says why, where it had said only "no model loaded yet".
        ready = health.worker_model_check(lambda: pipeline.loaded_version, lambda: pipeline.load_error)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(index, "active_version", lambda: version)
            with pytest.raises(InfrastructureError):
                pipeline.runtime()
        with pytest.raises(RuntimeError, match=f"cannot load the active model {version}: .*does not hold the gallery"):
            ready()
    finally:
        pipeline.close()
        index.drop(version)


def test_a_version_published_before_fingerprints_is_replicated_when_its_row_counts_match(published):
    """Collections without publish marks (as older code left them): the counts are all there is to compare."""
    _, _, gallery = load_checkpoint(published["model"])
    index, version = published["index"], f"replica_legacy_{uuid.uuid4().hex[:6]}"
    index.publish(version, *gallery_rows(gallery))
    for name in (centroid_collection(version), reference_collection(version)):
        index.client.drop_collection_properties(name, [STATE_KEY, FINGERPRINT_KEY])
    try:
        assert local_replica(version, gallery, index, max_centroids=1000) is not None
        assert local_replica(version, _flipped(gallery), index, max_centroids=1000) is not None  # counts only
        fewer = {**gallery, "centroids": {k: v[:-1] for k, v in gallery["centroids"].items()}}
        with pytest.raises(InfrastructureError, match="does not hold the gallery"):
            local_replica(version, fewer, index, max_centroids=1000)
    finally:
        index.drop(version)


def test_a_loaded_version_is_kept_out_of_the_collector_and_freed_once_replaced(published, engine):
    pipeline = _pipeline(engine, published["index"], published["photos"], max_centroids=1000)
    runtime = pipeline.runtime()
    # torch, the model and the replica no longer slow every full collection down
    assert gc.get_freeze_count() > 100_000
    replaced = weakref.ref(runtime.embedder._net)
    del runtime
    pipeline._runtime = pipeline._load_runtime(published["version"])  # as when the alias moves
    gc.collect()
    assert replaced() is None  # the previous model's memory is released
    assert pipeline.runtime().version == published["version"]


def test_a_device_jpeg_decoder_tags_as_the_cpu_pool_and_hands_back_what_it_refuses(published, engine):
    """The GPU path's decode (shared/device_decode.py), run here by torchvision on the CPU: the same tags as
    the pool's decode. A PNG goes to the pool; a truncated JPEG, refused by the device, goes back to the
    pool and fails there as it would have on the CPU."""
    photos = published["photos"]
    png, truncated = photos["root"] / "firsts0.png", photos["root"] / "truncated.jpg"
    Image.open(photos["firsts"][0]).save(png)
    truncated.write_bytes(photos["firsts"][0].read_bytes()[:3000])
    uploads = _uploads(photos, f"rd_{uuid.uuid4().hex[:6]}")
    uploads += [PhotoUploaded.model_validate(event(uploads[0].user_id, path)) for path in (png, truncated)]
    by_device, by_cpu = _with_device_decoder_and_on_cpu(published, engine, uploads, share=1.0)  # all offered
    assert _tags(by_device.outcomes) == _tags(by_cpu.outcomes)
    assert sum(o.status == PhotoStatus.TAGGED for o in by_device.outcomes) == len(photos["firsts"])
    assert [o.status for o in by_device.outcomes] == [o.status for o in by_cpu.outcomes]
    refused = by_device.outcomes[-1]
    assert refused.status == PhotoStatus.FAILED and refused.failure.reason == by_cpu.outcomes[-1].failure.reason
    assert (by_device.decoded, by_device.decoded_on_device) == (len(uploads) - 1, len(uploads) - 2)
    assert by_cpu.decoded_on_device == 0


def test_a_batch_split_between_the_device_and_the_pool_tags_as_the_pool_alone(published, engine):
    """With a device decoder the pool decodes part of each batch at the same time (LANDMARKS_DEVICE_DECODE_
    SHARE, here a half): the tags are those of the pool alone, and the split is what was asked."""
    uploads = _uploads(published["photos"], f"rh_{uuid.uuid4().hex[:6]}")
    by_split, by_cpu = _with_device_decoder_and_on_cpu(published, engine, uploads, share=0.5)
    assert _tags(by_split.outcomes) == _tags(by_cpu.outcomes)
    assert by_split.decoded_on_device == round(len(uploads) * 0.5)
    assert by_split.decoded == len(uploads)


def _with_device_decoder_and_on_cpu(published, engine, uploads, share: float):
    """The batch through a pipeline given a device decoder (torchvision's, on the CPU) that takes ``share``
    of each batch (LANDMARKS_DEVICE_DECODE_SHARE), and again, as another user, through a CPU pipeline:
    (device report, CPU report)."""
    photos = published["photos"]
    on_cpu = _pipeline(engine, published["index"], photos, max_centroids=1000)
    settings = Settings(file_roots=str(photos["root"]), search_replica_max_centroids=1000, device_decode_share=share)
    on_device = RecognitionPipeline(settings, engine, published["index"])
    on_device.runtime()
    assert on_device.device_decoder is None  # nothing detected on a CPU worker
    on_device.device_decoder = DeviceJpegDecoder.torchvision("cpu")
    try:
        by_device = on_device.process(uploads)
        by_cpu = on_cpu.process(_as_user([uploads], f"rp_{uuid.uuid4().hex[:6]}")[0])
    finally:
        on_cpu.close()
        on_device.close()
    return by_device, by_cpu

