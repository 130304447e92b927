"""The plan of the house, held against the code: every module's floor, every import pointing down,
no import circle, and a root that holds only what a user runs or reads first.

FLOORS is the one place where the layers are written down (docs/architecture.md explains them).
A module may import a module of its own unit (the same package or file) or of a lower floor,
never one of its own floor in another unit or of a higher floor."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {
    "plumbing": 0,      # all-or-nothing writes, downloads, caches, leases, progress bars, the GPU calls
    "ses_solvers": 1,   # the exact eigen-solve under the penalty: eigenvalues of a stack of Grams
    "ses_hooks": 1,     # the activation collector: forward hooks that pool a layer's output
    "ses_core": 2,      # the method: entropy, targets, penalty, periodic SES (the collector re-exported)
    "data_utils": 2,    # datasets, a dataset on the device
    "batches": 2,       # the GPU-resident loader, batched augmentation, Mixup/CutMix
    "reporting": 2,     # the report's tables and figures
    "harness": 3,       # the machinery every experiment script shares
    "perceiver": 3,     # Exp 13's model, optimizer and ModelNet40
    "report": 4,        # results folder -> tables, macros, plots
    "experiments": 5,   # exp10 ... exp13: a docstring, a grid, main()
    "bench": 6,         # benchmarks and the GPU check
    "tools": 6,         # the one-file bundler
}
ROOT_FILES = {"ses_core.py", "data_utils.py", "batches.py", "report.py"}  # besides the expNN_*.py scripts
MAX_LINES = 360  # "no module over about 350 lines"


def unit_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if len(rel.parts) > 1:
        return rel.parts[0]
    return "experiments" if rel.name.startswith("exp") else rel.stem


def project_files() -> list[Path]:
    files = [p for p in ROOT.glob("*.py")]
    for unit in FLOORS:
        if (ROOT / unit).is_dir():
            files += sorted((ROOT / unit).glob("*.py"))
    return sorted(files)


def imported(path: Path) -> list[str]:
    """Every module name imported anywhere in path (function-level imports included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def module_of(name: str, importer: Path) -> Path | None:
    """The project file a dotted import name refers to (a bench/ or tools/ script's sibling too), or None."""
    for base in (ROOT, importer.parent):
        target = base.joinpath(*name.split("."))
        for f in (target.with_suffix(".py"), target / "__init__.py"):
            if f.is_file() and (f.parent == ROOT or f.parent.parent == ROOT):
                return f
    return None


def test_every_module_has_a_floor_and_the_root_holds_only_the_front_door():
    assert {unit_of(p) for p in project_files()} == set(FLOORS)
    root_py = {p.name for p in ROOT.glob("*.py")}
    assert {n for n in root_py if not n.startswith("exp")} == ROOT_FILES, "a new module belongs in a folder"


def test_every_import_points_down():
    wrong = []
    for path in project_files():
        here = unit_of(path)
        for name in imported(path):
            target = module_of(name, path)
            if target is None or unit_of(target) == here:
                continue
            if FLOORS[unit_of(target)] >= FLOORS[here]:
                wrong.append(f"{path.relative_to(ROOT)} (floor {FLOORS[here]}) imports {name} "
                             f"(floor {FLOORS[unit_of(target)]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = {p: {module_of(n, p) for n in imported(p)} - {None, p} for p in project_files()}
    state: dict[Path, int] = {}

    def visit(p: Path, stack: list[Path]):
        state[p] = 1
        for q in graph.get(p, ()):
            if state.get(q) == 1:
                cycle = stack[stack.index(q):] + [q] if q in stack else [p, q]
                pytest.fail("import circle: " + " -> ".join(str(f.relative_to(ROOT)) for f in cycle))
            if q not in state:
                visit(q, stack + [q])
        state[p] = 2
    for p in graph:
        if p not in state:
            visit(p, [p])


def test_no_module_is_much_over_350_lines():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in project_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "split these by job: " + ", ".join(long)


CUDA_OWNERS = {"plumbing/gpu.py", "ses_solvers/cusolver_batched.py"}  # the one module, and the binding


def cuda_calls(path: Path) -> list[str]:
    """Each `torch.cuda.<...>` / `torch.backends.<...>` the code of path names (docstrings aside),
    and each import of torch.cuda or torch.backends, as 'line: text'."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch" \
                and node.attr in ("cuda", "backends"):
            hits.append(f"{node.lineno}: torch.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("torch.cuda", "torch.backends")):
            hits.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and \
                any(a.name in ("cuda", "backends") for a in node.names):
            hits.append(f"{node.lineno}: from torch import cuda/backends")
        elif isinstance(node, ast.Import) and any(a.name.startswith(("torch.cuda", "torch.backends")) for a in node.names):
            hits.append(f"{node.lineno}: import torch.cuda/backends")
    return hits


def test_only_the_gpu_module_and_the_cusolver_binding_call_torch_cuda():
    outside = [f"{p.relative_to(ROOT)}:{hit}" for p in project_files()
               if str(p.relative_to(ROOT)) not in CUDA_OWNERS and unit_of(p) not in ("bench", "tools")
               for hit in cuda_calls(p)]
    assert not outside, "ask plumbing.gpu instead: " + ", ".join(outside)
    assert cuda_calls(ROOT / "plumbing" / "gpu.py"), "the scan finds the calls where they are"
