"""Property-based fuzzing of the real worker with messages the producer would never send.

Thousands of messages go straight to the queue: random JSON kwargs (wrong types and
lengths, NaN/inf, huge integers, missing and extra kwargs, a kwarg named `self`),
positional args, unknown task names, malformed envelopes (headers, bodies) and refused
content types (a pickle that would create a file). Each job that can be observed ends in
SUCCESS, only when it was valid and then with the in-process prediction, or in FAILURE
with a typed error. Afterwards the worker runs the same processes, still serves, and its
memory has not grown.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from celery import Celery
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NonInteractiveExampleWarning
from kombu import Connection

from contract.names import QUEUE_CPU, TASK_PREDICT, TASK_PREDICT_BATCH
from producer import errors
from producer.client import Client, TaskStatus
from stack.processes import CeleryProcess, celery_env, worker_process
from stack.rss_soak import MIB, children, worker_rss
from tests.support import TEST_MAX_BATCH_ROWS, RunningWorker, TrainedModel, serving

pytestmark = [
    pytest.mark.integration,
    # Finite numbers beyond float32 become inf in the worker and in the reference alike.
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

N_FEATURES = 5
FIVE = [0.1, 0.2, 0.3, 0.4, 0.5]
INVALID_INPUT = frozenset(
    name
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, errors.InvalidInput)
)
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    # No shrinking: against a live worker it takes minutes, and each assertion names the
    # job that broke it (task, kwargs, status) within the unshrunk batch.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)

# -- an oracle that does not use the project's schema ---------------------------------------


def is_feature(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def is_row(row: Any) -> bool:
    return isinstance(row, list) and len(row) == N_FEATURES and all(map(is_feature, row))


def valid_rows(task: str, kwargs: Any) -> list[list[Any]] | None:
    """The rows of a job that must succeed, or None for a job that must fail."""
    if not isinstance(kwargs, dict):
        return None
    if task == TASK_PREDICT and set(kwargs) == {"features"} and is_row(kwargs["features"]):
        return [kwargs["features"]]
    rows = kwargs.get("rows")
    if (
        task == TASK_PREDICT_BATCH
        and set(kwargs) == {"rows"}
        and isinstance(rows, list)
        and 1 <= len(rows) <= TEST_MAX_BATCH_ROWS
        and all(map(is_row, rows))
    ):
        return rows
    return None


# -- strategies ---------------------------------------------------------------------------

keys = st.one_of(
    st.sampled_from(["self", "args", "kwargs", "features", "rows", "", "model_path"]),
    st.text(max_size=6),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**309, -(10**400), 2**64]),
    st.floats(),  # NaN and ±inf included
    st.text(max_size=6),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=6,
)
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**6), 10**6))
good_row = st.lists(numbers, min_size=N_FEATURES, max_size=N_FEATURES)
near_row = st.lists(st.one_of(numbers, numbers, scalars), min_size=3, max_size=7)
features = st.one_of(good_row, good_row, near_row, json_values)
rows = st.one_of(
    st.lists(good_row, min_size=1, max_size=6),
    st.lists(st.one_of(good_row, near_row), max_size=6),
    st.lists(json_values, max_size=4),
    json_values,
)
extra = st.dictionaries(keys.filter(lambda k: k not in ("features", "rows")), json_values,
                        min_size=1, max_size=2)  # fmt: skip


def merged(kwargs: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    return {**kwargs, **more}


def with_extra(name: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    plain = st.fixed_dictionaries({name: values})
    return st.one_of(plain, plain, st.builds(merged, plain, extra))


predict_kwargs = with_extra("features", features)
batch_kwargs = with_extra("rows", rows)
random_kwargs = st.dictionaries(keys, json_values, max_size=3)
# (task, positional args, kwargs): kwargs also go to the wrong task, or come with args.
jobs = st.one_of(
    st.tuples(st.just(TASK_PREDICT), st.just([]), st.one_of(predict_kwargs, predict_kwargs)),
    st.tuples(st.just(TASK_PREDICT_BATCH), st.just([]), st.one_of(batch_kwargs, batch_kwargs)),
    st.tuples(
        st.sampled_from([TASK_PREDICT, TASK_PREDICT_BATCH]),
        st.just([]),
        st.one_of(random_kwargs, predict_kwargs, batch_kwargs),
    ),
    st.tuples(
        st.sampled_from([TASK_PREDICT, TASK_PREDICT_BATCH]),
        st.lists(json_values, min_size=1, max_size=2),
        st.one_of(st.just({}), predict_kwargs, batch_kwargs),
    ),
)

# Sent in the warm-up, so that the memory they take once is in the baseline.
BIG = [
    (TASK_PREDICT_BATCH, {"rows": [FIVE] * (TEST_MAX_BATCH_ROWS + 1)}, "TooManyRows"),
    (TASK_PREDICT, {"features": [0.5] * 200_000}, "FeatureCountMismatch"),
    (TASK_PREDICT_BATCH, {"rows": [FIVE, [0] * 200_000, "x"]}, "FeatureCountMismatch"),
]

# -- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[Client]:
    from producer.settings import ProducerSettings

    with Client(ProducerSettings(redis_url=redis_url, wait_timeout_s=60)) as c:
        yield c


@pytest.fixture(scope="module")
def broker(redis_url: str) -> Iterator[Connection]:
    with Connection(redis_url) as conn:
        yield conn


def finish(client: Client, ids: list[str], timeout: float = 60) -> dict[str, TaskStatus]:
    return {s.task_id: s for s in client.iter_finished(ids, timeout=timeout)}


def assert_typed_failure(status: TaskStatus, allowed: frozenset[str] = INVALID_INPUT) -> None:
    assert status.state == "FAILURE", status
    assert status.error is not None and status.error.type in allowed, status.error
    assert status.error.retryable is False


def assert_serves(client: Client, trained_model: TrainedModel, queue: str = QUEUE_CPU) -> None:
    rows = trained_model.X_test[:3]
    ids = [client.send(TASK_PREDICT, {"features": r.tolist()}, queue) for r in rows]
    got = [finish(client, [i], timeout=30)[i].result for i in ids]
    expected = trained_model.reference(rows)
    for result, want in zip(got, expected, strict=True):
        assert result is not None
        assert result["prediction"] == pytest.approx(float(want), abs=1e-6)


def predicted(status: TaskStatus) -> list[float]:
    assert status.result is not None
    if "predictions" in status.result:
        return list(status.result["predictions"])
    return [status.result["prediction"]]


# -- RSS and processes before the fuzz ------------------------------------------------------


@pytest.fixture(scope="module")
def baseline(
    client: Client, cpu_worker: RunningWorker, trained_model: TrainedModel
) -> tuple[int, list[int]]:
    """The worker's pool processes and its RSS after a warm-up of good and bad jobs."""
    pid = cpu_worker.process.proc.pid  # type: ignore[union-attr]
    warm = [r.tolist() for r in trained_model.X_test[:200]]
    ids = [client.send(TASK_PREDICT, {"features": r}) for r in warm]
    ids += [client.send(TASK_PREDICT, {"features": [*r[:3], "x"]}) for r in warm]
    ids += [client.send(TASK_PREDICT_BATCH, {"rows": warm})]
    # Single-row jobs enqueued at once reach the row lane's largest batches, then rounds of
    # the fuzz's own jobs: the pool processes' RSS grows ~10 MB over the first round or two
    # of these, then stays flat however many follow (measured over eight rounds of 400);
    # with one round only, the growth measured after the fuzz varied from 19 to 36 MiB.
    ids += client.send_many(TASK_PREDICT, [{"features": r} for r in warm * 10])
    ids += [client.send(*big[:2]) for big in BIG]
    finish(client, ids)
    for _ in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonInteractiveExampleWarning)
            fuzz_jobs = [jobs.example() for _ in range(400)]
        finish(client, [client.send(task, kwargs) for task, args, kwargs in fuzz_jobs if not args])
    main, pool = worker_rss(pid)
    return main + sum(pool.values()), children(pid)


