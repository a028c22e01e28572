"""The host's NVIDIA GPUs as NVML reports them (``nvidia-ml-py``), without TensorFlow or JAX:
which GPUs a process may use, and each one's utilisation and memory for the worker's metrics.

Nothing here fails on a host without GPUs: :class:`Nvml` raises :class:`NoGpus` with the reason
(no ``nvidia-ml-py``, no driver), and callers carry on without GPU metrics. Only a worker pinned
to a GPU (``batchvision worker --gpu N``) turns that into an error (:func:`require_gpu`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Protocol

from batchvision.server.text import as_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpu:
    """One GPU: NVML's index (as ``CUDA_VISIBLE_DEVICES`` counts them), UUID and model name."""

    index: int
    uuid: str
    name: str

    def __str__(self) -> str:
        return f"{self.index} ({self.name}, {self.uuid})"


@dataclass(frozen=True)
class GpuSample:
    """One reading of a GPU: busy share of NVML's last sample period (0-1) and memory in bytes."""

    gpu: Gpu
    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int


class GpuReader(Protocol):
    """What reads the GPUs: :class:`Nvml`, or a stand-in in tests."""

    def gpus(self) -> list[Gpu]: ...

    def sample(self, gpu: Gpu) -> GpuSample: ...

    def close(self) -> None: ...


class NoGpus(RuntimeError):
    """NVML cannot be used in this process; the message says why (no library, no driver)."""


class GpuNotVisible(RuntimeError):
    """The GPU a worker was pinned to is not visible; the message names it and what is."""


class Nvml:
    """:class:`GpuReader` over NVML. Raises :class:`NoGpus` where NVML cannot start."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError:
            raise NoGpus("nvidia-ml-py is not installed") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:  # e.g. "NVML Shared Library Not Found": no NVIDIA driver
            raise NoGpus(f"NVML: {exc}") from None
        self._nvml: Any = pynvml

    def gpus(self) -> list[Gpu]:
        nvml = self._nvml
        out = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            # nvidia-ml-py returned bytes before version 11.
            uuid, name = as_text(nvml.nvmlDeviceGetUUID(handle)), as_text(nvml.nvmlDeviceGetName(handle))
            out.append(Gpu(index, uuid, name))
        return out

    def sample(self, gpu: Gpu) -> GpuSample:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(gpu.index)
        rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuSample(gpu, rates.gpu / 100.0, int(memory.used), int(memory.total))

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            log.debug("NVML shutdown: %s", exc)


#: One entry of ``CUDA_VISIBLE_DEVICES``: an index, or a GPU / MIG UUID (or its prefix).
_ENTRY = re.compile(r"^([0-9]+|(GPU|MIG)-[0-9A-Za-z/-]+)$")


def visible(gpus: list[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The GPUs a CUDA process sees under ``CUDA_VISIBLE_DEVICES`` (``None``: unset, all of
    them), in its order. As CUDA does, the list ends at the first entry that names no GPU."""
    if cuda_visible_devices is None:
        return list(gpus)
    out: list[Gpu] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if not _ENTRY.match(entry):
            break
        found = (
            [g for g in gpus if g.index == int(entry)]
            if entry.isdigit()
            else [g for g in gpus if g.uuid.startswith(entry)]
        )
        if len(found) != 1 or found[0] in out:
            break
        out.append(found[0])
    return out


def describe(gpus: list[Gpu]) -> str:
    """``no GPU`` or ``2 GPUs: 0 (NVIDIA H200, GPU-...), 1 (...)``: for error messages."""
    if not gpus:
        return "no GPU"
    return f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''}: " + ", ".join(str(g) for g in gpus)


def require_gpu(wanted: str, reader: GpuReader | None = None, allotted: str | None = None) -> Gpu:
    """The GPU ``wanted`` (an index or UUID, as ``--gpu`` takes it) names, if this host shows it;
    else :class:`GpuNotVisible`, naming it and the GPUs that are visible. ``reader`` defaults to
    :class:`Nvml` (opened and closed here).

    ``allotted``: a ``CUDA_VISIBLE_DEVICES`` set before the worker's own (a scheduler's share of
    the host, such as Slurm's). Then an index counts within that share, as CUDA counts it (``1``
    under ``2,3`` is the host's GPU 3), and a GPU outside it is refused: the share is what this
    job may use. Numbered entries are read in NVML's order, which is CUDA's only with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or on a host of GPUs of one model; otherwise refused."""
    own = reader is None
    try:
        reader = reader or Nvml()
    except NoGpus as exc:
        raise GpuNotVisible(f"GPU {wanted} is not visible: this host shows no GPU ({exc})") from None
    try:
        gpus = reader.gpus()
    finally:
        if own:
            reader.close()
    if allotted is None:
        found = visible(gpus, wanted)
        if len(found) != 1:
            raise GpuNotVisible(f"GPU {wanted} is not visible: this host shows {describe(gpus)}")
        return found[0]
    numbered = any(e.strip().isdigit() for e in allotted.split(","))
    order = os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    if numbered and order != "PCI_BUS_ID" and len({g.name for g in gpus}) > 1:
        # CUDA counts these indexes fastest first, NVML by PCI bus: on a host of mixed GPUs the
        # two differ, and the share could not be told from another job's GPUs.
        raise GpuNotVisible(
            f"GPU {wanted}: CUDA_VISIBLE_DEVICES={allotted!r} numbers GPUs in CUDA's {order} order, "
            f"which differs from NVML's on this host of mixed GPUs ({describe(gpus)}); set "
            "CUDA_DEVICE_ORDER=PCI_BUS_ID, or name the GPUs by UUID"
        )
    share = visible(gpus, allotted)
    if wanted.isdigit():
        found = share[int(wanted) : int(wanted) + 1]
    else:
        found = [g for g in visible(gpus, wanted) if g in share]
    if len(found) != 1:
        raise GpuNotVisible(
            f"GPU {wanted} is not visible: CUDA_VISIBLE_DEVICES={allotted!r} leaves this process "
            f"{describe(share)} (counted from 0 in that order) of the host's {describe(gpus)}"
        )
    return found[0]
