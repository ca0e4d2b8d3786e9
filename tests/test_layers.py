"""The package's layers, read from the modules' own import statements (no import runs).

* the core (everything but ``orchestration/``, ``reports/``, ``api`` and ``cli`` / ``docs``) imports no Ray,
  MLflow, orchestration, reports or CLI module;
* ``reports/`` imports no Ray, MLflow or orchestration module;
* ``orchestration/`` modules import the core and each other only through the modules
  meant to be shared (``cluster``, ``ray_train``, ``trainable``, ``runner``, ``spaces``, ``progress``,
  ``tracking``, ``storage``, ``study``) and the public ``run_study`` and ``tune_config`` of ``tune``;
* ``api`` (the Python API) imports anything but the command line;
* no module outside ``methods/`` mentions a method by name in a comparison.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "smile_ray"
EXTERNAL_ORCHESTRATION = ("ray", "mlflow")
SHARED_ORCHESTRATION = {"cluster", "ray_train", "trainable", "runner", "spaces", "tracking", "progress", "tune",
                        "study",
                        "storage"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def modules() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def layer(name: str) -> str:
    if name.startswith("smile_ray.orchestration"):
        return "orchestration"
    if name.startswith("smile_ray.reports"):
        return "reports"
    if name in ("smile_ray.cli", "smile_ray.__main__", "smile_ray.docs"):
        return "cli"
    if name == "smile_ray.api":
        return "api"
    return "core"


def is_external(imported: str, roots: tuple[str, ...]) -> bool:
    return imported.split(".")[0] in roots


def test_the_layers_are_what_the_tree_says():
    mods = modules()
    assert {layer(m) for m in mods} <= {"core", "orchestration", "reports", "api", "cli"}
    for name, deps in mods.items():
        kind = layer(name)
        if kind == "core":
            bad = [d for d in deps if is_external(d, EXTERNAL_ORCHESTRATION) or
                   layer(d) in ("orchestration", "reports", "cli") and d.startswith("smile_ray")]
            assert not bad, f"core module {name} imports {bad}"
        if kind == "reports":
            bad = [d for d in deps if is_external(d, EXTERNAL_ORCHESTRATION) or d.startswith("smile_ray.orchestration")
                   or d.startswith("smile_ray.cli")]
            assert not bad, f"report module {name} imports {bad}"
        if kind == "orchestration":
            siblings = {d.split(".")[2] for d in deps if d.startswith("smile_ray.orchestration.")}
            assert siblings <= SHARED_ORCHESTRATION, f"{name} reaches into {siblings - SHARED_ORCHESTRATION}"
            assert not any(d.startswith("smile_ray.cli") for d in deps)
        if kind == "api":  # the Python API sits over everything but the command line
            assert not any(d.startswith(("smile_ray.cli", "smile_ray.docs")) for d in deps), name
    tune_users = [n for n, d in mods.items() if "smile_ray.orchestration.tune" in d]
    for n in tune_users:  # tune's public entry points only
        assert {d for d in mods[n] if d.startswith("smile_ray.orchestration.tune.")} <= {
            "smile_ray.orchestration.tune.run_study", "smile_ray.orchestration.tune.tune_config"}, n


def test_the_config_module_needs_no_registry_module_and_no_torch():
    deps = modules()["smile_ray.config"]
    ours = {d.split(".")[1] for d in deps if d.startswith("smile_ray.")}
    assert ours <= {"errors", "registry"} and not any(is_external(d, ("torch",)) for d in deps)
    registry = modules()["smile_ray.registry"]
    assert {d for d in registry if d.startswith("smile_ray")} <= {"smile_ray.errors", "smile_ray.errors.SmileError"}


def test_no_import_climbs_back_up_from_the_ground_floor_or_the_core_rooms():
    mods = modules()
    for low in ("smile_ray.errors", "smile_ray.paths"):  # the cache folder's home imports nothing of ours
        assert not [d for d in mods[low] if d.startswith("smile_ray")], low
    # data, models and methods sit below the source-model cache (pretrain) and the recipe
    # that use them: the cache folder comes from paths, not from pretrain
    for name, deps in mods.items():
        if name.startswith(("smile_ray.data", "smile_ray.models", "smile_ray.methods")):
            climbs = [d for d in deps if d.startswith(("smile_ray.pretrain", "smile_ray.recipe"))]
            assert not climbs, f"{name} imports {climbs}"


def test_no_module_outside_methods_branches_on_a_method_name():
    from smile_ray.registry import METHODS

    for path in PACKAGE.rglob("*.py"):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                names = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                assert not set(names) & set(METHODS.names()), f"{path.name}:{node.lineno} compares with a method name"


def test_the_checks_would_catch_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    import ray.tune\n    from mlflow import MlflowClient\n")
    assert {"ray.tune", "mlflow", "mlflow.MlflowClient"} <= imports(bad)
    assert layer("smile_ray.recipe") == "core" and layer("smile_ray.orchestration.tune") == "orchestration"
