"""workers/broker.py: a message is taken off the Redis queue and recorded as unacknowledged in one step,
in the format kombu's own restore reads; consuming, acknowledging and restoring work as with stock kombu."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub

from workers.broker import TAKE_AND_RECORD, Transport

pytestmark = [pytest.mark.integration]


@pytest.fixture
def queue_name(broker_url):
    name = f"lm_atomic_{uuid.uuid4().hex[:8]}"
    yield name
    with Connection(broker_url) as conn:
        _client(conn).delete(name)


def _client(conn: Connection) -> redis.Redis:
    return conn.default_channel.client


def _publish(broker_url: str, queue: Queue, bodies: list[dict]) -> None:
    with Connection(broker_url) as conn:  # stock kombu publishes, as the upload pipeline does
        producer = Producer(conn.default_channel)
        for body in bodies:
            producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                             serializer="json")


def test_consume_ack_and_restore_through_the_atomic_transport(broker_url, queue_name):
    queue = Queue(queue_name, Exchange(queue_name, "direct"), routing_key=queue_name)
    bodies = [{"n": i} for i in range(5)]
    _publish(broker_url, queue, bodies)
    received = []
    with Connection(broker_url, transport=Transport) as conn:
        channel = conn.channel()
        unacked_key = channel.unacked_key

        def on_message(body, message):
            # At delivery the message is already recorded, and no longer in the queue.
            assert _client(conn).hexists(unacked_key, message.delivery_tag)
            received.append((body, message))

        with Consumer(channel, [queue], callbacks=[on_message], accept=["json"]):
            while len(received) < 5:
                conn.drain_events(timeout=5)
        assert [body for body, _ in received] == bodies  # FIFO
        assert _client(conn).llen(queue_name) == 0
        for _, message in received[:3]:
            message.ack()
        tags = [m.delivery_tag for _, m in received]
        assert [_client(conn).hexists(unacked_key, t) for t in tags] == [False] * 3 + [True] * 2
        # kombu's own restore reads what the script recorded and puts the two back on the queue.
        for _, message in received[3:]:
            channel.qos.restore_by_tag(message.delivery_tag)
        assert _client(conn).llen(queue_name) == 2
        channel.qos._delivered.clear()  # restored: nothing left to restore at close
        channel.close()
    again = []
    with Connection(broker_url) as conn:  # stock kombu consumes the restored messages
        with Consumer(conn.default_channel, [queue], callbacks=[lambda b, m: (again.append(b), m.ack())],
                      accept=["json"]):
            while len(again) < 2:
                conn.drain_events(timeout=5)
    assert sorted(again, key=lambda b: b["n"]) == bodies[3:]  # restored to the front, in restore order


def test_the_script_takes_and_records_in_one_step(broker_url, queue_name):
    with Connection(broker_url) as conn:
        _check_script(_client(conn), queue_name)


def _check_script(client: redis.Redis, queue_name: str) -> None:
    unacked, index = f"{queue_name}.unacked", f"{queue_name}.unacked_index"

    def message(tag: str) -> dict:
        return {"body": "e30=", "properties": {"delivery_tag": tag,
                                               "delivery_info": {"exchange": "ex", "routing_key": "rk"}}}
    raws = [json.dumps(message("tag-1")), "not json at all", json.dumps(message("tag-3"))]
    client.lpush(queue_name, *raws)  # the first pushed is the first taken

    def take(at_most: int, now: float) -> list:
        return client.eval(TAKE_AND_RECORD, 3, queue_name, unacked, index, now, at_most)
    try:
        first = take(1, 123.0)
        assert [first[0].decode(), first[1].decode(), first[2]] == [queue_name, raws[0], 1]
        assert json.loads(client.hget(unacked, "tag-1")) == [message("tag-1"), "ex", "rk"]
        assert client.zscore(index, "tag-1") == 123.0
        assert client.llen(queue_name) == 2  # one asked for, one taken
        rest = take(5, 124.0)  # more asked for than there are: what there is
        assert [(r[1].decode(), r[2]) for r in (rest[:3], rest[3:])] == [(raws[1], 0), (raws[2], 1)]
        assert not client.hexists(unacked, "not json at all")  # taken, left to kombu to record
        assert client.zscore(index, "tag-3") == 124.0
        assert take(5, 125.0) == []
    finally:
        client.delete(queue_name, unacked, index)


def test_in_an_event_loop_takes_up_to_the_prefetch_limit_and_acknowledges_a_turn_in_one_round_trip(
        broker_url, queue_name):
    queue = Queue(queue_name, Exchange(queue_name, "direct"), routing_key=queue_name)
    _publish(broker_url, queue, [{"n": i} for i in range(10)])
    received = []
    hub = Hub()
    try:
        with Connection(broker_url, transport=Transport) as conn:
            conn.register_with_event_loop(hub)
            channel = conn.channel()
            client = _client(conn)
            with Consumer(channel, [queue], callbacks=[lambda body, message: received.append(message)],
                          accept=["json"], prefetch_count=4):
                _turn_until(hub, lambda: len(received) == 4)
                for _ in range(3):
                    hub.run_once()
                # The prefetch limit holds: 4 taken, none more, all 4 recorded as unacknowledged.
                assert len(received) == 4 and client.llen(queue_name) == 6
                assert client.hlen(channel.unacked_key) == 4
                hdel_before = _calls(client, "hdel")
                first = received[:]
                for message in first:  # as Celery's consumer does: one callback per message, one turn
                    hub.call_soon(message.ack)
                hub.run_once()
                assert not any(client.hexists(channel.unacked_key, m.delivery_tag) for m in first)
                assert _calls(client, "hdel") - hdel_before == 1  # four acknowledgements, one round trip
                _turn_until(hub, lambda: len(received) == 8)  # the slots freed: the next four come
                assert [m.decode()["n"] for m in received] == list(range(8))
                assert all(client.hexists(channel.unacked_key, m.delivery_tag) for m in received[4:])
                for message in received[4:]:
                    message.ack()  # sent at the end of the loop turn...
                assert client.hlen(channel.unacked_key) == 4
                channel.close()  # ...or when the channel closes first
            unacked_key = channel.unacked_key
        with Connection(broker_url) as check:
            assert _client(check).hlen(unacked_key) == 0
            assert _client(check).llen(queue_name) == 2
    finally:
        hub.close()


def _turn_until(hub: Hub, done, turns: int = 200) -> None:
    for _ in range(turns):
        if done():
            return
        hub.run_once()
    raise AssertionError("the event loop never got there")


def _calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_an_unreadable_message_does_not_strand_the_ones_taken_with_it(broker_url, queue_name):
    queue = Queue(queue_name, Exchange(queue_name, "direct"), routing_key=queue_name)
    _publish(broker_url, queue, [{"n": 0}])
    with Connection(broker_url) as conn:
        _client(conn).lpush(queue_name, "not json at all")  # written by something that is not kombu
    _publish(broker_url, queue, [{"n": 1}])
    received = []
    with Connection(broker_url, transport=Transport) as conn:
        channel = conn.channel()
        with Consumer(channel, [queue], callbacks=[lambda body, message: received.append(message)],
                      accept=["json"], prefetch_count=10):
            with pytest.raises(ValueError):  # the unreadable one fails as it does with stock kombu...
                conn.drain_events(timeout=5)  # ...in the one call that took all three
            assert [m.decode()["n"] for m in received] == [0, 1]
            for message in received:
                message.ack()
        assert _client(conn).llen(queue_name) == 0 and _client(conn).hlen(channel.unacked_key) == 0
        channel.close()


def test_a_waiting_consumer_wakes_for_its_first_queue_whichever_queue_it_took_from_last(broker_url, queue_name):
    uploads = Queue(queue_name, Exchange(queue_name, "direct"), routing_key=queue_name)
    backfill = Queue(f"{queue_name}_backfill", Exchange(f"{queue_name}_backfill", "direct"),
                     routing_key=f"{queue_name}_backfill")
    received = []
    hub = Hub()
    try:
        with Connection(broker_url, transport=Transport, transport_options={"polling_interval": 20}) as conn:
            conn.register_with_event_loop(hub)
            channel = conn.channel()
            with Consumer(channel, [uploads, backfill], accept=["json"], prefetch_count=10,
                          callbacks=[lambda body, message: (received.append(body), message.ack())]):
                _publish(broker_url, uploads, [{"n": 0}])
                _turn_until(hub, lambda: len(received) == 1)  # taking it rotates the uploads queue last
                for _ in range(3):
                    hub.run_once()  # both queues empty: the channel waits (up to 20 s)
                later = threading.Timer(0.3, _publish, (broker_url, uploads, [{"n": 1}]))
                later.start()
                started = time.monotonic()
                _turn_until(hub, lambda: len(received) == 2)
                later.join()
                # Woken by the upload's arrival, not by the end of the 20-s wait on the backfill queue.
                assert time.monotonic() - started < 10
            channel.close()
    finally:
        hub.close()
        with Connection(broker_url) as conn:
            _client(conn).delete(f"{queue_name}_backfill")


def test_bodies_with_kombu_typed_values_arrive_as_kombu_would_give_them(broker_url, queue_name):
    """The worker reads JSON with the standard decoder where kombu's hook has nothing to do: a datetime, a
    UUID, bytes and an escaped text still arrive as stock kombu gives them."""
    from datetime import datetime, timezone

    from workers.broker import install
    install()
    queue = Queue(queue_name, Exchange(queue_name, "direct"), routing_key=queue_name)
    taken_at = datetime(2026, 11, 27, 18, 30, tzinfo=timezone.utc)
    photo = uuid.uuid4()
    bodies = [{"photo": "plain"}, {"at": taken_at, "id": photo, "raw": b"\x00\xff"}, {"caption": "Kölner Dom"}]
    _publish(broker_url, queue, bodies)
    received = []
    with Connection(broker_url, transport=Transport) as conn:
        with Consumer(conn.channel(), [queue], callbacks=[lambda b, m: (received.append(b), m.ack())],
                      accept=["json"]):
            while len(received) < 3:
                conn.drain_events(timeout=5)
    assert received[0] == {"photo": "plain"}
    assert received[1] == {"at": taken_at, "id": photo, "raw": b"\x00\xff"}
    assert received[2] == {"caption": "Kölner Dom"}
