"""Bundle an experiment script and the local modules it imports into one self-contained .py.

    python tools/bundle.py exp12_mixup_cutmix_cifar100.py -o dist/exp12_mixup_cutmix_cifar100.py

For a Kaggle notebook, where one uploaded file is all there is. Local modules (files next to the
script, found by walking the import statements of the script and, recursively, of those modules,
function-level imports included) are embedded verbatim as string literals and served by a small
importer on sys.meta_path; the script's own code follows unchanged. Standard library only. The
bundle records the experiment name (so a renamed upload still writes to the same results folder)
and the git commit it was built from.
"""
from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

HEADER = '''#!/usr/bin/env python3
# Self-contained bundle of {script} built by tools/bundle.py from commit {commit}.
# Embedded local modules: {modules}. Run it as:  python {script} --help
BUNDLE_EXPERIMENT = {experiment!r}
BUNDLE_GIT_COMMIT = {commit!r}

import importlib.abc as _abc
import importlib.util as _util
import linecache as _linecache
import sys as _sys

_BUNDLED_SOURCES = {{}}
_BUNDLED_PACKAGES = {packages!r}
'''

IMPORTER = '''

class _BundledModules(_abc.MetaPathFinder, _abc.Loader):
    """Serves the modules embedded above; tracebacks show their source lines."""

    def find_spec(self, name, path=None, target=None):
        if name in _BUNDLED_SOURCES:
            return _util.spec_from_loader(name, self, origin=f"bundled:{name}", is_package=name in _BUNDLED_PACKAGES)
        return None

    def create_module(self, spec):
        return None

    def get_source(self, name):
        return _BUNDLED_SOURCES[name]

    def exec_module(self, module):
        source = _BUNDLED_SOURCES[module.__name__]
        filename = f"<bundled {module.__name__}>"
        _linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        module.__file__ = __file__ if "__file__" in globals() else filename
        exec(compile(source, filename, "exec"), module.__dict__)


_sys.meta_path.insert(0, _BundledModules())

# ============================================================================ SCRIPT
'''


def module_file(root: Path, name: str) -> Path | None:
    """<root>/a/b.py, or <root>/a/b/__init__.py for a package, of module a.b; None if it is not local."""
    base = root.joinpath(*name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def local_imports(path: Path, root: Path) -> list[str]:
    """Dotted names of the local modules imported anywhere in `path` (function-level imports
    included), each package before the modules in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            wanted = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            wanted = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # from pkg import module
        else:
            continue
        for name in wanted:
            parts = name.split(".")
            names += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [n for n in dict.fromkeys(names) if module_file(root, n) is not None]


def collect(script: Path) -> dict[str, str]:
    """Every local module the script needs (dotted name -> source), dependencies first."""
    root, order, seen = script.parent, [], set()

    def visit(path: Path):
        for name in local_imports(path, root):
            if name not in seen:
                seen.add(name)
                visit(module_file(root, name))
                order.append(name)
    visit(script)
    return {name: module_file(root, name).read_text() for name in order}


def packages(script: Path, names) -> list[str]:
    """Which of the collected modules are packages (a folder's __init__.py)."""
    return [n for n in names if module_file(script.parent, n).name == "__init__.py"]


def literal(source: str) -> str:
    """A readable triple-quoted literal of `source` (backslashes and ''' escaped)."""
    body = source.replace("\\", "\\\\").replace("'''", "\\'\\'\\'")
    text = "'''" + body + "'''"
    if ast.literal_eval(text) != source:  # never ship a bundle that alters a module
        raise RuntimeError("bundle: a module did not survive embedding")
    return text


def git_commit(root: Path) -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def bundle(script: Path) -> str:
    script = script.resolve()
    modules = collect(script)
    parts = [HEADER.format(script=script.name, experiment=script.stem, commit=git_commit(script.parent),
                           modules=", ".join(modules) or "none", packages=packages(script, modules))]
    for name, source in modules.items():
        parts.append(f"\n# ============================================================================ {name}\n"
                     f"_BUNDLED_SOURCES[{name!r}] = {literal(source)}\n")
    parts.append(IMPORTER.replace("SCRIPT", script.name))
    parts.append(script.read_text())
    text = "".join(parts)
    compile(text, str(script), "exec")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", type=Path, help="experiment script, e.g. exp12_mixup_cutmix_cifar100.py")
    p.add_argument("-o", "--output", type=Path, help="output file (default dist/<script name>)")
    args = p.parse_args(argv)
    if not args.script.is_file():
        p.exit(2, f"bundle: error: {args.script} is not a file\n")
    out = args.output or Path("dist") / args.script.name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(bundle(args.script))
    os.replace(tmp, out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB): {args.script.name} + "
          f"{', '.join(collect(args.script.resolve())) or 'no local modules'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
