"""The benchmark's own pieces: camera-like inputs, the bound arithmetic, and one quick run of the whole
bench (real PostgreSQL, Redis, milvus-lite and a Celery worker) that must print every JSON key."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from shared.bench.bound import combined_rate, stage_resources, throughput_bound
from shared.bench.end_to_end import freed_memory_kept, worker_laps
from shared.bench.inputs import camera_jpeg, generated_images
from shared.imaging import decode_image
from shared.runtime import HEAVY_FORWARD_CPU_MS

REPO_KEYS = {"device", "size", "e2e_img_s", "bound_img_s", "ratio", "stages", "rss_mb_start", "rss_mb_end",
             "delf_style_ms", "ours_ms", "model", "backbone", "batch_size"}
STAGE_KEYS = {"decode_img_s", "model_img_s", "search_img_s", "write_img_s"}


@pytest.mark.parametrize(("width", "height", "low_mb", "high_mb"),
                         [(4000, 3000, 2.8, 6.0), (1600, 1200, 0.35, 0.9)])
def test_generated_jpegs_have_camera_sizes_and_content(width, height, low_mb, high_mb):
    data = camera_jpeg(width, height, seed=3)
    assert low_mb <= len(data) / 1e6 <= high_mb
    img = Image.open(io.BytesIO(data))
    assert (img.format, img.size, img.getexif().get(0x0112)) == ("JPEG", (width, height), 1)
    small = np.asarray(img.reduce(8), dtype=np.float32)
    assert small.std() > 20  # not a flat colour
    assert len(np.unique(small.reshape(-1, 3).astype(np.uint8), axis=0)) > 2000  # gradients and noise
    rows = np.abs(np.diff(small.mean(axis=2), axis=1))
    assert rows.max() > 40  # sharp edges somewhere
    assert decode_image(data, size=96, max_pixels=10**8).pixels.shape == (96, 96, 3)


def test_generated_images_are_cached(tmp_path):
    first = generated_images(tmp_path, "2mp", 2)
    stamp = [p.stat().st_mtime_ns for p in first]
    again = generated_images(tmp_path, "2mp", 2)
    assert again == first and [p.stat().st_mtime_ns for p in again] == stamp
    assert all(p.parent == tmp_path / "2mp" for p in first)


def test_stages_on_one_resource_combine_as_harmonic_sum():
    assert combined_rate([100.0]) == pytest.approx(100.0)
    assert combined_rate([100.0, 100.0]) == pytest.approx(50.0)
    assert combined_rate([30.0, 60.0]) == pytest.approx(20.0)
    assert combined_rate([30.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        combined_rate([])


def test_bound_is_the_slowest_resource():
    stages = {"decode": 120.0, "model": 120.0, "search": 900.0, "write": 2000.0}
    cpu = stage_resources("cpu", "pillow")
    assert cpu == {"decode": "cpu", "model": "cpu", "search": "milvus", "write": "postgres"}
    assert throughput_bound(stages, cpu) == (pytest.approx(60.0), "cpu")
    # On a GPU with the hardware JPEG engine, decode and model no longer share a resource.
    gpu = stage_resources("cuda", "nvimgcodec_hw")
    assert throughput_bound({**stages, "search": 90.0}, gpu) == (pytest.approx(90.0), "milvus")
    assert throughput_bound(stages, gpu) == (pytest.approx(120.0), "gpu_jpeg_engine")
    assert stage_resources("cuda:1", "torchvision_nvjpeg")["decode"] == "gpu"
    # Searched in the worker's replica, the search takes its turn on the cores with decode and model.
    local = stage_resources("cpu", "pillow", search_in_process=True)
    assert throughput_bound({**stages, "search": 120.0}, local) == (pytest.approx(40.0), "cpu")


def test_the_cpu_bound_charges_the_model_the_cpu_the_worker_spends_on_it():
    """Two threads on one batch wait for each other at every layer; the worker's one thread beside the
    decode processes spends less CPU per image: measured on two only, the bound would be too low."""
    from shared.bench.run import model_rate_for_bound
    two_threads = {"img_s": 1000.0, "cpu_ms_per_img": 2.0}
    assert model_rate_for_bound({"model": two_threads, "model_served": {"cpu_ms_per_img": 0.5}}, 2) == 4000.0
    assert model_rate_for_bound({"model": two_threads, "model_served": {"cpu_ms_per_img": 4.0}}, 2) == 1000.0
    assert model_rate_for_bound({"model": two_threads}, 2) == 1000.0  # CUDA: the stage as measured


def test_the_cpu_bound_charges_decode_the_cpu_its_decodes_take_not_the_thread_pools_idle_moments():
    """The bench's decode threads pass the GIL and leave a core idle now and then; the worker's decode
    processes do not: measured by the pool's rate alone, the bound would be too low."""
    from shared.bench.run import decode_rate_for_bound
    pool = {"decoder": "pillow", "img_s": 300.0, "cpu_ms_per_img": 6.0}
    assert decode_rate_for_bound(pool, 2) == pytest.approx(333.3, abs=0.1)
    assert decode_rate_for_bound({**pool, "cpu_ms_per_img": 8.0}, 2) == 300.0  # never below what was measured
    assert decode_rate_for_bound({"decoder": "nvimgcodec", "img_s": 4000.0}, 2) == 4000.0  # GPU: as measured


