"""exp/'s modules import one another without a cycle, the plot reaches nothing of the trainer,
megablocks never imports exp, and exp.train still offers the names other code imports from it.

The graph counts every import of a file, at module level or inside a function, as read by `ast`.
"""

import ast
import glob
import os
import subprocess
import sys

import exp.checkpoint
import exp.config
import exp.log
import exp.loop
import exp.train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _modules(package_dir):
    """{dotted module name: file} of the .py files under `package_dir`."""
    out = {}
    for path in glob.glob(os.path.join(package_dir, "**", "*.py"), recursive=True):
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imported(path, module, is_package):
    """Every module name the file imports (a `from m import x` counts m and m.x)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def import_graph(package_dir):
    """{module: the modules of the same tree it imports}."""
    modules = _modules(package_dir)
    return {
        name: {m for m in _imported(path, name, path.endswith("__init__.py")) if m in modules and m != name}
        for name, path in modules.items()
    }


def find_cycle(graph):
    """A list [a, b, ..., a] of modules that import one another in a ring, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_checks_see_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_exp_has_no_import_cycle():
    graph = import_graph(os.path.join(ROOT, "exp"))
    parts = {"exp.train", "exp.config", "exp.loop", "exp.parallel", "exp.checkpoint", "exp.log", "exp.plot",
             "exp.model", "exp.demo", "exp.data.gpt_dataset", "exp.megatron.pretrain_gpt"}
    assert parts <= set(graph)
    assert graph["exp.plot"] == {"exp.log"} and "exp.loop" in graph["exp.train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # Each part reaches only what it needs: the plot and the outputs nothing of the trainer, the
    # options nothing of the loop, the data tools nothing outside exp.data.
    assert reach(graph, "exp.plot") == {"exp.log"} and reach(graph, "exp.log") == set()
    assert reach(graph, "exp.config") <= {"exp.model", "exp.data", "exp.data.preprocess", "exp.data.indexed_dataset"}
    for name in graph:
        if name.startswith("exp.data"):
            assert all(m.startswith("exp.data") for m in reach(graph, name)), name


def test_each_part_imports_first_in_a_fresh_interpreter():
    """Importing any part first (the others not yet loaded) works: no part needs another half-built."""
    parts = ["exp.plot", "exp.log", "exp.checkpoint", "exp.parallel", "exp.loop", "exp.config", "exp.train",
             "exp.demo", "exp.model", "exp.data.gpt_dataset", "exp.data.preprocess", "exp.megatron.pretrain_gpt"]
    script = (
        "import importlib, sys\n"
        f"for name in {parts!r}:\n"
        "    for m in [m for m in sys.modules if m == 'exp' or m.startswith('exp.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    # The root first, and whatever the suite's own path holds (site folders of installed wheels).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_megablocks_never_imports_exp():
    for name, path in _modules(os.path.join(ROOT, "megablocks")).items():
        imported = _imported(path, name, path.endswith("__init__.py"))
        assert not [m for m in imported if m == "exp" or m.startswith("exp.")], path


def test_exp_train_keeps_its_names():
    homes = {"consolidated_state_dict": exp.checkpoint, "latest_iteration": exp.checkpoint,
             "save_checkpoint": exp.checkpoint, "load_checkpoint": exp.checkpoint, "LATEST": exp.checkpoint,
             "TrainConfig": exp.config, "build_parser": exp.config, "configs_from_dict": exp.config,
             "parse_config": exp.config, "padded_vocab_size": exp.config, "read_csv": exp.log,
             "TRAIN_COLUMNS": exp.log, "VALID_COLUMNS": exp.log, "train": exp.loop, "lr_at": exp.loop,
             "evaluate": exp.loop}
    assert set(exp.train.__all__) == set(homes) | {"main"}
    for name, module in homes.items():
        assert getattr(exp.train, name) is getattr(module, name), name
