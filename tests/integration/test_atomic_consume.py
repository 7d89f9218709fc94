"""workers/broker.py: a message is taken off the Redis queue and recorded as unacknowledged in one step,
in the format kombu's own restore reads; consuming, acknowledging and restoring work as with stock kombu."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

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
    message = {"body": "e30=", "properties": {"delivery_tag": "tag-1",
                                              "delivery_info": {"exchange": "ex", "routing_key": "rk"}}}
    raw = json.dumps(message)
    client.lpush(queue_name, raw, "not json at all")
    try:
        first = client.eval(TAKE_AND_RECORD, 3, queue_name, unacked, index, 123.0)
        assert first[0].decode() == queue_name and first[1].decode() == raw and first[2] == 1
        assert json.loads(client.hget(unacked, "tag-1")) == [message, "ex", "rk"]
        assert client.zscore(index, "tag-1") == 123.0
        second = client.eval(TAKE_AND_RECORD, 3, queue_name, unacked, index, 124.0)
        assert second[1] == b"not json at all" and second[2] == 0  # taken, left to kombu to record
        assert client.eval(TAKE_AND_RECORD, 3, queue_name, unacked, index, 125.0) is None
    finally:
        client.delete(queue_name, unacked, index)