def _generated_2mp_jpegs(tmp_path) -> list[bytes]:
    return [path.read_bytes() for path in generated_images(tmp_path / "bench", "2mp", 2)] * 6


def _tiled_heics(tmp_path) -> list[bytes]:
    buffer = io.BytesIO()  # a phone's HEIC is a grid of 512-px tiles, which libheif decodes on threads of its own
    Image.open(io.BytesIO(camera_jpeg(2400, 1800, seed=3))).save(buffer, "HEIF", quality=70, tile_size=512)
    return [buffer.getvalue()] * 4


@pytest.mark.parametrize("inputs", [_generated_2mp_jpegs, _tiled_heics])
def test_the_decode_stage_times_the_cpu_its_decodes_take_on_every_thread(inputs, tmp_path):
    # Charged only each decode's own thread, a tiled HEIC looked ten times cheaper than it is, and the real
    # photos' bound three times higher.
    from shared.bench.stages import decode_stage
    blobs = inputs(tmp_path)
    result = decode_stage(blobs, 96, workers=2)
    assert result["failed"] == 0
    started = time.process_time()
    for data in blobs:
        decode_image(data, size=96, max_pixels=100_000_000)
    alone_ms = (time.process_time() - started) * 1e3 / len(blobs)
    assert 0.5 * alone_ms < result["cpu_ms_per_img"] < 2 * alone_ms  # about what a decode costs on its own


def test_the_cost_of_a_photo_is_told_by_format_and_refusals_are_counted_apart(tmp_path):
    from shared.bench.stages import decode_cost_by_format
    jpeg = camera_jpeg(640, 480, seed=4)
    heic = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(heic, "HEIF", quality=70)
    cost = decode_cost_by_format([jpeg, heic.getvalue(), jpeg, b"not a photo"], 96)
    assert {kind: entry["images"] for kind, entry in cost.items()} == {"HEIF": 1, "JPEG": 2, "refused": 1}
    assert cost["HEIF"]["cpu_ms"] > cost["JPEG"]["cpu_ms"] > 0  # a HEIC has no reduced-scale decode


def test_the_cpu_of_a_run_is_put_down_to_the_worker_its_decoders_the_services_and_the_host():
    from shared.bench.host import cpu_by_role
    before = {10: ("python -m shared.cli worker", 5.0), 11: ("python -c forkserver", 1.0),
              20: ("postgres: postgres lm_bench idle", 2.0), 30: ("redis-server unixsocket:/tmp/r.sock", 0.5),
              40: ("python -m milvus_lite server --data-dir /tmp/m", 1.0), 50: ("[kdamond.0]", 3.0)}
    after = {10: ("python -m shared.cli worker", 6.0), 11: ("python -c forkserver", 5.0),
             20: ("postgres: postgres lm_bench idle", 2.25), 30: ("redis-server unixsocket:/tmp/r.sock", 0.75),
             40: ("python -m milvus_lite server --data-dir /tmp/m", 1.5), 50: ("[kdamond.0]", 3.5),
             60: ("postgres: postgres lm_bench idle", 0.25)}  # a connection opened during the run
    assert cpu_by_role(before, after, {10: "worker", 11: "decode"}) == {
        "worker": 1.0, "decode": 4.0, "postgres": 0.5, "redis": 0.25, "milvus": 0.5, "host": 0.5}


