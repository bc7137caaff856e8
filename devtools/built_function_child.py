"""The child `devtools.smoke_build` runs in the Lambda runtime's python, started as `python3.13 -I -S -B <this file>
<function dir> <layer dir> <runtime dir>`: isolated (no PYTHON* variables, no user or site packages, nothing written),
so only the standard library can be imported until this file puts the built function, its layer and the runtime's
boto3 on `sys.path`, in the order Lambda does (`/var/task`, then `/opt/python`, then the runtime's own packages).

It reads `{"timeout": <seconds>, "events": [...]}` from stdin, hands each event to `relay.handler.lambda_handler` in
turn (one execution environment, as Lambda would), and prints one JSON line, the last: the python version, each
answer (or the error that ended the run), and the file every imported module came from, named by the root it is
under. It imports nothing of this repository: it must run with only what `make build` ships.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import time
import traceback
import uuid
from pathlib import Path
from typing import Any


class Context:
    """The attributes and method of the Lambda runtime's context object that a handler may use."""

    def __init__(self, timeout_s: float) -> None:
        self.function_name = "interact-relay-local"
        self.function_version = "$LATEST"
        self.invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:interact-relay-local"
        self.memory_limit_in_mb = 1769
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = "/aws/lambda/interact-relay-local"
        self.log_stream_name = f"{time.strftime('%Y/%m/%d')}/[$LATEST]{uuid.uuid4().hex}"
        self._deadline = time.monotonic() + timeout_s

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def origins(roots: dict[str, Path]) -> dict[str, str]:
    """Each imported module with a file: the name of the root its file is under, else the file itself."""
    found = {}
    itself = os.path.abspath(__file__)
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or os.path.abspath(file) == itself:
            continue  # built in, frozen, a namespace package, or this script (as __main__)
        path = Path(os.path.abspath(file))  # not resolved: the roots may hold symbolic links to packages elsewhere
        found[name] = next((label for label, root in roots.items() if path.is_relative_to(root)), str(path))
    return found


def main(argv: list[str]) -> int:
    function_dir, layer_dir, runtime_dir = (Path(os.path.abspath(a)) for a in argv)
    sys.path[:0] = [str(function_dir), str(layer_dir), str(runtime_dir)]
    request = json.load(sys.stdin)
    answers: list[Any] = []
    error = None
    try:
        from relay.handler import lambda_handler

        for event in request["events"]:
            answers.append(lambda_handler(event, Context(float(request["timeout"]))))
    except BaseException:  # reported, not raised: the parent names what failed
        error = traceback.format_exc(limit=-3)
    paths = sysconfig.get_paths()
    roots = {
        "function": function_dir,
        "layer": layer_dir,
        "runtime": runtime_dir,
        # under the standard library's directory, but not of it: `-S` keeps them off sys.path, and this says so if not
        "interpreter site-packages": Path(paths["purelib"]),
        "interpreter site-packages (platform)": Path(paths["platlib"]),
        "stdlib": Path(paths["stdlib"]),
        "platstdlib": Path(paths["platstdlib"]),
    }
    report = {
        "python": ".".join(map(str, sys.version_info[:2])),
        "answers": answers,
        "error": error,
        "modules": origins(roots),
    }
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
