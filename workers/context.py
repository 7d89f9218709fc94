"""Per-process state of a worker (database engine, Milvus index, pipeline), created on first use,
after any fork, so CUDA and connections are never shared with Celery's parent."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from shared.db.session import make_engine
from shared.index import LandmarkIndex
from shared.pipeline import RecognitionPipeline
from shared.settings import Settings, get_settings
from shared.stack import resolve


@dataclass
class WorkerContext:
    settings: Settings
    engine: Engine
    index: LandmarkIndex
    pipeline: RecognitionPipeline


_context: WorkerContext | None = None
_lock = threading.Lock()


def worker_context() -> WorkerContext:
    global _context
    with _lock:
        if _context is None:
            settings = get_settings()
            urls = resolve(settings)
            token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
            engine = make_engine(urls.database_url)
            index = LandmarkIndex(urls.milvus_uri, token)
            _context = WorkerContext(settings, engine, index, RecognitionPipeline(settings, engine, index))
        return _context