def test_a_process_that_touches_memory_mapped_afresh_shows_its_minor_faults():
    import mmap

    from shared.bench.host import minor_faults
    before = minor_faults(os.getpid())
    fresh = mmap.mmap(-1, 16 << 20)  # 4,096 pages of 4 KB, none of them touched yet
    fresh.madvise(mmap.MADV_NOHUGEPAGE)  # as many faults where transparent huge pages are always on
    for offset in range(0, len(fresh), mmap.PAGESIZE):
        fresh[offset] = 1
    assert minor_faults(os.getpid()) - before >= (16 << 20) // mmap.PAGESIZE * 0.9
    fresh.close()
    assert minor_faults(2 ** 22 + 1) is None  # no such process


def test_the_stage_cpu_share_is_what_the_bounding_stages_took_of_the_cores_during_the_run():
    from shared.bench.run import stage_cpu_share
    # 250 photos a second, each 6 ms in a decode process, 1 ms forward and 0.2 ms search: 1.8 of 2 cores.
    e2e = {"e2e_img_s": 250.0, "worker_cpu_ms_per_img": {"main": 1.5, "pool": 6.0},
           "worker_stage_cpu_ms_per_img": {"fetch_decode": 0.02, "embed": 1.0, "search": 0.2, "write": 0.05}}
    assert stage_cpu_share(e2e, 2) == 0.9
    assert stage_cpu_share({**e2e, "worker_stage_cpu_ms_per_img": {}}, 2) is None  # a worker that logs no CPU
    # A forward on two torch threads: the batch thread's clock sees half of it, so no share is given.
    assert stage_cpu_share(e2e, 2, forward_threads=2) is None


