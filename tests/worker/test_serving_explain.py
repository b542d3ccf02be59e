"""inference.explain under serving decisions, in process: each job is explained by the
version that serves it (its own explain.onnx), by the same routing as predictions, and the
result names that version and its arm."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest

from contract.errors import ExplainUnavailable
from contract.schemas import ExplainResult, ServingDecision, WorkerState
from tests.support import served_version
from training.artifact import CONTRIBUTIONS_NAME
from training.train import TrainConfig, TrainOutcome, run_training
from worker import service
from worker.model import load_model
from worker.runtime import Runtime
from worker.serving import ARM_CHAMPION, ARM_PINNED, Serving
from worker.settings import WorkerSettings
from worker.stats import Heartbeat, ProcessStats

NAME = f"sexplain-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[TrainOutcome]:
    model_dir = tmp_path_factory.mktemp("sexplain-models")
    config = TrainConfig(model_dir=model_dir, name=NAME, n_samples=1500, n_estimators=10, n_jobs=1)
    return [run_training(config), run_training(config.model_copy(update={"seed": 1}))]


def _runtime(versions: list[TrainOutcome], tmp_path: Path, **overrides: Any) -> Runtime:
    settings = WorkerSettings(
        model_dir=versions[0].version_dir.parent.parent,
        model_name=NAME,
        model_version=versions[0].manifest.version,
        model_cache_dir=tmp_path / "cache",
        warmup_runs=0,
        max_batch_rows=40,
        **overrides,
    )
    model = load_model(settings)
    stats = ProcessStats(
        WorkerState(
            hostname="h@t", pid=1, queues=["inference.cpu"], pool="solo", model_name=NAME,
            model_version=model.manifest.version, provider="cpu", device="cpu",
            started_at=0, updated_at=0,
        )
    )  # fmt: skip
    rt = Runtime(settings, model, stats, Heartbeat(fakeredis.FakeRedis(), stats, 1.0))
    rt.serving = Serving(settings, model)
    return rt


def _contributions(version: TrainOutcome, rows: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    path = version.version_dir / version.manifest.files["explain"].path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run([CONTRIBUTIONS_NAME], {"features": rows.astype(np.float32)})
    return np.asarray(out)


def test_each_explain_job_is_explained_by_the_version_that_serves_it(
    versions: list[TrainOutcome], tmp_path: Path
) -> None:
    rt = _runtime(versions, tmp_path)
    one, two = (served_version(v.version_dir, str(i + 1)) for i, v in enumerate(versions))
    assert rt.serving is not None
    assert rt.serving.apply(
        ServingDecision(name=NAME, generation=1, champion=two, previous=one, decided_at=time.time())
    )
    rt.model = rt.serving.arms.champion
    rows = versions[0].X_test[:5]
    jobs = [
        service.Job((), {"rows": rows.tolist()}, None, "h", "a"),
        service.Job((), {"rows": rows[:2].tolist(), "model_version": "1"}, None, "h", "b"),
        service.Job((), {"rows": rows[:3].tolist()}, None, "h", "c", pin=one.version),
    ]
    # Explained together, as the row lane does: one graph pass per version.
    outcomes = service.explain_many(rt, jobs)
    results = [ExplainResult.model_validate(o) for o in outcomes]
    assert [(r.model_version, r.arm) for r in results] == [
        (two.version, ARM_CHAMPION),
        (one.version, ARM_PINNED),
        (one.version, ARM_PINNED),
    ]
    expected = [(versions[1], 5), (versions[0], 2), (versions[0], 3)]
    for result, (version, n) in zip(results, expected, strict=True):
        np.testing.assert_allclose(
            result.contributions, _contributions(version, rows[:n]), atol=1e-12
        )
        assert result.base_value == version.manifest.base_value
        gap = result.base_value + np.asarray(result.contributions).sum(axis=1)
        assert np.abs(gap - np.asarray(result.predictions)).max() <= 1e-4
    # The two versions' explanations differ: the routing, not chance, made them match.
    assert not np.allclose(results[0].contributions[:2], results[1].contributions)


def test_a_version_loaded_by_a_swap_loads_its_explainer_on_the_first_explain_job(
    versions: list[TrainOutcome], tmp_path: Path
) -> None:
    rt = _runtime(versions, tmp_path)
    assert rt.serving is not None
    rt.serving.apply(
        ServingDecision(
            name=NAME, generation=1, champion=served_version(versions[1].version_dir),
            decided_at=time.time(),
        )
    )  # fmt: skip
    champion = rt.serving.arms.champion
    # The swap loaded the prediction model only: explain.onnx waits for an explain job.
    assert champion.explainer is None and champion.explains
    rt.model = champion
    job = service.Job((), {"rows": versions[1].X_test[:3].tolist()}, None, "h")
    result = service.explain(rt, job)
    explainer = champion.explainer
    assert explainer is not None and champion.explain_from is None
    assert result["base_value"] == explainer.base_value == versions[1].manifest.base_value
    np.testing.assert_allclose(
        result["contributions"], _contributions(versions[1], versions[1].X_test[:3]), atol=1e-12
    )
    assert explainer.session is not rt.serving.arms.champion.session
    assert champion.load_s > 0


def test_a_tampered_explain_file_found_on_first_use_fails_explain_jobs_only(
    versions: list[TrainOutcome], tmp_path: Path
) -> None:
    rt = _runtime(versions, tmp_path)
    assert rt.serving is not None
    rt.serving.apply(
        ServingDecision(
            name=NAME, generation=1, champion=served_version(versions[1].version_dir),
            decided_at=time.time(),
        )
    )  # fmt: skip
    champion = rt.model = rt.serving.arms.champion
    assert champion.explain_from is not None
    explain_file = champion.explain_from[1] / "explain.onnx"
    explain_file.write_bytes(explain_file.read_bytes()[:-1] + b"x")
    job = service.Job((), {"rows": versions[1].X_test[:2].tolist()}, None, "h")
    with pytest.raises(ExplainUnavailable, match="sha256"):
        service.explain(rt, job)
    # Predictions go on, from the same version.
    row = service.Job((), {"features": versions[1].X_test[0].tolist()}, None, "h")
    assert service.predict_one(rt, row)["model_version"] == champion.manifest.version


def test_without_explanations_a_swapped_in_version_refuses_explain_jobs(
    versions: list[TrainOutcome], tmp_path: Path
) -> None:
    rt = _runtime(versions, tmp_path, explain=False)
    assert rt.serving is not None
    two = served_version(versions[1].version_dir)
    rt.serving.apply(ServingDecision(name=NAME, generation=1, champion=two, decided_at=time.time()))
    rt.model = rt.serving.arms.champion
    assert rt.model.manifest.version == two.version and rt.model.explainer is None
    job = service.Job((), {"rows": versions[0].X_test[:2].tolist()}, None, "h")
    with pytest.raises(ExplainUnavailable, match="INFERENCE_EXPLAIN=false"):
        service.explain(rt, job)
