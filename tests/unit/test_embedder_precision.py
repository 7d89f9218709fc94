"""LANDMARKS_PRECISION: the forward in bf16 where the hardware computes it (CUDA; a CPU with AVX512-BF16 or
AMX, where it takes about 40 % less CPU than fp32), in fp32 elsewhere; bf16 embeddings are fp32's to
within a rounding a recognition threshold does not notice."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from pydantic import ValidationError

from shared import embedder as embedder_module
from shared.embedder import Embedder, cpu_computes_bf16
from shared.imaging import decode_image
from shared.modelinit import init_model
from shared.settings import Settings
from shared.synthetic import write_photo_set


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    return write_photo_set(tmp_path_factory.mktemp("photos"), n_landmarks=6, photos_per_landmark=8, n_everyday=16)


@pytest.fixture(scope="module")
def served_cpu_model(tmp_path_factory, photo_set):
    """The CPU build's served backbone, its batch norms set from photos as a trained model's are."""
    path = tmp_path_factory.mktemp("model") / "m.pt"
    init_model(path, backbone="resnet_small", dim=128, size=96, version="precision_v1", calibrate=photo_set[0])
    return path


def _photos(photo_set) -> np.ndarray:
    landmarks, _, everyday = photo_set
    files = sorted(landmarks.rglob("*.jpg")) + sorted(everyday.glob("*.jpg"))
    return np.stack([decode_image(f.read_bytes(), size=96, max_pixels=10**8).pixels for f in files])


def test_bf16_embeddings_point_where_the_fp32_ones_do(served_cpu_model, photo_set):
    photos = _photos(photo_set)
    full = Embedder(served_cpu_model, "cpu", precision="fp32").embed(photos)
    half = Embedder(served_cpu_model, "cpu", precision="bf16").embed(photos)
    cosines = (full * half).sum(axis=1)
    assert cosines.min() > 0.998
    # Still the same photo's nearest neighbour among the others.
    assert ((full @ full.T).argsort(axis=1)[:, -2] == (half @ full.T).argsort(axis=1)[:, -2]).mean() >= 0.95


@pytest.mark.parametrize("in_hardware", [True, False])
def test_auto_serves_bf16_on_a_cpu_only_when_it_computes_bf16_itself(served_cpu_model, monkeypatch, caplog,
                                                                      in_hardware):
    monkeypatch.setattr(embedder_module, "cpu_computes_bf16", lambda: in_hardware)
    served = Embedder(served_cpu_model, "cpu", precision="auto")
    with caplog.at_level(logging.INFO, logger="shared.embedder"):
        served.load()
    assert served.bf16 is in_hardware
    assert any(f"on cpu, {'bf16' if in_hardware else 'fp32'}" in r.getMessage() for r in caplog.records)
    asked = Embedder(served_cpu_model, "cpu", precision="fp32")
    asked.load()
    assert asked.bf16 is False  # an operator's fp32 stands whatever the CPU


def test_this_machine_s_answer_matches_its_cpu_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags here")
    assert cpu_computes_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_an_unknown_precision_is_refused_before_any_photo():
    with pytest.raises(ValidationError):
        Settings(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        Embedder("unused.pt", "cpu", precision="half")