@pytest.mark.parametrize("option", ["--images", "--batch-size", "--centroids"])
def test_a_zero_count_is_refused_rather_than_taken_for_the_default(option):
    """`--images 0` meant the default, 8,192 images: minutes of a GPU machine's 15 spent on a run meant to
    be skipped."""
    run = subprocess.run([sys.executable, "-m", "shared.bench_cli", "bench", "--json", option, "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Invalid value" in run.stderr and "Traceback" not in run.stderr


def test_worker_laps_are_read_from_the_pipeline_log():
    text = ("INFO shared.pipeline: batch of 8: 1 tagged, 0 failed, 8 applied, model v1, "
            "ms {'fetch_decode': 80.0, 'embed': 40.5, 'search': 4.0, 'write': 3.5}, "
            "cpu ms {'fetch_decode': 2.0, 'embed': 39.0, 'search': 3.0, 'write': 0.5}\n"
            "unrelated line\n"
            "INFO shared.pipeline: batch of 4: 0 tagged, 0 failed, 4 applied, model v1, "
            "ms {'fetch_decode': 40.0, 'embed': 20.5, 'search': 2.0, 'write': 1.5}, "
            "cpu ms {'fetch_decode': 1.0, 'embed': 20.0, 'search': 1.5, 'write': 0.5}\n")
    assert worker_laps(text) == (2, 12, {"fetch_decode": 120.0, "embed": 61.0, "search": 6.0, "write": 5.0}, 0,
                                 {"fetch_decode": 3.0, "embed": 59.0, "search": 4.5, "write": 1.0})
    older = ("INFO shared.pipeline: batch of 8: 1 tagged, 0 failed, 8 applied, 7 decoded on the device, model v1, "
             "ms {'fetch_decode': 8.0}\n") * 2  # a log from before the CPU laps were logged
    assert worker_laps(older) == (2, 16, {"fetch_decode": 16.0}, 14, {})
    as_json = json.dumps({"ts": "2026-11-27T00:00:00Z", "level": "INFO", "logger": "shared.pipeline",
                          "msg": "batch of 8: 1 tagged, 0 failed, 8 applied, model v1, ms {'embed': 40.5}, "
                                 "cpu ms {'embed': 40.0}"})
    assert worker_laps(as_json + "\n{not json\n") == (1, 8, {"embed": 40.5}, 0, {"embed": 40.0})


def test_the_workers_word_on_its_allocator_is_read_from_its_start_up_line():
    line = "INFO workers.pool: 2 batches in flight; threads {{}}; freed memory kept for the next batch: {}\n"
    assert freed_memory_kept("unrelated\n" + line.format("yes")) == "yes"
    assert freed_memory_kept(line.format("partly (3 malloc arenas)")) == "partly"
    assert freed_memory_kept("a worker that never started\n") is None


def _bench_env(pg_server_url: str, broker_url: str, home, **extra: str) -> dict:
    """A bench subprocess's environment: the test's PostgreSQL and Redis, its own home, a private Milvus."""
    env = {**os.environ, "LANDMARKS_DATABASE_URL": pg_server_url, "LANDMARKS_BROKER_URL": broker_url,
           "LANDMARKS_HOME": str(home), **extra}
    env.pop("LANDMARKS_MILVUS_URI", None)
    return env


def _quick_bench(pg_server_url: str, broker_url: str, home, *args: str) -> dict:
    """`bench --json --quick --device cpu --size 2mp ARGS` on the test's PostgreSQL and Redis: its JSON."""
    env = _bench_env(pg_server_url, broker_url, home)
    run = subprocess.run([sys.executable, "-m", "shared.bench_cli", "bench", "--json", "--quick",
                          "--device", "cpu", "--size", "2mp", *args], env=env, capture_output=True, text=True,
                         timeout=400)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.integration
@pytest.mark.slow
def test_quick_bench_prints_every_key(pg_server_url, broker_url, tmp_path):
    result = _quick_bench(pg_server_url, broker_url, tmp_path / "home")
    assert REPO_KEYS <= set(result)
    assert set(result["stages"]) == STAGE_KEYS
    assert all(v > 0 for v in result["stages"].values())
    assert result["e2e_img_s"] > 0 and result["bound_img_s"] > 0
    assert result["ratio"] == pytest.approx(result["e2e_img_s"] / result["bound_img_s"], rel=0.01)
    assert result["rss_mb_start"] > 0 and result["rss_mb_end"] > 0 and result["rss_mb_growth_pct"] >= 0
    # Decode alone is measured on both sides of the end-to-end part; the bound uses their mean, each the
    # better of the pool's rate and its decodes' CPU per image over the cores.
    assert result["stages"]["decode_img_s"] == pytest.approx(
        (result["decode_img_s_before"] + result["decode_img_s_after"]) / 2, abs=0.1)
    for pool_img_s, cpu_ms, used in zip(result["decode_pool_img_s"], result["decode_cpu_ms_per_img"],
                                        (result["decode_img_s_before"], result["decode_img_s_after"])):
        assert used == pytest.approx(max(pool_img_s, result["host"]["cpus"] * 1000 / cpu_ms), abs=0.1)
    # What a photo of each format costs to decode: the generated inputs are JPEGs, each decoded once.
    assert set(result["decode_cpu_ms_by_format"]) == {"JPEG"}
    assert result["decode_cpu_ms_by_format"]["JPEG"]["images"] == result["unique_inputs"]
    assert result["decode_cpu_ms_by_format"]["JPEG"]["cpu_ms"] > 0
    assert result["delf_style_ms"] > result["ours_ms"] > 0
    assert result["ours_model"] == "served resnet_small 96 px" and result["ours_ms"] == result["ours_served_ms"]
    # The bound charges the model the CPU the worker's own thread count spends, if that is the cheaper.
    served = result["model_served"]
    # The quick bench's model is light: its forward, measured first as the worker measures it, runs on one
    # torch thread per 4 cores.
    assert 0 < served["forward_cpu_ms_at_start"] < HEAVY_FORWARD_CPU_MS
    assert served["torch_threads"] == max(1, result["host"]["cpus"] // 4)
    assert result["stages"]["model_img_s"] == pytest.approx(
        max(result["model_stage_img_s"], result["host"]["cpus"] * 1000 / served["cpu_ms_per_img"]), rel=0.01)
    assert (result["device"], result["size"], result["backbone"], result["batch_size"]) == \
        ("cpu", "2mp", "resnet_small", 8)
    assert result["e2e_tagged"] >= 1  # the anchored landmark photo went all the way to a tag
    # The quick gallery fits the worker's in-process replica, so the bound uses that search, on the cores.
    assert result["search_in_process"] and result["resources"]["search"] == "cpu"
    assert result["stages"]["search_img_s"] == result["search_local_img_s"]
    assert 0 < result["search_milvus_queries"] <= result["images"]  # milvus-lite is sampled for comparison
    # The worker's CPU per photo: its own threads and its decode processes both worked during the run.
    assert result["worker_cpu_ms_per_img"]["main"] > 0 and result["worker_cpu_ms_per_img"]["pool"] > 0
    handover = result["handover_cpu_ms_per_img"]
    assert handover["pixels_cpu_ms_per_img"] > 0 and handover["jpeg_cpu_ms_per_img"] > 0
    # The worker and the bench's own model stage keep the memory a forward frees, every thread on one heap.
    assert result["worker_freed_memory_kept"] == ["yes"] and result["host"]["malloc_arenas"] == 1
    assert result["worker_minor_faults_per_img"] >= 0


@pytest.mark.integration
@pytest.mark.slow
def test_the_load_run_can_drain_the_queue_with_two_worker_processes(pg_server_url, broker_url, tmp_path):
    result = _quick_bench(pg_server_url, broker_url, tmp_path / "home", "--load-only", "--images", "48",
                          "--workers", "2")
    assert result["e2e_workers"] == 2 and len(result["e2e_batches_by_worker"]) == 2
    assert sum(result["e2e_batches_by_worker"]) == result["e2e_batches"] > 0
    assert result["events"] == 48 and result["e2e_img_s"] > 0
    assert result["worker_freed_memory_kept"] == ["yes", "yes"]
    assert result["worker_cpu_ms_per_img"]["main"] > 0


@pytest.mark.integration
@pytest.mark.slow
def test_a_bench_whose_worker_fails_every_batch_stops_at_once_with_the_reason(pg_server_url, broker_url, tmp_path):
    """A worker that dead-letters the bench's events (a GPU worker failing every batch, say) ends the run at
    once, with the reason and the worker's last lines, instead of waiting out the stall limit (600 s during
    the warm-up; this test gives the whole bench 300)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "if 'worker' in sys.argv:  # the bench's worker processes, not the bench itself\n"
        "    from shared.pipeline import RecognitionPipeline\n"
        "    def fail(self, events, *args):\n"
        "        raise RuntimeError('injected: every batch fails')\n"
        "    RecognitionPipeline.process = fail\n")
    env = _bench_env(pg_server_url, broker_url, tmp_path / "home",
                     PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "shared.bench_cli", "bench", "--json", "--quick", "--device", "cpu",
                          "--size", "2mp", "--load-only", "--images", "16"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1
    assert "dead-lettered" in run.stderr and "injected: every batch fails" in run.stderr


def test_rss_growth_is_measured_over_the_samples_taken_while_batches_ran():
    from shared.bench.run import rss_growth_pct
    # The idle start (1,000 MB) sits below every sample with batches in flight, which stay within 5 %.
    series = [[0, 1000.0, 0.0], [100, 1200.0, 1.0], [200, 1260.0, 2.0], [300, 1230.0, 3.0]]
    assert rss_growth_pct(series) == 5.0
    assert rss_growth_pct([[0, 1000.0, 0.0], [100, 1000.0, 1.0], [200, 1500.0, 2.0]]) == 50.0  # a leak shows
    assert rss_growth_pct([[0, 1000.0, 0.0]]) is None


def test_tenth_rates_are_images_per_second_within_each_step():
    from shared.bench.run import tenth_rates
    series = [[0, 900.0, 0.0], [100, 905.0, 2.0], [200, 905.0, 6.0], [200, 906.0, 6.0]]
    assert tenth_rates(series) == [50.0, 25.0]


def test_a_last_sliver_of_the_backlog_is_not_reported_as_a_tenth_of_its_own():
    from shared.bench.run import tenth_rates
    # 80 events committed 0.06 s after the sample before: the last batches landing together, not 1,333 img/s.
    series = [[0, 900.0, 0.0], [5000, 905.0, 25.0], [9920, 905.0, 50.97], [10000, 905.0, 51.03]]
    assert tenth_rates(series) == [200.0, 192.1]


def test_cpu_seconds_are_read_for_a_process_and_its_descendants():
    from shared.bench.host import cpu_s
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\ntime.sleep(30)"])
    try:
        own_before, _ = cpu_s(os.getpid())
        sum(i * i for i in range(2_000_000))  # this process's own CPU
        deadline = 50
        while cpu_s(os.getpid())[1] < 0.3 and deadline:  # the child's busy loop shows among the descendants
            deadline -= 1
            subprocess.run(["sleep", "0.1"])
        own_after, descendants = cpu_s(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert own_after > own_before
    assert descendants >= 0.3
    assert cpu_s(child.pid) is None  # gone


def test_rss_counts_a_process_and_its_children_and_a_known_family_is_read_again_only_when_stale():
    """A worker's RSS includes its decode processes; the bench reads who they are at most every FAMILY_TTL_S,
    since finding them reads every process on the machine, and RSS is read at every poll."""
    from shared.bench.end_to_end import BenchWorkers
    from shared.bench.host import rss_mb
    child = subprocess.Popen([sys.executable, "-c", "import time\nb = bytearray(200 << 20)\n"
                              "print(flush=True)\ntime.sleep(30)"], stdout=subprocess.PIPE)
    worker = subprocess.Popen(["sleep", "30"])  # a worker with no decode process of its own
    workers = BenchWorkers.__new__(BenchWorkers)
    workers.procs, workers._family, workers._family_read_at = [worker], [], None
    try:
        child.stdout.readline()  # its 200 MB are touched
        alone = rss_mb(os.getpid(), members=[])
        assert rss_mb(os.getpid()) - alone >= 190  # this process's children found in /proc
        assert rss_mb(os.getpid(), members=[child.pid]) - alone >= 190
        assert workers._families() == [[]] and workers.rss_mb() < 50
        workers._family = [[child.pid]]  # as if read a moment ago: used as it is
        assert workers.rss_mb() >= 190
        workers._family_read_at -= BenchWorkers.FAMILY_TTL_S  # stale: read again
        assert workers.rss_mb() < 50
    finally:
        for proc in (child, worker):
            proc.kill()
            proc.wait()
    assert rss_mb(os.getpid(), members=[child.pid]) - rss_mb(os.getpid(), members=[]) < 5  # gone: counts as none


def test_worker_cpu_per_photo_is_the_difference_over_the_run():
    from shared.bench.end_to_end import _cpu_per_img
    assert _cpu_per_img((10.0, 100.0), (12.0, 108.0), 1000) == {"main": 2.0, "pool": 8.0}
    assert _cpu_per_img(None, (12.0, 108.0), 1000) is None  # the worker was gone



def test_the_gpu_decode_stage_runs_the_workers_split_loading(tmp_path):
    """The CUDA bench's decode stage, run here with torchvision's decoder on the CPU: every photo decoded,
    the share asked for taken by the device, both sides' rates learnt as the worker learns them."""
    from shared.bench.stages import gpu_decode_stage
    from shared.device_decode import DeviceJpegDecoder
    paths = generated_images(tmp_path / "bench", "2mp", 3)
    photos = [paths[i % 3] for i in range(24)]
    decoder = DeviceJpegDecoder.torchvision("cpu")
    result = gpu_decode_stage(decoder, photos, (tmp_path / "bench" / "2mp").resolve(), 64, batch=8)
    assert result["img_s"] > 0
    assert 0 < result["device_share"] < 1  # the split starts even and keeps both sides busy
    assert set(result["split_rates"]) == {"device", "cpu"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])])
