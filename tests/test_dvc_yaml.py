"""dvc.yaml's promises: every stage depends on all the project code it runs, and nothing else is left out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """stages.lib.x -> stages/lib/x.py (or the package's __init__.py); None outside this project."""
    if name != "stages" and not name.startswith("stages."):
        return None
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


def import_closure(module: str) -> set[Path]:
    """Every project file `module` imports, directly or not, anywhere in its code (also inside functions)."""
    seen, todo = set(), [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen or not path.is_file():
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                todo += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        parts = path.relative_to(REPO).with_suffix("").parts
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run their __init__
    return seen


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(REPO)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_depends_on_every_project_file_it_imports(stage):
    spec = STAGES[stage]
    module = spec["cmd"].split("python -m ", 1)[1].split()[0]
    deps = [next(iter(dep)) if isinstance(dep, dict) else dep for dep in spec["deps"]]
    missing = sorted(str(p.relative_to(REPO)) for p in import_closure(module) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage}: add to its deps: {', '.join(missing)}"


def test_an_edited_module_makes_its_stages_stale(tiny_pipeline, tmp_path):
    """After editing any module a stage imports, `dvc status` names that stage: a stage depends on the
    library packages it imports (export reaches model/ through the model loader)."""
    import shutil

    from tests.conftest import dvc

    project = tmp_path / "project"
    shutil.copytree(tiny_pipeline, project, symlinks=True)
    module = project / "stages" / "lib" / "model" / "backbones.py"
    module.write_text(module.read_text() + "\n# an edit\n")
    status = dvc(project, "status").stdout
    for stage in ("features", "finetune", "evaluate", "export"):
        assert f"{stage}:" in status, status
    assert "validate:" not in status and "split:" not in status and "augment:" not in status
