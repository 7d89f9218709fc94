"""The `landmarks` command."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from typer.core import TyperGroup

from shared.allocator import keep_freed_memory
from shared.settings import Settings, get_settings
from shared.signing import SigningKeyError


class _Commands(TyperGroup):
    """Every command: a LANDMARKS_* variable that fails validation is one line per variable and exit status
    2, not a traceback ending in a ValidationError that names the field rather than the variable. A server
    that cannot be reached, a URL that cannot be parsed or a database without the schema is one line naming
    what to fix and exit status 1 (with ``--json``, then the JSON error line), not a traceback. So is an unusable
    event signing key (exit status 2), found by the worker and `enqueue` when they read it."""

    def invoke(self, ctx):
        as_json = "--json" in ctx.args  # the command's own arguments, parsed only inside super().invoke
        try:
            return super().invoke(ctx)
        except ValidationError as exc:
            if exc.title != Settings.__name__:
                raise
            for line in _settings_errors(exc):
                console.print(line, soft_wrap=True, markup=False)
            raise typer.Exit(2) from None
        except SigningKeyError as exc:  # its message names the variable and how to make a key
            console.print(str(exc), soft_wrap=True, markup=False)
            raise typer.Exit(2) from None
        except _server_errors() as exc:
            message = _server_failure(exc)
            if message is None:
                raise
            from shared.ops_cli import _fail
            _fail(message, as_json)


def _server_errors() -> tuple[type[Exception], ...]:
    """What the clients raise for a server they cannot reach, a URL they cannot parse (ArgumentError, and a
    ValueError from redis) or a missing table; imported only once something was raised."""
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    from shared.errors import InfrastructureError
    return (InfrastructureError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
            sqlalchemy.exc.ArgumentError, sqlalchemy.exc.ProgrammingError, redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError, kombu.exceptions.OperationalError, ValueError)


NOT_MIGRATED = "the database schema is not migrated: run `landmarks db upgrade`"
_URL_PARSERS = {("redis.connection", "parse_url"): "broker_url", ("sqlalchemy.engine.url", "make_url"): "database_url"}
# The part of the stack whose client library raised an error (shared.stack.PARTS names its variable).
_PART_OF_PACKAGE = {"sqlalchemy": "database_url", "psycopg2": "database_url", "redis": "broker_url",
                    "kombu": "broker_url", "pymilvus": "milvus_uri", "grpc": "milvus_uri"}


def _server_failure(exc: Exception) -> str | None:
    """`Redis: Error 111 connecting to 127.0.0.1:1. Connection refused. (check LANDMARKS_BROKER_URL)`; None
    for an error of those types that is no such failure (another ProgrammingError or ValueError)."""
    from psycopg2.errors import UndefinedTable
    from sqlalchemy.exc import ProgrammingError

    from shared.errors import InfrastructureError
    from shared.stack import PARTS
    if isinstance(exc, ProgrammingError):
        return NOT_MIGRATED if isinstance(exc.orig, UndefinedTable) else None
    if getattr(getattr(exc, "orig", None), "pgcode", None):
        return None  # the server answered (a deadlock, a timeout, a full disk): not a URL to check
    if (parsing := _url_parser_of(exc)) is not None:
        # Never the parser's message: it quotes the part it choked on, often a piece of the password
        # (`redis://:s3cr/et@redis` -> "Port could not be cast to integer value as 's3cr'").
        variable, server = PARTS[parsing]
        return (f"{server}: {variable} cannot be parsed as a URL (percent-encode special characters in its "
                "password, e.g. '/' as %2F, '@' as %40, ':' as %3A)")
    if isinstance(exc, ValueError):
        return None  # a bad input or a bug, whose traceback is the useful report
    part = _part_of(exc)
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if part is None:
        return reason
    variable, server = PARTS[part]
    what = "" if isinstance(exc, InfrastructureError) else f"{server}: "  # its message names the server
    return f"{what}{reason} (check {variable})"


def _part_of(exc: BaseException | None) -> str | None:
    """The stack part whose client raised ``exc``, or the error ``exc`` wraps."""
    while exc is not None:
        part = _PART_OF_PACKAGE.get(type(exc).__module__.partition(".")[0])
        if part:
            return part
        exc = exc.__cause__
    return None


def _url_parser_of(exc: BaseException) -> str | None:
    """The stack part whose URL parser raised ``exc`` (a port that is not a number, no scheme), or None."""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        part = _URL_PARSERS.get((module, tb.tb_frame.f_code.co_name))
        if part:
            return part
        tb = tb.tb_next
    return None


def _settings_errors(exc: ValidationError) -> list[str]:
    """`LANDMARKS_WORKER_PROCESSES: Input should be a valid integer, ...` for each error of ``exc``."""
    prefix = Settings.model_config.get("env_prefix", "")
    return [f"{prefix}{'_'.join(str(part) for part in error['loc']).upper() or 'settings'}: {error['msg']}"
            for error in exc.errors()]


app = typer.Typer(cls=_Commands, no_args_is_help=True, add_completion=False, help="Landmark recognition fleet.")
stack_app = typer.Typer(no_args_is_help=True, help="The embedded PostgreSQL + Redis + Milvus stack.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema migrations.")
model_app = typer.Typer(no_args_is_help=True, help="Model files.")
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")
console = Console(stderr=True)
from shared.cli_output import JsonFlag  # noqa: E402
from shared.cli_output import emit as _emit  # noqa: E402


def _url(part: str) -> str:
    """One server's URL (database_url, broker_url, milvus_uri); an unset one starts that embedded server
    only."""
    from shared.stack import resolve_url
    return resolve_url(get_settings(), part)


def _engine():
    from shared.db.session import make_engine
    return make_engine(_url("database_url"))


def _index():
    from shared.index import LandmarkIndex
    settings = get_settings()
    return LandmarkIndex(_url("milvus_uri"), settings.milvus_token.get_secret_value() if settings.milvus_token else None)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shared.logs import configure_logging
    configure_logging()  # JSON lines when LANDMARKS_LOG_JSON=1


# --- stack and database ---------------------------------------------------------------------

@stack_app.command("up")
def stack_up(as_json: JsonFlag = False) -> None:
    """Start the embedded servers under $LANDMARKS_HOME (idempotent) and migrate their database."""
    from dataclasses import asdict
    from shared import stack
    from shared.db import migrate
    urls = stack.up(get_settings().home_path)
    console.print(f"development stack: its database is migrated to revision {migrate.current(urls.database_url)} "
                  "(a PostgreSQL of your own: `landmarks db upgrade`)", soft_wrap=True, markup=False)
    _emit(asdict(urls), as_json)


@stack_app.command("down")
def stack_down() -> None:
    """Stop the embedded servers (data stays on disk)."""
    from shared import stack
    stack.down(get_settings().home_path)
    print("stack stopped")


@stack_app.command("status")
def stack_status(as_json: JsonFlag = False) -> None:
    """URLs in use (LANDMARKS_* overrides win) and whether the embedded servers run."""
    from shared import stack
    settings = get_settings()
    state = stack.status(settings.home_path)
    urls = stack.resolve(settings, start=False)
    _emit({**state, "database_url": urls.database_url, "broker_url": urls.broker_url,
           "milvus_uri": urls.milvus_uri}, as_json)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Migrate the database schema (default: to head): before a new PostgreSQL of your own is first used, and
    after each upgrade of this code (`stack up` migrates the embedded one)."""
    from shared.db import migrate
    url = _url("database_url")
    migrate.upgrade(url, revision)
    print(f"database at revision {migrate.current(url)}")


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    from shared.db import migrate
    url = _url("database_url")
    migrate.downgrade(url, revision)
    print(f"database at revision {migrate.current(url)}")