def test_the_model_stage_runs_its_batches_as_the_worker_does(tmp_path, device):
    """Two batches at once, as a CUDA worker runs them: every batch counted once, the forwards taking turns
    (never two in the model at once), the embeddings the model gives one batch at a time, and every thread
    that runs a measured batch warmed up first (cuDNN keeps its algorithm timings per thread)."""
    from shared.bench.stages import model_stage
    from shared.embedder import Embedder
    from shared.modelinit import init_model
    path = tmp_path / "m.pt"
    init_model(path, backbone="tiny", dim=32, size=32, version="bench_v1", calibrate=None)
    embedder = Embedder(path, device)
    inside, most_inside, embedded, threads = 0, 0, [], []
    forward = embedder.embed

    def counted(pixels):
        nonlocal inside, most_inside
        inside += 1
        most_inside = max(most_inside, inside)
        time.sleep(0.01)  # long enough for the other thread to try to come in
        threads.append(threading.get_ident())
        try:
            embedded.append(forward(pixels))
            return embedded[-1]
        finally:
            inside -= 1

    embedder.embed = counted
    result = model_stage(embedder, 8, 8 * 12, in_flight=2)
    assert result["batches"] == 12 and result["in_flight"] == 2 and result["img_s"] > 0
    assert len(embedded) == 2 * 2 + 12  # two warm-up rounds, a batch on each thread, then the measured ones
    assert len(set(threads[:2])) == 2 and set(threads[4:]) <= set(threads[:2])
    assert len(result["warm_up_s"]) == 2 and min(result["warm_up_s"]) > 0.02  # two batches of 10 ms each
    assert most_inside == 1
    one_at_a_time = forward(np.stack(list(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8))))
    for embeddings in embedded:  # L2-normalised: cosines of 1
        assert (embeddings * one_at_a_time).sum(axis=1).min() > 0.9999


