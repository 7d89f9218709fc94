"""Celery entry points: the app, its thin tasks and the batching consumer."""
