"""docs/ARCHITECTURE.md's claims, checked on the source: the package tree it draws, the layers and who may
import whom, Hydra at the edge, one module that knows a checkpoint's keys, one registry of tasks, and the size
limits of functions. Static reads of cbam_train/ (ast), ~0.3 s for the file; nothing is trained."""

from __future__ import annotations

import ast
import inspect
from functools import lru_cache
from pathlib import Path

import pytest

from cbam_train.config.tasks import TASKS
from cbam_train.config.validation import validate

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cbam_train"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
# the layers, lowest first: a subpackage imports cbam_train only from the layers before it (and itself)
LAYERS = ("config", "models", "augment", "state", "data", "reporting", "training", "tasks", "cli")
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8  # self and cls not counted
CHECKPOINT_NAMES = {"ckpt", "checkpoint", "meta"}  # what the code calls a checkpoint's dict (or its metadata)
ENVELOPE_KEYS = {"format", "version", "model", "state_dict"}  # state/weights.py reads any weights file by these


@lru_cache(maxsize=None)
def modules() -> dict:
    """{'training.train': ast tree} for every module under cbam_train/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imported(tree: ast.AST) -> set:
    """Every module an import statement names, top-level or inside a function (lazy imports count)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def subpackage(module: str) -> str:
    return module.split(".")[0]


def drawn_tree() -> set:
    """The paths the tree that opens ARCHITECTURE.md draws: 'config/', 'config/schema.py', '__main__.py', ..."""
    text = ARCHITECTURE.read_text()
    start = text.index("```text")
    block = text[start:text.index("```", start + 7)].splitlines()[2:]  # after the fence and cbam_train/
    paths, folder = set(), ""
    for line in block:
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        if indent == 2:
            folder = name if name.endswith("/") else ""
            paths.add(name)
        else:
            paths.add(folder + name)
    return paths


def test_the_tree_in_architecture_md_is_the_package():
    """The tree that opens ARCHITECTURE.md names every subpackage and module there is, each in its subpackage,
    and no other; each subpackage's __init__.py has a one-line docstring."""
    there = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    there |= {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert drawn_tree() == there
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(modules()[f"{init.parent.name}.__init__"])
        assert doc and "\n" not in doc.strip(), f"{init.parent.name}/__init__.py: a one-line docstring"


def test_each_subpackage_imports_only_the_layers_below_it():
    layer = {name: i for i, name in enumerate(LAYERS)}
    assert set(layer) == {subpackage(m) for m in modules() if "." in m}, "LAYERS lists every subpackage"
    wrong = []
    for module, tree in modules().items():
        if "." not in module:  # cbam_train/__init__.py, __main__.py: the entry point, above every layer
            continue
        for target in imported(tree):
            if target.startswith("cbam_train."):
                to = subpackage(target.removeprefix("cbam_train."))
                if layer[to] > layer[subpackage(module)]:
                    wrong.append(f"{module} imports {target}")
    assert wrong == []


@pytest.mark.parametrize("library", ["hydra", "omegaconf"])
def test_hydra_and_omegaconf_stay_in_cli(library):
    users = {m for m, tree in modules().items() if any(t.split(".")[0] == library for t in imported(tree))}
    assert users and all(subpackage(m) == "cli" for m in users), users


def test_no_subpackage_imports_a_task_module():
    """tasks/ is reached through the registry (config/tasks.py names each runner by string), not by import."""
    users = {m for m, tree in modules().items() if subpackage(m) != "tasks"
             for target in imported(tree) if target.startswith("cbam_train.tasks")}
    assert users == set()
    assert all(task.runner.startswith(("cbam_train.tasks.", "cbam_train.training.train:")) for task in TASKS.values())


def test_config_imports_neither_torch_nor_the_rest():
    """config/ is read at start-up, before a config error is answered: no torch, nothing above it."""
    for module, tree in modules().items():
        if subpackage(module) == "config":
            outside = {t for t in imported(tree) if t.split(".")[0] in ("torch", "torchvision", "numpy")
                       or (t.startswith("cbam_train.") and not t.startswith("cbam_train.config"))}
            assert outside == set(), module


def _key_reads(tree: ast.AST) -> list:
    """String keys read from a name or attribute called like a checkpoint: ckpt["epoch"], meta.get("data"),
    state.checkpoint["history"]."""
    reads = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, (ast.Name, ast.Attribute)) \
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            value = node.value
            name, key = (value.id if isinstance(value, ast.Name) else value.attr), node.slice.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and isinstance(node.func.value, (ast.Name, ast.Attribute)) and node.args \
                and isinstance(node.args[0], ast.Constant):
            owner = node.func.value
            name, key = (owner.id if isinstance(owner, ast.Name) else owner.attr), node.args[0].value
        else:
            continue
        if name in CHECKPOINT_NAMES:
            reads.append(key)
    return reads


def test_only_run_state_reads_a_checkpoints_keys():
    """state/run_state.py knows what a checkpoint holds; state/weights.py reads only the envelope of a weights
    file (its format, version and where the weights sit); nothing else indexes a checkpoint's dict."""
    assert _key_reads(modules()["state.run_state"]), "the check finds run_state's own reads"
    for module, tree in modules().items():
        reads = set(_key_reads(tree))
        if module == "state.weights":
            assert reads <= ENVELOPE_KEYS, reads
        elif module != "state.run_state":
            assert reads == set(), f"{module} reads {sorted(reads)} of a checkpoint"


def test_a_task_is_one_registry_entry():
    """Every TASKS entry loads a runner with the one signature; validation accepts exactly those names; the CLI
    names no task (it runs whatever the registry says)."""
    for name, task in TASKS.items():
        params = list(inspect.signature(task.load()).parameters)
        assert params == ["cfg", "run_dir", "record", "job"], name
    from cbam_train.config.errors import ConfigError
    from cbam_train.config.schema import Config

    for name in TASKS:  # another key may be refused (data.root, checkpoint=), but not the task
        try:
            validate(Config(task=name))
        except ConfigError as e:
            assert not str(e).startswith("task:"), e
    with pytest.raises(ConfigError, match=f"^task: unknown value 'tune'; choose one of: {', '.join(TASKS)}$"):
        validate(Config(task="tune"))
    cli_strings = {n.value for m, tree in modules().items() if subpackage(m) == "cli"
                   for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert cli_strings.isdisjoint(TASKS), "a task name in cli/"


def test_functions_are_short_and_narrow():
    too_long, too_wide = [], []
    for module, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                params += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
                where = f"{module}.{node.name}"
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    too_long.append(where)
                if len(params) > MAX_PARAMETERS:
                    too_wide.append(where)
    assert (too_long, too_wide) == ([], [])
