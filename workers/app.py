"""The Celery app. Configuration is applied lazily, so importing this module starts nothing."""

from __future__ import annotations

from celery import Celery, signals

from shared.settings import get_settings
from shared.stack import resolve
from workers.broker import install as install_atomic_consume
from workers.pool import prefetch_limit, prefetch_multiplier

# Before any broker connection: messages are taken off Redis and recorded as unacknowledged in one step.
install_atomic_consume()
app = Celery("landmarks", include=["workers.tasks"])


@app.on_configure.connect
def _configure(sender: Celery, **_: object) -> None:
    settings = get_settings()
    urls = resolve(settings)
    sender.conf.update(
        broker_url=urls.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # Longer than the worst batch, or Redis hands a running batch to another worker.
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu sweeps for expired unacknowledged messages every 10 s but scans only every 10th
            # sweep by default, and a worker killed while holding the sweep's mutex blocks others for
            # 5 min: scan every sweep (one ZRANGE) and let a dead holder's mutex expire in a minute.
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": 60,
        },
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # A task is acknowledged only after its tags are committed; a killed worker's
        # batch goes back to the queue.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # celery-batches buffers prefetched messages: prefetch (this times the concurrency) must cover
        # a whole batch for each batch in flight.
        worker_prefetch_multiplier=prefetch_multiplier(settings.batch_size, settings.batches_in_flight),
        worker_eta_task_limit=prefetch_limit(settings.batch_size, settings.batches_in_flight),
        # Threads in this one process (workers/pool.py): up to batches_in_flight batches overlap.
        worker_pool="workers.pool:BatchPipelinePool",
        worker_concurrency=settings.batches_in_flight,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )


# --- operations: logs, the backfill queue, metrics and health (shared/metrics.py, shared/health.py) ---

@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _json_logs(logger=None, **_: object) -> None:
    from shared.logs import json_logs_enabled, use_json
    if json_logs_enabled():
        use_json([logger] if logger is not None else None)


@signals.celeryd_after_setup.connect
def _consume_backfill_queue(sender: str, instance, **_: object) -> None:
    """Backfills arrive on their own queue (`landmarks backfill`), consumed by the same worker;
    LANDMARKS_BACKFILL_QUEUE=off leaves it to dedicated workers."""
    from shared.backfill import backfill_queue
    queue = backfill_queue(get_settings())
    if queue:
        instance.app.amqp.queues.select_add(queue)


@signals.worker_process_init.connect
def _start_metrics_server(**_: object) -> None:
    # Sent by workers/pool.py in the process that consumes, never in a forking parent.
    from workers.context import start_operations_server
    start_operations_server()


@signals.worker_shutdown.connect
def _close(**_: object) -> None:
    from workers.context import close_worker_context
    close_worker_context()


@signals.worker_ready.connect
def _warm_up(sender=None, **_: object) -> None:
    """Load the active model before the first event arrives, so readiness reflects it. The sender is the
    consumer; its pool runs the batches (workers/pool.py). A stop signal during the warm-up stops the worker
    at once (workers/context.exit_on_stop_signal); one that came before skips the warm-up."""
    from workers.context import exit_on_stop_signal, warm_up
    from workers.pool import worker_stopping
    if worker_stopping():
        return  # the event loop, next, stops the worker
    pool = getattr(sender, "pool", None)
    with exit_on_stop_signal():
        warm_up(pool if hasattr(pool, "run_on_every_thread") else None)
