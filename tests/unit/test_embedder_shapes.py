"""On CUDA, a worker's model runs at a few batch sizes only (shared/embedder.batch_shapes): cuDNN times its
algorithms anew for each size it meets, and batches that close on the clock have any size. Padding a batch
to the next of those sizes leaves each photo's embedding as it was. And a model file that is not a model, or
not the one published, is refused at load as an outage of the worker."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared import runtime
from shared.embedder import batch_shapes, padded
from shared.errors import InfrastructureError
from shared.model import CheckpointError, load_checkpoint
from shared.modelinit import init_model


def test_the_sizes_run_are_the_powers_of_two_to_32_then_every_32nd_and_the_served_one():
    assert batch_shapes(256) == (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256)
    assert batch_shapes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_shapes(100) == (1, 2, 4, 8, 16, 32, 64, 96, 100)
    assert batch_shapes(5) == (1, 2, 4, 5)
    assert batch_shapes(1) == (1,)


def test_batches_of_every_size_reach_the_model_at_those_sizes_only_and_each_row_stays_its_own():
    seen: set[int] = set()

    def forward(batch: torch.Tensor) -> torch.Tensor:
        seen.add(len(batch))
        return batch.flatten(1)[:, :2] * 2

    run = padded(forward, batch_shapes(256), torch.contiguous_format)
    for n in range(1, 600):
        batch = torch.arange(n * 3 * 2 * 2, dtype=torch.float32).view(n, 3, 2, 2)
        torch.testing.assert_close(run(batch), batch.flatten(1)[:, :2] * 2)  # split above 256
    assert seen == set(batch_shapes(256))


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.pt"
    init_model(path, backbone="tiny", dim=32, size=64, version="shapes_v1", calibrate=None)
    net, _, _ = load_checkpoint(path)
    return net.eval()


@torch.inference_mode()
def test_a_padded_batch_gives_each_photo_the_embedding_it_has_alone(tiny_net):
    photos = torch.from_numpy(np.random.default_rng(3).normal(size=(70, 3, 64, 64)).astype(np.float32))
    run = padded(tiny_net.embed, batch_shapes(32), torch.contiguous_format)
    alone = torch.cat([tiny_net.embed(photo[None]) for photo in photos])
    for n in (1, 3, 17, 32, 70):  # padded to 1, 4, 32; as it is; split into 32 + 32 + 8
        torch.testing.assert_close(run(photos[:n]), alone[:n], atol=1e-5, rtol=1e-4)


# --- a model file that is not one: an outage of the worker, never a failure of the photos ----------------------

def _broken_files(good: Path, folder: Path) -> dict[str, Path]:
    """What a model path can hold besides a model: an empty or truncated copy, random bytes, a Git LFS pointer
    that was never pulled, a checkpoint from a newer builder (an unknown metadata field), one without weights."""
    raw = good.read_bytes()
    payload = torch.load(good, weights_only=True)
    contents = {"empty": b"", "truncated": raw[: len(raw) // 2], "random": np.random.default_rng(0).bytes(5000),
                "lfs_pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"}
    files = {}
    for name, data in contents.items():
        files[name] = folder / f"{name}.pt"
        files[name].write_bytes(data)
    for name, changed in {"newer_builder": {**payload, "meta": {**payload["meta"], "new_field": 1}},
                          "no_weights": {k: v for k, v in payload.items() if k != "state_dict"}}.items():
        files[name] = folder / f"{name}.pt"
        torch.save(changed, files[name])
    return files


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("model_files")
    init_model(folder / "good.pt", backbone="tiny", dim=16, size=64, version="files_v1", calibrate=None)
    return {"good": folder / "good.pt", **_broken_files(folder / "good.pt", folder)}


BROKEN = ["empty", "truncated", "random", "lfs_pointer", "newer_builder", "no_weights"]


@pytest.mark.parametrize("name", BROKEN)
def test_a_file_that_is_not_a_model_checkpoint_says_so(model_files, name):
    with pytest.raises(CheckpointError, match="is not a readable landmarks model checkpoint"):
        load_checkpoint(model_files[name])


@dataclass
class _Row:
    """model_versions' row of files_v1, as published."""
    checkpoint: str
    backbone: str = "tiny"
    embedding_dim: int = 16
    t_geo: float = 0.5
    t_global: float = 0.8
    t_ref: float = 0.7


def _registered_as(monkeypatch, row: _Row) -> None:
    session = SimpleNamespace(get=lambda model, version: row if version == "files_v1" else None)
    monkeypatch.setattr(runtime, "transaction", lambda engine: nullcontext(session))


@pytest.mark.parametrize("name", BROKEN)
def test_a_worker_whose_model_file_is_not_a_model_hands_its_batches_back(model_files, name, monkeypatch):
    """An InfrastructureError is an outage of the worker: its batches are retried, then handed back
    (workers/tasks.py); anything else would record every photo of the batch as failed."""
    _registered_as(monkeypatch, _Row(str(model_files[name])))
    with pytest.raises(InfrastructureError, match=f"cannot load model files_v1 from .*{name}.pt"):
        runtime.load_model_runtime(None, "files_v1", "cpu")


def test_a_model_file_of_another_dimension_than_published_is_refused_at_load(model_files, monkeypatch):
    """Not as a search Milvus refuses for its dimension at the first batch, which reads as a Milvus outage."""
    _registered_as(monkeypatch, _Row(str(model_files["good"]), embedding_dim=512))
    with pytest.raises(InfrastructureError, match="tiny of dimension 16, but files_v1 was published as a tiny of "
                                                  "dimension 512"):
        runtime.load_model_runtime(None, "files_v1", "cpu")
    _registered_as(monkeypatch, _Row(str(model_files["good"])))
    assert runtime.load_model_runtime(None, "files_v1", "cpu").embedder.meta.embedding_dim == 16
