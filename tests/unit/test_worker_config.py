"""Configuration a worker reads from the environment, refused before anything starts: a bad metrics port or
liveness limit used to switch off /healthz, /readyz and /metrics while the worker consumed on (until the
orchestrator's probes restarted it, every ten minutes), and a bad setting ended in a traceback that named
the settings field instead of the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import health, metrics

REPO = Path(__file__).resolve().parents[2]


def test_metrics_port_values():
    assert metrics.configured_port({}) == metrics.DEFAULT_PORT
    assert metrics.configured_port({metrics.PORT_ENV: " 9100 "}) == 9100
    assert metrics.configured_port({metrics.PORT_ENV: "0"}) == 0
    for off in ("off", "OFF", "none", "-1"):
        assert metrics.configured_port({metrics.PORT_ENV: off}) is None
    for bad in ("abc", "70000", "65536", "-2", "9100.5"):
        with pytest.raises(ValueError, match=f"{metrics.PORT_ENV}='{bad}'.*0 to 65535"):
            metrics.configured_port({metrics.PORT_ENV: bad})


def test_liveness_limit_values():
    assert health.max_batch_seconds(3600.0, {}) == 3600.0
    assert health.max_batch_seconds(3600.0, {health.MAX_BATCH_ENV: "900"}) == 900.0
    assert health.max_batch_seconds(3600.0, {health.MAX_BATCH_ENV: "1.5"}) == 1.5
    for bad in ("15m", "0", "-5", "nan", "inf"):
        with pytest.raises(ValueError, match=f"{health.MAX_BATCH_ENV}='{bad}'.*greater than 0"):
            health.max_batch_seconds(3600.0, {health.MAX_BATCH_ENV: bad})


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "LANDMARKS_HOME": str(tmp_path / "home"), **env}
    for key in ("LANDMARKS_DATABASE_URL", "LANDMARKS_BROKER_URL", "LANDMARKS_MILVUS_URI"):
        environ.pop(key, None)  # a worker that got past the check would start the embedded stack here
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=environ, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, named", [
    ({"LANDMARKS_METRICS_PORT": "abc"}, "LANDMARKS_METRICS_PORT='abc'"),
    ({"LANDMARKS_METRICS_PORT": "70000", "LANDMARKS_WORKER_PROCESSES": "2"}, "LANDMARKS_METRICS_PORT='70000'"),
    ({"LANDMARKS_LIVENESS_MAX_BATCH_S": "15m"}, "LANDMARKS_LIVENESS_MAX_BATCH_S='15m'"),
    ({"LANDMARKS_LIVENESS_MAX_BATCH_S": "0", "LANDMARKS_WORKER_PROCESSES": "2"}, "LANDMARKS_LIVENESS_MAX_BATCH_S='0'"),
    ({"LANDMARKS_WORKER_PROCESSES": "two"}, "LANDMARKS_WORKER_PROCESSES: Input should be a valid integer"),
])
def test_the_worker_refuses_a_bad_variable_before_it_starts_anything(tmp_path, env, named):
    try:
        result = _cli(tmp_path, "worker", **env)
    finally:  # a worker that got past the check started the embedded stack
        if (tmp_path / "home" / "stack.json").exists():
            from shared import stack
            stack.down(tmp_path / "home")
    assert result.returncode == 2, result.stderr[-2000:]
    assert named in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "home").exists()  # no embedded stack, no supervisor, no worker


def test_every_command_names_the_variable_of_a_bad_setting(tmp_path):
    result = _cli(tmp_path, "stack", "status", "--json", LANDMARKS_BATCH_SIZE="0",
                  LANDMARKS_FETCH_ALLOWED_NETWORKS="10.0.0.0/8,nonsense")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "LANDMARKS_BATCH_SIZE: Input should be greater than or equal to 1"
    assert lines[1].startswith("LANDMARKS_FETCH_ALLOWED_NETWORKS: Value error, 'nonsense'")


# --- settings that would fail every photo, or never close a batch, are refused at start-up -----------

def _settings_error_lines(monkeypatch, **env: str) -> list[str]:
    """What `landmarks` prints for these variables (shared/cli.py): one line per refused variable."""
    from pydantic import ValidationError

    from shared.cli import _settings_errors
    from shared.settings import Settings
    for name in [n for n in os.environ if n.startswith("LANDMARKS_") and n != "LANDMARKS_HOME"]:
        monkeypatch.delenv(name)  # only what the test sets
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        Settings()
    except ValidationError as exc:
        return _settings_errors(exc)
    return []


@pytest.mark.parametrize("name, value, says", [
    ("LANDMARKS_MAX_WAIT_MS", "0", "greater than or equal to 1"),  # kombu never runs a 0 s timer
    ("LANDMARKS_FETCH_MAX_BYTES", "0", "greater than or equal to 1"),
    ("LANDMARKS_FETCH_MAX_BYTES", "-5", "greater than or equal to 1"),
    ("LANDMARKS_FETCH_TIMEOUT_S", "0", "greater than 0"),
    ("LANDMARKS_FETCH_TIMEOUT_S", "-1.5", "greater than 0"),
    ("LANDMARKS_FETCH_TIMEOUT_S", "nan", "finite number"),
    ("LANDMARKS_MAX_IMAGE_PIXELS", "0", "greater than or equal to 1"),
    ("LANDMARKS_GLOBAL_TOP_K", "16385", "less than or equal to 16384"),  # Milvus refuses a larger limit
    ("LANDMARKS_GEO_TOP_K", "100000", "less than or equal to 16384"),
    ("LANDMARKS_DEVICE", "gpu", "not a device"),  # the worker would report ready and never load a model
    ("LANDMARKS_DEVICE", "cuda0", "not a device"),
])
def test_a_value_that_would_fail_every_photo_is_refused_naming_its_variable(monkeypatch, name, value, says):
    lines = _settings_error_lines(monkeypatch, **{name: value})
    assert len(lines) == 1 and lines[0].startswith(f"{name}: ") and says in lines[0], lines


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_every_device_the_worker_knows_is_allowed(monkeypatch, device):
    assert _settings_error_lines(monkeypatch, LANDMARKS_DEVICE=device) == []


def test_the_largest_top_k_milvus_accepts_is_allowed(monkeypatch):
    from shared.index import MAX_TOPK
    assert _settings_error_lines(monkeypatch, LANDMARKS_GLOBAL_TOP_K=str(MAX_TOPK),
                                 LANDMARKS_GEO_TOP_K=str(MAX_TOPK)) == []


def test_the_cli_prints_each_refused_variable_and_exits_2(tmp_path):
    result = _cli(tmp_path, "stack", "status", "--json", LANDMARKS_MAX_WAIT_MS="0", LANDMARKS_GEO_TOP_K="20000",
                  LANDMARKS_FETCH_TIMEOUT_S="0")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    names = {line.split(":", 1)[0] for line in result.stderr.strip().splitlines()}
    assert names == {"LANDMARKS_MAX_WAIT_MS", "LANDMARKS_GEO_TOP_K", "LANDMARKS_FETCH_TIMEOUT_S"}


def test_torch_threads_default_to_a_quarter_of_the_cpus_the_pod_may_use(tmp_path, monkeypatch):
    from shared import cpus
    from shared.runtime import default_torch_threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(192)), raising=False)
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    monkeypatch.setattr(cpus, "CGROUP_ROOT", tmp_path)
    assert default_torch_threads() == 2  # 8 CPUs, not the node's 192 (48 threads)