# -- the fuzz -----------------------------------------------------------------------------


@settings(FUZZ, max_examples=50)
@given(batch=st.lists(jobs, min_size=20, max_size=40))
def test_random_kwargs_end_in_success_only_when_valid(
    batch: list[tuple[str, list[Any], dict[str, Any]]],
    client: Client,
    trained_model: TrainedModel,
    baseline: tuple[int, list[int]],
    celery_sender: Celery,
) -> None:
    ids = []
    for task, args, kwargs in batch:
        if args:
            sent = celery_sender.send_task(task, args=args, kwargs=kwargs, queue=QUEUE_CPU)
            ids.append(str(sent.id))
        else:
            ids.append(client.send(task, kwargs, QUEUE_CPU))
    statuses = finish(client, ids)

    good_rows: list[list[Any]] = []
    good_out: list[float] = []
    for task_id, (task, args, kwargs) in zip(ids, batch, strict=True):
        status = statuses[task_id]
        expected = None if args else valid_rows(task, kwargs)
        if expected is None:
            assert_typed_failure(status)
            if args and "self" not in kwargs:  # refused before the schema: see below
                assert status.error is not None and "positional" in status.error.message
            if "self" in kwargs:  # Celery would call the task with two values for `self`
                assert status.error is not None and "'self'" in status.error.message
        else:
            assert status.state == "SUCCESS", (task, kwargs, status)
            good_rows += expected
            good_out += predicted(status)
    if good_rows:
        reference = trained_model.reference(np.array(good_rows, dtype=np.float64))
        np.testing.assert_allclose(good_out, reference, atol=1e-6)


