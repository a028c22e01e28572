"""``python -m batchvision.cli.logexec SERVICE MODULE [ARG...]``: ``python -m MODULE ARG...``
with JSON log lines (``BATCHVISION_LOG_FORMAT=json``) set up first.

For programs that would otherwise install a text handler of their own: Flower (tornado adds
its handler only when the root logger has none), so that ``batchvision up`` in JSON mode writes
JSON lines from every service.
"""

from __future__ import annotations

import runpy
import sys

from batchvision.core.logs import configure_logging


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m batchvision.cli.logexec SERVICE MODULE [ARG...]")
    service, module, *args = argv
    configure_logging("json", "INFO", service=service)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
