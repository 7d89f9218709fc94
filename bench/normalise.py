"""The model input's normalisation alone: CPU per batch for the worker's form (shared/embedder.normalised_photos,
one multiply-add over the batch as the decode pool lays it out, with constants the size of a photo) against
per-channel constants broadcast over the permuted batch (the form the worker used until the thirty-first
session, and the one training still uses on its own batches).

    .venv/bin/python bench/normalise.py            # 64 photos of 96 px (the CPU worker), 256 of 224 (CUDA's)

One torch thread, as the CPU worker runs its forward; best and median of --repeats rounds, CPU ms per batch,
and the largest difference between the two results. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from shared.embedder import normalised_photos, photo_constants
from shared.model import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def per_channel(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.permute(0, 3, 1, 2).float() - MEAN) / STD


def cpu_ms(fn, pixels: torch.Tensor, repeats: int) -> tuple[float, float]:
    fn(pixels)  # allocator warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn(pixels)
        times.append((time.process_time() - start) * 1000)
    return round(min(times), 3), round(statistics.median(times), 3)


def measure(photos: int, side: int, repeats: int) -> dict:
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (photos, side, side, 3), dtype=np.uint8))
    constants = photo_constants(MEAN, STD, side, side)
    served = lambda batch: normalised_photos(batch, *constants)  # noqa: E731
    best, median = cpu_ms(served, pixels, repeats)
    old_best, old_median = cpu_ms(per_channel, pixels, repeats)
    difference = float((served(pixels) - per_channel(pixels)).abs().max())
    return {"photos": photos, "side": side, "served_ms": best, "served_ms_median": median,
            "per_channel_ms": old_best, "per_channel_ms_median": old_median,
            "per_channel_over_served": round(old_best / best, 1), "max_abs_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps({"torch_threads": 1, "batches": [measure(64, 96, args.repeats),
                                                      measure(256, 224, max(3, args.repeats // 5))]}))


if __name__ == "__main__":
    main()
