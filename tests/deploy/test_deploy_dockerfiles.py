"""The worker Dockerfiles install what they should and run what the code expects."""

from __future__ import annotations

import re
import shlex
import tomllib

import pytest
from deploy_helpers import (
    PYPROJECT,
    REPO_ROOT,
    Dockerfile,
    Stage,
    exec_form,
    healthcheck_command,
    option_value,
)
from packaging.requirements import Requirement
from packaging.version import Version

from contract.names import QUEUE_CPU, QUEUE_GPU

# CUDA major version the PyPI onnxruntime-gpu wheels of each 1.x minor target.
# Since 1.19 the default PyPI build is CUDA 12 + cuDNN 9 (CUDA Execution
# Provider docs, "Requirements"). Extend this table only after checking the
# release notes when pyproject's bound moves.
ORT_GPU_CUDA_MAJOR = {minor: 12 for minor in range(19, 27)}

# What the images copy into the build: the package and its metadata, never
# tests, models or local environments. The CPU Dockerfile also builds the gateway.
ALLOWED_COPY_SOURCES = {
    "pyproject.toml",
    "README.md",
    "contract/",
    "producer/",
    "worker/",
    "training/",
}
GATEWAY_COPY_SOURCES = {"gateway/"}

# Default python3 of the Ubuntu releases nvidia/cuda images are built on.
UBUNTU_PYTHON = {"20.04": (3, 8), "22.04": (3, 10), "24.04": (3, 12)}

CUDA_TAG = re.compile(
    r"^(?:docker\.io/)?nvidia/cuda:(?P<major>\d+)\.(?P<minor>\d+)(?:\.\d+)?"
    r"-(?P<cudnn>cudnn\d*)-runtime-ubuntu(?P<ubuntu>\d+\.\d+)(?:@sha256:[0-9a-f]{64})?$"
)
PYTHON_TAG = re.compile(
    r"^(?:docker\.io/)?(?:library/)?python:(?P<major>\d+)\.(?P<minor>\d+)(?:\.\d+)?-slim[\w.-]*"
    r"(?:@sha256:[0-9a-f]{64})?$"
)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def _requires_python() -> tuple[int, int]:
    spec = _pyproject()["project"]["requires-python"]
    m = re.search(r">=\s*(\d+)\.(\d+)", spec)
    assert m, spec
    return int(m.group(1)), int(m.group(2))


def _extra(name: str) -> list[Requirement]:
    return [Requirement(r) for r in _pyproject()["project"]["optional-dependencies"][name]]


