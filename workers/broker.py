"""kombu's Redis transport with an atomic consume, taken and acknowledged in batches.

Stock kombu takes a message off the queue with BRPOP and only then, in a second round trip, records it in
the `unacked` hash that Redis redelivers from. A worker killed between the two loses the message for good:
the fault suite's SIGKILL case lost one event of 1,000 that way while the consumer received during a
running batch. Here one Lua script takes the message off the queue and records it as unacknowledged, in
the format kombu's own restore reads, so a killed worker leaves every message it took in `unacked`.

The script takes as many messages as the prefetch limit still allows (at most TAKE_AT_MOST), and in an
event loop the acknowledgements of one loop turn (a finished batch's 64) go to Redis together, in one
round trip, before the loop polls again. One round trip per message each way was most of the consumer
thread's work (py-spy). A worker killed after acknowledging locally and before that round trip leaves the
messages in `unacked`: they are redelivered, and a redelivered event changes nothing.

Messages are read with orjson. kombu's decoder passes every JSON object through a Python hook that turns
its `{"__type__": ..., "__value__": ...}` objects back into datetimes, UUIDs and bytes, and builds a new
decoder for each call: about half of the 30 µs each message took to read twice (envelope, then body). A
message with no such object in it decodes the same without the hook; one that has one, or that escapes a
character (which could spell `__type__`), still goes through kombu's. The standard decoder, without the
hook, had still been a tenth of a GPU worker's Python (py-spy, eleventh session): orjson reads the same
1.7 KB envelope three times faster. What it refuses (NaN and Infinity, which Python's encoder writes)
goes to the standard decoder; an integer past 64 bits, which no message field holds, arrives as the
nearest float.

While the queues are empty the channel waits with a non-destructive `BLMOVE q q RIGHT RIGHT` (the last
element is moved onto itself) on its first queue (Channel._wait_queue), then takes messages with the
script. Everything else (publishing, restoring expired messages, priorities, acknowledging outside an
event loop) is kombu's. The workers install it for the `redis://`, `rediss://` and `redis+socket://` URLs
(`install()`, called by workers/app.py)."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from queue import Empty

import orjson
from kombu.serialization import registry
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

log = logging.getLogger(__name__)


def loads(text: str | bytes | bytearray | memoryview) -> object:
    """kombu's JSON decoding, with orjson wherever kombu's object hook would change nothing."""
    data = text if isinstance(text, (str, bytes)) else bytes(text)
    markers = ("__type__", "\\u") if isinstance(data, str) else (b"__type__", b"\\u")
    if markers[0] in data or markers[1] in data:
        return kombu_loads(data if isinstance(data, str) else data.decode("utf-8"))
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # NaN or Infinity: the standard decoder reads them
        return json.loads(data)


# The most messages one script call takes; the prefetch limit usually allows fewer.
TAKE_AT_MOST = 64

# KEYS: the queue keys in priority order, then the unacked hash and its index. ARGV[1]: now; ARGV[2]: how
# many messages to take at most. Returns {queue key, message, recorded, queue key, message, recorded, ...}
# (empty when the queues are). A message cjson cannot read is still taken (and recorded by kombu
# afterwards, the stock way) rather than blocking the queue.
TAKE_AND_RECORD = """
local unacked, index = KEYS[#KEYS - 1], KEYS[#KEYS]
local taken = {}
local function take_one()
  for i = 1, #KEYS - 2 do
    local raw = redis.call('LINDEX', KEYS[i], -1)
    if raw then
      redis.call('RPOP', KEYS[i])
      local ok, message = pcall(cjson.decode, raw)
      local properties = ok and type(message) == 'table' and message['properties']
      local tag = type(properties) == 'table' and properties['delivery_tag']
      if type(tag) ~= 'string' then
        return {KEYS[i], raw, 0}
      end
      local info = properties['delivery_info'] or {}
      redis.call('ZADD', index, ARGV[1], tag)
      redis.call('HSET', unacked, tag,
        '[' .. raw .. ',' .. cjson.encode(info['exchange'] or '') .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
      return {KEYS[i], raw, 1}
    end
  end
  return nil
end
for _ = 1, tonumber(ARGV[2]) do
  local one = take_one()
  if not one then break end
  for _, field in ipairs(one) do taken[#taken + 1] = field end
end
return taken
"""


class QoS(kombu_redis.QoS):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._acks_to_send: deque[str] = deque()  # acknowledged here, not yet removed from Redis

    def append(self, message, delivery_tag):
        if getattr(self.channel, "_recorded_tag", None) == delivery_tag:
            virtual.QoS.append(self, message, delivery_tag)  # already in `unacked`: local bookkeeping only
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag):
        if not self.channel.connection.sends_acks_per_turn:
            return super().ack(delivery_tag)
        self._acks_to_send.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # frees the prefetch slot now

    def send_acks(self) -> None:
        """Removes the acknowledged messages from `unacked` and its index, all in one round trip."""
        tags = []
        while self._acks_to_send:
            tags.append(self._acks_to_send.popleft())
        if not tags:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except self.channel.connection_errors as exc:
            # Like a failed stock ack: the messages stay in `unacked` and come back after the visibility
            # timeout; their events were applied, and applying them again changes nothing.
            log.error("could not acknowledge %d messages in Redis (%s); they will be redelivered", len(tags), exc)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _wait_first = False  # the queues were empty at the last take: block until something arrives
    _pending_mode: str | None = None
    _recorded_tag: str | None = None

    def _brpop_start(self, timeout=None):
        if self.global_keyprefix:  # keys would need the prefix inside the script: stock behaviour
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        if self._wait_first:
            self._pending_mode = "wait"
            wait_on = self._q_for_pri(self._wait_queue(queues), self.priority_steps[0])
            self.client.connection.send_command("BLMOVE", wait_on, wait_on, "RIGHT", "RIGHT", timeout or 0)
        else:
            self._pending_mode = "take"
            self.client.connection.send_command("EVAL", TAKE_AND_RECORD, len(keys) + 2, *keys,
                                                self.unacked_key, self.unacked_index_key, time.time(),
                                                self._take_count())

    def _wait_queue(self, queues: list[str]) -> str:
        """BLMOVE waits on one key: the queue this channel consumed first, the worker's upload queue (its
        backfill queue is added after it). A message on another queue, or with a priority, is taken when
        the wait times out (brpop_timeout, 1 s). Waiting on whichever queue the round-robin put first had
        left uploads waiting out that second behind an idle backfill queue."""
        return next((q for q in self._active_queues if q in queues), queues[0])

    def _take_count(self) -> int:
        """As many as the prefetch limit still allows, so that a worker never holds more than its share."""
        allowed = self.qos.can_consume_max_estimate()
        return max(1, min(TAKE_AT_MOST if allowed is None else allowed, TAKE_AT_MOST))

    def _brpop_read(self, **options):
        if self.global_keyprefix:
            return super()._brpop_read(**options)
        mode = self._pending_mode
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVAL" if mode == "take" else "BLMOVE",
                                                   **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # reconnects on the next round
                raise
            if mode == "wait":
                self._wait_first = False  # something arrived, or the wait timed out: take next time
                raise Empty()
            if not reply:
                self._wait_first = True
                raise Empty()
            failures = []
            for i in range(0, len(reply), 3):
                try:
                    self._deliver_taken(reply[i:i + 3])
                except Exception as exc:  # noqa: BLE001 - one unreadable message must not strand those taken with it
                    failures.append(exc)
            if failures:
                raise failures[0]  # as stock kombu does for the one message it took
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _deliver_taken(self, taken) -> None:
        key, raw, recorded = taken
        queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        payload = loads(raw)
        self._recorded_tag = payload["properties"]["delivery_tag"] if int(recorded) else None
        try:
            self.connection._deliver(payload, queue)
        finally:
            self._recorded_tag = None

    def close(self):
        if self._qos is not None:
            self._qos.send_acks()  # what this loop turn acknowledged reaches Redis before the restore
        super().close()


class Transport(kombu_redis.Transport):
    Channel = Channel
    sends_acks_per_turn = False  # until an event loop drives this connection

    def register_with_event_loop(self, connection, loop):
        super().register_with_event_loop(connection, loop)
        self.sends_acks_per_turn = True
        # Ticks run after the turn's callbacks (where the hub acknowledges) and before it polls again.
        loop.on_tick.add(self._send_acks)

    def _send_acks(self) -> None:
        for channel in self.channels:
            if channel._qos is not None:
                channel._qos.send_acks()


def install() -> None:
    """Route this process's Redis broker connections through the transport above, and read JSON message bodies
    with ``loads`` (kombu's encoder is kept)."""
    for alias in ("redis", "rediss"):
        TRANSPORT_ALIASES[alias] = "workers.broker:Transport"
    registry.register("json", kombu_dumps, loads, content_type="application/json", content_encoding="utf-8")
