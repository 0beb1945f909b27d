"""dvc.yaml cannot drift from the code: every project module a stage imports is one of its deps,
and dvc.yaml stages, MLproject entry points and stages/*.py name the same five stages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from support import REPO_ROOT

from mnist_mlops.paths import STAGE_OUTPUTS

SRC = REPO_ROOT / "src"
PACKAGES = ("mnist_mlops", "mnist_serving")
STAGES_DIR = SRC / "mnist_mlops" / "stages"
# Modules that only log (to stderr or MLflow), set up logging, format errors, check the MLflow
# store or look after the stage's process: a change to them changes no output, so listing them
# would rerun the whole pipeline for nothing.
ONLY_LOG = {
    "src/mnist_mlops/logs.py",
    "src/mnist_mlops/errors.py",
    "src/mnist_mlops/stage_process.py",
    "src/mnist_mlops/tracking.py",
    "src/mnist_mlops/store.py",
    "src/mnist_mlops/lineage.py",
}
# Package markers: empty, or a docstring and environment defaults.
PACKAGE_FILES = {
    "src/mnist_mlops/__init__.py",
    "src/mnist_mlops/stages/__init__.py",
    "src/mnist_serving/__init__.py",
}


def _module_file(name: str) -> Path | None:
    """The source file of project module `name`, or None for third-party modules."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = SRC / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[Path]:
    """Project modules imported anywhere in `path` (top level or inside functions)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import module` imports a module; `from module import name` a name.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        for name in names:
            if (module := _module_file(name)) is not None:
                found.add(module)
    return found


def import_closure(path: Path) -> set[str]:
    """Every project module `path` loads, directly or through other project modules, as
    repository-relative paths."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(_imports(current))
    return {str(p.relative_to(REPO_ROOT)) for p in seen} - PACKAGE_FILES


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


STAGE_NAMES = sorted(p.stem for p in STAGES_DIR.glob("*.py") if p.stem != "__init__")


def dependency_gaps(stage: str, stages: dict) -> tuple[set[str], set[str]]:
    """(imported modules missing from the stage's deps, code deps the stage does not import)."""
    deps = {str(dep) for dep in stages[stage]["deps"]}
    needed = import_closure(STAGES_DIR / f"{stage}.py") - ONLY_LOG
    return needed - deps, {dep for dep in deps if dep.startswith("src/")} - needed


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_imported_module_is_a_dependency(stage: str) -> None:
    missing, unused = dependency_gaps(stage, _dvc_stages())
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps: {sorted(missing)}"
    assert not unused, f"dvc.yaml stage {stage!r} lists code it does not import: {sorted(unused)}"


def test_a_removed_dependency_is_caught() -> None:
    stages = _dvc_stages()
    stages["evaluate"]["deps"].remove("src/mnist_mlops/data.py")
    stages["retrain"]["deps"].remove("src/mnist_serving/inputs.py")  # reached via registry.py
    assert dependency_gaps("evaluate", stages)[0] == {"src/mnist_mlops/data.py"}
    assert dependency_gaps("retrain", stages)[0] == {"src/mnist_serving/inputs.py"}


def test_stages_entry_points_and_modules_match_one_to_one() -> None:
    mlproject = yaml.safe_load((REPO_ROOT / "MLproject").read_text())["entry_points"]
    dvc = _dvc_stages()
    assert sorted(dvc) == STAGE_NAMES
    assert sorted(set(mlproject) - {"main"}) == STAGE_NAMES
    for stage in STAGE_NAMES:
        command = f"python -m mnist_mlops.stages.{stage}"
        assert dvc[stage]["cmd"] == command
        assert mlproject[stage]["command"] == command


def test_paths_name_the_stage_that_writes_each_output() -> None:
    # ProjectPaths.require's "run the X stage first" relies on this table.
    for output, stage in STAGE_OUTPUTS.items():
        outs = [
            next(iter(out)) if isinstance(out, dict) else out
            for out in _dvc_stages()[stage].get("outs", [])
            + _dvc_stages()[stage].get("metrics", [])
        ]
        assert any(str(out).startswith(output) for out in outs), (output, stage, outs)