class _Unpickled:
    """Creates a file when unpickled: proof that a pickle was deserialized."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


PICKLE_MARKER = Path(f"/tmp/inference-fuzz-unpickled-{uuid.uuid4().hex}")
PICKLE = pickle.dumps(((), {"features": _Unpickled(PICKLE_MARKER)}, {}))
YAML = f"- []\n- !!python/object/apply:builtins.open ['{PICKLE_MARKER}', 'w']\n- {{}}\n"
REGISTERED = [TASK_PREDICT, TASK_PREDICT_BATCH]
# Headers Celery reads, fuzzed with any JSON value. Not fuzzed: a valid future `eta` or a
# past `expires` would delay or revoke the job, and `ignore_result` would hide its result.
CELERY_HEADERS = [
    "root_id", "parent_id", "group", "shadow", "origin", "lang", "argsrepr", "kwargsrepr",
    "retries", "group_index", "replaced_task_nesting", "stamped_headers", "stamps",
    "timelimit", "enqueued_at", "eta", "expires", "x-anything",
]  # fmt: skip

json_bodies = st.one_of(
    st.builds(lambda kw: [[], kw, None], st.one_of(predict_kwargs, batch_kwargs)),
    st.builds(
        lambda kw: [[], kw, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
        st.one_of(predict_kwargs, batch_kwargs),
    ),
    st.tuples(json_values, json_values, json_values).map(list),
    json_values,
)
bodies = st.one_of(
    st.tuples(st.just("application/json"), json_bodies.map(json.dumps)),
    st.tuples(st.just("application/json"), json_bodies.map(json.dumps)),
    st.tuples(st.just("application/json"), st.binary(max_size=40)),
    st.tuples(st.just("application/x-python-serialize"), st.just(PICKLE)),
    st.tuples(st.just("application/x-yaml"), st.just(YAML)),
    st.tuples(
        st.sampled_from(["text/plain", "application/data", "application/x-msgpack", "", "x/y"]),
        st.one_of(st.binary(max_size=20), json_bodies.map(json.dumps)),
    ),
)


def envelopes(guarded: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Raw messages: task name, id, other headers, content type and body.

    Unguarded (the stock consumer), the task name is a string and an unknown task has a
    string id: anything else makes Celery's consumer fail before any task strategy runs.
    """
    good_id = st.builds(lambda: str(uuid.uuid4()))
    bad_id = st.one_of(st.just(None), scalars, st.lists(scalars, max_size=2))
    unknown = st.sampled_from(["inference.nope", "", "inference.predict "]) | st.text(max_size=8)
    registered = st.builds(
        lambda task, task_id, headers, body: (task, task_id, headers, body),
        st.sampled_from(REGISTERED), st.one_of(good_id, good_id, bad_id),
        st.dictionaries(st.sampled_from(CELERY_HEADERS), json_values, max_size=2), bodies,
    )  # fmt: skip
    unregistered = st.builds(
        lambda task, task_id, body: (task, task_id, {}, body),
        unknown, good_id if not guarded else st.one_of(good_id, bad_id), bodies,
    )  # fmt: skip
    anything = st.builds(
        lambda task, task_id, headers, body: (task, task_id, headers, body),
        json_values, st.one_of(good_id, bad_id),
        st.dictionaries(keys, json_values, max_size=2), bodies,
    )  # fmt: skip
    kinds = [registered, registered, unregistered] + ([anything] if guarded else [])
    return st.one_of(*kinds).map(
        lambda t: {"task": t[0], "id": t[1], "headers": t[2], "ctype": t[3][0], "body": t[3][1]}
    )


def publish(broker: Connection, queue: str, env: dict[str, Any]) -> None:
    headers = {**env["headers"], "task": env["task"]}
    if env["id"] is not None:
        headers["id"] = env["id"]
    body = env["body"]
    broker.Producer().publish(
        body,
        routing_key=queue,
        exchange="",
        headers=headers,
        content_type=env["ctype"] or None,
        content_encoding="binary" if isinstance(body, bytes) else "utf-8",
        retry=True,
    )


def observable(env: dict[str, Any]) -> bool:
    """A message whose result the test can look up: a string task name and a UUID id (a
    random string id could name any key, or repeat within the batch)."""
    if not isinstance(env["task"], str) or not isinstance(env["id"], str):
        return False
    try:
        return str(uuid.UUID(env["id"])) == env["id"]
    except ValueError:
        return False


