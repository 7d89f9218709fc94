"""On CUDA, a worker's model runs at a few batch sizes only (shared/embedder.batch_shapes): cuDNN times its
algorithms anew for each size it meets, and batches that close on the clock have any size. Padding a batch
to the next of those sizes leaves each photo's embedding as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.embedder import batch_shapes, padded
from shared.model import load_checkpoint
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
