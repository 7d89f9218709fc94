"""One settings object per process, read from LANDMARKS_* environment variables."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Milvus refuses a search limit above this (shared/index.py checks it): a larger top-k would fail every
# photo's search instead of the worker's start. Here, not in shared/index.py, which imports pymilvus.
MILVUS_MAX_TOP_K = 16384


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LANDMARKS_", extra="ignore")

    # Where the embedded stack keeps its data; also the default place for models.
    home: Path = Path(".landmarks")

    # Unset means "use the embedded stack under `home`".
    database_url: SecretStr | None = None
    broker_url: SecretStr | None = None
    milvus_uri: str | None = None
    milvus_token: SecretStr | None = None

    # The recognition model used by workers (a checkpoint written by `landmarks build`).
    model_path: Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Compile the model with torch.compile as the worker starts (minutes for WRN-50-2; done before the worker
    # takes a batch), for the served batch size (smaller batches are padded to it). Meant for CUDA; on the
    # CPU it needs a C compiler.
    torch_compile: bool = False
    # The forward's number format (shared/embedder.py): "auto" is bf16 on CUDA and on a CPU with bf16 in
    # hardware (AVX512-BF16 or AMX: about 40 % less CPU per photo), fp32 on other CPUs, which emulate bf16
    # more slowly than fp32 runs. On the small world's test, bf16 changed no decision (BENCHMARKS.md).
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    # Batching: a batch closes at `batch_size` events, or once its first event has waited `max_wait_ms`
    # (checked every `max_wait_ms`: at 0, kombu would never run that check, and partial batches never close).
    batch_size: int = Field(64, ge=1, le=4096)
    max_wait_ms: int = Field(50, ge=1)
    queue: str = "landmarks"
    # Longer than the worst batch, or Redis redelivers a batch that is still running. The worker sends
    # every event it holds back (a fetch tried again later, a batch handed back) due within half of it.
    visibility_timeout_s: int = Field(3600, ge=10)
    # Batches one worker works on at once (a thread each): with 2, the next batch is fetched and decoded
    # while this one is in the model, searched and written (a GPU runs one batch's forward at a time, a CPU as
    # many as its cores hold: shared/runtime.py ForwardTurns). Safe because workers/broker.py takes a message
    # and records it as unacknowledged in one step.
    batches_in_flight: int = Field(2, ge=1, le=8)
    # Worker processes `landmarks worker` runs on its device, under one supervisor (workers/supervisor.py):
    # 2 when one process's own Python limits a GPU's throughput (BENCHMARKS.md, worker_cpu_ms_per_img.main).
    worker_processes: int = Field(1, ge=1, le=16)
    # CPU threads of a worker (shared/runtime.configure_threads): torch intra-op (0 = chosen by what the model's
    # forward costs on this CPU: every core for a heavy one, else one per 4 cores; shared/runtime.forward_threads)
    # and numpy's BLAS (0 = leave as is), whose spinning idle threads otherwise eat into the decode pool.
    torch_threads: int = Field(0, ge=0, le=256)
    blas_threads: int = Field(1, ge=0, le=256)

    # Fetching: file:// only below these roots (colon-separated), size and time limits.
    file_roots: str = ""
    fetch_max_bytes: int = Field(50 * 1024 * 1024, ge=1)
    fetch_timeout_s: float = Field(15.0, gt=0, allow_inf_nan=False)
    # http(s) hosts that resolve to loopback, link-local (cloud metadata), private, multicast or reserved
    # addresses are refused (SSRF); allow them all, or only these comma-separated networks (CIDRs).
    fetch_allow_private: bool = False
    fetch_allowed_networks: str = ""
    # A fetch the storage may answer later (refused or reset connection, timeout, HTTP 429/5xx) is tried
    # again this many times, the first after fetch_retry_delay_s and each later one after twice as long
    # (30 s: 15.5 min in all), before the photo is recorded as failed.
    fetch_retries: int = Field(5, ge=0, le=20)
    fetch_retry_delay_s: float = Field(30.0, ge=0, le=3600)
    # Decoding: in a pool of processes (default; see shared/loading.py) or threads, of this many workers
    # (0 = one per CPU this process may use: its affinity, at most its cgroup's CPU limit, shared/cpus.py).
    # Images with more pixels than max_image_pixels are refused as decompression bombs.
    decode_pool: Literal["processes", "threads"] = "processes"
    decode_workers: int = Field(0, ge=0, le=256)
    max_image_pixels: int = Field(100_000_000, ge=1)
    # Where decode processes leave their large results for the worker (shared/spill.py): "auto" is /dev/shm
    # when writable; "off" sends everything through the pool's pipe (1.3–2.2 µs of the worker's CPU per KB).
    decode_spill_dir: str = "auto"
    # The arena there that decode processes write into, its pages reused (shared/arena.py), in MB: unset is
    # half the directory's filesystem, at most 2048; 0 writes a file per chunk (about 1 ms of the worker's
    # CPU more per 12 MP JPEG, BENCHMARKS.md). Memory is charged only as the busiest moment fills it, and kept.
    decode_arena_mb: int | None = Field(None, ge=0)
    # On CUDA, baseline JPEGs are decoded on the GPU when a decoder loads (shared/device_decode.py): "auto"
    # uses it when present, "off" keeps every decode in the CPU pool.
    device_decode: Literal["auto", "off"] = "auto"
    # The share of a batch's photos sent to the device decoder; the CPU pool decodes the others at the same
    # time. Unset: learnt from the batches, so that both sides finish together (shared/device_decode.py).
    device_decode_share: float | None = Field(None, ge=0, le=1)

    # Search: how many centroids to take without GPS, and the tile-filter limit with GPS when Milvus is
    # searched (the in-process replica finds each photo's best centroid in its square exactly).
    global_top_k: int = Field(10, ge=1, le=MILVUS_MAX_TOP_K)
    geo_top_k: int = Field(256, ge=1, le=MILVUS_MAX_TOP_K)
    # Workers search an in-process exact copy of the active version when it has at most this many
    # centroids (~0.5 KB each at dim 128, 2 KB at 512); 0 = always search Milvus.
    search_replica_max_centroids: int = Field(2_000_000, ge=0)

    # HMAC-SHA256 key shared with the upload pipeline: when set, workers refuse unsigned or forged events.
    # Give it inline or as a file (a mounted secret); the previous key still verifies during a rotation.
    event_signing_key: SecretStr | None = None
    event_signing_key_file: Path | None = None
    event_signing_previous_key: SecretStr | None = None

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        # A typo (gpu, cuda0) would otherwise start a worker that reports ready and never loads a model.
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"{value!r} is not a device: auto, cpu, cuda or cuda:N")
        return value

    @field_validator("fetch_allowed_networks")
    @classmethod
    def _valid_networks(cls, value: str) -> str:
        parse_networks(value)  # a typo fails at start-up, not as a failure on every photo
        return value

    @property
    def fetch_allowed_ip_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return parse_networks(self.fetch_allowed_networks)

    @property
    def file_root_paths(self) -> tuple[Path, ...]:
        return resolved_roots(self.file_roots)

    @property
    def home_path(self) -> Path:
        return self.home.expanduser().resolve()


def parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in text.split(",") if item.strip())


@lru_cache(maxsize=16)
def resolved_roots(text: str) -> tuple[Path, ...]:
    """The file roots with symlinks resolved, once per process: every file:// fetch checks against them,
    and resolving them each time cost a tenth of a decode thread's time."""
    return tuple(Path(p).resolve() for p in text.split(":") if p.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
