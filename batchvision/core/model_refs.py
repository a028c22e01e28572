"""Several models: names, references (``name`` or ``name:version``) and per-job options.

Pure rules that the API (checking a submit), the workers (loading a repository) and the client
share. A model name is also part of its queue names (``<QUEUE>.<model>``), so it allows no dots;
``interactive``, ``high`` and ``low`` are reserved (``<QUEUE>.interactive`` is the default
model's interactive queue, ``<QUEUE>.high`` and ``<QUEUE>.low`` its priority tiers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from batchvision.core.errors import BatchvisionError
from batchvision.core.priorities import DEFAULT_PRIORITY, MAX_PRIORITY, check_priority

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)
#: ``name`` or ``name:version`` (versions are positive integers).
REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}(:[1-9][0-9]{0,8})?$"
REF_RE = re.compile(REF_PATTERN)
RESERVED_NAMES = frozenset({"interactive", "high", "low"})
#: Most classes a result may list (``top_k``), whatever the model.
MAX_TOP_K = 1000
#: The keys of per-job options in the job hash.
OPTION_FIELDS = ("model", "version", "top_k", "min_score", "priority", "scores")


class InvalidOption(BatchvisionError):
    """A per-job option the service cannot honour (unknown model, version, top_k range...):
    ``422`` naming the option and what is allowed."""

    status = 422
    code = "invalid_option"


def check_name(name: str) -> str:
    """``name`` if it is a valid model name, else ``ValueError`` saying why."""
    if not NAME_RE.match(name):
        raise ValueError(
            f"model name {name!r} must be 1 to 64 letters, digits, '_' or '-' (starting with a "
            "letter or digit; no dots: the name is part of its queue names)"
        )
    if name in RESERVED_NAMES:
        raise ValueError(f"model name {name!r} is reserved (it would collide with a queue name)")
    return name


def model_name_of(spec: str) -> str:
    """The name under which ``BATCHVISION_MODEL`` is served: a ``keras.applications`` name as it
    is, a file's stem (``models/demo.keras`` -> ``demo``), a SavedModel folder's name, a plugin's
    factory (``py:standins:null`` -> ``null``); characters a name cannot hold become ``-``."""
    spec = spec.strip()
    if spec.startswith("py:"):
        base = spec.rsplit(":", 1)[-1]
    elif NAME_RE.match(spec):
        base = spec
    else:
        path = PurePath(spec.rstrip("/\\"))
        base = path.stem if path.suffix in (".keras", ".h5", ".hdf5") else path.name
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", base).strip("-_")[:64] or "model"
    return name if name not in RESERVED_NAMES else f"{name}-model"


@dataclass(frozen=True)
class ModelRef:
    """A model asked for by name, optionally pinned to a version."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """``name`` or ``name:version``; ``ValueError`` otherwise."""
        if not REF_RE.match(text):
            raise ValueError(f"{text!r} is not a model reference: expected NAME or NAME:VERSION")
        name, _, version = text.partition(":")
        check_name(name)
        return cls(name, int(version) if version else None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"


@dataclass(frozen=True)
class JobOptions:
    """What a job asked for: its model (and a pinned version, else the live one), how many
    classes each result lists, the score below which a class is left out of ``top_k``, its
    priority (:mod:`batchvision.core.priorities`), and whether each result keeps every class's
    score as a vector (``scores``: the Open Inference Protocol's scores tensor)."""

    model: str
    version: int | None = None
    top_k: int = 5
    min_score: float = 0.0
    priority: int = DEFAULT_PRIORITY
    scores: bool = False

    def to_hash(self) -> dict[str, str]:
        """The job-hash fields (``version`` empty: the live version at classification time;
        ``scores`` only when set)."""
        fields = {
            "model": self.model,
            "version": "" if self.version is None else str(self.version),
            "top_k": str(self.top_k),
            "min_score": repr(self.min_score),
            "priority": str(self.priority),
        }
        if self.scores:
            fields["scores"] = "1"
        return fields

    @classmethod
    def from_hash(cls, fields: Mapping[str, Any], default_model: str, default_top_k: int) -> JobOptions:
        """Options from job-hash fields (keys and values bytes or text); a job stored before
        options existed gets the defaults."""

        def text(key: str) -> str:
            value = fields.get(key, fields.get(key.encode()))  # type: ignore[call-overload]
            return value.decode() if isinstance(value, bytes) else str(value or "")

        model = text("model") or default_model
        if not NAME_RE.match(model):  # a job of an older version stored BATCHVISION_MODEL itself
            model = model_name_of(model)
        version = text("version")
        top_k = text("top_k")
        min_score = text("min_score")
        priority = text("priority")
        return cls(
            model=model,
            version=int(version) if version else None,
            top_k=int(top_k) if top_k else default_top_k,
            min_score=float(min_score) if min_score else 0.0,
            priority=int(priority) if priority else DEFAULT_PRIORITY,
            scores=text("scores") == "1",
        )


@dataclass(frozen=True)
class ModelFacts:
    """What the API knows of a model to check options against (from the worker registry)."""

    name: str
    live: int | None
    #: usable version -> its number of classes (``None``: found on disk, not loaded yet);
    #: versions that were refused are left out.
    versions: Mapping[int, int | None] = field(default_factory=dict)


def resolve_options(
    *,
    model: str | None,
    top_k: int | None,
    min_score: float | None,
    default_model: str,
    default_top_k: int,
    known: Mapping[str, ModelFacts],
    priority: int | None = None,
    max_priority: int = MAX_PRIORITY,
) -> JobOptions:
    """Check a submit's options against the known models; :class:`InvalidOption` (422) names
    the option, the value and what is allowed. ``priority``: the job's, at most
    ``max_priority`` (the caller's API key's maximum): see
    :func:`~batchvision.core.priorities.check_priority`.

    A model no worker has announced yet is refused, except the default model (the deployment's
    own, whose workers may still be starting): its options are checked against the general
    limits only, and a worker reports a version it cannot load per image.
    """
    ref = ModelRef(default_model)
    if model is not None:
        try:
            ref = ModelRef.parse(model)
        except ValueError as exc:
            raise _invalid("model", model, sorted(known) or [default_model], str(exc)) from None
    facts = known.get(ref.name)
    if facts is None and ref.name != default_model:
        allowed = sorted(set(known) | {default_model})
        raise _invalid("model", model, allowed, f"unknown model {ref.name!r}")
    classes: int | None = None
    if facts is not None:
        if ref.version is not None:
            if ref.version not in facts.versions:
                allowed_versions = [f"{ref.name}:{v}" for v in sorted(facts.versions)]
                why = f"model {ref.name!r} has no usable version {ref.version}"
                raise _invalid("model", model, allowed_versions, why)
            classes = facts.versions[ref.version]
        elif facts.live is not None:
            classes = facts.versions.get(facts.live)
    limit = min(classes, MAX_TOP_K) if classes else MAX_TOP_K
    if top_k is not None and not 1 <= top_k <= limit:
        where = f" for model {ref}" if classes else ""
        raise _invalid("top_k", top_k, f"1 to {limit}", f"top_k={top_k} is out of range{where}")
    if min_score is not None and not (math.isfinite(min_score) and 0.0 <= min_score <= 1.0):
        raise _invalid("min_score", min_score, "0 to 1", f"min_score={min_score} is out of range")
    k = top_k if top_k is not None else min(default_top_k, limit)
    return JobOptions(
        ref.name, ref.version, k, float(min_score or 0.0), check_priority(priority, max_priority)
    )


def _invalid(option: str, value: Any, allowed: Sequence[str] | str, why: str) -> InvalidOption:
    shown = allowed if isinstance(allowed, str) else ", ".join(allowed)
    if isinstance(value, float) and not math.isfinite(value):
        value = str(value)  # JSON has no NaN or Infinity
    return InvalidOption(
        f"{why}; allowed {option}: {shown}",
        details=[{"in": "query", "field": option, "value": value, "allowed": allowed}],
    )