def test_the_bench_package_gives_its_names_on_first_use():
    """shared.bench's names, imported from their modules on first use (device_wheels --check must run without
    the bench's dependencies), are the modules' own, and a name it lacks is an AttributeError."""
    import shared.bench
    from shared.bench import SEARCH_SCALE_SIZES, BenchConfig, run_bench, run_search_scale
    from shared.bench import config, run, search_scale
    assert (BenchConfig, run_bench) == (config.BenchConfig, run.run_bench)
    assert (SEARCH_SCALE_SIZES, run_search_scale) == (search_scale.SEARCH_SCALE_SIZES, search_scale.run_search_scale)
    assert set(shared.bench.__all__) <= set(dir(shared.bench))
    with pytest.raises(AttributeError, match="no_such_name"):
        shared.bench.no_such_name  # noqa: B018


class FakeStream:
    """A CUDA stream without a GPU: what is queued on it is done at a given time."""

    def __init__(self) -> None:
        self.done_at = 0.0

    def queue(self, seconds: float) -> None:
        self.done_at = max(self.done_at, time.perf_counter()) + seconds

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.done_at - time.perf_counter()))


class FakeCuda:
    """CUDA's waits: a stream's synchronize waits for its own work, torch.cuda.synchronize for every stream's."""

    def __init__(self) -> None:
        self.default = FakeStream()
        self.streams = [self.default]
        self.current = threading.local()

    def Stream(self) -> FakeStream:  # noqa: N802 (torch's name)
        self.streams.append(FakeStream())
        return self.streams[-1]

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        before = self.current_stream()
        self.current.stream = stream
        try:
            yield
        finally:
            self.current.stream = before

    def current_stream(self) -> FakeStream:
        return getattr(self.current, "stream", self.default)

    def synchronize(self) -> None:
        for stream in list(self.streams):
            stream.synchronize()


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # bf16 autocast on the CPU here
def test_the_concurrent_model_figure_does_not_wait_for_the_decode_threads_stream(tmp_path, monkeypatch):
    """`concurrent.model_img_s` is the forward's rate while the GPU decodes in a thread on its own stream: a
    forward that waited for every stream would count the decoder's time as the model's."""
    from shared.bench.stages import overlap_figures
    from shared.modelinit import init_model
    cuda = FakeCuda()
    for name in ("Stream", "stream", "current_stream", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    path = tmp_path / "m.pt"
    init_model(path, backbone="tiny", dim=32, size=32, version="bench_v1", calibrate=None)

    class Decoder:
        def __init__(self, seconds_per_chunk: float) -> None:
            self.seconds = seconds_per_chunk

        def decode(self, chunk, size):
            cuda.current_stream().queue(self.seconds)
            return [], []

    unhindered = overlap_figures(Decoder(0.0), [b"jpeg"] * 64, path, "cpu", 8, seconds=1.0)
    busy = overlap_figures(Decoder(0.05), [b"jpeg"] * 64, path, "cpu", 8, seconds=1.0)  # 50 ms a chunk of 64
    assert 0 < busy["decode_img_s"] <= 64 / 0.05 * 1.1
    assert busy["model_img_s"] > 0.5 * unhindered["model_img_s"], (unhindered, busy)


@pytest.mark.parametrize("spill_to", ["arena", "files", "off"])
def test_the_handover_stage_takes_pixels_and_jpegs_from_the_workers_pool(tmp_path, monkeypatch, spill_to):
    """The worker's CPU for taking its pool's results, through the arena, files in shared memory or the pipe:
    every photo loaded each way, and no file left behind."""
    from shared.bench.stages import handover_stage
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    monkeypatch.setenv("LANDMARKS_DECODE_SPILL_DIR", str(spill_dir) if spill_to != "off" else "off")
    monkeypatch.setenv("LANDMARKS_DECODE_ARENA_MB", "64" if spill_to == "arena" else "0")
    paths = generated_images(tmp_path / "bench", "2mp", 3)
    result = handover_stage(paths, (tmp_path / "bench" / "2mp").resolve(), 224, batch=8, photos=16)
    assert result["spill_dir"] == (str(spill_dir) if spill_to != "off" else None)
    assert result["arena_mb"] == (64 if spill_to == "arena" else 0)
    assert result["pixels_cpu_ms_per_img"] > 0 and result["jpeg_cpu_ms_per_img"] > 0
    assert list(spill_dir.iterdir()) == []


@pytest.mark.integration
def test_search_scale_measures_the_replica_and_milvus_and_skips_an_insert_past_the_cap():
    from shared.bench import BenchConfig, run_search_scale
    result = run_search_scale(BenchConfig(embedding_dim=16), sizes=(2_000, 4_000), milvus_cap_s=1e-3)
    small, large = result["results"]
    assert (small["centroids"], large["centroids"], result["dim"]) == (2_000, 4_000, 16)
    for row in (small, large):
        assert row["local_global_ms"] > 0 and row["local_geo_ms"] > 0 and row["local_global_scratch_mb"] > 0
        assert row["local_squares_ms"] > 0 and row["local_squares_img_s"] > 0
    assert small["milvus_global_ms"] > 0 and small["milvus_insert_s"] >= 0
    # The first insert measured the rate; 4,000 rows at that rate would pass the 1 ms cap.
    assert large["milvus"].startswith("skipped") and "milvus_global_ms" not in large
    assert result["notes"] == [f"4,000: milvus-lite not measured, {large['milvus']}"]


def _bench_databases(server_url: str) -> set[str]:
    import sqlalchemy as sa
    from shared.db.session import make_engine
    engine = make_engine(server_url)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(sa.text("SELECT datname FROM pg_database WHERE datname LIKE 'lm_bench_%'")))
    finally:
        engine.dispose()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_a_terminated_bench_stops_its_milvus_and_worker_and_drops_its_database(pg_server_url, broker_url, tmp_path):
    """`kill` (or a CI timeout) mid-run: the bench's own servers, processes and scratch database go with it."""
    import time
    from shared.bench.host import descendants
    before = _bench_databases(pg_server_url)
    env = _bench_env(pg_server_url, broker_url, tmp_path / "home")
    bench = subprocess.Popen([sys.executable, "-m", "shared.bench_cli", "bench", "--json", "--quick", "--device",
                              "cpu", "--size", "2mp", "--load-only", "--images", "4000"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until its milvus-lite and its worker both run
            children = {pid: _cmdline(pid) for pid in descendants(bench.pid)}
            if any("milvus_lite" in c for c in children.values()) and \
                    any("shared.cli" in c and "worker" in c for c in children.values()):
                break
            assert bench.poll() is None, "the bench ended before its worker started"
            time.sleep(0.5)
        else:
            pytest.fail("the bench's milvus-lite and worker did not start within 300 s")
        assert _bench_databases(pg_server_url) - before  # its scratch database exists
        bench.terminate()
        assert bench.wait(timeout=120) == 128 + 15
    finally:
        if bench.poll() is None:
            bench.kill()
    time.sleep(1)
    alive = [pid for pid in children if _cmdline(pid)]
    assert alive == [], f"left running: {[children[p] for p in alive]}"
    assert _bench_databases(pg_server_url) == before


def test_the_search_scale_prints_a_row_per_gallery_size():
    from rich.console import Console
    from shared.bench_cli import search_scale_table
    result = {"mode": "search_scale", "dim": 128, "batch": 64, "results": [
        {"centroids": 10000, "local_global_ms": 2.41, "local_global_img_s": 26540.6, "local_geo_ms": 0.68,
         "local_geo_img_s": 94442.5, "local_squares_ms": 0.31, "local_squares_img_s": 206451.6,
         "local_global_scratch_mb": 3.3, "milvus_insert_s": 2.3,
         "milvus_global_ms": 47.98, "milvus_global_img_s": 1333.8, "milvus_geo_ms": 514.69,
         "milvus_geo_img_s": 124.3},
        {"centroids": 1000000, "local_global_ms": 153.48, "local_global_img_s": 417.0, "local_geo_ms": 1.0,
         "local_geo_img_s": 63941.9, "local_global_scratch_mb": 18.7, "milvus": "skipped: ..."}]}
    console = Console(record=True, width=200)
    console.print(search_scale_table(result))
    lines = console.export_text().splitlines()
    small = next(line for line in lines if "10,000" in line)
    large = next(line for line in lines if "1,000,000" in line)
    assert "2.41 (26,540.6)" in small and "47.98 (1,333.8)" in small and "3.3" in small
    assert "0.31 (206,451.6)" in small
    assert "153.48 (417.0)" in large and "skipped (cap)" in large
