"""The code's shape, as issue-level rules a change must keep: short functions, one declaration
per loss option, no import cycle among the package's modules at import time."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# kernels/ is installed as degla_fast.kernels (setup.py's package_dir).
PACKAGES = {"degla_fast": ROOT / "degla_fast", "degla_fast.kernels": ROOT / "kernels"}
MAX_FUNCTION_LINES = 70


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_no_function_longer_than_the_limit():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in MODULES.values() for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long)


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imported(module: str, node: ast.ImportFrom | ast.Import) -> set[str]:
    """The package modules a top-level import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    if node.level:
        base = module.split(".") if _is_package(module) else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source not in MODULES:
        return set()
    targets = {f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES}
    # ``from pkg import name`` runs pkg's __init__ unless every name is a submodule of it
    if len(targets) < len(node.names) or not _is_package(source):
        targets.add(source)
    return targets


def _top_level_imports(module: str) -> set[str]:
    """Imports at module level (inside try/if included, and under ``if TYPE_CHECKING``: a type
    that needs a cycle to name is a cycle of the design), not inside functions or classes."""
    found: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(_imported(module, node))
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(_tree(MODULES[module]).body)
    found.discard(module)
    return found


def _parents(module: str) -> set[str]:
    """Packages that are importing while ``module`` loads (an import of a package's own module
    from its __init__ is how a package is built, not a cycle)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycle_among_package_modules():
    graph = {m: {t for t in _top_level_imports(m) if t not in _parents(m)} for m in MODULES}
    cycles, state = [], {}

    def walk(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import cycles at module level: " + "; ".join(cycles)


LOSS_OPTIONS = ("igc_weight", "tgc_weight", "distill_weight", "official_tgc_indexing")


@pytest.mark.parametrize("option", LOSS_OPTIONS)
def test_each_loss_option_is_declared_at_most_three_times(option):
    """The spec, and the keyword arguments of the public module and functional form: one
    owner, two drop-in signatures that mirror it."""
    places = []
    for path in MODULES.values():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                if option in names:
                    places.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}()")
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                            and item.target.id == option:
                        places.append(f"{path.relative_to(ROOT)}:{item.lineno} {node.name}.{option}")
    assert len(places) <= 3, f"{option} declared in {len(places)} places: " + "; ".join(places)


def _private_names(tree: ast.AST) -> set[str]:
    """Private attribute names a module reaches on objects other than its own ``self``/``cls``:
    ``x._name`` and ``getattr``/``hasattr``/``setattr(x, "_name")``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and ast.unparse(node.value) not in ("self", "cls", "ctx"):
            names.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                and node.args[1].value.startswith("_") and not node.args[1].value.startswith("__"):
            names.add(node.args[1].value)
    return names


def test_library_internals_are_reached_in_the_compat_layer_only():
    """Whatever private attribute a shim in degla_fast/compat/ reaches (DeepSpeed's, torch.amp's,
    torch.optim's, torch.nn's), no other module of the package reaches it too."""
    compat = {name: path for name, path in MODULES.items() if name.startswith("degla_fast.compat")}
    reached = set().union(*(_private_names(_tree(path)) for path in compat.values()))
    reached -= {"_versions"}  # the compat package's own module
    assert {"_per_optimizer_states", "_step_supports_amp_scaling", "_last_lr", "_broadcast_model"} <= reached
    outside = {f"{path.relative_to(ROOT)}: {name}" for module, path in MODULES.items() if module not in compat
               for name in _private_names(_tree(path)) & reached}
    assert not outside, "library internals outside degla_fast/compat/: " + "; ".join(sorted(outside))


# ---------------------------------------------------------------- the loss package

def _closure(module: str) -> set[str]:
    """``module`` and every package module it imports at module level, transitively."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen or current not in MODULES:
            continue
        seen.add(current)
        todo.extend(_top_level_imports(current))
    return seen


def test_the_loss_spec_imports_no_backend_kernel_or_torch():
    """The spec is what the trainer's configuration holds (``--help`` without torch) and what the
    backends read: it depends on none of them."""
    closure = _closure("degla_fast.loss.spec")
    inside = {m for m in closure if m.startswith("degla_fast.kernels") or m == "degla_fast.backends"
              or (m.startswith("degla_fast.loss.") and m != "degla_fast.loss.spec")}
    assert not inside, f"degla_fast.loss.spec imports {sorted(inside)}"
    heavy = {f"{m}: {t}" for m in closure for t in _top_level_imports(m) if t.split(".")[0] in ("torch", "triton")}
    assert not heavy, f"degla_fast.loss.spec's imports load torch or triton: {sorted(heavy)}"


MAX_LOSS_FRAMES = 4


@pytest.mark.parametrize("backend", ["triton", "gemm"])
def test_at_most_four_frames_from_the_module_to_a_kernel_launch(backend, monkeypatch):
    """Every Triton launch of the loss's forward is at most four of the project's frames below
    ``DeGLALoss.forward`` (that frame included): the module, the dispatch, the autograd Function's
    forward, the launcher (Liger-Kernel's depth). Counted on the interpreter's launches."""
    import inspect
    import os

    import torch

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts the interpreter's launches (TRITON_INTERPRET=1)")
    from triton.runtime.interpreter import InterpretedFunction

    from degla_fast.loss import DeGLALoss

    depths, original = [], InterpretedFunction.run

    def run(self, *args, **kwargs):
        ours = [f for f in inspect.stack(context=0)
                if any(Path(f.filename).resolve().is_relative_to(folder) for folder in PACKAGES.values())]
        below = next(i for i, f in enumerate(ours) if f.function == "forward" and f.filename.endswith("module.py"))
        depths.append((below + 1, " <- ".join(f"{Path(f.filename).name}:{f.function}" for f in ours[:below + 1])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    k, batch, dim = 2, 3, 8
    image = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(batch * (1 + k), dim), dim=-1)
    DeGLALoss(num_negatives=k, backend=backend)(image, text, torch.tensor(10.0), image, text)
    assert depths, "no Triton launch seen"
    deepest = max(depths)
    assert deepest[0] <= MAX_LOSS_FRAMES, f"{deepest[0]} frames: {deepest[1]}"
