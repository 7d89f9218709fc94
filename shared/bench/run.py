"""One bench run: the inputs, each stage alone, the worker end to end, and the JSON that compares them
(`landmarks bench --json`)."""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from shared.bench.bound import STAGES, combined_rate, stage_resources, throughput_bound
from shared.bench.config import BenchConfig, NullReporter, Reporter
from shared.bench.end_to_end import E2EPlan, bench_event, run_end_to_end
from shared.bench.gallery import BenchModel, event_gps, make_bench_model
from shared.bench.host import CpuAccount, host_info, torch_threads, whole_machine_threads
from shared.bench.inputs import BenchInputs, bench_inputs, realdata_dir
from shared.bench.services import bench_queues, private_milvus, scratch_database, service_urls
from shared.bench.stages import (decode_cost_by_format, decode_stage, delf_vs_ours, device_model_figures,
                                 gpu_decode_stage, handover_stage, model_stage, overlap_figures, search_stage,
                                 write_stage)
from shared.device_decode import DeviceJpegDecoder

MILVUS_SAMPLE_S = 30.0  # milvus-lite's search, when the worker does not use it: measured for this long


def worker_device_decoder(cfg: BenchConfig) -> DeviceJpegDecoder | None:
    """The device decoder the worker will detect (shared/pipeline.py), unless LANDMARKS_DEVICE_DECODE=off."""
    from shared.settings import get_settings
    if not cfg.cuda or get_settings().device_decode != "auto":
        return None
    return DeviceJpegDecoder.detect(cfg.device)


def decode_alone(cfg: BenchConfig, inputs: BenchInputs, count: int, gpu_decoder: DeviceJpegDecoder | None,
                 reporter: Reporter) -> dict:
    """The decode stage alone over the first ``count`` photos, with the worker's decoder: {decoder, img_s, ...}."""
    blobs = inputs.blobs[:count]
    if gpu_decoder is None:
        return {"decoder": "pillow", **decode_stage(blobs, cfg.input_size, reporter=reporter)}
    paths = [inputs.unique[i] for i in inputs.image_of_event[:count]]
    result = {"decoder": gpu_decoder.name, **gpu_decode_stage(gpu_decoder, paths, inputs.file_root, cfg.input_size,
                                                              batch=cfg.batch_size, reporter=reporter)}
    result["cpu_img_s"] = round(decode_stage(blobs[:min(len(blobs), 512)], cfg.input_size,
                                             reporter=reporter)["img_s"], 1)
    return result


def measure_stages(cfg: BenchConfig, inputs: BenchInputs, model: BenchModel, index, engine,
                   gps: Sequence[tuple[float, float] | None], reporter: Reporter) -> dict:
    """Each stage alone, on the resources the worker would use."""
    import torch
    from shared.embedder import Embedder
    from shared.local_index import LocalIndex
    from shared.publish import gallery_rows
    from shared.recognition import Thresholds
    from shared.settings import get_settings
    n = inputs.n
    gpu_decoder = worker_device_decoder(cfg)
    out: dict = {"decode": decode_alone(cfg, inputs, n, gpu_decoder, reporter)}
    out["decode_by_format"] = decode_cost_by_format(inputs.unique_blobs, cfg.input_size)
    out["handover"] = handover_stage(inputs.unique, inputs.file_root, cfg.input_size, batch=cfg.batch_size,
                                     photos=min(n, 512), reporter=reporter)
    embedder = Embedder(model.path, cfg.device, batch_size=cfg.batch_size)  # as the worker loads it
    embedder.load()
    # On CUDA, as many batches at once as the worker runs: their copies to the device overlap the forwards.
    in_flight = get_settings().batches_in_flight if cfg.cuda else 1
    with whole_machine_threads() as threads:
        out["model"] = model_stage(embedder, cfg.batch_size, n, reporter=reporter, in_flight=in_flight)
        out["model"]["torch_threads"] = threads
    if not cfg.cuda:  # the worker's own thread count: the CPU its forward really costs (model_rate_for_bound)
        out["model_served"] = served_model_stage(embedder, cfg, out["model"], min(n, 2048), reporter)
    queries = model.image_embeddings[inputs.image_of_event]
    thresholds = Thresholds(model.meta.t_geo, model.meta.t_global, model.meta.t_ref)
    # Where the worker searches its replica, milvus-lite's rate is for comparison only: a sample will do.
    out["search"] = search_stage(index, model.version, queries, gps, thresholds, cfg.batch_size,
                                 what="milvus-lite (the worker's index)", reporter=reporter,
                                 budget_s=MILVUS_SAMPLE_S if _searches_in_process(cfg) else None)
    # As the worker keeps it: its global search on the GPU when there is one.
    local = LocalIndex(model.version, *gallery_rows(model.gallery), device=cfg.device if cfg.cuda else None)
    out["search_local"] = search_stage(local, model.version, queries, gps, thresholds, cfg.batch_size,
                                       what=f"exact in-process LocalIndex ({local.device})", reporter=reporter)
    out["write"] = write_stage(engine, model.version, n, cfg.batch_size, sorted(model.places), reporter=reporter)
    if cfg.cuda:
        out["device_figures"] = device_model_figures(model.path, cfg.device, cfg.batch_size,
                                                     compile_model=cfg.compile, reporter=reporter)
        if gpu_decoder is not None:
            reporter.start("GPU decode and model together (6 s)")
            out["device_figures"]["concurrent"] = overlap_figures(
                gpu_decoder, inputs.unique_blobs, model.path, cfg.device, cfg.batch_size)
    del embedder, gpu_decoder, local
    gc.collect()
    if cfg.cuda:
        torch.cuda.empty_cache()  # the worker gets the card to itself
    return out


