"""Check what `make build` ships: every module of the relay has bytecode for this interpreter (run it with the Lambda
runtime's python3.13), hash-based and checked against its source; the layer's is hash-based. Exits 1 otherwise.

    python3.13 devtools/check_bytecode.py <relay package dir> <layer dir>
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HASH_BASED, CHECK_SOURCE = 0b01, 0b10  # the flags word of a .pyc (PEP 552)


def flags_of(source: Path) -> int | None:
    """The flags of `source`'s .pyc for this interpreter, or None when it has none (or one for another version)."""
    pyc = Path(importlib.util.cache_from_source(str(source)))
    if not pyc.exists():
        return None
    data = pyc.read_bytes()
    if data[:4] != importlib.util.MAGIC_NUMBER:
        return None
    return int.from_bytes(data[4:8], "little")


def problems(relay: Path, layer: Path) -> list[str]:
    found = []
    relay_sources = sorted(relay.rglob("*.py"))
    if not relay_sources:
        found.append(f"no relay modules under {relay}")
    for source in relay_sources:
        if flags_of(source) != HASH_BASED | CHECK_SOURCE:
            found.append(f"{source}: no checked-hash bytecode for this python")
    layer_sources = [p for p in layer.rglob("*.py") if "__pycache__" not in p.parts]
    missing = [p for p in layer_sources if (flags_of(p) or 0) & HASH_BASED == 0]
    if missing:
        found.append(
            f"{len(missing)} of {len(layer_sources)} layer modules without hash-based bytecode, e.g. {missing[0]}"
        )
    return found


def main(argv: list[str]) -> int:
    relay, layer = Path(argv[0]), Path(argv[1])
    found = problems(relay, layer)
    for line in found:
        print(f"make build: {line}", file=sys.stderr)
    if not found:
        version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        print(
            f"bytecode for {version}: relay checked-hash, layer ({len(list(layer.rglob('*.py')))} modules) hash-based"
        )
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
