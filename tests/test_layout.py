"""The package's rooms: the plumbing in diffusion_policy/common imports nothing of the algorithm's
modules above it, no module of the package imports the fine-tuning methods but the methods'
own package, and the package's imports have no cycle."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imports():
    """{module: set of diffusion_policy modules it imports (at any depth of its code)}."""
    graph = {}
    for path in glob.glob(os.path.join(ROOT, "diffusion_policy", "**", "*.py"), recursive=True):
        name, found = module_name(path), set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffusion_policy"):
                for alias in node.names:  # `from diffusion_policy.common import distributed` imports a module
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if os.path.exists(os.path.join(ROOT, *sub.split(".")) + ".py") else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("diffusion_policy"))
        graph[name] = found - {name}
    return graph


def test_the_plumbing_imports_nothing_above_it():
    graph = imports()
    common = [m for m in graph if m.startswith("diffusion_policy.common")]
    assert {"diffusion_policy.common.cli", "diffusion_policy.common.runtime", "diffusion_policy.common.distributed"} <= set(common)
    up = {m: sorted(d for d in graph[m] if not d.startswith("diffusion_policy.common")) for m in common}
    assert not any(up.values()), f"the plumbing imports the algorithm's modules: {up}"
    top = [m for m in graph if m.count(".") == 1 and not m.endswith(".common")]
    assert "diffusion_policy.policy" in top and not any(m.split(".")[1] in {"cli", "runlog", "atomic", "runtime"} for m in top)


def test_only_the_methods_package_imports_the_methods():
    graph = imports()
    users = {m for m, deps in graph.items() if any(d.startswith("diffusion_policy.finetune") for d in deps)}
    assert users <= {m for m in graph if m.startswith("diffusion_policy.finetune")}, users


def test_no_import_cycle():
    graph = imports()
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph.get(m, ()):
            if state.get(d) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [d])}")
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    # the check is live: a cycle made by hand is found
    graph["diffusion_policy.common.cli"] = graph["diffusion_policy.common.cli"] | {"diffusion_policy.common.runtime"}
    graph["diffusion_policy.common.runtime"] = {"diffusion_policy.common.cli"}
    state.clear()
    try:
        visit("diffusion_policy.common.cli", ["diffusion_policy.common.cli"])
    except AssertionError as e:
        assert "import cycle" in str(e)
    else:
        raise AssertionError("a hand-made cycle was not found")


def test_no_script_edits_the_import_path():
    """Everything runs from the repository root as a script or `python -m`: nothing inserts itself into sys.path."""
    needle = "sys.path." + "insert"
    paths = glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
    assert len(paths) > 50
    offenders = [os.path.relpath(p, ROOT) for p in paths if needle in open(p).read()]
    assert not offenders, offenders


def test_train_reward_is_a_script_not_a_library():
    lines = open(os.path.join(ROOT, "train_reward.py")).read().count("\n")
    assert lines <= 250, lines
    from diffusion_policy import reward_metrics

    assert callable(reward_metrics.branch_pick_gain) and callable(reward_metrics.within_state_metrics)
