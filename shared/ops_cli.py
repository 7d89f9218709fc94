"""Operations commands of `landmarks`: promote, rollback, compare, versions, backfill, health, prune-ledger,
and `shadow start|stop|status` (a candidate beside the active version; `publish --shadow` starts one too).

``register(cli)`` adds them to the main command (shared/cli.py). Each one given ``--json`` prints one
JSON object as its last line; a refused operation exits 1 with the reason on stderr.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta
from typing import Annotated, Any, Optional

import typer

from shared.cli_output import JsonFlag  # noqa: E402
from shared.cli_output import emit as _emit  # noqa: E402


def _fail(message: str, as_json: bool, **extra: Any) -> None:
    typer.echo(message, err=True)
    if as_json:
        print(json.dumps({"ok": False, "error": message, **extra}, default=str))
    raise typer.Exit(1)


def _refusals() -> tuple[type[Exception], ...]:
    """What a rollout command reports as a one-line refusal rather than a traceback. An outage is reported by
    every command alike (shared.cli._Commands: one line naming the variable to check)."""
    from shared.rollout import RolloutError
    return (RolloutError,)


def _settings():
    from shared.settings import get_settings
    return get_settings()


def _urls():
    from shared.stack import resolve
    return resolve(_settings())


def _url(part: str) -> str:
    """One server's URL; an unset one starts that embedded server only (see shared.stack.resolve_url)."""
    from shared.stack import resolve_url
    return resolve_url(_settings(), part)


def _engine():
    from shared.db.session import make_engine
    return make_engine(_url("database_url"))


def _index(timeout: float | None = None):
    from shared.index import LandmarkIndex
    settings = _settings()
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
    kwargs = {"timeout": timeout, "connect_timeout": timeout} if timeout else {}
    return LandmarkIndex(_url("milvus_uri"), token, **kwargs)


def _parse_date(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD or ISO 8601)") from None


