"""The house (STYLE.md): imports flow one way (no cycle, lazy imports included), common.py at the
bottom, and the shared layout check (budgets, line lengths) passes."""
import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_graph(root=ROOT):
    """{module: set of top-level modules it imports}, from the source (function-level imports too)."""
    mods = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(root, "*.py"))}
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            else:
                continue
            graph[m].update(n for n in names if n in mods and n != m)
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state = {}
    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n, path + [n])):
                return cycle
        state[m] = "done"
    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_top_level_modules_import_one_way():
    graph = import_graph()
    assert {"model", "tokenizer", "data", "lora", "compact", "train", "eval", "demo"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert graph["common"] == set(), "common.py imports no project module"
    assert graph["tokenizer"] <= {"common"}, "tokenizer.py stands on common.py alone"
    assert graph["model"] <= {"common", "tokenizer"}, "model.py stands on common.py, tokenizer.py"
    assert "demo" not in set().union(*(graph[m] for m in graph if m != "demo")), "nothing imports the demo"


LAYOUT_CHECK = os.path.join(ROOT, "..", "shared", "tools", "layout_check.py")


def test_the_layout_check_passes():
    """Budgets of code lines per module, at most a dozen lines over 100 characters per file."""
    if not os.path.isfile(LAYOUT_CHECK):
        pytest.skip("../shared/tools/layout_check.py is absent (a fresh clone has no shared/)")
    done = subprocess.run([sys.executable, LAYOUT_CHECK], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_front_page_holds_the_two_commands_early_and_ci_runs_its_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split("\n")
    head = "\n".join(readme[:40])
    assert "&& python demo.py" in head and "&& python -m pytest -q" in head
    assert len(readme) <= 250, f"README.md has {len(readme)} lines: details belong in docs/"
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "python -m pytest -q" in ci
    for link in ("docs/demo.md", "docs/usage.md", "docs/speed.md", "docs/readings.md"):
        assert link in head + "\n".join(readme) and os.path.isfile(os.path.join(ROOT, link)), link
