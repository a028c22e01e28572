"""What the servers ``batchvision up`` runs itself (redis-server, rabbitmq-server) share: a
data directory that is temporary unless given, removed again by ``close``.

These classes only describe a server (ports, files, command line); the supervisor of ``up``
(:mod:`batchvision.cli.runner`) starts and stops its process. Starting, restarting and killing
one from Python is test tooling: :mod:`batchvision.testing.servers`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


class LocalServer:
    """Base of a server this package runs on this machine: its ``data_dir``."""

    def __init__(self, data_dir: str | Path | None, prefix: str) -> None:
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix=prefix)
        self.data_dir = Path(data_dir) if data_dir else Path(self._tmp.name)  # type: ignore[union-attr]

    def close(self) -> None:
        """Remove the data directory if it is a temporary one (the process has stopped)."""
        if self._tmp is not None:
            self._tmp.cleanup()