def check_envelopes(client: Client, sent: list[dict[str, Any]]) -> None:
    """Every message with a string id and task name ends FAILURE with a typed error, or
    SUCCESS when it was a well-formed JSON job with valid kwargs."""
    watched = [env for env in sent if observable(env)]
    statuses = finish(client, [env["id"] for env in watched])
    for env in watched:
        status = statuses[env["id"]]
        if env["task"] not in REGISTERED:
            assert_typed_failure(status, frozenset({"NotRegistered"}))
            continue
        json_body = env["ctype"] == "application/json" and isinstance(env["body"], str)
        decoded = json.loads(env["body"]) if json_body else None
        well_formed = (
            isinstance(decoded, list)
            and len(decoded) == 3
            and decoded[0] == []
            and valid_rows(env["task"], decoded[1]) is not None
            and decoded[2] in (None, {"callbacks": None, "errbacks": None, "chain": None,
                                      "chord": None})
        )  # fmt: skip
        if well_formed and not env["headers"]:
            assert status.state == "SUCCESS", (env, status)
        elif status.state == "SUCCESS":
            # Fuzzed headers may all be acceptable; the job itself must have been valid.
            assert well_formed, (env, status)
        else:
            assert_typed_failure(status)


@settings(FUZZ, max_examples=25)
@given(batch=st.lists(envelopes(guarded=False), min_size=5, max_size=25))
def test_malformed_envelopes_and_content_types_are_refused(
    batch: list[dict[str, Any]],
    client: Client,
    broker: Connection,
    trained_model: TrainedModel,
    baseline: tuple[int, list[int]],
) -> None:
    for env in batch:
        publish(broker, QUEUE_CPU, env)
    check_envelopes(client, batch)
    assert_serves(client, trained_model)
    assert not PICKLE_MARKER.exists()


@pytest.fixture(scope="module")
def guarded_worker(
    redis_url: str, trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningWorker]:
    """A solo worker whose app uses worker.guards.GuardedConsumer."""
    hostname = f"guarded-{uuid.uuid4().hex[:8]}@tests"
    queue = f"fuzz-{uuid.uuid4().hex[:8]}"
    env = celery_env(
        redis_url, model_dir=trained_model.model_dir, max_batch_rows=TEST_MAX_BATCH_ROWS
    )
    log = tmp_path_factory.mktemp("logs") / "guarded-worker.log"
    code = (
        "import sys; from worker.celery import app; "
        "app.conf.worker_consumer = 'worker.guards:GuardedConsumer'; app.worker_main(sys.argv[1:])"
    )
    stock = worker_process(env, log, queue=queue, name=hostname, pool="solo")
    proc = CeleryProcess([sys.executable, "-c", code, *stock.args[5:]], env, log)
    with serving(proc, redis_url, hostname, queue) as worker:
        yield worker


@settings(FUZZ, max_examples=15)
@given(batch=st.lists(envelopes(guarded=True), min_size=5, max_size=25))
def test_guarded_consumer_survives_messages_that_stop_the_stock_one(
    batch: list[dict[str, Any]],
    client: Client,
    broker: Connection,
    guarded_worker: RunningWorker,
    trained_model: TrainedModel,
) -> None:
    # A `task` header that is a list: the stock consumer dies on it ("Unrecoverable error").
    batch = [{**batch[0], "task": ["inference.predict"], "id": str(uuid.uuid4())}, *batch]
    for env in batch:
        publish(broker, guarded_worker.queue, env)
    check_envelopes(client, batch)
    assert guarded_worker.process.running
    assert_serves(client, trained_model, guarded_worker.queue)
    assert not PICKLE_MARKER.exists()


def test_after_the_fuzz_the_same_processes_serve_with_flat_memory(
    client: Client,
    cpu_worker: RunningWorker,
    trained_model: TrainedModel,
    baseline: tuple[int, list[int]],
) -> None:
    before_rss, before_pool = baseline
    pid = cpu_worker.process.proc.pid  # type: ignore[union-attr]
    assert cpu_worker.process.running
    assert_serves(client, trained_model)
    main, pool = worker_rss(pid)
    after_rss = main + sum(pool.values())
    growth = (after_rss - before_rss) / MIB
    print(
        f"\nworker RSS, main + {len(pool)} pool processes: after warm-up {before_rss / MIB:.1f}"
        f" MiB, after the fuzz {after_rss / MIB:.1f} MiB ({growth:+.1f} MiB; now main"
        f" {main / MIB:.1f}, pool {' '.join(f'{v / MIB:.1f}' for v in pool.values())})"
    )
    # No pool process was lost and replaced (a crash, a hard time limit) during the fuzz.
    assert sorted(pool) == before_pool
    assert growth < 30, f"worker RSS grew by {growth:.1f} MiB"
    assert not PICKLE_MARKER.exists()