def register(cli: typer.Typer) -> None:
    """Adds promote, rollback, compare, versions, backfill, health and prune-ledger to the `landmarks` command."""

    @cli.command()
    def promote(version: str, force: Annotated[bool, typer.Option(
                    "--force", help="promote although photos in the albums have not been through VERSION yet, "
                    "or its model file is not readable here")] = False,
                as_json: JsonFlag = False) -> None:
        """Make an already published VERSION active: Milvus alias swap, then the albums' version."""
        from shared.rollout import promote as do_promote
        try:
            activation = do_promote(version, _engine(), _index(), force=force)
        except _refusals() as exc:
            _fail(str(exc), as_json)
        _say_what_left_the_albums(activation)
        _emit({"ok": True, **activation.as_dict()}, as_json)

    @cli.command()
    def rollback(force: Annotated[bool, typer.Option(
                     "--force", help="roll back although the target's model file is not readable here")] = False,
                 as_json: JsonFlag = False) -> None:
        """Go back to the version active before the current one (repeat to go further back)."""
        from shared.rollout import rollback as do_rollback
        try:
            activation = do_rollback(_engine(), _index(), force=force)
        except _refusals() as exc:
            _fail(str(exc), as_json)
        _say_what_left_the_albums(activation)
        _emit({"ok": True, **activation.as_dict()}, as_json)

    @cli.command()
    def compare(v1: str, v2: str,
                examples: Annotated[int, typer.Option(min=0, help="gained and lost examples to list")] = 10,
                user: Annotated[Optional[str], typer.Option("--user", help="one user's photos only")] = None,
                as_json: JsonFlag = False) -> None:
        """Tags of V2 (candidate) against V1 (baseline): agreement, gained and lost tags."""
        from shared.rollout import compare as do_compare
        try:
            report = do_compare(_engine(), v1, v2, examples=examples, user=user)
        except _refusals() as exc:
            _fail(str(exc), as_json)
        _emit(report, as_json)

    @cli.command()
    def versions(history: Annotated[int, typer.Option(min=0, help="recent activations to show")] = 10,
                 counts: Annotated[bool, typer.Option(
                     "--counts", help="each version's tagged and shadowed photos (reads every tag)")] = False,
                 as_json: JsonFlag = False) -> None:
        """Published versions (active one, tagged photos, in Milvus) and the recent activations."""
        from shared.rollout import history as activations, rollback_target, versions as list_versions, RolloutError
        engine, index = _engine(), _index()
        try:
            target, _ = rollback_target(engine)
        except RolloutError:
            target = None
        from shared.rollout import shadow_status
        _emit({"active_in_milvus": index.active_version(), "rollback_target": target,
               "shadow": shadow_status(engine), "versions": list_versions(engine, index, counts=counts),
               "activations": activations(engine, history)}, as_json)

    cli.add_typer(_shadow_commands(), name="shadow")

    @cli.command()
    def backfill(
        user: Annotated[Optional[str], typer.Option("--user", help="one user's photos")] = None,
        since: Annotated[Optional[str], typer.Option("--since", help="photos uploaded on or after DATE")] = None,
        all_photos: Annotated[bool, typer.Option("--all", help="every stored photo")] = False,
        rate: Annotated[Optional[float], typer.Option("--rate", help="events per second (default: unlimited)")] = None,
        name: Annotated[Optional[str], typer.Option(
            help="job name (default: from the scope, --failed, --include-current and the version)")] = None,
        restart: Annotated[bool, typer.Option("--restart", help="start the job over from the first photo")] = False,
        include_current: Annotated[bool, typer.Option(
            "--include-current", help="also photos the active version has already processed")] = False,
        failed: Annotated[bool, typer.Option(
            "--failed", help="only photos whose last attempt failed, the active version's too (after an outage)")] = False,
        limit: Annotated[Optional[int], typer.Option(
            min=1, help="stop after this many events (resume later)")] = None,
        max_live_backlog: Annotated[int, typer.Option(
            min=0, help="pause while the live queue's backlog is above this")] = 1000,
        max_backfill_backlog: Annotated[int, typer.Option(
            min=0, help="pause while the backfill queue holds more than this")] = 10000,
        as_json: JsonFlag = False,
    ) -> None:
        """Re-enqueue stored photos for the active version on the low-priority backfill queue (resumable)."""
        from shared.backfill import BackfillRefused, Scope, backfill_queue, run_backfill
        from shared.backlog import queue_backlog
        if rate is not None and rate <= 0:
            raise typer.BadParameter(f"{rate} is not > 0 events/s", param_hint="'--rate'")
        settings = _settings()
        try:
            scope = Scope(user=user, since=_parse_date(since) if since else None, all=all_photos, failed=failed)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        queue = backfill_queue(settings)
        if queue is None:
            _fail("LANDMARKS_BACKFILL_QUEUE is off: there is no backfill queue to send to", as_json)
        from workers.app import app as celery_app
        from shared.signing import event_signer
        from workers.tasks import UPLOADED
        broker_url = _url("broker_url")

        sign = event_signer(settings)

        def send(event: dict) -> None:
            celery_app.send_task(UPLOADED, args=[sign(event)], queue=queue)

        def backlog(q: str) -> int:
            return queue_backlog(broker_url, q)["backlog"]

        def progress(done: int, total: int | None) -> None:
            if not as_json:
                typer.echo(f"{done} enqueued" + (f" (job total {total})" if total is not None else ""), err=True)

        try:
            result = run_backfill(_engine(), send, scope, queue=queue, rate=rate, name=name, restart=restart,
                                  include_current=include_current, limit=limit, backlog=backlog,
                                  live_queue=settings.queue, max_live_backlog=max_live_backlog,
                                  max_backfill_backlog=max_backfill_backlog, progress=progress)
        except (LookupError, BackfillRefused, *_refusals()) as exc:
            _fail(str(exc), as_json)
        if result.status == "version_changed":
            _fail(f"backfill {result.name} stopped after {result.enqueued} events this run: {result.active_version} "
                  f"was activated while it ran (the job was for {result.model_version}'s activation when it began); "
                  "run the backfill again for the active version", as_json, **result.as_dict())
        if result.already_done:  # on stderr, which the operator reads with or without --json
            typer.echo(_job_already_done(result, backlog), err=True)
        _emit(result.as_dict(), as_json)

    @cli.command("backfill-jobs")
    def backfill_jobs(
        name: Annotated[Optional[str], typer.Option(help="only this job")] = None,
        limit: Annotated[int, typer.Option(min=1, help="the latest jobs to show")] = 20,
        as_json: JsonFlag = False,
    ) -> None:
        """Backfill jobs, the latest first: scope, version, progress, and whether each is done, running now,
        interrupted (the same `landmarks backfill` command resumes it) or outdated (another version is active)."""
        from shared.backfill import job_status
        jobs = job_status(_engine(), name, limit)
        if as_json:
            _emit({"jobs": jobs}, as_json)
            return
        if not jobs:
            typer.echo("no backfill job" + (f" named {name}" if name else " yet"))
        for job in jobs:
            typer.echo(_job_line(job))

    @cli.command()
    def health(
        worker: Annotated[bool, typer.Option("--worker", help="ask the local worker's /readyz instead")] = False,
        url: Annotated[Optional[str], typer.Option(help="a worker's base URL (implies --worker)")] = None,
        timeout: Annotated[float, typer.Option(help="seconds per check")] = 3.0,
        as_json: JsonFlag = False,
    ) -> None:
        """Readiness: broker, database, Milvus, and the active model (exit 1 when not ready).

        Without --worker it checks from here that the active version agrees between PostgreSQL and
        Milvus and that its model file is readable; with --worker it reports the running worker's own
        view (model loaded in memory), as the Docker HEALTHCHECK does."""
        if worker or url:
            report = _worker_readiness(url, timeout)
        else:
            report = _readiness_from_here(timeout)
        _emit(report, as_json)
        if not report.get("ok"):
            raise typer.Exit(1)

    @cli.command("prune-ledger")
    def prune_ledger(
        older_than: Annotated[int, typer.Option("--older-than", metavar="DAYS", min=1,
                                                help="delete events applied more than DAYS days ago")],
        batch: Annotated[int, typer.Option(min=1, help="events deleted per transaction")] = 5000,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="count them, delete nothing")] = False,
        as_json: JsonFlag = False,
    ) -> None:
        """Delete processed_events rows older than the window, in short transactions (dead letters are kept).

        A window shorter than the broker can bring an event back is refused: an event redelivered after
        its row is gone is applied again (harmless, as the writer orders uploads by uploaded_at and keeps
        tombstones, but work done twice)."""
        from shared.db.ledger import cutoff as ledger_cutoff, ledger_floor, old_events, prune_events
        window, floor = timedelta(days=older_than), ledger_floor(_settings().visibility_timeout_s)
        if window < floor:
            _fail(f"--older-than {older_than} is inside the redelivery horizon: events can come back for "
                  f"{_floor_reason(floor)}; keep at least {_days(floor)} days", as_json)
        engine = _engine()
        cutoff = ledger_cutoff(engine, older_than)
        if dry_run:
            count, oldest = old_events(engine, cutoff)
            _emit({"ok": True, "dry_run": True, "cutoff": cutoff, "would_delete": count, "deleted": 0,
                   "oldest": oldest}, as_json)
            return

        def progress(deleted: int, batches: int) -> None:
            if not as_json:
                typer.echo(f"{deleted} events deleted ({batches} batches)", err=True)

        deleted, batches = prune_events(engine, cutoff, batch, progress)
        _emit({"ok": True, "dry_run": False, "cutoff": cutoff, "deleted": deleted, "batches": batches}, as_json)


