"""worker.serving in process, with real onnxruntime sessions: swaps, checks, pins, canary
routing and shadow statistics."""

from __future__ import annotations

import gc
import time
import uuid
import weakref
from pathlib import Path

import numpy as np
import pytest

from contract.errors import UnknownModelVersion
from contract.schemas import ServedVersion, ServingDecision
from tests.support import served_version
from training.train import TrainConfig, TrainOutcome, run_training
from worker.model import load_model
from worker.serving import ARM_CHALLENGER, ARM_CHAMPION, ARM_PINNED, Serving, in_canary
from worker.settings import WorkerSettings

NAME = f"serving-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[TrainOutcome]:
    model_dir = tmp_path_factory.mktemp("serving-models")
    config = TrainConfig(model_dir=model_dir, name=NAME, n_samples=1500, n_estimators=10, n_jobs=1)
    first = run_training(config)
    second = run_training(config.model_copy(update={"seed": 1}))
    return [first, second]


@pytest.fixture
def settings(versions: list[TrainOutcome], tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        model_dir=versions[0].version_dir.parent.parent,
        model_name=NAME,
        model_version=versions[0].manifest.version,
        model_cache_dir=tmp_path / "cache",
        warmup_runs=1,
        max_pinned_versions=1,
    )


def decision(generation: int, champion: ServedVersion, **kw: object) -> ServingDecision:
    return ServingDecision(
        name=NAME, generation=generation, champion=champion, decided_at=time.time(), **kw
    )


def test_canary_share_is_within_a_tenth_over_20000_keys_and_sticky() -> None:
    keys = [uuid.uuid4().hex for _ in range(20_000)]
    share = sum(in_canary(k, 10) for k in keys) / len(keys)
    assert 0.09 <= share <= 0.11
    assert [in_canary(k, 10) for k in keys[:500]] == [in_canary(k, 10) for k in keys[:500]]
    assert not any(in_canary(k, 0) for k in keys[:500])
    assert all(in_canary(k, 100) for k in keys[:500])
    # A key in a 10% canary stays in it as the share grows.
    assert all(in_canary(k, 50) for k in keys if in_canary(k, 10))


def test_apply_swaps_between_batches_and_frees_the_old_session(
    settings: WorkerSettings, versions: list[TrainOutcome]
) -> None:
    serving = Serving(settings, load_model(settings))
    old = weakref.ref(serving.arms.champion.session)
    assert serving.apply(decision(0, served_version(versions[1].version_dir)))
    assert serving.arms.champion.manifest.version == versions[1].manifest.version
    assert serving.status().generation == 0 and serving.status().error is None
    gc.collect()
    assert old() is None
    # The fetched copy is the one served, byte for byte.
    cached = settings.model_cache_dir / NAME / versions[1].manifest.version / "model.onnx"
    assert cached.read_bytes() == (versions[1].version_dir / "model.onnx").read_bytes()
    # The same generation again is not applied twice.
    assert not serving.apply(decision(0, served_version(versions[0].version_dir)))


def test_a_version_with_a_bad_sha256_is_not_served(
    settings: WorkerSettings, versions: list[TrainOutcome]
) -> None:
    serving = Serving(settings, load_model(settings))
    bad = served_version(versions[1].version_dir)
    bad = bad.model_copy(update={"sha256": {**bad.sha256, "model.onnx": "0" * 64}})
    assert not serving.apply(decision(3, bad))
    assert serving.arms.champion.manifest.version == versions[0].manifest.version
    status = serving.status()
    assert status.generation == -1 and "sha256" in (status.error or "")
    assert not (settings.model_cache_dir / NAME / versions[1].manifest.version).exists()


def test_a_refused_decision_is_not_retried_but_an_unreachable_store_is(
    settings: WorkerSettings, versions: list[TrainOutcome], tmp_path: Path
) -> None:
    serving = Serving(settings, load_model(settings))
    bad = served_version(versions[1].version_dir)
    bad = bad.model_copy(update={"sha256": {**bad.sha256, "model.onnx": "0" * 64}})
    assert not serving.apply(decision(3, bad))
    assert serving.refused_generation == 3
    # The poll reads the same decision again: it is not fetched again (the copy is gone).
    (versions[1].version_dir / "model.onnx").rename(tmp_path / "moved.onnx")
    try:
        assert not serving.apply(decision(3, bad))
        assert "sha256" in (serving.error or "")
    finally:
        (tmp_path / "moved.onnx").rename(versions[1].version_dir / "model.onnx")
    # A store that can't be read is tried again on the next poll, and then served.
    gone = served_version(versions[1].version_dir).model_copy(
        update={"location": str(tmp_path / "not-yet")}
    )
    assert not serving.apply(decision(4, gone))
    assert "cannot read" in (serving.error or "") and serving.refused_generation == 3
    (tmp_path / "not-yet").symlink_to(versions[1].version_dir)
    assert serving.apply(decision(4, gone))
    assert serving.arms.champion.manifest.version == versions[1].manifest.version