def served_model_stage(embedder, cfg: BenchConfig, whole_machine: dict, n: int, reporter: Reporter) -> dict:
    """The forward on the torch threads the worker runs it on (shared/runtime.forward_threads: chosen by
    what it costs here, as the worker's warm-up does, unless LANDMARKS_TORCH_THREADS says)."""
    from shared.runtime import forward_threads
    from shared.settings import get_settings
    threads = forward_threads(embedder, get_settings().torch_threads)
    with torch_threads(threads):
        served = whole_machine if threads == whole_machine["torch_threads"] else \
            model_stage(embedder, cfg.batch_size, n, reporter=reporter)
    return {"torch_threads": threads, "img_s": round(served["img_s"], 1), "cpu_ms_per_img": served["cpu_ms_per_img"],
            "forward_cpu_ms_at_start": round(embedder.forward_cpu_ms(), 2)}


def _searches_in_process(cfg: BenchConfig) -> bool:
    """Whether the worker searches its in-process replica: the gallery fits
    (LANDMARKS_SEARCH_REPLICA_MAX_CENTROIDS)."""
    from shared.settings import get_settings
    return 0 < cfg.centroids <= get_settings().search_replica_max_centroids


def comparison_stage(cfg: BenchConfig, model: BenchModel, reporter: Reporter) -> dict:
    """The DELF comparison, run after the end-to-end part: its gigabytes of activations and its minute of
    work on every core slowed the worker that started right after it (the first tenth of the run)."""
    from shared.embedder import Embedder
    if not cfg.delf:
        return {"delf_style_ms": None, "ours_ms": None}
    embedder = Embedder(model.path, cfg.device)
    embedder.load()
    with whole_machine_threads():
        return delf_vs_ours(embedder, cfg.device, quick=cfg.quick, article_model=not cfg.quick, reporter=reporter)