# --- the fleet ------------------------------------------------------------------------------

@app.command()
def worker(device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N (one worker per GPU)")] = None,
           processes: Annotated[Optional[int], typer.Option(
               min=1, max=16, help="worker processes on the device, under one supervisor (default "
               "LANDMARKS_WORKER_PROCESSES, 1): 2 when one process's Python limits the GPU")] = None,
           loglevel: str = "INFO") -> None:
    """Run a recognition worker (the model lives in the worker process; batches overlap in threads)."""
    keep_freed_memory()  # before the imports below start threads: every thread then shares the main heap
    if device:
        os.environ["LANDMARKS_DEVICE"] = device
        get_settings.cache_clear()
    settings = get_settings()
    _check_worker_environment(settings)
    processes = processes or settings.worker_processes
    if processes > 1:
        from workers.supervisor import supervise
        raise typer.Exit(supervise(processes, loglevel))
    from shared.logs import NODE_ENV
    from workers.supervisor import stop_with_parent
    stop_with_parent(dict(os.environ))
    from workers.app import app as celery_app
    node = os.environ.get(NODE_ENV)  # set by the supervisor: one Celery node name per process
    celery_app.worker_main(["worker", f"--queues={settings.queue}", f"--loglevel={loglevel}", "--without-gossip",
                            "--without-mingle", "--without-heartbeat", *([f"--hostname={node}"] if node else [])])


