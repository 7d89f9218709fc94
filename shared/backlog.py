"""Queue backlog as an autoscaler must see it: waiting messages plus those reserved (prefetched,
unacknowledged) by workers, which Redis LLEN alone does not count."""

from __future__ import annotations

import json

import redis

from shared.stack import redis_client_url

# kombu's Redis transport keeps priority levels in sibling lists "<queue>\x06\x16<n>".
PRIORITY_SEPARATOR = "\x06\x16"
UNACKED_KEY = "unacked"


def queue_backlog(broker_url: str, queue: str) -> dict[str, int]:
    client = redis.Redis.from_url(redis_client_url(broker_url), socket_timeout=5)
    lists = [queue] + [key.decode() for key in client.scan_iter(f"{queue}{PRIORITY_SEPARATOR}*")]
    waiting = sum(client.llen(name) for name in lists)
    reserved = 0
    for _, raw in client.hscan_iter(UNACKED_KEY):
        try:
            _message, _exchange, routing_key = json.loads(raw)
        except (ValueError, TypeError):
            continue
        reserved += routing_key == queue
    return {"queue": queue, "waiting": waiting, "reserved": reserved, "backlog": waiting + reserved}
