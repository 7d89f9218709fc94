"""What `landmarks` says when a server cannot be reached, a URL cannot be parsed, the database has no schema
yet or a file is not a model: one line naming what to fix and exit status 1, and under --json the
{"ok": false, "error": ...} line last, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from PIL import Image

from shared.cli import NOT_MIGRATED, _server_failure

pytestmark = pytest.mark.integration

UNREACHABLE = {"LANDMARKS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres",
               "LANDMARKS_BROKER_URL": "redis://127.0.0.1:1/0", "LANDMARKS_MILVUS_URI": "http://127.0.0.1:1"}


def _landmarks(tmp_path, *args, **urls) -> subprocess.CompletedProcess:
    env = {**os.environ, "LANDMARKS_HOME": str(tmp_path / "home"), "LANDMARKS_FILE_ROOTS": str(tmp_path), **urls}
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def _one_line_failure(done: subprocess.CompletedProcess, *expected: str) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert all(text in lines[0] for text in expected), lines[0]
    return lines[0]


def _json_error(done: subprocess.CompletedProcess) -> str:
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["ok"] is False
    return answer["error"]


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(path)
    return path


@pytest.mark.parametrize("args, variable", [
    (["albums", "--user", "a", "--json"], "LANDMARKS_DATABASE_URL"),
    (["photo", "p1", "--user", "a", "--json"], "LANDMARKS_DATABASE_URL"),
    (["versions", "--json"], "LANDMARKS_DATABASE_URL"),
    (["shadow", "status", "--json"], "LANDMARKS_DATABASE_URL"),
    (["db", "upgrade"], "LANDMARKS_DATABASE_URL"),
    (["queue", "--json"], "LANDMARKS_BROKER_URL"),
    (["enqueue", "PHOTO", "--user", "a", "--json"], "LANDMARKS_BROKER_URL"),
    (["promote", "v1", "--json"], "LANDMARKS_DATABASE_URL"),
    (["rollback", "--json"], "LANDMARKS_DATABASE_URL"),
    (["compare", "v1", "v2", "--json"], "LANDMARKS_DATABASE_URL"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else "")
def test_an_unreachable_server_is_one_line_naming_its_variable(tmp_path, photo, args, variable):
    done = _landmarks(tmp_path, *[str(photo) if a == "PHOTO" else a for a in args], **UNREACHABLE)
    line = _one_line_failure(done, "refused", variable)
    if "--json" in args:
        assert _json_error(done) == line


@pytest.mark.parametrize("args, urls, variable", [
    (["albums", "--user", "a", "--json"], {"LANDMARKS_DATABASE_URL": "localhost:5432"}, "LANDMARKS_DATABASE_URL"),
    (["health", "--json"], {"LANDMARKS_DATABASE_URL": "localhost:5432"}, "LANDMARKS_DATABASE_URL"),
    (["queue", "--json"], {"LANDMARKS_BROKER_URL": "localhost:6379"}, "LANDMARKS_BROKER_URL"),
    (["versions", "--json"], {"LANDMARKS_DATABASE_URL": "postgresql://u@127.0.0.1:54x2/db"},
     "LANDMARKS_DATABASE_URL"),
    (["queue", "--json"], {"LANDMARKS_BROKER_URL": "redis://127.0.0.1:63x9/0"}, "LANDMARKS_BROKER_URL"),
], ids=["albums", "health", "queue", "database_port", "broker_port"])
def test_a_malformed_url_is_one_line_naming_its_variable(tmp_path, args, urls, variable):
    done = _landmarks(tmp_path, *args, **{**UNREACHABLE, **urls})
    assert _json_error(done) == _one_line_failure(done, variable)


@pytest.mark.parametrize("args, urls, variable", [
    (["queue", "--json"], {"LANDMARKS_BROKER_URL": "redis://:s3cr/et@redis:6379/0"}, "LANDMARKS_BROKER_URL"),
    (["versions", "--json"], {"LANDMARKS_DATABASE_URL": "postgresql://u:s3cr@h:et@db:5432/x"},
     "LANDMARKS_DATABASE_URL"),
    (["albums", "--user", "a", "--json"], {"LANDMARKS_DATABASE_URL": "postgresql://u:s3cr/et@db:5x/x"},
     "LANDMARKS_DATABASE_URL"),
], ids=["broker", "database", "database_port"])
def test_a_url_that_cannot_be_parsed_shows_no_piece_of_its_password(tmp_path, args, urls, variable):
    """The parsers quote what they choke on ("Port could not be cast to integer value as 's3cr'")."""
    done = _landmarks(tmp_path, *args, **{**UNREACHABLE, **urls})
    line = _one_line_failure(done, f"{variable} cannot be parsed as a URL", "percent-encode", "password")
    assert _json_error(done) == line
    assert "s3cr" not in done.stdout + done.stderr and "et@" not in done.stdout + done.stderr


def test_other_value_errors_keep_their_traceback():
    assert _server_failure(ValueError("a bad input, or a bug")) is None


def test_an_error_the_database_answered_keeps_its_traceback(engine):
    """A deadlock or a timeout is no URL to check: the traceback is the useful report."""
    with pytest.raises(sa.exc.OperationalError) as info, engine.connect() as conn:
        conn.execute(sa.text("SET LOCAL statement_timeout = '1ms'; SELECT pg_sleep(1)"))
    assert _server_failure(info.value) is None


@pytest.mark.parametrize("args", [["albums", "--user", "alice", "--json"], ["versions", "--json"],
                                  ["photo", "p1", "--user", "alice", "--json"], ["backfill", "--all", "--json"]],
                         ids=lambda args: args[0])
def test_a_database_without_the_schema_says_to_run_db_upgrade(tmp_path, empty_database, args):
    done = _landmarks(tmp_path, *args, **{**UNREACHABLE, "LANDMARKS_DATABASE_URL": empty_database})
    assert _json_error(done) == _one_line_failure(done) == NOT_MIGRATED


def test_publishing_a_file_that_is_not_a_model_is_one_line_without_torchs_advice(tmp_path, photo):
    done = _landmarks(tmp_path, "publish", str(photo), "--json", **UNREACHABLE)
    line = _one_line_failure(done, f"{photo} is not a readable landmarks model checkpoint (UnpicklingError")
    assert "weights_only" not in done.stderr + done.stdout
    assert _json_error(done) == line


def test_an_unknown_demo_preset_is_refused_before_anything_starts(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in UNREACHABLE}
    done = subprocess.run([sys.executable, "-m", "shared.cli", "demo", "--preset", "huge"], capture_output=True,
                          text=True, timeout=120,
                          env={**env, "LANDMARKS_HOME": str(tmp_path / "home"), "COLUMNS": "200"})  # one line
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "unknown preset 'huge'" in done.stderr and "tiny, small, medium" in done.stderr
    assert not (tmp_path / "home").exists()  # no embedded server was started


@pytest.mark.parametrize("flag, last_line", [([], '{"photos": 3, "seconds": 1.5}'), (["--no-json"], "seconds: 1.5")])
def test_the_demo_result_is_json_unless_no_json(monkeypatch, flag, last_line):
    from typer.testing import CliRunner

    from shared import demo
    from shared.cli import app
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: {"photos": 3, "seconds": 1.5})
    done = CliRunner().invoke(app, ["demo", "--preset", "tiny", *flag])
    assert done.exit_code == 0, done.output
    assert done.stdout.strip().splitlines()[-1] == last_line


@pytest.mark.parametrize("args", [["worker", "--processes", "2"], ["enqueue", "{photo}", "--user", "alice"]],
                         ids=lambda args: args[0])
def test_a_placeholder_signing_key_is_one_line_naming_its_variable(tmp_path, photo, args):
    args = [str(photo) if arg == "{photo}" else arg for arg in args]
    done = _landmarks(tmp_path, *args, **UNREACHABLE, LANDMARKS_EVENT_SIGNING_KEY="CHANGE_ME_TO_32_RANDOM_BYTES",
                      COLUMNS="200")
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    assert (done.stdout + done.stderr).strip() == (
        "LANDMARKS_EVENT_SIGNING_KEY is a placeholder (it contains 'change_me'), not a secret "
        "(e.g. use `openssl rand -hex 32`)")


def test_db_upgrade_against_a_database_of_ones_own_starts_no_embedded_server(tmp_path, empty_database):
    """Only LANDMARKS_DATABASE_URL set, as deploy/README.md's upgrade runs it: no Redis or Milvus is left
    running under LANDMARKS_HOME once the command is done."""
    from shared import stack
    env = {key: value for key, value in os.environ.items() if key not in UNREACHABLE}
    done = subprocess.run([sys.executable, "-m", "shared.cli", "db", "upgrade"], capture_output=True, text=True,
                          timeout=120, env={**env, "LANDMARKS_HOME": str(tmp_path / "home"),
                                            "LANDMARKS_DATABASE_URL": empty_database})
    try:
        assert done.returncode == 0 and "database at revision" in done.stdout, done.stderr
        assert stack.status(tmp_path / "home")["running"] == {"postgres": False, "redis": False, "milvus": False}
    finally:
        stack.down(tmp_path / "home")
