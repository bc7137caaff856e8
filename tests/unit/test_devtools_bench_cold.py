"""The benchmark's cold start runs the relay from bytecode, as `make build` ships it: every module of the copy has a
pyc for this interpreter that the import system uses without looking at the source's time (unchecked hash)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from devtools.bench import FUNCTION_DIR, compiled_function


def test_the_cold_start_copy_of_the_relay_comes_with_bytecode_that_is_used_as_is(tmp_path: Path) -> None:
    dest = compiled_function(tmp_path / "fn")

    sources = sorted(p.relative_to(dest) for p in dest.rglob("*.py"))
    assert sources == sorted(p.relative_to(FUNCTION_DIR) for p in (FUNCTION_DIR / "relay").rglob("*.py"))
    for source in sources:
        pyc = Path(importlib.util.cache_from_source(str(dest / source)))
        assert pyc.exists(), source
        flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
        assert flags == 0b01, source  # hash-based, not checked against the source (PEP 552)

    # The interpreter takes the copy's bytecode as it is: a source changed after the build is not even read.
    (dest / "relay" / "clock.py").write_text("raise SystemExit(3)\n", encoding="utf-8")
    code = "import relay.clock; print(relay.clock.__file__)"
    run = subprocess.run(
        [sys.executable, "-B", "-c", code], env={"PYTHONPATH": str(dest)}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(dest / "relay" / "clock.py")
