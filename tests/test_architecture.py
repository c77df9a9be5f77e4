"""The layering of the package and the one hop from a workflow rule to its stage function
(docs/architecture.md): checked on the source, so a change that breaks either fails here."""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

from medvit import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medvit"

# Function-level imports of medvit's own modules, each with the measured reason it stays one
# (written beside the import too). ``*``: any module.
LAZY_IMPORTS_ALLOWED = {
    ("medvit/cli.py", "*"): "start-up: every job of a study starts `medvit`, and a command imports only what "
                            "it runs (`medvit --help` imports no stage)",
    ("medvit/models/registry.py", "medvit.models"): "every model module imports the registry (its "
                                                    "@register_model), so the registry imports them when first "
                                                    "asked for a name, not at its own import",
    ("medvit/engine/trainer.py", "medvit.evaluation.figures"): "matplotlib.pyplot takes about 2 s to import on "
                                                               "2 cores: paid by the jobs that draw curves.png, "
                                                               "not by every importer of the engine",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported medvit module, inside a function) for every import in ``path``; ``from a
    import b`` counts as ``a.b`` when ``b`` is a module, else as ``a``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                     for a in node.names]
        else:
            continue
        found += [(n, id(node) in in_function) for n in names if n == "medvit" or n.startswith("medvit.")]
    return found


def _package_files(*subpackages: str) -> list[Path]:
    return sorted(p for sub in subpackages for p in (PACKAGE / sub).rglob("*.py"))


def test_evaluation_imports_no_task_module():
    offenders = [(str(p.relative_to(ROOT)), m) for p in _package_files("evaluation") for m, _ in _imports(p)
                 if m.startswith("medvit.tasks")]
    assert offenders == []


def test_models_import_nothing_of_engine_data_or_tasks():
    layers = ("medvit.engine", "medvit.data", "medvit.tasks", "medvit.evaluation")
    offenders = [(str(p.relative_to(ROOT)), m) for p in _package_files("models") for m, _ in _imports(p)
                 if m.startswith(layers)]
    assert offenders == []


def test_cpu_ops_import_no_other_medvit_module():
    """medvit.cpu_ops (the CPU fast paths and process-level speed settings) sits below the
    models and the engine, which import it by name: it imports nothing of medvit but itself."""
    offenders = [(str(p.relative_to(ROOT)), m) for p in _package_files("cpu_ops") for m, _ in _imports(p)
                 if not m.startswith("medvit.cpu_ops")]
    assert offenders == []


def test_lower_layers_import_no_higher_one():
    """fileio, errors, provenance, system: nothing above them; config: only the manifest
    contract (``medvit.data.manifest``, torch-free) of the data layer; data and engine: no
    evaluation or tasks (the engine's one figure is an allowed function-level import)."""
    higher = ("medvit.config", "medvit.engine", "medvit.models", "medvit.data", "medvit.evaluation", "medvit.tasks")
    base = [PACKAGE / f for f in ("fileio.py", "errors.py", "provenance.py", "system.py")]
    offenders = [(str(p.relative_to(ROOT)), m) for p in base for m, _ in _imports(p) if m.startswith(higher)]
    offenders += [("medvit/config.py", m) for m, _ in _imports(PACKAGE / "config.py")
                  if m.startswith(higher) and m != "medvit.data.manifest"]
    offenders += [(str(p.relative_to(ROOT)), m) for p in _package_files("data", "engine") for m, lazy in _imports(p)
                  if m.startswith(("medvit.evaluation", "medvit.tasks"))
                  and not (lazy and (str(p.relative_to(ROOT)), m) in LAZY_IMPORTS_ALLOWED)]
    assert offenders == []


def test_function_level_medvit_imports_only_where_a_reason_is_written():
    offenders = sorted({(str(p.relative_to(ROOT)), m) for p in PACKAGE.rglob("*.py") for m, lazy in _imports(p)
                        if lazy and (str(p.relative_to(ROOT)), "*") not in LAZY_IMPORTS_ALLOWED}
                       - set(LAZY_IMPORTS_ALLOWED))
    assert offenders == [], "import medvit modules at the top (fix the layering), or add the measured reason here"
    for path, module in LAZY_IMPORTS_ALLOWED:  # the reason is written beside the import as well
        source = (ROOT / path).read_text(encoding="utf-8")
        if module != "*":
            line = next(line for line in source.splitlines() if f"from {module} import" in line
                        or f"import {module}" in line)
            assert "#" in line, (path, module)


