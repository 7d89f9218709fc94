"""Queue backlog as an autoscaler must see it: waiting messages plus those reserved (prefetched,
unacknowledged) by workers, which Redis LLEN alone does not count.

kombu's Redis transport keeps the reserved messages of every queue in one hash, ``unacked``: delivery tag ->
JSON ``[message, exchange, routing_key]``, the whole message included (kombu/transport/redis.py,
``QoS.append``). Under load that is tens of thousands of entries of a kilobyte or more, so the entries are
counted inside Redis, by a Lua script that returns only counts, for all the queues asked in one pass."""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis

from shared.stack import redis_client_url

# kombu's Redis transport keeps priority levels in sibling lists "<queue>\x06\x16<n>".
PRIORITY_SEPARATOR = "\x06\x16"
UNACKED_KEY = "unacked"
# Entries of the unacked hash counted per script call: Redis serves nothing else while a script runs
# (about 5 ms for 1,000 entries of 1.5 KB), so a large hash is counted a page at a time.
UNACKED_PAGE = 1000

# One HSCAN page of the hash in KEYS[1] from cursor ARGV[1], ARGV[2] entries; ARGV[3..] are the tails the
# entries of the queues end with (_tails). Returns the next cursor and, per tail, the entries of the page that
# end so: their tail compared, the message never parsed or sent.
_COUNT_RESERVED = """
local page = redis.call("HSCAN", KEYS[1], ARGV[1], "COUNT", ARGV[2])
local counts = {}
for i = 3, #ARGV do counts[i - 2] = 0 end
local entries = page[2]
for j = 2, #entries, 2 do
  local entry = entries[j]
  for i = 3, #ARGV do
    local tail = ARGV[i]
    if string.sub(entry, -#tail) == tail then
      counts[i - 2] = counts[i - 2] + 1
      break
    end
  end
end
return {page[1], counts}
"""


def queue_backlogs(broker_url: str, queues: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{queue: {"queue", "waiting", "reserved", "backlog"}}``, one pass over Redis for all the queues."""
    queues = list(dict.fromkeys(queues))
    client = redis.Redis.from_url(redis_client_url(broker_url), socket_timeout=5)
    try:
        waiting = _waiting(client, queues)
        reserved = _reserved(client, queues)
    finally:
        client.close()
    return {q: {"queue": q, "waiting": waiting[q], "reserved": reserved[q], "backlog": waiting[q] + reserved[q]}
            for q in queues}


def queue_backlog(broker_url: str, queue: str) -> dict[str, int]:
    return queue_backlogs(broker_url, [queue])[queue]


def _waiting(client: redis.Redis, queues: list[str]) -> dict[str, int]:
    """LLEN of each queue and of its priority lists, those found by one SCAN of the keyspace."""
    lists = {q: [q] for q in queues}
    for key in client.scan_iter(match=f"*{PRIORITY_SEPARATOR}*", count=1000):
        name = key.decode(errors="replace")
        queue = name.rsplit(PRIORITY_SEPARATOR, 1)[0]
        if queue in lists:
            lists[queue].append(name)
    with client.pipeline(transaction=False) as pipe:
        for names in lists.values():
            for name in names:
                pipe.llen(name)
        lengths = iter(pipe.execute())
    return {q: sum(next(lengths) for _ in names) for q, names in lists.items()}


def _reserved(client: redis.Redis, queues: list[str]) -> dict[str, int]:
    """Entries of the unacked hash per queue. Like any SCAN, an entry added or removed meanwhile may be
    counted or not: the backlog is a gauge read again within seconds, not a ledger."""
    if not queues:
        return {}
    count_page = client.register_script(_COUNT_RESERVED)
    tails = [(queue, tail) for queue in queues for tail in _tails(queue)]
    counts = dict.fromkeys(queues, 0)
    cursor = 0
    while True:
        cursor, page = count_page(keys=[UNACKED_KEY], args=[cursor, UNACKED_PAGE, *(tail for _, tail in tails)])
        for (queue, _), n in zip(tails, page):
            counts[queue] += n
        if int(cursor) == 0:
            return counts


def _tails(queue: str) -> set[str]:
    r"""How an unacked entry of ``queue`` ends: its routing key, the last item of a JSON array, written by
    kombu (Python's json: "\u00e9" for é) or by workers/broker.py's script (Redis' cjson: "\/" for /, é raw)."""
    return {json.dumps(queue) + "]", json.dumps(queue, ensure_ascii=False).replace("/", "\\/") + "]"}