def test_a_decision_naming_a_loaded_version_with_other_hashes_is_refused(
    settings: WorkerSettings, versions: list[TrainOutcome]
) -> None:
    """The copy a process holds is served only under a decision that names its manifest."""
    serving = Serving(settings, load_model(settings))
    same = served_version(versions[0].version_dir)
    forged = same.model_copy(update={"sha256": {**same.sha256, "manifest.json": "1" * 64}})
    assert not serving.apply(decision(1, forged))
    assert "differs" in (serving.error or "") and serving.status().generation == -1
    assert serving.apply(decision(2, same))
    assert serving.status().generation == 2 and serving.error is None


def test_a_version_with_another_feature_count_is_not_served(
    settings: WorkerSettings, versions: list[TrainOutcome], tmp_path: Path
) -> None:
    wide_dir = tmp_path / "wide"
    wide = run_training(
        TrainConfig(
            model_dir=wide_dir, name=NAME, n_samples=600, n_estimators=2, n_jobs=1
        ).model_copy(update={"csv": _csv(tmp_path, 7), "target": "y"})
    )
    serving = Serving(settings, load_model(settings))
    assert not serving.apply(decision(1, served_version(wide.version_dir)))
    assert "features" in (serving.error or "")
    assert serving.arms.champion.manifest.version == versions[0].manifest.version


def test_pins_canary_and_shadow(settings: WorkerSettings, versions: list[TrainOutcome]) -> None:
    serving = Serving(settings, load_model(settings))
    one, two = (served_version(v.version_dir, str(i + 1)) for i, v in enumerate(versions))
    assert serving.apply(decision(5, two, challenger=one, canary_percent=10, shadow=True))
    model, arm = serving.choose("champion", None, "job")
    assert (model.manifest.version, arm) == (two.version, ARM_PINNED)
    assert serving.choose("1", None, "job")[0].manifest.version == one.version
    keys = [f"user-{i}" for i in range(2000)]
    arms = [serving.choose(None, k, "job")[1] for k in keys]
    assert arms == [ARM_CHALLENGER if in_canary(k, 10) else ARM_CHAMPION for k in keys]
    with pytest.raises(UnknownModelVersion):
        serving.choose("no-such-version", None, "job")
    with pytest.raises(UnknownModelVersion):
        serving.choose("../../etc", None, "job")

    rows = versions[0].X_test[:200].astype(np.float32)
    key = next(k for k in keys if not in_canary(k, 10))
    model, arm, challenger = serving.pick(None, key, "job")
    assert (model, arm, challenger) == (
        serving.arms.champion, ARM_CHAMPION, serving.arms.challenger
    )  # fmt: skip
    served = model.predict(rows)
    serving.shadow(rows, served, model, challenger)
    assert serving.drain_shadow()
    status = serving.status()
    expected = np.abs(serving.arms.challenger.predict(rows) - served)  # type: ignore[union-attr]
    assert status.shadow_rows == 200
    assert status.shadow_mean_abs_diff == pytest.approx(float(expected.mean()), rel=1e-4)
    assert status.loaded_versions == sorted({one.version, two.version})
    serving.close()


def test_pinned_versions_are_kept_least_recently_used(
    settings: WorkerSettings, versions: list[TrainOutcome]
) -> None:
    only_second = settings.model_copy(update={"model_version": versions[1].manifest.version})
    serving = Serving(only_second, load_model(only_second))
    # Before any decision there are no roles.
    assert serving.choose(None, "key", "job") == (serving.arms.champion, None)
    first = versions[0].manifest.version
    model, arm = serving.choose(first, None, "job")
    assert (model.manifest.version, arm) == (first, ARM_PINNED)
    assert serving.choose(first, None, "job")[0] is model  # kept loaded
    assert first in serving.status().loaded_versions


def test_rss_stays_flat_over_20_swaps(
    settings: WorkerSettings, versions: list[TrainOutcome]
) -> None:
    serving = Serving(settings, load_model(settings))
    both = [served_version(v.version_dir) for v in versions]
    rows = versions[0].X_test[:64].astype(np.float32)
    for generation in range(5):
        serving.apply(decision(generation, both[generation % 2]))
        serving.arms.champion.predict(rows)
    gc.collect()
    before = _rss_kb()
    for generation in range(5, 25):
        assert serving.apply(decision(generation, both[generation % 2]))
        serving.arms.champion.predict(rows)
    gc.collect()
    grown_mb = (_rss_kb() - before) / 1024
    assert serving.arms.generation == 24
    assert grown_mb < 8, f"RSS grew {grown_mb:.1f} MB over 20 swaps"


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _csv(tmp_path: Path, n_features: int) -> Path:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, n_features))
    path = tmp_path / "wide.csv"
    header = ",".join([*(f"x{i}" for i in range(n_features)), "y"])
    lines = [header] + [",".join(map(str, [*row, row.sum()])) for row in X]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_previous_champion_can_be_pinned(
    settings: WorkerSettings, versions: list[TrainOutcome]
) -> None:
    serving = Serving(settings, load_model(settings))
    one, two = (served_version(v.version_dir, str(i + 1)) for i, v in enumerate(versions))
    assert serving.apply(decision(1, two, previous=one))
    model, arm = serving.choose("1", None, "job")  # its registry number, from the decision
    assert (model.manifest.version, arm) == (one.version, ARM_PINNED)
    assert serving.choose(one.version, None, "job")[0] is model
