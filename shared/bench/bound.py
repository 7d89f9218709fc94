"""The physical bound: each stage's rate on its resource; stages on one resource combine as 1/Σ(1/x)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from shared.device_decode import DeviceJpegDecoder

STAGES = ("decode", "model", "search", "write")


def combined_rate(rates: Iterable[float]) -> float:
    """Throughput of stages that take turns on one resource: 1 / Σ(1/x)."""
    rates = list(rates)
    if not rates:
        raise ValueError("no rates to combine")
    if any(r <= 0 for r in rates):
        return 0.0
    return 1.0 / sum(1.0 / r for r in rates)


def throughput_bound(stages: Mapping[str, float], resources: Mapping[str, str]) -> tuple[float, str]:
    """The slowest resource's throughput, each resource running its stages in turn; and its name."""
    groups: dict[str, list[float]] = {}
    for stage, rate in stages.items():
        groups.setdefault(resources[stage], []).append(rate)
    per_resource = {resource: combined_rate(rates) for resource, rates in groups.items()}
    limiting = min(per_resource, key=per_resource.__getitem__)
    return per_resource[limiting], limiting


def stage_resources(device: str, decoder: str, search_in_process: bool = False) -> dict[str, str]:
    """Which resource each stage occupies. The search runs in the worker's replica on the cores, or in the
    Milvus server; the write in PostgreSQL; the CPU pool decodes on the cores, the hardware JPEG engine
    (nvImageCodec HW) is its own unit, while torchvision's nvJPEG runs on the GPU's SMs next to the model."""
    model = "gpu" if device.startswith("cuda") else "cpu"
    decode = "cpu" if decoder == "pillow" else DeviceJpegDecoder.UNITS[decoder]
    return {"decode": decode, "model": model, "search": "cpu" if search_in_process else "milvus",
            "write": "postgres"}