def _check_worker_environment(settings) -> None:
    """The worker's variables read outside shared/settings.py, checked before anything starts: a bad one
    would otherwise only switch off /healthz, /readyz and /metrics while the worker consumes, until the
    orchestrator's probes restart it, again and again."""
    from shared import health, metrics
    from shared.signing import verification_keys
    verification_keys(settings)  # an unusable key: one line from _Commands, before any process starts
    try:
        metrics.configured_port()
        health.max_batch_seconds(float(settings.visibility_timeout_s))
    except ValueError as exc:  # the message names the variable and what it accepts
        console.print(str(exc), soft_wrap=True, markup=False)
        raise typer.Exit(2) from None


def _photo_id(user: str, path: Path) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{user}:{path.resolve()}").hex


def upload_event(user: str, path: Path, gps: tuple[float, float] | None = None) -> dict:
    event = {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": _photo_id(user, path),
             "uri": path.resolve().as_uri(), "uploaded_at": datetime.now(timezone.utc).isoformat()}
    if gps:
        event["gps"] = {"lat": gps[0], "lon": gps[1]}
    return event


@app.command()
def enqueue(paths: Annotated[list[Path], typer.Argument(exists=True)],
            user: Annotated[str, typer.Option("--user")],
            as_json: JsonFlag = False) -> None:
    """Send one photo_uploaded event per image file (folders recursively), as the upload pipeline does."""
    from shared.gallery import image_files
    from shared.signing import event_signer
    sign = event_signer(get_settings())  # workers with a key refuse unsigned events; a bad key stops us here
    from workers.app import app as celery_app
    from workers.tasks import UPLOADED
    files = [f for p in paths for f in image_files(p)]
    roots = get_settings().file_root_paths
    outside = [f for f in files if not any(f.resolve().is_relative_to(r) for r in roots)]
    if outside:
        console.print(f"[yellow]{len(outside)} file(s) lie outside LANDMARKS_FILE_ROOTS; "
                      "workers will record them as failures[/yellow]")
    for path in files:
        celery_app.send_task(UPLOADED, args=[sign(upload_event(user, path))])
    _emit({"enqueued": len(files), "user": user, "queue": get_settings().queue}, as_json)


@app.command()
def queue(as_json: JsonFlag = False) -> None:
    """Backlog of the recognition queue: waiting + reserved (what an autoscaler should read)."""
    from shared.backlog import queue_backlog
    _emit(queue_backlog(_url("broker_url"), get_settings().queue), as_json)


@app.command()
def albums(user: Annotated[str, typer.Option("--user")], as_json: JsonFlag = False) -> None:
    """A user's Attractions album: cities → landmarks → photo counts (reads the album views only)."""
    from shared.db.albums import attractions, begin_snapshot
    from shared.db.session import transaction
    with transaction(_engine()) as session:
        begin_snapshot(session)  # its two reads see one state of the tags, as the API's do
        cities = attractions(session, user)
    data = [_plain(city) for city in cities]
    if as_json:
        print(json.dumps({"user": user, "cities": data}, default=str))
        return
    print_albums(user, data)


def _plain(obj):
    from dataclasses import asdict, is_dataclass
    return asdict(obj) if is_dataclass(obj) else obj


def print_albums(user: str, cities: list[dict]) -> None:
    table = Table(title=f"Attractions of {user}")
    for column in ("country", "city", "landmark", "photos"):
        table.add_column(column)
    for city in cities:
        for landmark in city["landmarks"]:
            table.add_row(city["country"], city["city"], landmark["name"], str(landmark["photo_count"]))
    Console().print(table)


@app.command()
def photo(photo_id: str, user: Annotated[str, typer.Option("--user")], as_json: JsonFlag = False) -> None:
    """What happened to one photo: status, tags, failure reason."""
    from shared.db.albums import begin_snapshot, photo_report
    from shared.db.session import transaction
    with transaction(_engine()) as session:
        begin_snapshot(session)
        report = photo_report(session, user, photo_id)
    if report is None:
        # No processed event yet: the upload is still queued (or was never sent).
        report = {"photo_id": photo_id, "user_id": user, "status": "pending", "tags": [], "failure": None}
    _emit(report, as_json)


# --- models ---------------------------------------------------------------------------------

