"""The layout a reader relies on: layers that import downwards only (no cycles; the loop's
machinery never imports the loop), and modules short enough to read."""
import ast

from conftest import ROOT

# Lower layers first: a module may import its own layer and the ones before it.
LAYERS = [("errors", ["runtime/errors.py", "runtime/signals.py", "options.py", "sched.py"]),
          ("data and model", ["corpus/read.py", "corpus/features.py", "data.py", "model.py"]),
          ("runtime", ["runtime/hardware.py", "runtime/activations.py", "runtime/backends.py",
                       "runtime/torchrun.py", "runtime/sharding.py", "runtime/xla_sharding.py",
                       "runtime/agreement.py", "runtime/launch.py",
                       "runtime/progress.py", "runtime/rundir.py", "runtime/checkpoint.py",
                       "runtime/reporting.py", "runtime/start_up.py"]),
          ("task", ["task/__init__.py", "task/generation.py", "task/polarity.py",
                    "task/judge.py", "task/nsmc.py"]),
          ("the loop and the command lines", ["train.py", "generate.py"])]


def module_name(path):
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def project_imports(path):
    """The project modules that the file `path` imports (at any depth of its code)."""
    names = {module_name(p) for _, layer in LAYERS for p in layer}
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in names}


def test_every_module_is_in_a_layer():
    listed = {p for _, layer in LAYERS for p in layer}
    modules = {str(p.relative_to(ROOT)) for p in ROOT.glob("*.py")}
    modules |= {str(p.relative_to(ROOT)) for folder in ("runtime", "corpus", "task")
                for p in (ROOT / folder).glob("*.py")}
    modules -= {"corpus/__init__.py", "runtime/__init__.py"}  # docstrings only
    assert modules == listed


def test_layers_import_downwards_only():
    """No import cycles, and neither the runtime, the data nor the task imports train.py."""
    allowed = set()
    for _, layer in LAYERS:
        allowed |= {module_name(p) for p in layer}
        for path in layer:
            upward = project_imports(path) - allowed
            assert not upward, f"{path} imports {sorted(upward)} from a layer above it"
    within = {module_name(p): project_imports(p) for _, layer in LAYERS for p in layer}

    def visit(name, path):
        assert name not in path, f"import cycle: {' -> '.join(path + [name])}"
        for other in within.get(name, ()):
            visit(other, path + [name])
    for name in within:
        visit(name, [])


def test_modules_are_short_enough_to_read():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
               for p in ROOT.rglob("*.py")
               if not {"tests", ".venv"} & set(p.relative_to(ROOT).parts)}
    assert lengths["train.py"] <= 300
    assert {path: n for path, n in lengths.items() if n > 400} == {}


# What docs/adapting.md says a copy can drop with the code that chooses it in
# runtime/launch.py: a copy that never runs on XLA, and one that runs in one process.
DROPPABLE = [{"runtime.xla_sharding"},
             {"runtime.torchrun", "runtime.sharding", "runtime.agreement"}]


def test_what_a_copy_can_drop_only_the_launcher_imports():
    for dropped in DROPPABLE:
        for _, layer in LAYERS:
            for path in layer:
                if module_name(path) in dropped | {"runtime.launch"}:
                    continue
                kept_needs = {name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in dropped
                              else name for name in project_imports(path)} & dropped
                assert not kept_needs, f"{path} imports {sorted(kept_needs)}"