def _job_line(job: dict) -> str:
    """One backfill job as `landmarks backfill-jobs` prints it."""
    scope = ", ".join(key if value is True else f"{key} {value}" for key, value in (job["scope"] or {}).items())
    total = f"{job['total']:,}" if job["total"] is not None else "?"
    when = (f"finished {job['finished_at']:%Y-%m-%d %H:%M:%S %Z}" if job["finished_at"]
            else f"last progress {job['updated_at']:%Y-%m-%d %H:%M:%S %Z}")
    return (f"{job['name']}: {job['state']}, {job['enqueued']:,} of {total} photos enqueued for "
            f"{job['model_version']} ({scope or 'no scope'}); {when}")


def _job_already_done(result, backlog) -> str:
    """What a re-run of a done backfill job says: done, or done with photos still left out of the albums."""
    at = result.finished_at.isoformat(timespec="seconds") if result.finished_at else "an unknown time"
    if not result.unprocessed:
        return (f"job {result.name} already done: {result.enqueued_total} photos enqueued at {at}; "
                "--restart to run it again")
    count = f"{result.unprocessed:,}" + ("+" if result.unprocessed_capped else "")
    message = (f"job {result.name} is done but {count} of its photos are still not processed by "
               f"{result.model_version} (events lost with the queue?): `--restart` sends them again")
    queued = _backlog_or_none(backlog, result.queue)
    if queued:  # the fleet may simply not have reached them yet
        message += f"; but {result.queue} still holds {queued:,} events: let it drain before deciding"
    return message


