"""The Celery app. Configuration is applied lazily, so importing this module starts nothing."""

from __future__ import annotations

from celery import Celery

from shared.settings import get_settings
from shared.stack import resolve

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
        # celery-batches buffers prefetched messages: prefetch must cover a whole batch.
        worker_prefetch_multiplier=settings.batch_size,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