@model_app.command("init")
def model_init(out: Annotated[Path, typer.Option("--out")],
               backbone: str = "tiny", dim: int = 128, size: int = 224,
               version: Annotated[Optional[str], typer.Option()] = None,
               calibrate: Annotated[Optional[Path], typer.Option(help="images to set BatchNorm statistics")] = None,
               seed: int = 0) -> None:
    """A randomly initialised model (no training) without a gallery: give it one with `landmarks model gallery`
    before `landmarks publish` takes it."""
    from shared.modelinit import init_model
    meta = init_model(out, backbone=backbone, dim=dim, size=size, version=version, calibrate=calibrate, seed=seed)
    print(f"wrote {out} (version {meta.version}, {meta.backbone}, dim {meta.embedding_dim})")


@model_app.command("gallery")
def model_gallery(model: Annotated[Path, typer.Option("--model", exists=True)],
                  landmarks: Annotated[Path, typer.Option("--landmarks", exists=True, help="DIR/<slug>/photos")],
                  csv_path: Annotated[Path, typer.Option("--csv", exists=True, help="id,slug,name,city,country,region (1–4),lat,lon")],
                  negatives: Annotated[Path, typer.Option("--negatives", exists=True, help="non-landmark photos")],
                  out: Annotated[Path, typer.Option("--out")],
                  references: int = 3) -> None:
    """Centroids and references from folders of landmark photos; thresholds from non-landmarks."""
    from shared.gallery import EmptyGalleryError
    from shared.modelinit import gallery_from_folders
    try:
        meta = gallery_from_folders(model, landmarks, csv_path, negatives, out, n_references=references)
    except EmptyGalleryError:
        console.print(f"error: {landmarks}: no landmark folder with readable photos (expected {landmarks}/<slug>/ "
                      f"for the slugs in {csv_path})", soft_wrap=True, markup=False)
        raise typer.Exit(2) from None
    except ValueError as exc:  # bad input, such as a landmarks CSV row (its file and line are named)
        console.print(f"error: {exc}", soft_wrap=True, markup=False)  # one line, paths kept whole
        raise typer.Exit(2) from None
    print(f"wrote {out} (version {meta.version}; t_global {meta.t_global:.4f}, t_ref {meta.t_ref:.4f})")


@app.command()
def publish(model: Annotated[Path, typer.Argument(exists=True)],
            activate: Annotated[Optional[bool], typer.Option(
                help="swap the alias to this version (default: yes for a version published for the first "
                     "time, unless --shadow; a version published before is left as it is)")] = None,
            shadow: Annotated[bool, typer.Option(
                "--shadow", help="run it beside the active version on --share of the photos instead")] = False,
            share: Annotated[float, typer.Option(
                min=0.0, max=1.0, help="with --shadow: share of photos sampled (0 ends its shadow)")] = 0.1,
            force: Annotated[bool, typer.Option(
                "--force", help="activate although photos in the albums have not been through MODEL yet")] = False,
            as_json: JsonFlag = False) -> None:
    """Publish MODEL: landmarks + version row in PostgreSQL, new Milvus collections, alias swap (or shadow).
    Activating is refused, as `landmarks promote` is, while photos in the albums have not been through MODEL."""
    if shadow:
        _publish_shadow(model, share, activate, as_json)
        return
    from shared.publish import publish_model
    if force and activate is None:  # after a refused publish: that version, now registered, is to go live
        activate = True
    with _publish_refusals(as_json):
        meta = publish_model(model, _engine(), _index(), activate=activate, require_coverage=not force)
    answer = {"version": meta.version, "active": meta.extra["activated"],
              "catalogue_changes": meta.extra["catalogue_changes"]}
    if meta.extra.get("uncovered"):  # --force: photos the new version has not been through left the albums
        answer.update(uncovered=meta.extra["uncovered"], backfill=meta.extra["backfill"])
    if not meta.extra["activated"] and activate is None:
        answer["note"] = (f"{meta.version} was published before and is not the active version: "
                          f"`landmarks promote {meta.version}` makes it the active one")
    _emit(answer, as_json)


def _publish_shadow(model: Path, share: float, activate: bool | None, as_json: bool) -> None:
    from shared.publish import publish_shadow
    if activate:
        raise typer.BadParameter("--shadow publishes without activating: drop --activate")
    with _publish_refusals(as_json):
        meta, shadow = publish_shadow(model, share, _engine(), _index())
    _emit({"ok": True, "version": meta.version, "active": False,
           "shadow": {**shadow, "running": share > 0} if shadow else None,
           "catalogue_changes": meta.extra["catalogue_changes"]}, as_json)


