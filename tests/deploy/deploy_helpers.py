"""Helpers for the static checks of the deployment files (see conftest.py for fixtures).

Nothing here needs a Docker engine: the compose file is read as YAML, the Dockerfiles
with dockerfile-parse, and both are checked as data.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser
from dockerfile_parse.constants import COMMENT_INSTRUCTION
from dockerfile_parse.parser import image_from
from dockerfile_parse.util import WordSplitter, get_key_val_dictionary

from contract import metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE_CPU = REPO_ROOT / "Dockerfile.worker"
DOCKERFILE_GPU = REPO_ROOT / "Dockerfile.worker-gpu"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
HADOLINT_CONFIG = REPO_ROOT / ".hadolint.yaml"
PYPROJECT = REPO_ROOT / "pyproject.toml"

# Modules whose pydantic-settings classes define the INFERENCE_* variables.
SETTINGS_MODULES = ("producer.settings", "worker.settings", "gateway.settings")


def find_tool(name: str) -> str | None:
    """A command, looked up next to the running interpreter (the venv) first, then on PATH."""
    here = Path(sys.executable).parent
    return shutil.which(name, path=str(here)) or shutil.which(name)


def tool_env() -> dict[str, str]:
    """The environment for compose binaries, without settings that would pick other files."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}


# --------------------------------------------------------------------------
# Compose helpers
# --------------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
)


def interpolated_names(text: str) -> set[str]:
    """Variable names used as ${NAME...} in a compose file."""
    return {m.group("name") for m in _INTERPOLATION.finditer(text)}


def resolve_defaults(value: Any) -> Any:
    """Compose interpolation with an empty environment: ${X:-d} -> d, ${X} -> ''."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            op, arg = m.group("op"), m.group("arg")
            if op in (":-", "-"):
                return arg or ""
            return ""

        return _INTERPOLATION.sub(sub, value.replace("$$", "\0")).replace("\0", "$")
    if isinstance(value, list):
        return [resolve_defaults(v) for v in value]
    if isinstance(value, dict):
        return {k: resolve_defaults(v) for k, v in value.items()}
    return value


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever of the two syntaxes it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        out: dict[str, str] = {}
        for item in env:
            key, _, val = str(item).partition("=")
            out[key] = val
        return out
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_argv(command: Any) -> list[str]:
    """A compose command (string or list) as an argv list."""
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(c) for c in command]


def option_value(argv: list[str], *names: str) -> str | None:
    """The value of a CLI option given as `-Q x`, `--queues x` or `--queues=x`."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
            if not name.startswith("--") and arg.startswith(name) and len(arg) > len(name):
                return arg[len(name) :]
    return None


# --------------------------------------------------------------------------
# Dockerfile helpers
# --------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    """The arguments as written, continuation lines joined (dockerfile-parse's `value`)."""
    line: int

    def words(self) -> list[str]:
        """The arguments split into words and unquoted as Docker reads them."""
        return list(WordSplitter(self.args).split())

    def _flags_and_operands(self) -> tuple[list[str], list[str]]:
        words = self.words()
        n = next((i for i, w in enumerate(words) if not w.startswith("--")), len(words))
        return words[:n], words[n:]

    def flags(self) -> dict[str, str]:
        """Leading `--name=value` flags (COPY --from=..., --chown=...): dockerfile-parse
        leaves an instruction's flags in its value."""
        flags, _ = self._flags_and_operands()
        return dict(flag[2:].partition("=")[::2] for flag in flags)

    def operands(self) -> list[str]:
        """The words after the flags: a COPY's sources and its destination."""
        return self._flags_and_operands()[1]


