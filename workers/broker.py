"""kombu's Redis transport with an atomic consume.

Stock kombu takes a message off the queue with BRPOP and only then, in a second round trip, records it in
the `unacked` hash that Redis redelivers from. A worker killed between the two loses the message for good:
the fault suite's SIGKILL case lost one event of 1,000 that way while the consumer received during a
running batch. Here one Lua script takes the message off the queue and records it as unacknowledged, in
the format kombu's own restore reads, so a killed worker leaves every message it took in `unacked`.

While the queues are empty the channel waits with a non-destructive `BLMOVE q q RIGHT RIGHT` (the last
element is moved onto itself), then takes the message with the script. Everything else (publishing,
acknowledgement, restoring expired messages, priorities) is kombu's. The workers install it for the
`redis://`, `rediss://` and `redis+socket://` URLs (`install()`, called by workers/app.py)."""

from __future__ import annotations

import time
from queue import Empty

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

# KEYS: the queue keys in priority order, then the unacked hash and its index. ARGV[1]: now.
# Returns {queue key, message, recorded} or false. A message cjson cannot read is still taken (and
# recorded by kombu afterwards, the stock way) rather than blocking the queue.
TAKE_AND_RECORD = """
local unacked, index = KEYS[#KEYS - 1], KEYS[#KEYS]
for i = 1, #KEYS - 2 do
  local raw = redis.call('LINDEX', KEYS[i], -1)
  if raw then
    local ok, message = pcall(cjson.decode, raw)
    redis.call('RPOP', KEYS[i])
    if not ok or type(message) ~= 'table' or type(message['properties']) ~= 'table' then
      return {KEYS[i], raw, 0}
    end
    local properties = message['properties']
    local info = properties['delivery_info'] or {}
    local tag = properties['delivery_tag']
    if type(tag) ~= 'string' then
      return {KEYS[i], raw, 0}
    end
    redis.call('ZADD', index, ARGV[1], tag)
    redis.call('HSET', unacked, tag,
      '[' .. raw .. ',' .. cjson.encode(info['exchange'] or '') .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
    return {KEYS[i], raw, 1}
  end
end
return false
"""


class QoS(kombu_redis.QoS):
    def append(self, message, delivery_tag):
        if getattr(self.channel, "_recorded_tag", None) == delivery_tag:
            virtual.QoS.append(self, message, delivery_tag)  # already in `unacked`: local bookkeeping only
        else:
            super().append(message, delivery_tag)


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
            self.client.connection.send_command("BLMOVE", keys[0], keys[0], "RIGHT", "RIGHT", timeout or 0)
        else:
            self._pending_mode = "take"
            self.client.connection.send_command("EVAL", TAKE_AND_RECORD, len(keys) + 2, *keys,
                                                self.unacked_key, self.unacked_index_key, time.time())

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
            return self._deliver_taken(reply)
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _deliver_taken(self, reply) -> bool:
        key, raw, recorded = reply
        queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        payload = loads(bytes_to_str(raw))
        self._recorded_tag = payload["properties"]["delivery_tag"] if int(recorded) else None
        try:
            self.connection._deliver(payload, queue)
        finally:
            self._recorded_tag = None
        return True


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Route this process's Redis broker connections through the transport above."""
    for alias in ("redis", "rediss"):
        TRANSPORT_ALIASES[alias] = "workers.broker:Transport"