def _backlog_or_none(backlog, queue: str | None) -> int | None:
    """The queue's backlog, or None when the broker cannot say (the message goes out without it)."""
    from redis.exceptions import RedisError
    try:
        return backlog(queue) if queue else None
    except (RedisError, OSError):
        return None


def _floor_reason(floor) -> str:
    from shared.db.ledger import MIN_LEDGER_WINDOW
    if floor == MIN_LEDGER_WINDOW:
        return f"{_days(floor)} days (a redelivery waiting out an outage's backlog)"
    return f"{_days(floor)} days (LANDMARKS_VISIBILITY_TIMEOUT_S, then the backlog it rejoins)"


def _days(span: timedelta) -> int:
    return -(-span // timedelta(days=1))  # whole days, rounded up


def _say_what_left_the_albums(activation) -> None:
    """On stderr, which the operator reads with or without --json."""
    if activation.uncovered:
        typer.echo(f"{activation.uncovered} photos in the albums have not been through {activation.version}: "
                   f"they are out of the albums until `{activation.backfill}` has sent them to it", err=True)
    elif activation.backfill and activation.changed:  # a rollback: the photos uploaded meanwhile
        typer.echo(f"photos uploaded while {activation.previous} was active are out of the albums until "
                   f"`{activation.backfill}` has sent them to {activation.version}", err=True)


def _shadow_commands() -> typer.Typer:
    shadow = typer.Typer(no_args_is_help=True, help="A candidate version beside the active one, on a sample.")

    @shadow.command("start")
    def shadow_start(version: str,
                     share: Annotated[float, typer.Option(min=0.0, max=1.0,
                                                          help="share of photos sampled")] = 0.1,
                     as_json: JsonFlag = False) -> None:
        """Run the published VERSION beside the active one on --share of the photos (replaces a running shadow)."""
        from shared.rollout import start_shadow
        try:
            started = start_shadow(version, share, _engine(), _index())
        except _refusals() as exc:
            _fail(str(exc), as_json)
        _emit({"ok": True, "shadow": started}, as_json)

    @shadow.command("stop")
    def shadow_stop(as_json: JsonFlag = False) -> None:
        """End the running shadow: no shadow tag is written once this returns; workers unload its model."""
        from shared.rollout import stop_shadow
        _emit({"ok": True, "stopped": stop_shadow(_engine())}, as_json)

    @shadow.command("status")
    def shadow_status(as_json: JsonFlag = False) -> None:
        """The running shadow (version, share, since when), or null."""
        from shared.rollout import shadow_status as running
        _emit({"shadow": running(_engine())}, as_json)

    return shadow


def _worker_readiness(url: str | None, timeout: float) -> dict:
    import urllib.error
    import urllib.request

    from shared.metrics import DEFAULT_PORT, configured_port
    try:
        base = url or f"http://127.0.0.1:{configured_port() or DEFAULT_PORT}"
    except ValueError as exc:  # names LANDMARKS_METRICS_PORT and what it accepts
        return {"ok": False, "error": str(exc)}
    try:
        with urllib.request.urlopen(base.rstrip("/") + "/readyz", timeout=timeout * 2) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503 carries the failed checks
        try:
            return json.loads(exc.read())
        except ValueError:
            return {"ok": False, "error": f"{base}/readyz answered {exc.code}"}
    except (OSError, ValueError) as exc:
        return {"ok": False, "error": f"no worker answers at {base}: {exc}"}


def _readiness_from_here(timeout: float) -> dict:
    from shared import health
    try:
        urls = _urls()
    except Exception as exc:  # noqa: BLE001 - e.g. the embedded stack cannot start
        return {"ok": False, "error": str(exc), "checks": {}}
    from shared.db.session import make_engine
    engine = make_engine(urls.database_url, connect_args={"connect_timeout": max(1, int(timeout))})
    index = _index(timeout)
    try:
        return health.run_checks({
            "broker": health.broker_check(urls.broker_url, timeout),
            "database": health.database_check(engine),
            "milvus": health.milvus_check(index, engine),
            "model": health.published_model_check(engine, index),
        }, timeout_s=timeout * 2)
    finally:
        engine.dispose()


if __name__ == "__main__":  # pragma: no cover - until shared/cli.py registers these commands
    _app = typer.Typer(no_args_is_help=True, add_completion=False)
    register(_app)
    sys.exit(_app())