@dataclass
class Stage:
    base: str  # resolved image reference, or the name of an earlier stage
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"{self.path.name} has no stage {name!r}")

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages if s.name]

    def external_base(self, stage: Stage) -> str:
        """The registry image a stage ultimately starts from."""
        seen = 0
        while stage.base in self.stage_names and seen < len(self.stages):
            stage = self.stage(stage.base)
            seen += 1
        return stage.base

    # dockerfile-parse starts each stage afresh (its `envs` and `context_structure` reset
    # at every FROM) and does not follow `FROM <earlier stage>`: what a stage inherits is
    # followed here.
    def lineage(self, stage: Stage) -> list[Stage]:
        """The stage and every earlier stage it is built FROM, nearest first."""
        chain = [stage]
        while chain[-1].base in self.stage_names and len(chain) <= len(self.stages):
            chain.append(self.stage(chain[-1].base))
        return chain

    def env(self, stage: Stage) -> dict[str, str]:
        """ENV set in a stage, including what it inherits from earlier stages; values as
        written (`$PATH` stays unexpanded)."""
        out: dict[str, str] = {}
        for s in reversed(self.lineage(stage)):
            for inst in s.all("ENV"):
                out.update(get_key_val_dictionary(inst.args))
        return out

    def inherited_last(self, stage: Stage, keyword: str) -> Instruction | None:
        for s in self.lineage(stage):
            found = s.last(keyword)
            if found is not None:
                return found
        return None


def parse_dockerfile(path: Path) -> Dockerfile:
    """The stages of a Dockerfile and their instructions, read with dockerfile-parse.

    Each FROM's image comes from the parser's `parent_images`, which substitutes the ARGs
    declared before the first FROM (their defaults: no build arguments are passed).
    """
    parser = DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))
    images = iter(parser.parent_images)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in parser.structure:
        keyword, value, line = item["instruction"], item["value"], item["startline"] + 1
        if keyword == COMMENT_INSTRUCTION:
            continue
        if keyword == "ARG" and not stages:
            global_args.update(get_key_val_dictionary(value))
            continue
        if keyword == "FROM":
            _, name = image_from(value)
            stages.append(Stage(base=next(images), name=name))
            continue
        if not stages:
            raise AssertionError(f"{path.name}:{line}: {keyword} before the first FROM")
        stages[-1].instructions.append(Instruction(keyword, value, line))
    return Dockerfile(path=path, global_args=global_args, stages=stages)


def exec_form(args: str) -> list[str] | None:
    """The argv of an exec-form CMD/ENTRYPOINT (`["a", "b"]`), or None for shell form.

    dockerfile-parse hands these values over as written; Docker reads the exec form as a
    JSON array, and so does this.
    """
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


# `HEALTHCHECK [--interval=.. --timeout=.. ...] CMD <command>` or `HEALTHCHECK NONE`:
# dockerfile-parse leaves the options and the command in one value.
_HEALTHCHECK = re.compile(
    r"^\s*(?P<options>(?:--\S+\s+)*)(?P<kind>CMD|NONE)\b\s*(?P<cmd>.*)$", re.S | re.I
)


def healthcheck_command(args: str) -> list[str] | None:
    """The probe of a HEALTHCHECK: its argv (exec form, or `/bin/sh -c <text>` for shell
    form), without HEALTHCHECK's own options; None for HEALTHCHECK NONE."""
    m = _HEALTHCHECK.match(args)
    assert m, f"not a HEALTHCHECK: {args!r}"
    if m["kind"].upper() == "NONE":
        return None
    command = m["cmd"].strip()
    return exec_form(command) or ["/bin/sh", "-c", command]


# --------------------------------------------------------------------------
# Settings helpers
# --------------------------------------------------------------------------


def settings_classes() -> list[type]:
    """Every pydantic-settings class defined in the settings modules."""
    from pydantic_settings import BaseSettings

    classes: list[type] = []
    for module_name in SETTINGS_MODULES:
        module = importlib.import_module(module_name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseSettings) and obj is not BaseSettings and obj not in classes:
                classes.append(obj)
    return classes


