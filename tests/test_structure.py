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


# ---------------------------------------------------------------- the compat boundary
# DeepSpeed's and open_clip's internals are reached only behind the named, versioned shims of
# degla_fast/compat/ (and by degla_fast/integrations/, whose job is to patch other trainers).
# Everywhere else a module may use these libraries' public API only:
#   - names at the library's top level (``import deepspeed``, ``deepspeed.initialize``,
#     ``from open_clip import CLIP``, ``open_clip.create_model_and_transforms``, ``CLIP.encode_text``);
#   - below a submodule, only :data:`PUBLIC_BELOW_TOP`: DeepSpeed's documented ZeRO API
#     (``deepspeed.zero.GatheredParameters``, the ``deepspeed.utils.safe_get_*`` readers,
#     ``set_z3_leaf_modules``), which DeepSpeed's docs name by these paths;
#   - no attribute of :data:`DENIED_ATTRIBUTES` (nor any ``ds_*`` attribute, DeepSpeed's ZeRO-3
#     parameter bookkeeping), as ``x.attr``, ``getattr(x, "attr")`` or an imported name.
# Which top-level names are submodules is read from the installed packages' folders (nothing is
# imported); a library that is not installed has none, and then only imports below its top
# level (``from deepspeed.runtime... import``), which always name a submodule, are caught.

BOUNDARY = ("degla_fast.compat", "degla_fast.integrations")
HOSTS = ("deepspeed", "open_clip")
PUBLIC_BELOW_TOP = {"deepspeed.zero.GatheredParameters", "deepspeed.utils.safe_get_full_fp32_param",
                    "deepspeed.utils.safe_get_local_fp32_param", "deepspeed.utils.set_z3_leaf_modules"}
DENIED_ATTRIBUTES = {
    # DeepSpeed ZeRO-3: the optimiser's flat partitions, the parameters' shards, the offload hooks
    "fp32_partitioned_groups_flat", "fp16_groups", "partition_numel", "all_gather_coalesced",
    "DeepSpeedZeRoOffload", "NoopTimer", "ZeroParamStatus",
    # torch.optim / GradScaler: the skip protocol of fused optimisers
    "found_inf", "grad_scale",
    # open_clip: the text tower's inner steps and the model-name parser
    "attn_mask", "text_pool_type", "text_eos_id", "text_global_pool", "parse_model_name",
}
DENIED_PREFIX = "ds_"


def _submodules(library: str) -> set[str]:
    """Top-level names of ``library`` that are modules (``open_clip.factory``), from its folder."""
    import importlib.util

    spec = importlib.util.find_spec(library)
    found = set()
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for entry in Path(folder).iterdir():
            if entry.suffix == ".py" or (entry.is_dir() and (entry / "__init__.py").exists()):
                found.add(entry.stem)
    return found - {"__init__"}


SUBMODULES = {library: _submodules(library) for library in HOSTS}


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None when the chain does not start at a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _internal_path(path: str, submodules: dict[str, set[str]]) -> bool:
    """Whether ``path`` (``open_clip.factory.parse_model_name``) goes through a host library's
    submodule and is not in :data:`PUBLIC_BELOW_TOP`."""
    parts = path.split(".")
    if parts[0] not in HOSTS or len(parts) < 2 or path in PUBLIC_BELOW_TOP:
        return False
    return parts[1] in submodules.get(parts[0], set())


def _denied_name(name: str) -> bool:
    return name in DENIED_ATTRIBUTES or name.startswith(DENIED_PREFIX)


def _import_reaches(tree: ast.AST, submodules: dict[str, set[str]]) -> tuple[list[tuple[int, str]], dict[str, str]]:
    """(violations, {local name: host path}) of a module's imports of the host libraries."""
    found, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in HOSTS:
                    if "." in alias.name and alias.name not in PUBLIC_BELOW_TOP:
                        found.append((node.lineno, f"import {alias.name}"))
                    bound[alias.asname or root] = alias.name if alias.asname else root
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for alias in node.names:
                path = f"{node.module}.{alias.name}"
                if _denied_name(alias.name):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
                elif node.module.split(".")[0] in HOSTS:
                    if ("." in node.module and path not in PUBLIC_BELOW_TOP) or _internal_path(path, submodules):
                        found.append((node.lineno, f"from {node.module} import {alias.name}"))
                    bound[alias.asname or alias.name] = path
    return found, bound


def compat_violations(source: str, submodules: dict[str, set[str]] | None = None) -> list[str]:
    """``"line: what"`` for each reach into DeepSpeed's or open_clip's internals in ``source``
    (the rule at the top of this section); the boundary modules are not passed here."""
    submodules = SUBMODULES if submodules is None else submodules
    tree = ast.parse(source)
    found, bound = _import_reaches(tree, submodules)
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if _denied_name(node.attr):
                found.append((node.lineno, f".{node.attr}"))
            chain = _dotted(node) if id(node) not in inner else None  # the whole chain, once
            if chain and chain[0] in bound:
                path = ".".join([bound[chain[0]], *chain[1:]])
                if _internal_path(path, submodules):
                    found.append((node.lineno, path))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                and _denied_name(node.args[1].value):
            found.append((node.lineno, f'{node.func.id}(..., "{node.args[1].value}")'))
    return [f"{line}: {what}" for line, what in sorted(set(found))]


def test_compat_rule_reports_each_kind_of_reach():
    """The checker itself: every kind of violation in a snippet is reported, public API is not."""
    submodules = {"deepspeed": {"runtime", "utils", "zero", "comm"}, "open_clip": {"factory", "transformer", "model"}}
    bad = """
import open_clip
import deepspeed.runtime.zero
from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
from deepspeed.utils import groups
from open_clip import factory
from open_clip.model import CLIP
import open_clip as oc
schema = oc.factory.parse_model_name(name)
pooled = open_clip.transformer.text_global_pool(x)
param.ds_tensor.data = shard
masters = optimizer.fp32_partitioned_groups_flat
optimizer.found_inf, optimizer.grad_scale = flag, None
mask = net.attn_mask
ok = hasattr(param, "ds_id")
"""
    reported = compat_violations(bad, submodules)
    lines = {int(entry.split(":")[0]) for entry in reported}
    assert lines == set(range(3, 16)) - {8}, reported  # all but the two plain `import open_clip` lines
    good = """
import deepspeed
import open_clip
from deepspeed.utils import safe_get_full_fp32_param, set_z3_leaf_modules
from open_clip import CLIP, create_model_and_transforms
engine, *_ = deepspeed.initialize(model=m, optimizer=o, config=c)
with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32")
x = CLIP.encode_text(model, tokens)
net.transformer(x, attn_mask=mask)
"""
    assert compat_violations(good, submodules) == []


def test_library_internals_stay_behind_the_compat_boundary():
    assert {"factory", "transformer", "model"} <= SUBMODULES["open_clip"]  # read from the installed package
    outside = [f"{path.relative_to(ROOT)}:{entry}" for module, path in MODULES.items()
               if not module.startswith(BOUNDARY)
               for entry in compat_violations(path.read_text(encoding="utf-8"))]
    assert not outside, "DeepSpeed/open_clip internals outside degla_fast/compat/ and integrations/: " \
        + "; ".join(outside)


def test_a_passing_tests_tmp_path_is_deleted_as_it_ends(pytestconfig):
    """The trainer tests write 0.1-0.7 GB of checkpoints each: with pytest's default retention the
    suite held 11.9 GB under /tmp by its end, which ran a CI disk out of space (pytest.ini)."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