def test_the_layering_checks_see_upward_and_function_level_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from medvit.config import load_study\n\n\ndef f():\n"
                   "    from medvit.tasks.common import split_stage\n    from medvit.tasks import common\n")
    assert _imports(bad) == [("medvit.config", False), ("medvit.tasks.common", True),
                             ("medvit.tasks.common", True)]


# ------------------------------------------------------------------------------ rule -> command -> function
def workflow_rules() -> list[tuple[str, str]]:
    """(rule, medvit command) for every rule of workflows/rules/*.smk whose shell runs `medvit`;
    a rule defined per task (``rule:`` with ``name: f"adapt_{_task}"``) is named ``adapt_<task>``."""
    rules = []
    for path in sorted((ROOT / "workflows" / "rules").glob("*.smk")):
        text = path.read_text(encoding="utf-8")
        heads = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*rule (\w+):", text, re.M)]
        heads += [(m.start(), m.group(1).replace("{_task}", "<task>"))
                  for m in re.finditer(r"^\s*rule:\s*\n\s*name:\s*\n?\s*f?\"([^\"]+)\"", text, re.M)]
        heads.sort()
        for i, (start, name) in enumerate(heads):
            body = text[start:heads[i + 1][0] if i + 1 < len(heads) else len(text)]
            body = "\n".join(line for line in body.splitlines() if not line.strip().startswith("#"))
            rules += [(name, command) for command in dict.fromkeys(re.findall(r"\"medvit ([a-z][a-z-]*)", body))]
    return rules


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _handler_function(command: str) -> str:
    """``module.function`` the command calls: its stage function, or for a user command the one
    library function its handler imports."""
    if command in cli.STAGES:
        return cli.STAGES[command].function.replace(":", ".")
    handler = _subcommands()[command].get_default("func")
    calls = re.findall(r"from (medvit[\w.]*) import (\w+)", inspect.getsource(handler))
    assert len(calls) >= 1, command
    module, name = calls[0]
    return f"{module}.{name}"


def test_workflow_readme_lists_every_rule_with_its_command_and_function():
    text = (ROOT / "workflows" / "README.md").read_text(encoding="utf-8")
    section = text.split("## Rule, command, function", 1)[1].split("\n## ", 1)[0]
    table = re.findall(r"^\| `([^`]+)` \| `medvit ([a-z-]+)` \| `([\w.]+)` \|$", section, re.M)
    expected = [(rule, command, _handler_function(command)) for rule, command in workflow_rules()]
    assert table == expected


def test_stage_commands_come_from_one_table_of_unique_functions():
    commands = _subcommands()
    run_by_table = {name for name, p in commands.items() if p.get_default("func") is cli.run_stage}
    assert run_by_table == set(cli.STAGES)
    names = [spec.function.rsplit(":", 1)[1] for spec in cli.STAGES.values()]
    assert len(names) == len(set(names)), "two stage commands call functions of one name"
    for command, spec in cli.STAGES.items():
        function = cli.stage_function(command)
        params = list(inspect.signature(function).parameters)
        assert len(spec.args) <= len(params), command
        dests = {a.dest for a in commands[command]._actions}
        assert set(spec.args) <= dests, (command, set(spec.args) - dests)


def _workflow_imports() -> list[str]:
    files = [ROOT / "Snakefile", *sorted((ROOT / "workflows" / "rules").glob("*.smk"))]
    return sorted({m for f in files for m in re.findall(r"^\s*(?:from|import) (medvit[\w.]*)",
                                                         f.read_text(encoding="utf-8"), re.M)})


def test_the_workflow_imports_only_torch_free_modules():
    """Snakemake imports what the rule files name while it plans (every `snakemake -n` and
    every job's start): torch there would cost seconds each time, and rules would copy
    Python to avoid it."""
    modules = _workflow_imports()
    assert "medvit.config" in modules
    code = f"import sys, {', '.join(modules)}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, modules
    heavy = subprocess.run([sys.executable, "-c", "import sys, medvit.tasks.adapt; sys.exit('torch' in sys.modules)"])
    assert heavy.returncode == 1  # the check sees torch where it is imported


def test_no_test_module_imports_another():
    """Shared fixtures live in tests/conftest.py and plain helpers in tests/helpers.py."""
    offenders = [(p.name, m) for p in sorted((ROOT / "tests").glob("test_*.py"))
                 for m in re.findall(r"^\s*(?:from|import) (test_\w+)", p.read_text(encoding="utf-8"), re.M)]
    assert offenders == []