@contextmanager
def _publish_refusals(as_json: bool) -> Iterator[None]:
    """A refused publish (another gallery or other thresholds under a published version, a file that is not a
    model or cannot be read, an outage, a rollout rule) is one line and exit status 1, not a traceback."""
    from shared.index import IndexVersionError
    from shared.model import CheckpointError
    from shared.ops_cli import _fail, _refusals
    try:
        yield
    except (IndexVersionError, CheckpointError, OSError, *_refusals()) as exc:
        _fail(str(exc), as_json)


# --- offline pipeline -----------------------------------------------------------------------

def _progress() -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)


def _require_preset(preset: str, known) -> None:
    if preset not in known:
        raise typer.BadParameter(f"unknown preset {preset!r}: choose one of {', '.join(known)}",
                                 param_hint="'--preset'")


@app.command()
def world(out: Annotated[Path, typer.Option("--out")], seed: int = 0,
          preset: Annotated[str, typer.Option(help="tiny | small | medium")] = "small",
          contact_sheet: Annotated[bool, typer.Option("--contact-sheet")] = False,
          as_json: JsonFlag = False) -> None:
    """Generate a deterministic synthetic landmark world in the dataset format (docs/dataset.md)."""
    from shared.training.world import PRESETS, generate_world
    _require_preset(preset, PRESETS)
    with _progress() as progress:
        task = progress.add_task(f"world {preset} seed {seed}", total=None)
        summary = generate_world(out, seed=seed, preset=preset, contact_sheet=contact_sheet,
                                 progress=lambda done, total: progress.update(task, completed=done, total=total))
    _emit(summary, as_json)


