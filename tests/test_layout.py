"""The architecture's import rules: shared code imports neither Flask nor TensorFlow, the API
never imports TensorFlow (its image does not install it), and only workers/model.py does."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_after(modules: list[str]) -> set[str]:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_shared_package_imports_neither_flask_nor_tensorflow() -> None:
    import batchvision

    mods = [f"batchvision.{m.name}" for m in pkgutil.iter_modules(batchvision.__path__)]
    assert len(mods) > 10
    loaded = _imported_after(mods)
    assert "flask" not in loaded and "tensorflow" not in loaded and "keras" not in loaded


def test_api_never_imports_tensorflow() -> None:
    loaded = _imported_after(["api", "api.jobs", "api.uploads", "api.health", "api.metrics", "api.auth"])
    assert "flask" in loaded
    assert "tensorflow" not in loaded and "keras" not in loaded


def test_only_workers_model_imports_tensorflow() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(tensorflow|keras)\b", re.M)
    offenders = [
        str(p.relative_to(ROOT))
        for folder in ("api", "workers", "batchvision")
        for p in (ROOT / folder).rglob("*.py")
        if pattern.search(p.read_text())
    ]
    assert offenders == ["workers/model.py"]
