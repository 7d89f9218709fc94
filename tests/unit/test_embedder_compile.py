"""LANDMARKS_TORCH_COMPILE: the worker's model compiled at load (before the first batch), giving the
eager model's embeddings for batches smaller than, equal to and larger than the compiled batch size."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from shared.embedder import Embedder
from shared.modelinit import init_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                 reason="torch.compile on the CPU needs a C compiler")]


# bf16 rounds each layer's output to 8 bits of mantissa, and the compiled model fuses layers the eager one
# rounds between: about 4e-4 apart in an embedding's components.
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("bf16", 3e-3)])
def test_a_compiled_model_embeds_as_the_eager_one_for_every_batch_size(tmp_path, caplog, precision, atol):
    init_model(tmp_path / "m.pt", backbone="tiny", dim=32, size=64, version="compiled_v1", calibrate=None)
    eager = Embedder(tmp_path / "m.pt", "cpu", precision=precision)
    compiled = Embedder(tmp_path / "m.pt", "cpu", batch_size=4, compile_model=True, precision=precision)
    with caplog.at_level(logging.INFO, logger="shared.embedder"):
        compiled.load()
    assert any("compiled the model for batches of 4" in r.getMessage() for r in caplog.records)
    pixels = np.random.default_rng(0).integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)
    for n in (1, 4, 9):  # padded, as compiled, split into 4 + 4 + 1
        got, want = compiled.embed(pixels[:n]), eager.embed(pixels[:n])
        assert got.shape == want.shape == (n, 32)
        np.testing.assert_allclose(got, want, atol=atol)