def run_bench(cfg: BenchConfig, reporter: Reporter | None = None) -> dict:
    """One run: inputs, private services, a published model; each stage alone; the worker end to end."""
    import torch
    from shared.db.session import make_engine
    from shared.index import LandmarkIndex
    from shared.publish import publish_model
    from shared.settings import get_settings
    reporter = reporter or NullReporter()
    cfg = cfg.resolved()
    if cfg.cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    from shared.allocator import keep_freed_memory, malloc_arenas
    from shared.runtime import configure_threads
    settings = get_settings()
    threads = configure_threads(settings.torch_threads, settings.blas_threads)  # as the worker does
    freed_memory_kept = keep_freed_memory()  # as the worker does: the model stage then costs what it costs there
    started, account, host = time.monotonic(), CpuAccount(), host_info()
    host["threads"], host["batches_in_flight"] = threads, settings.batches_in_flight
    host["freed_memory_kept"], host["malloc_arenas"] = freed_memory_kept, malloc_arenas()
    inputs = bench_inputs(cfg, reporter)
    if inputs is None:
        return {"device": cfg.device, "size": cfg.size, "skipped": f"no real photos at {realdata_dir()}"}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lm-bench-")))
        database_server, broker_url = service_urls(settings)
        reporter.start("services: scratch database, private milvus-lite, bench queue")
        database_url = stack.enter_context(scratch_database(database_server))
        milvus_uri = stack.enter_context(private_milvus(workdir))
        queue, staging = stack.enter_context(bench_queues(broker_url))
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        index = LandmarkIndex(milvus_uri)
        stack.callback(index.close)

        model = make_bench_model(workdir / "model.pt", cfg, inputs.unique, reporter)
        reporter.start(f"publishing {cfg.centroids} centroids to milvus-lite")
        publish_model(model.path, engine, index)
        rng = np.random.default_rng(cfg.seed)
        gps = [event_gps(i, inputs.image_of_event[i], model, rng) for i in range(inputs.n)]
        stages = {} if cfg.load_only else measure_stages(cfg, inputs, model, index, engine, gps, reporter)

        run_id = uuid.uuid4().hex[:6]
        events = [bench_event(f"bench_e2e_{run_id}", i, inputs.unique[inputs.image_of_event[i]], gps[i])
                  for i in range(inputs.n)]
        warm_rng = np.random.default_rng(cfg.seed + 1)
        k = len(inputs.unique)
        warmup = [bench_event(f"bench_warm_{run_id}", i, inputs.unique[i % k], event_gps(i, i % k, model, warm_rng))
                  for i in range(2 * cfg.batch_size)]
        e2e = run_end_to_end(E2EPlan(database_url, broker_url, milvus_uri, queue, staging, inputs.file_root,
                                     events, warmup, cfg.batch_size, cfg.device, workdir, cfg.max_wait_ms,
                                     torch_compile=cfg.compile, stall_s=600.0 if cfg.compile else 180.0,
                                     poll_s=1.0 if cfg.load_only else 0.25, workers=cfg.workers), reporter)
        host["other_cpu_share"] = account.other_share()  # before the private milvus-lite stops
        if not cfg.load_only:
            # Decode is the stage that bounds a CPU run: measured again after the end-to-end part, so that a
            # machine whose speed drifts during the run (shared hosts do) is measured on both sides of it.
            stages["decode_after"] = decode_alone(cfg, inputs, max(1, inputs.n // 2), worker_device_decoder(cfg),
                                                  reporter)
            stages["comparison"] = comparison_stage(cfg, model, reporter)
    host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if cfg.load_only:
        return summarise_load(cfg, inputs, e2e, host, seconds=time.monotonic() - started)
    return summarise(cfg, inputs, stages, e2e, host, settings.max_wait_ms,
                     seconds=time.monotonic() - started)


def tenth_rates(series: Sequence[Sequence[float]]) -> list[float]:
    """Images/s within each step of an [events done, RSS MB, seconds] series. A last step of under half a
    tenth (the sample before it came just short of the end) is counted with the step before it: over a
    fraction of a second, the last two batches committing together read as several times the real rate
    (1,333.3 img/s against 179.5–214.6 for the other tenths, thirty-first session)."""
    points = list(series)
    if len(points) > 2 and points[-1][0] - points[-2][0] < points[-1][0] / 20:
        del points[-2]
    return [round((b[0] - a[0]) / (b[2] - a[2]), 1) for a, b in zip(points, points[1:]) if b[2] > a[2]]


def rss_growth_pct(series: Sequence[Sequence[float]]) -> float | None:
    """How far RSS moved while the events were processed: (largest - smallest) / smallest, in %, over the
    samples an [events done, RSS MB, seconds] series took during the run. Its first sample is left out: the
    worker was idle then, after its warm-up, without the buffers of the batches in flight that every
    later sample holds, so against it a flat run could read as growth."""
    rss = [mb for _, mb, _ in series[1:] if mb]
    return round(100 * (max(rss) - min(rss)) / min(rss), 1) if rss else None


def summarise_load(cfg: BenchConfig, inputs: BenchInputs, e2e: dict, host: dict, seconds: float) -> dict:
    """`--load-only`: did the backlog drain at a steady rate in flat memory?"""
    series = e2e["rss_mb_series"]
    rates = tenth_rates(series)
    # The first tenth includes the backlog appearing at once and the first batches' warm caches.
    steady = rates[1:] or rates
    mean = statistics.mean(steady) if steady else None
    return {
        "device": cfg.device, "size": cfg.size, "events": inputs.n,
        "e2e_img_s": round(e2e["e2e_img_s"], 1), "e2e_seconds": e2e["e2e_seconds"],
        "img_s_by_tenth": rates,
        "img_s_min_max_tenth": [min(steady), max(steady)] if steady else None,
        "img_s_cv": round(statistics.pstdev(steady) / mean, 3) if mean else None,
        "rss_mb_start": e2e["rss_mb_start"], "rss_mb_end": e2e["rss_mb_end"], "rss_mb_peak": e2e["rss_mb_peak"],
        "rss_mb_growth_pct": rss_growth_pct(series),
        "rss_mb_series": series, "e2e_batches": e2e["e2e_batches"], "e2e_mean_batch": e2e["e2e_mean_batch"],
        "worker_ms_per_img": e2e["worker_ms_per_img"], "worker_batches_busy": e2e["worker_batches_busy"],
        "worker_cpu_ms_per_img": e2e["worker_cpu_ms_per_img"],
        "worker_stage_cpu_ms_per_img": e2e["worker_stage_cpu_ms_per_img"],
        "e2e_cpu_ms_per_img_by_role": e2e["e2e_cpu_ms_per_img_by_role"], "e2e_workers": e2e["e2e_workers"],
        "e2e_batches_by_worker": e2e["e2e_batches_by_worker"],
        "worker_freed_memory_kept": e2e["worker_freed_memory_kept"],
        "worker_minor_faults_per_img": e2e["worker_minor_faults_per_img"],
        "model": f"random-init {cfg.backbone}, {cfg.input_size} px, dim {cfg.embedding_dim}, {cfg.precision}",
        "batch_size": cfg.batch_size, "centroids": cfg.centroids, "unique_inputs": len(inputs.unique),
        "file_mb_mean": inputs.file_mb_mean, "host": host, "seconds": round(seconds, 1),
    }


def model_rate_for_bound(stages: dict, cores: int) -> float:
    """The model's rate on the whole machine. On CPU, the better of every core's threads on one batch and
    the CPU time per image of the worker's own thread count spread over every core: the worker runs its
    forward on one thread beside the decode processes, and one thread spends less CPU per image than two
    that wait for each other at every layer. Measured on fewer threads only, the bound would be too low and
    the ratio too high."""
    return _better_of(stages["model"]["img_s"], stages.get("model_served", {}).get("cpu_ms_per_img"), cores)


def decode_rate_for_bound(decode: dict, cores: int) -> float:
    """The decode stage's rate on the whole machine. With Pillow, the better of the thread pool's rate and
    the CPU time per image spread over every core: the pool's threads pass the GIL between decodes and leave
    a core idle now and then, which the worker's decode processes do not, so measured by the pool's rate
    alone the bound would be too low and the ratio too high (by 0.04-0.06 in the twenty-fifth session)."""
    return _better_of(decode["img_s"], decode.get("cpu_ms_per_img") if decode["decoder"] == "pillow" else None, cores)


def _better_of(measured_img_s: float, cpu_ms_per_img: float | None, cores: int) -> float:
    """The rate measured, or every core spending ``cpu_ms_per_img`` on each image if that is faster."""
    return max(measured_img_s, cores * 1000.0 / cpu_ms_per_img) if cpu_ms_per_img else measured_img_s


def stage_cpu_share(e2e: dict, cores: int, forward_threads: int = 1) -> float | None:
    """On CPU: the share of the machine's cores that the bound's stages took while the end-to-end run went on,
    at what they cost there (the decode processes, the forward and the search of the batch threads); the
    rest went to the worker's other work, PostgreSQL, Redis and the host. Read in one window, it does not
    move with the machine's speed, which on a shared host drifts by a tenth between the stages measured
    alone and the end-to-end part that `ratio` compares. None when the forward runs on more than one torch
    thread: the batch thread's clock counts its own share of the forward only (it read 0.49 for a run at
    0.92 of its bound)."""
    cpu, laps = e2e.get("worker_cpu_ms_per_img"), e2e.get("worker_stage_cpu_ms_per_img")
    if not cpu or not laps or not e2e.get("e2e_img_s") or forward_threads > 1:
        return None
    stage_ms = cpu["pool"] + laps.get("embed", 0.0) + laps.get("search", 0.0)
    return round(stage_ms * e2e["e2e_img_s"] / (cores * 1000.0), 3)


def summarise(cfg: BenchConfig, inputs: BenchInputs, stages: dict, e2e: dict, host: dict,
              served_max_wait_ms: int, seconds: float) -> dict:
    """The JSON object: the contract keys first, then what explains them."""
    # The worker searches its in-process replica when the gallery fits (LANDMARKS_SEARCH_REPLICA_MAX_CENTROIDS).
    in_process = _searches_in_process(cfg)
    rates = {name: stages["search_local" if name == "search" and in_process else name]["img_s"] for name in STAGES}
    decode_measured = [stages[k] for k in ("decode", "decode_after") if k in stages]
    decode_runs = [decode_rate_for_bound(run, host["cpus"]) for run in decode_measured]
    rates["decode"] = statistics.mean(decode_runs)  # before and after the end-to-end part
    rates["model"] = model_rate_for_bound(stages, host["cpus"])
    decode = stages["decode"]
    resources = stage_resources(cfg.device, decode["decoder"], search_in_process=in_process)
    bound, limiting = throughput_bound(rates, resources)
    serial = combined_rate(rates.values())
    comparison = stages["comparison"]
    return {
        "device": cfg.device, "size": cfg.size, "images": inputs.n,
        "e2e_img_s": round(e2e["e2e_img_s"], 1), "bound_img_s": round(bound, 1),
        "ratio": round(e2e["e2e_img_s"] / bound, 3) if bound else None,
        "stages": {f"{name}_img_s": round(rate, 1) for name, rate in rates.items()},
        "rss_mb_start": e2e["rss_mb_start"], "rss_mb_end": e2e["rss_mb_end"],
        "rss_mb_growth_pct": rss_growth_pct(e2e["rss_mb_series"]),
        "delf_style_ms": comparison["delf_style_ms"], "ours_ms": comparison["ours_ms"],
        "model": f"random-init {cfg.backbone}, {cfg.input_size} px, dim {cfg.embedding_dim}, {cfg.precision}",
        "backbone": cfg.backbone, "batch_size": cfg.batch_size,
        "max_wait_ms": cfg.max_wait_ms if cfg.max_wait_ms is not None else served_max_wait_ms,
        "input_size": cfg.input_size, "embedding_dim": cfg.embedding_dim, "precision": cfg.precision,
        **({"warning": "e2e above the bound: a stage alone was measured slower than the worker runs it"}
           if bound and e2e["e2e_img_s"] > 1.05 * bound else {}),
        "model_stage_img_s": round(stages["model"]["img_s"], 1),
        "model_stage_threads": stages["model"].get("torch_threads"),
        "model_in_flight": stages["model"].get("in_flight"),
        "model_cpu_ms_per_img": stages["model"].get("cpu_ms_per_img"),
        # Two rounds of one batch per thread: on CUDA the first holds cuDNN's timing of the full batch.
        "model_warm_up_s": stages["model"].get("warm_up_s"),
        **({"model_served": stages["model_served"]} if "model_served" in stages else {}),
        "decoder": decode["decoder"], "resources": resources, "limiting_resource": limiting,
        **({"e2e_stage_cpu_share": stage_cpu_share(e2e, host["cpus"], stages["model_served"]["torch_threads"])}
           if not cfg.cuda else {}),
        "bound_serial_img_s": round(serial, 1),
        "ratio_serial": round(e2e["e2e_img_s"] / serial, 3) if serial else None,
        "search_local_img_s": round(stages["search_local"]["img_s"], 1),
        "search_milvus_img_s": round(stages["search"]["img_s"], 1), "search_in_process": in_process,
        "write_rows_s": round(stages["write"]["rows_s"], 1),
        "write_client_cpu_ms_per_img": stages["write"]["client_cpu_ms_per_img"],
        "centroids": cfg.centroids, "unique_inputs": len(inputs.unique), "file_mb_mean": inputs.file_mb_mean,
        "decode_failed": decode.get("failed", 0),
        "decode_img_s_before": round(decode_runs[0], 1), "decode_img_s_after": round(decode_runs[-1], 1),
        **({"decode_pool_img_s": [round(run["img_s"], 1) for run in decode_measured],
            "decode_cpu_ms_per_img": [run["cpu_ms_per_img"] for run in decode_measured]}
           if "cpu_ms_per_img" in decode else {}),
        **({"decode_cpu_img_s": decode["cpu_img_s"]} if "cpu_img_s" in decode else {}),
        "decode_cpu_ms_by_format": stages["decode_by_format"],
        "handover_cpu_ms_per_img": stages["handover"],
        **({"decode_device_share": decode["device_share"], "decode_split_rates": decode["split_rates"]}
           if "device_share" in decode else {}),
        **{k: v for k, v in comparison.items() if k not in ("delf_style_ms", "ours_ms")},
        **stages.get("device_figures", {}),
        **{k: v for k, v in e2e.items() if k not in ("e2e_img_s", "rss_mb_start", "rss_mb_end", "worker_log")},
        "search_tagged": stages["search_local" if in_process else "search"]["tagged"],
        "search_milvus_queries": stages["search"]["queries"], "quick": cfg.quick, "host": host,
        "seconds": round(seconds, 1),
    }
