"""The ``batchvision`` command and the local runner; the library never imports this package."""

from batchvision.cli.main import main

__all__ = ["main"]
