"""Helpers for the static checks of the deployment files (see conftest.py for fixtures).

Nothing here needs a Docker engine: the compose file and the Dockerfiles are
parsed and checked as text.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE_CPU = REPO_ROOT / "Dockerfile.worker"
DOCKERFILE_GPU = REPO_ROOT / "Dockerfile.worker-gpu"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
HADOLINT_CONFIG = REPO_ROOT / ".hadolint.yaml"
PYPROJECT = REPO_ROOT / "pyproject.toml"

# Modules whose pydantic-settings classes define the INFERENCE_* variables.
SETTINGS_MODULES = ("producer.settings", "worker.settings")


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
    """A compose or Dockerfile command as an argv list."""
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
    line: int


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

    def lineage(self, stage: Stage) -> list[Stage]:
        """The stage and every earlier stage it is built FROM, nearest first."""
        chain = [stage]
        while chain[-1].base in self.stage_names and len(chain) <= len(self.stages):
            chain.append(self.stage(chain[-1].base))
        return chain

    def env(self, stage: Stage) -> dict[str, str]:
        """ENV set in a stage, including what it inherits from earlier stages."""
        out: dict[str, str] = {}
        for s in reversed(self.lineage(stage)):
            for inst in s.all("ENV"):
                out.update(parse_env(inst.args))
        return out

    def inherited_last(self, stage: Stage, keyword: str) -> Instruction | None:
        for s in self.lineage(stage):
            found = s.last(keyword)
            if found is not None:
                return found
        return None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Dockerfile lines with comments dropped and backslash continuations joined."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are skipped by Docker too
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(p for p in buf if p)))
        buf = []
    if buf:
        out.append((start, " ".join(buf)))
    return out


def _substitute(value: str, variables: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group("name") or m.group("bare")
        return variables.get(name, m.group(0))

    return re.sub(
        r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)", sub, value
    )


def parse_env(args: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` (or the legacy `ENV A 1`) as a mapping."""
    parts = shlex.split(args)
    if parts and "=" not in parts[0]:
        return {parts[0]: " ".join(parts[1:])}
    return dict(p.split("=", 1) for p in parts if "=" in p)


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
            continue
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            base = _substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
            continue
        if not stages:
            raise AssertionError(f"{path.name}:{number}: {keyword} before the first FROM")
        stages[-1].instructions.append(Instruction(keyword, args, number))
    return Dockerfile(path=path, global_args=global_args, stages=stages)


def exec_form(args: str) -> list[str] | None:
    """The argv of an exec-form CMD/ENTRYPOINT (`["a", "b"]`), or None for shell form."""
    import json

    try:
        value = json.loads(args)
    except ValueError:
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


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