def _pip_installs(stage: Stage) -> list[str]:
    """Requirement arguments of every `pip install` in a stage's RUN instructions."""
    found: list[str] = []
    for inst in stage.all("RUN"):
        # A RUN's value is a shell command line, which dockerfile-parse does not read:
        # shlex splits it at the shell's separators, to find each command's words.
        lexer = shlex.shlex(inst.args, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        segments: list[list[str]] = [[]]
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                segments.append([])
            else:
                segments[-1].append(token)
        for words in segments:
            for i, word in enumerate(words):
                if (
                    re.search(r"(^|/)pip3?$", word)
                    and i + 1 < len(words)
                    and words[i + 1] == "install"
                ):
                    found += [w for w in words[i + 2 :] if not w.startswith("-")]
                    break
    return found


def _installs_everything(dockerfile: Dockerfile) -> list[str]:
    return [req for stage in dockerfile.stages for req in _pip_installs(stage)]


def _dist_name(requirement: str) -> str:
    """`onnxruntime-gpu==1.2` -> onnxruntime-gpu; `.[worker]` -> .[worker]."""
    if requirement.startswith((".", "/")):
        return requirement
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _final_stage(dockerfile: Dockerfile) -> Stage:
    return dockerfile.stages[-1]


def _worker_cmd(dockerfile: Dockerfile) -> list[str]:
    cmd = dockerfile.inherited_last(_final_stage(dockerfile), "CMD")
    assert cmd is not None, f"{dockerfile.path.name}: no CMD"
    argv = exec_form(cmd.args)
    assert argv is not None, "use the exec form for CMD so celery gets the signals"
    return argv


def _external_bases(dockerfile: Dockerfile) -> set[str]:
    return {dockerfile.external_base(s) for s in dockerfile.stages}


# --------------------------------------------------------------------------
# Both images
# --------------------------------------------------------------------------


@pytest.fixture(params=["cpu", "gpu"])
def dockerfile(request: pytest.FixtureRequest, cpu_dockerfile, gpu_dockerfile) -> Dockerfile:
    return cpu_dockerfile if request.param == "cpu" else gpu_dockerfile


def test_one_base_image_for_all_stages(dockerfile: Dockerfile) -> None:
    """The runtime copies /opt/venv from the build stage: same image, same interpreter."""
    bases = _external_bases(dockerfile)
    assert len(bases) == 1, f"{dockerfile.path.name} mixes base images: {bases}"
    (base,) = bases
    assert ":" in base and not base.endswith(":latest"), f"pin the base image by tag: {base}"


def test_copies_only_the_package(dockerfile: Dockerfile) -> None:
    sources: set[str] = set()
    for stage in dockerfile.stages:
        for inst in stage.all("COPY") + stage.all("ADD"):
            assert inst.keyword == "COPY", "use COPY, not ADD"
            if "from" in inst.flags():
                continue
            sources |= set(inst.operands()[:-1])
    allowed = ALLOWED_COPY_SOURCES | (
        GATEWAY_COPY_SOURCES if any(s.name == "gateway" for s in dockerfile.stages) else set()
    )
    assert sources == allowed, sources
    for src in sources:
        assert (REPO_ROOT / src).exists(), f"COPY source {src} does not exist"


def test_runs_as_non_root(dockerfile: Dockerfile) -> None:
    """Every stage meant to be run (the final one, and any with a CMD) drops root."""
    final = _final_stage(dockerfile)
    for stage in dockerfile.stages:
        if stage is not final and not stage.all("CMD"):
            continue
        user = dockerfile.inherited_last(stage, "USER")
        assert user is not None, f"stage {stage.name} runs as root"
        assert user.args.split(":")[0] not in ("root", "0"), f"stage {stage.name} runs as root"


def test_pip_installs_into_the_venv(dockerfile: Dockerfile) -> None:
    """The runtime stage copies /opt/venv; a system-wide install would be left behind
    (and Ubuntu 24.04's python3 refuses one, PEP 668)."""
    for stage in dockerfile.stages:
        for inst in stage.all("RUN"):
            if re.search(r"\bpip3? install\b", inst.args):
                assert "/opt/venv/bin/pip install" in inst.args, (
                    f"{dockerfile.path.name}:{inst.line}: install into /opt/venv"
                )


def test_model_volume_and_environment(dockerfile: Dockerfile, env_names: set[str]) -> None:
    final = _final_stage(dockerfile)
    env = dockerfile.env(final)
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("INFERENCE_MODEL_DIR") == "/models"
    volumes = " ".join(i.args for s in dockerfile.lineage(final) for i in s.all("VOLUME"))
    assert "/models" in volumes
    unknown = sorted(k for k in env if k.startswith("INFERENCE_") and k.upper() not in env_names)
    assert not unknown, f"INFERENCE_* variables that are not settings fields: {unknown}"


def test_healthcheck_pings_this_worker(dockerfile: Dockerfile) -> None:
    check = dockerfile.inherited_last(_final_stage(dockerfile), "HEALTHCHECK")
    assert check is not None, f"{dockerfile.path.name}: no HEALTHCHECK"
    # The probe itself, without HEALTHCHECK's own --interval/--timeout options.
    argv = healthcheck_command(check.args)
    assert argv is not None, f"{dockerfile.path.name}: HEALTHCHECK NONE"
    probe = " ".join(argv)
    assert "celery -A worker inspect ping" in probe
    assert re.search(r"-d\s+\"?celery@\$\{?HOSTNAME", probe), probe
    assert re.search(r"(--timeout[= ]|-t )\d+", probe), "give inspect ping a timeout"


def test_default_celery_command_matches_contract(dockerfile: Dockerfile) -> None:
    argv = _worker_cmd(dockerfile)
    assert argv[:4] == ["celery", "-A", "worker", "worker"], argv
    queue = option_value(argv, "-Q", "--queues")
    pool = option_value(argv, "-P", "--pool")
    if dockerfile.path.name == "Dockerfile.worker":
        assert queue == QUEUE_CPU and pool == "prefork"
    else:
        assert queue == QUEUE_GPU and pool in ("solo", "threads")


# --------------------------------------------------------------------------
# CPU image and trainer
# --------------------------------------------------------------------------


def test_cpu_base_image_is_slim_python(cpu_dockerfile: Dockerfile) -> None:
    (base,) = _external_bases(cpu_dockerfile)
    m = PYTHON_TAG.match(base)
    assert m, f"expected a python:3.x-slim base: {base}"
    assert (int(m["major"]), int(m["minor"])) >= _requires_python()


def test_cpu_worker_installs_the_worker_extra_only(cpu_dockerfile: Dockerfile) -> None:
    final = _final_stage(cpu_dockerfile)
    assert final.name == "worker", "the CPU worker must be the last (default) stage"
    # The worker stage copies its venv from the stage that installed it.
    sources = {i.flags()["from"] for i in final.all("COPY") if "from" in i.flags()}
    assert len(sources) == 1, sources
    build = cpu_dockerfile.stage(sources.pop())
    installs = [r for s in cpu_dockerfile.lineage(build) for r in _pip_installs(s)]
    assert ".[worker]" in installs, installs
    assert not {".[worker-gpu]", ".[training]", ".[dev]"} & set(installs), installs


def test_cpu_dockerfile_never_installs_onnxruntime_gpu(cpu_dockerfile: Dockerfile) -> None:
    installs = _installs_everything(cpu_dockerfile)
    assert ".[worker-gpu]" not in installs
    assert "onnxruntime-gpu" not in {_dist_name(r) for r in installs}
    for extra in ("worker", "training"):
        names = {r.name.lower() for r in _extra(extra)}
        assert "onnxruntime-gpu" not in names, f"the {extra} extra pulls onnxruntime-gpu"


def test_trainer_target(cpu_dockerfile: Dockerfile) -> None:
    trainer = cpu_dockerfile.stage("trainer")
    sources = {i.flags()["from"] for i in trainer.all("COPY") if "from" in i.flags()}
    installs = [
        r
        for src in sources
        for s in cpu_dockerfile.lineage(cpu_dockerfile.stage(src))
        for r in _pip_installs(s)
    ]
    assert ".[training]" in installs, installs
    cmd = trainer.last("CMD")
    assert cmd is not None
    argv = exec_form(cmd.args)
    assert argv is not None
    assert argv[:3] == ["python", "-m", "training"]
    assert option_value(argv, "--model-dir") == "/models"
    assert "--no-benchmark" in argv


# --------------------------------------------------------------------------
# GPU image
# --------------------------------------------------------------------------


def _ort_gpu_cuda_majors() -> set[int]:
    """CUDA majors targeted by every onnxruntime-gpu minor the worker-gpu extra allows."""
    (req,) = [r for r in _extra("worker-gpu") if r.name.lower() == "onnxruntime-gpu"]
    allowed = {
        minor
        for minor in range(0, 60)
        if any(Version(f"1.{minor}.{patch}") in req.specifier for patch in (0, 1, 2, 9))
    }
    assert allowed, f"{req} allows no 1.x release"
    unknown = allowed - ORT_GPU_CUDA_MAJOR.keys()
    assert not unknown, (
        f"{req} allows onnxruntime-gpu 1.{sorted(unknown)}, whose CUDA target this test does not "
        "know: check the release notes, then update ORT_GPU_CUDA_MAJOR and the base image"
    )
    return {ORT_GPU_CUDA_MAJOR[m] for m in allowed}


def test_gpu_base_image_matches_onnxruntime_gpu(gpu_dockerfile: Dockerfile) -> None:
    (base,) = _external_bases(gpu_dockerfile)
    m = CUDA_TAG.match(base)
    assert m, f"expected nvidia/cuda:<ver>-cudnn-runtime-ubuntu<ver>: {base}"
    majors = _ort_gpu_cuda_majors()
    assert majors == {int(m["major"])}, (
        f"onnxruntime-gpu targets CUDA {majors}; the image has CUDA {m['major']}.{m['minor']}"
    )
    # onnxruntime-gpu >= 1.19 on PyPI needs cuDNN 9; the unnumbered "cudnn" tags of
    # CUDA 12 images carry cuDNN 9, the "cudnn8" ones do not.
    assert m["cudnn"] in ("cudnn", "cudnn9"), f"cuDNN 8 images do not work: {base}"


def test_gpu_image_python_is_new_enough(gpu_dockerfile: Dockerfile) -> None:
    (base,) = _external_bases(gpu_dockerfile)
    m = CUDA_TAG.match(base)
    assert m, base
    ubuntu_python = UBUNTU_PYTHON.get(m["ubuntu"])
    assert ubuntu_python is not None, f"unknown Ubuntu release {m['ubuntu']}"
    if ubuntu_python < _requires_python():
        text = gpu_dockerfile.path.read_text()
        assert re.search(r"python3\.1[1-9]\b", text), (
            f"Ubuntu {m['ubuntu']}'s python3 is {ubuntu_python}; install a newer one explicitly"
        )


def test_gpu_dockerfile_installs_worker_gpu_and_never_cpu_onnxruntime(
    gpu_dockerfile: Dockerfile,
) -> None:
    installs = _installs_everything(gpu_dockerfile)
    assert ".[worker-gpu]" in installs, installs
    assert not {".[worker]", ".[training]", ".[dev]", ".[embedded]"} & set(installs), installs
    assert "onnxruntime" not in {_dist_name(r) for r in installs}
    names = {r.name.lower() for r in _extra("worker-gpu")}
    assert "onnxruntime" not in names, "the worker-gpu extra pulls the CPU onnxruntime"


def test_gpu_environment(gpu_dockerfile: Dockerfile) -> None:
    env = gpu_dockerfile.env(_final_stage(gpu_dockerfile))
    assert env.get("INFERENCE_PROVIDER") == "cuda"
    assert env.get("NVIDIA_VISIBLE_DEVICES") == "all"
    caps = set(env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(","))
    assert {"compute", "utility"} <= caps, caps


def test_gpu_apt_lists_are_cleaned(gpu_dockerfile: Dockerfile) -> None:
    for stage in gpu_dockerfile.stages:
        for inst in stage.all("RUN"):
            if "apt-get install" in inst.args:
                assert "--no-install-recommends" in inst.args, f"line {inst.line}"
                assert "rm -rf /var/lib/apt/lists/*" in inst.args, f"line {inst.line}"