@app.command()
def build(world_dir: Annotated[Path, typer.Option("--world", exists=True, file_okay=False)],
          out: Annotated[Path, typer.Option("--out")],
          preset: Annotated[str, typer.Option(help="training preset: tiny | small | medium")] = "small",
          init: Annotated[Optional[Path], typer.Option(exists=True, help="local pretrained backbone weights")] = None,
          backbone: Annotated[Optional[str], typer.Option(help="override the preset's backbone")] = None,
          ablation: Annotated[Optional[str], typer.Option(help="no_cleaning | no_curriculum | no_center_loss")] = None,
          seed: int = 0, version: Annotated[Optional[str], typer.Option()] = None, as_json: JsonFlag = False) -> None:
    """Clean, train (curriculum, softmax + center loss), cluster centroids, calibrate: write MODEL."""
    from dataclasses import replace as dc_replace
    import torch
    from shared.training.build import PRESETS, Builder
    _require_preset(preset, PRESETS)
    cfg = PRESETS[preset]
    cfg = dc_replace(cfg, train=dc_replace(cfg.train, seed=seed, backbone=backbone or cfg.train.backbone))
    if ablation == "no_cleaning":
        cfg = dc_replace(cfg, clean=False)
    elif ablation == "no_curriculum":
        cfg = dc_replace(cfg, curriculum=False)
    elif ablation == "no_center_loss":
        cfg = dc_replace(cfg, train=dc_replace(cfg.train, center_weight=0.0))
    elif ablation:
        raise typer.BadParameter(f"unknown ablation {ablation!r}")
    from shared.cpus import usable_cpus
    torch.set_num_threads(usable_cpus())  # the CPUs this process may use, not the node's
    try:  # the dataset's and the build's preconditions, most checked before any training
        with _progress() as progress:
            meta = Builder(world_dir, out, cfg, init=init, progress=progress, version=version).run()
    except ValueError as exc:  # after the progress bars' last lines
        typer.echo(f"build: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:  # e.g. --out under a file, a full disk; the message names the path
        typer.echo(f"build: {exc}", err=True)
        raise typer.Exit(1) from None
    report = meta.extra["build"]
    _emit({"model": str(out), "version": meta.version, "t_geo": meta.t_geo, "t_global": meta.t_global,
           "t_ref": meta.t_ref, "seconds": report["seconds"],
           "share_with_several_centroids": report["centroids"]["share_with_several"],
           "cleaning": [c for s in report["stages"] for c in s["cleaning"]]}, as_json)


@app.command("eval")
def evaluate_model(world_dir: Annotated[Path, typer.Option("--world", exists=True, file_okay=False)],
                   model: Annotated[Path, typer.Option("--model", exists=True)],
                   local: Annotated[bool, typer.Option(help="exact in-process search instead of Milvus")] = False,
                   report: Annotated[Optional[Path], typer.Option(help="write an HTML report")] = None,
                   ablation_model: Annotated[Optional[list[str]], typer.Option(
                       help="NAME=MODEL built with `build --ablation`, shown in the report")] = None,
                   as_json: JsonFlag = False) -> None:
    """The article's test through the workers' recognition code; Milvus holds the version's centroids."""
    from typing import NoReturn

    from shared.local_index import LocalIndex
    from shared.model import load_checkpoint
    from shared.publish import gallery_rows
    from shared.training.evaluate import evaluate

    def fail(message: str) -> NoReturn:
        console.print(f"eval: {message}", soft_wrap=True, markup=False)  # one line, paths kept whole
        raise typer.Exit(2)

    others = {}  # checked before the evaluation, which they would otherwise only fail after
    for item in ablation_model or []:
        name, equals, file = item.partition("=")
        if not (equals and name and file):
            fail(f"--ablation-model {item!r}: expected NAME=MODEL")
        if not Path(file).is_file():
            fail(f"--ablation-model {item!r}: no model file {file}")
        others[name] = Path(file)
    try:  # a bad dataset, or a file that is not a model (CheckpointError is a ValueError)
        _, meta, gallery = load_checkpoint(model)
        if not gallery.get("landmarks"):  # `landmarks model init` writes none
            fail(f"{model} has no gallery (centroids and references): build it, or `landmarks model gallery`")
        if local:
            index = LocalIndex(meta.version, *gallery_rows(gallery))
        else:
            index = _index()
            index.publish(meta.version, *gallery_rows(gallery))  # published (if not yet), not activated
        with _progress() as progress:
            task = progress.add_task("embedding the test split", total=None)
            metrics = evaluate(world_dir, model, index, progress=lambda n: progress.advance(task, n))
        if report is not None:
            from shared.training.evaluate import decision_ablations
            from shared.training.report import write_report
            ablations = decision_ablations(world_dir, model)
            for name, path in others.items():
                _, other_meta, other_gallery = load_checkpoint(path)
                ablations[name] = evaluate(world_dir, path, LocalIndex(other_meta.version, *gallery_rows(other_gallery)))
            write_report(report, world_dir, model, metrics, ablations)
            metrics["ablations"] = ablations
            metrics["report"] = str(report)
    except ValueError as exc:
        fail(str(exc))
    _emit(metrics, as_json)


@app.command()
def demo(preset: Annotated[str, typer.Option(help="world and build preset: tiny | small | medium")] = "small",
         seed: int = 0,
         serve: Annotated[bool, typer.Option("--serve", help="then serve the Attractions page")] = False,
         port: int = 8080,
         as_json: Annotated[bool, typer.Option("--json/--no-json", help="print the result as one JSON object last "
                                               "(--no-json: one `key: value` line each)")] = True) -> None:
    """The whole job on the embedded stack: world, build, publish, worker, users' archives, albums."""
    from shared.demo import presets, run_demo
    _require_preset(preset, presets())  # before the stack starts
    result = run_demo(get_settings(), console, preset=preset, seed=seed)
    _emit(result, as_json)
    sys.stdout.flush()  # before --serve blocks
    if serve:
        serve_demo(result, port)


def serve_demo(result: dict, port: int) -> None:
    """Leave the album page running for the demo's first user (a fresh token key unless one is set)."""
    import secrets

    import uvicorn

    from shared.api.auth import make_token
    from shared.api.serve import TOKEN_KEY_ENV, build_app, page_url
    os.environ.setdefault(TOKEN_KEY_ENV, secrets.token_urlsafe(32))
    os.environ["LANDMARKS_FILE_ROOTS"] = result["world"]  # the page streams the demo's photos
    get_settings.cache_clear()
    key = os.environ[TOKEN_KEY_ENV].encode()
    console.print(f"Attractions page of {result['album_user']}: "
                  f"{page_url('127.0.0.1', port, make_token(key, result['album_user']))}  (Ctrl-C stops)")
    uvicorn.run(build_app(key, None), host="127.0.0.1", port=port, log_level="warning")


from shared.api.serve import register as _register_serve  # noqa: E402
from shared.bench_cli import register as _register_bench  # noqa: E402
from shared.ops_cli import register as _register_ops  # noqa: E402

_register_serve(app)
_register_ops(app)
_register_bench(app)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
