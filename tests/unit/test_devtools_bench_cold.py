"""What `make build` ships, and the benchmark's cold start runs: the relay's modules with bytecode for the interpreter,
hash-based and checked against the source (used when the source is unchanged, not when it was edited after the
build); devtools/check_bytecode.py, which `make build` runs, refuses anything else."""

from __future__ import annotations

import importlib.util
import marshal
import py_compile
import subprocess
import sys
from pathlib import Path

from devtools.bench import FUNCTION_DIR, compiled_function
from devtools.check_bytecode import problems


def run_child(dest: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-B", "-c", code], env={"PYTHONPATH": str(dest)}, capture_output=True, text=True
    )


def test_the_cold_start_copy_of_the_relay_has_checked_bytecode_for_every_module(tmp_path: Path) -> None:
    dest = compiled_function(tmp_path / "fn")

    sources = sorted(p.relative_to(dest) for p in dest.rglob("*.py"))
    assert sources == sorted(p.relative_to(FUNCTION_DIR) for p in (FUNCTION_DIR / "relay").rglob("*.py"))
    assert problems(dest / "relay", dest) == []


def test_the_bytecode_is_what_runs_while_the_source_is_unchanged_and_an_edited_source_wins(tmp_path: Path) -> None:
    dest = compiled_function(tmp_path / "fn")
    source = dest / "relay" / "clock.py"
    pyc = Path(importlib.util.cache_from_source(str(source)))
    # GIVEN the module's bytecode replaced by other code under the same header (the same source hash)
    header = pyc.read_bytes()[:16]
    pyc.write_bytes(header + marshal.dumps(compile("FROM_BYTECODE = True\n", str(source), "exec")))

    # WHEN it is imported with its source unchanged, THEN the bytecode runs (the source is not compiled)
    unchanged = run_child(dest, "import relay.clock as c; print(c.FROM_BYTECODE)")
    assert unchanged.stdout.strip() == "True", unchanged.stderr

    # WHEN the source is edited after the build (say in the Lambda console), THEN the edit is what runs
    source.write_text("raise SystemExit(3)\n", encoding="utf-8")
    assert run_child(dest, "import relay.clock").returncode == 3


def test_the_build_check_refuses_missing_or_unchecked_bytecode(tmp_path: Path) -> None:
    relay, layer = tmp_path / "relay", tmp_path / "layer"
    relay.mkdir()
    layer.mkdir()
    (relay / "a.py").write_text("A = 1\n", encoding="utf-8")
    (layer / "b.py").write_text("B = 1\n", encoding="utf-8")
    assert len(problems(relay, layer)) == 2  # neither has bytecode

    def build(path: Path, mode: py_compile.PycInvalidationMode) -> None:
        py_compile.compile(str(path), invalidation_mode=mode, doraise=True)

    build(relay / "a.py", py_compile.PycInvalidationMode.UNCHECKED_HASH)
    build(layer / "b.py", py_compile.PycInvalidationMode.TIMESTAMP)
    assert len(problems(relay, layer)) == 2  # the relay's not checked, the layer's not hash-based

    build(relay / "a.py", py_compile.PycInvalidationMode.CHECKED_HASH)
    build(layer / "b.py", py_compile.PycInvalidationMode.UNCHECKED_HASH)
    assert problems(relay, layer) == []
