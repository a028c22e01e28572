"""What our private servers (redis-server, rabbitmq-server) share: a data directory that is
temporary unless given, restart on the same ports and data, and ``with`` support."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Self


class LocalServer:
    """Base of a server process this package starts; subclasses define ``start`` and ``stop``."""

    def __init__(self, data_dir: str | Path | None, prefix: str) -> None:
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix=prefix)
        self.data_dir = Path(data_dir) if data_dir else Path(self._tmp.name)  # type: ignore[union-attr]

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, kill: bool = False) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Stop and start on the same ports and data: what the server persisted comes back."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