def settings_env_names() -> set[str]:
    """Environment variable names the settings classes read (upper-cased)."""
    from pydantic import AliasChoices, AliasPath

    names: set[str] = set()
    for cls in settings_classes():
        prefix = str(cls.model_config.get("env_prefix", ""))
        for field_name, info in cls.model_fields.items():
            alias = info.validation_alias
            if isinstance(alias, str):
                names.add(alias.upper())
            elif isinstance(alias, AliasChoices):
                for choice in alias.choices:
                    if isinstance(choice, str):
                        names.add(choice.upper())
                    elif isinstance(choice, AliasPath) and isinstance(choice.path[0], str):
                        names.add(choice.path[0].upper())
            else:
                names.add((prefix + (info.alias or field_name)).upper())
    return names


# --------------------------------------------------------------------------
# Monitoring helpers (Prometheus, Grafana)
# --------------------------------------------------------------------------

DEPLOY_DIR = REPO_ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY_DIR / "prometheus"
GRAFANA_DIR = DEPLOY_DIR / "grafana"
K8S_DIR = DEPLOY_DIR / "k8s"

# The series the workers (on INFERENCE_METRICS_PORT) and the queue exporter
# (`python -m producer metrics`) expose, by type: dashboards and alerts may use these only.
WORKER_COUNTERS = (
    metrics.JOBS_TOTAL,
    metrics.ROWS_TOTAL,
    metrics.SERVING_DECISIONS_TOTAL,
    metrics.SHADOW_ROWS_TOTAL,
    metrics.SHADOW_SKIPPED_ROWS_TOTAL,
)
WORKER_HISTOGRAMS = (
    metrics.QUEUE_WAIT_SECONDS,
    metrics.COMPUTE_SECONDS,
    metrics.TASK_SECONDS,
    metrics.LANE_BATCH_SIZE,
    metrics.SHADOW_ABS_DIFF,
)
WORKER_GAUGES = (metrics.MODEL_LOAD_SECONDS, metrics.MODEL_WARMUP_SECONDS, metrics.MODEL_INFO)
EXPORTER_GAUGES = (
    metrics.QUEUE_DEPTH,
    metrics.QUEUE_OLDEST_AGE_SECONDS,
    metrics.WORKERS_LIVE,
    metrics.JOBS_HELD,
)


def exposed_series() -> set[str]:
    """Every series name a query may select: histograms as their _bucket/_sum/_count."""
    names = set(WORKER_COUNTERS) | set(WORKER_GAUGES) | set(EXPORTER_GAUGES)
    for histogram in WORKER_HISTOGRAMS:
        names |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    return names


_PROMQL_STRING = re.compile(r""""(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`""")
_PROMQL_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_PROMQL_KEYWORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan", "atan2"}
_PROMQL_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names (in matchers and grouping clauses), strings or durations."""
    text = _PROMQL_STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = _PROMQL_GROUPING.sub(" ", text)
    names: set[str] = set()
    for m in _PROMQL_IDENTIFIER.finditer(text):
        before = text[m.start() - 1] if m.start() else " "
        if before.isdigit() or before in "._$":
            continue  # a number's exponent, a duration's unit, a dashboard variable
        if text[m.end() :].lstrip().startswith("("):
            continue  # a function call or aggregation
        if m.group(0).lower() in _PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


# Grafana's variables, as concrete values Prometheus accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def grafana_expr_for_prometheus(expr: str, variables: dict[str, str]) -> str:
    """A dashboard query with Grafana's and the dashboard's own variables substituted."""
    values = {**GRAFANA_VARIABLES, **{f"${k}": v for k, v in variables.items()}}
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(name, values[name])
    return expr


def dashboard_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel of a dashboard, those nested in collapsed rows included; rows left out."""
    out: list[dict[str, Any]] = []
    for panel in panels:
        if panel.get("type") == "row":
            out += dashboard_panels(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """The documents of a multi-document YAML file, empty ones skipped."""
    import yaml

    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]
