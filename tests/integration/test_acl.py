"""The Redis ACL recipe of deploy/redis/users.acl, on a real server: a worker and beat-less
stock and project producers work under it, and the producer user can do nothing else."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from contract.names import QUEUE_CPU, TASK_PREDICT, TASK_PREDICT_BATCH, UNACKED_KEY, row_queue
from producer.client import Client
from producer.settings import ProducerSettings
from stack.embedded_redis import EmbeddedRedis, redis_server_binaries, redis_server_version
from stack.processes import celery_env, wait_ready, worker_process
from tests.support import TrainedModel

pytestmark = pytest.mark.integration

RECIPE = Path(__file__).parents[2] / "deploy" / "redis" / "users.acl"
SECRETS = {"producer": uuid.uuid4().hex, "worker": uuid.uuid4().hex}


def url(server: EmbeddedRedis, user: str) -> str:
    return f"redis://{user}:{SECRETS[user]}@127.0.0.1:{server.port}/0"


def redis_7() -> str:
    for binary in redis_server_binaries():
        if redis_server_version(binary) >= (7,):
            return binary
    pytest.skip(
        "the ACL recipe's read-only key patterns (%R~) need redis-server 7 or later; none "
        "here (the embedded one is 6.2): install Debian's redis-server, as CI does"
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    binary = redis_7()
    text = RECIPE.read_text()
    for user, secret in SECRETS.items():
        text = text.replace(f"CHANGE-ME-{user}", secret)
    acl = tmp_path / "users.acl"
    acl.write_text(text)
    # The default user is off: the server's own readiness probe logs in as the worker.
    with EmbeddedRedis(
        username="worker",
        password=SECRETS["worker"],
        extra_args=("--aclfile", str(acl)),
        binary=binary,
    ) as srv:
        yield srv


def test_producers_and_workers_work_under_the_recipe_and_producers_do_nothing_else(
    server: EmbeddedRedis, trained_model: TrainedModel, tmp_path: Path
) -> None:
    env = celery_env(url(server, "worker"), model_dir=trained_model.model_dir)
    name = f"acl-{uuid.uuid4().hex[:6]}@tests"
    worker = worker_process(env, tmp_path / "w.log", queue=QUEUE_CPU, name=name).start()
    admin = redis.Redis.from_url(url(server, "worker"))
    try:
        wait_ready(worker, admin, name, 1)
        row = trained_model.X_test[0].tolist()
        # A stock Celery client, by task name, on both paths; results read with .get().
        stock = Celery("stock", broker=url(server, "producer"), backend=url(server, "producer"))
        stock.conf.update(task_serializer="json", accept_content=["json"])
        single = stock.send_task(TASK_PREDICT, kwargs={"features": row}, queue=row_queue(QUEUE_CPU))
        batch = stock.send_task(TASK_PREDICT_BATCH, kwargs={"rows": [row]}, queue=QUEUE_CPU)
        expected = float(trained_model.reference(trained_model.X_test[:1])[0])
        assert single.get(timeout=30)["prediction"] == pytest.approx(expected, abs=1e-5)
        assert batch.get(timeout=30)["predictions"][0] == pytest.approx(expected, abs=1e-5)
        stock.close()
        # The project's client, with its queue-depth limit (a Lua script).
        settings = ProducerSettings(
            redis_url=url(server, "producer"), track_sent_jobs=0, max_queue_depth=1000
        )
        with Client(settings) as client:
            result = client.wait(client.submit(row), timeout=30)
            assert result["prediction"] == pytest.approx(expected, abs=1e-5)

        # What the producer user may not do.
        producer = redis.Redis.from_url(url(server, "producer"))
        admin.hset(UNACKED_KEY, "some-tag", '[{}, "", "inference.cpu"]')
        admin.lpush("inference.cpu", "{}")
        forbidden = [
            lambda: producer.hvals(UNACKED_KEY),
            lambda: producer.hget(UNACKED_KEY, "some-tag"),
            lambda: producer.rpop("inference.cpu"),
            lambda: producer.lrange("inference.cpu", 0, -1),
            lambda: producer.delete("inference.cpu"),
            lambda: producer.set(f"celery-task-meta-{uuid.uuid4()}", "{}"),
            lambda: producer.flushall(),
            lambda: producer.config_get("*"),
            lambda: producer.keys("*"),
        ]
        for attempt in forbidden:
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
        producer.close()
        # And what the worker user may not do either.
        for attempt in [lambda: admin.flushall(), lambda: admin.config_get("*")]:
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
    finally:
        worker.stop()
        admin.close()
