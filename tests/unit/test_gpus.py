"""The GPU side of a worker without a GPU: NVML readings (through an injected reader) become
the worker's GPU metrics, ``CUDA_VISIBLE_DEVICES`` selects the GPUs as CUDA does, a worker
pinned to a GPU that is not visible is refused with the GPUs that are, and a host without NVML
gives no GPU series and no error."""

from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchvision.core.settings import Settings, SettingsError
from batchvision.server.gpus import Gpu, GpuNotVisible, GpuSample, NoGpus, describe, require_gpu, visible
from workers import metrics
from workers.runtime import GpuStep

H200 = [
    Gpu(0, "GPU-1111aaaa-0000-0000-0000-000000000000", "NVIDIA H200"),
    Gpu(1, "GPU-2222bbbb-0000-0000-0000-000000000000", "NVIDIA H200"),
]


@dataclass
class FakeReader:
    """A :class:`~batchvision.server.gpus.GpuReader` with fixed readings; ``broken`` GPUs raise."""

    gpus_: list[Gpu]
    broken: set[int] = field(default_factory=set)
    closed: bool = False

    def gpus(self) -> list[Gpu]:
        return list(self.gpus_)

    def sample(self, gpu: Gpu) -> GpuSample:
        if gpu.index in self.broken:
            raise RuntimeError("GPU is lost")
        return GpuSample(gpu, 0.25 * (gpu.index + 1), (gpu.index + 1) * 2**30, 141 * 2**30)

    def close(self) -> None:
        self.closed = True


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize(
    ("env", "indexes"),
    [
        (None, [0, 1]),
        ("", []),
        ("1", [1]),
        ("1,0", [1, 0]),
        ("GPU-2222", [1]),
        ("0,7,1", [0]),  # CUDA stops at the first entry that names no GPU
        ("0,0", [0]),
        ("GPU-", []),  # a prefix of both: ambiguous
        ("-1", []),
    ],
)
def test_cuda_visible_devices_selects_as_cuda_does(env: str | None, indexes: list[int]) -> None:
    assert [g.index for g in visible(H200, env)] == indexes


def test_a_visible_gpu_is_found_by_index_or_uuid() -> None:
    reader = FakeReader(H200)
    assert require_gpu("1", reader) == H200[1]
    assert require_gpu(H200[0].uuid, reader) == H200[0]
    assert not reader.closed, "a reader passed in stays open"


def test_a_gpu_that_is_not_visible_is_named_with_the_visible_ones() -> None:
    with pytest.raises(GpuNotVisible) as err:
        require_gpu("2", FakeReader(H200))
    assert str(err.value) == (
        "GPU 2 is not visible: this host shows 2 GPUs: "
        f"0 (NVIDIA H200, {H200[0].uuid}), 1 (NVIDIA H200, {H200[1].uuid})"
    )
    with pytest.raises(GpuNotVisible, match="GPU 0 is not visible: this host shows no GPU$"):
        require_gpu("0", FakeReader([]))
    assert describe(H200[:1]) == f"1 GPU: 0 (NVIDIA H200, {H200[0].uuid})"


def test_without_nvml_a_pinned_gpu_is_refused_with_the_reason() -> None:
    # This machine has no NVIDIA driver: the real NVML reader cannot start.
    with pytest.raises(GpuNotVisible, match=r"^GPU 0 is not visible: this host shows no GPU \(.+\)$"):
        require_gpu("0")


def test_gpu_readings_become_metrics_by_gpu() -> None:
    registry = CollectorRegistry()
    collector = metrics.watch_gpus(FakeReader(H200), H200[1:], registry)
    assert collector is not None
    labels = (("gpu", "1"), ("uuid", H200[1].uuid))
    assert _samples(registry) == {
        ("batchvision_gpu_utilization_ratio", labels): 0.5,
        ("batchvision_gpu_memory_used_bytes", labels): 2 * 2**30,
        ("batchvision_gpu_memory_total_bytes", labels): 141 * 2**30,
    }, "GPU 1 only: the GPUs the worker uses"
    registry.unregister(collector)
    assert "batchvision_gpu" not in generate_latest(registry).decode()


def test_a_gpu_that_fails_to_read_is_left_out_of_the_scrape() -> None:
    registry = CollectorRegistry()
    metrics.watch_gpus(FakeReader(H200, broken={0}), H200, registry)
    text = generate_latest(registry).decode()
    assert 'gpu="0"' not in text and 'batchvision_gpu_utilization_ratio{gpu="1"' in text


def test_no_gpus_register_nothing() -> None:
    registry = CollectorRegistry()
    assert metrics.watch_gpus(FakeReader([]), [], registry) is None
    assert "batchvision_gpu" not in generate_latest(registry).decode()


def _no_nvml() -> FakeReader:
    raise NoGpus("NVML: NVML Shared Library Not Found")


def _exported() -> str:
    return generate_latest(metrics.REGISTRY).decode()


def test_the_worker_component_exports_the_gpus_it_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    reader = FakeReader(H200)
    step = GpuStep(Settings(gpu="1"), lambda: reader)
    step.start()
    try:
        assert 'batchvision_gpu_memory_used_bytes{gpu="1"' in _exported()
        assert 'gpu="0"' not in _exported()
    finally:
        step.stop()
    assert "batchvision_gpu" not in _exported() and reader.closed


def test_the_worker_component_refuses_a_pinned_gpu_it_cannot_see() -> None:
    with pytest.raises(GpuNotVisible, match="GPU 3 is not visible: this host shows 2 GPUs"):
        GpuStep(Settings(gpu="3"), lambda: FakeReader(H200)).start()
    with pytest.raises(GpuNotVisible, match="GPU 0 is not visible: this host shows no GPU"):
        GpuStep(Settings(gpu="0"), _no_nvml).start()


def test_without_nvml_an_unpinned_worker_starts_without_gpu_metrics() -> None:
    step = GpuStep(Settings(), _no_nvml)
    step.start()
    assert "batchvision_gpu" not in _exported()
    step.stop()


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("keras_backend", "torch", "'tensorflow' or 'jax'"),
        ("precision", "float16", "'float32', 'mixed_float16' or 'mixed_bfloat16'"),
        ("xla", "maybe", "valid boolean"),
        ("gpu", "0,1", "should match pattern"),
        ("gpu", "cuda:0", "should match pattern"),
    ],
)
def test_runtime_settings_are_checked(name: str, value: str, allowed: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({f"BATCHVISION_{name.upper()}": value})
    assert f"BATCHVISION_{name.upper()}={value!r}" in str(err.value) and allowed in str(err.value)


def test_pinning_names_the_gpu_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchvision.cli.main import pin_gpu

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("BATCHVISION_GPU", raising=False)
    pin_gpu(Settings(), "1", FakeReader(H200))
    # NVML's index 1 may be another device in CUDA's own order: the UUID is the same in both.
    assert os.environ["CUDA_VISIBLE_DEVICES"] == H200[1].uuid
    assert os.environ["BATCHVISION_GPU"] == H200[1].uuid
    assert visible(H200, os.environ["CUDA_VISIBLE_DEVICES"]) == [H200[1]]


def test_under_a_scheduler_s_share_an_index_counts_within_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchvision.cli.main import pin_gpu

    four = [Gpu(i, f"GPU-{i}{i}{i}{i}-aaaa", "NVIDIA H200") for i in range(4)]
    # Slurm gave this job the host's GPUs 2 and 3: CUDA calls them 0 and 1, and so does --gpu.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.delenv("BATCHVISION_GPU", raising=False)  # restored after the test
    pin_gpu(Settings(), "1", FakeReader(four))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == four[3].uuid
    assert os.environ["BATCHVISION_GPU"] == four[3].uuid, "the worker's own check names the same GPU"
    assert require_gpu(os.environ["BATCHVISION_GPU"], FakeReader(four)) == four[3]
    # By UUID: one of the share, yes; one outside it, no (another job's GPU).
    assert require_gpu(four[2].uuid, FakeReader(four), allotted="2,3") == four[2]
    with pytest.raises(GpuNotVisible) as err:
        require_gpu(four[0].uuid, FakeReader(four), allotted="2,3")
    assert f"CUDA_VISIBLE_DEVICES='2,3' leaves this process 2 GPUs: 2 (NVIDIA H200, {four[2].uuid})" in str(
        err.value
    )
    with pytest.raises(GpuNotVisible, match=r"GPU 2 is not visible: CUDA_VISIBLE_DEVICES='2,3' leaves"):
        require_gpu("2", FakeReader(four), allotted="2,3")
    with pytest.raises(GpuNotVisible, match=r"CUDA_VISIBLE_DEVICES='' leaves this process no GPU"):
        require_gpu("0", FakeReader(four), allotted="")
    # Mixed GPUs: CUDA numbers them fastest first, NVML by bus; unless told to use the bus order
    # too, an index of the share cannot be read.
    mixed = [*four[:3], Gpu(3, "GPU-3333-bbbb", "NVIDIA A100")]
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    with pytest.raises(GpuNotVisible, match="CUDA_DEVICE_ORDER=PCI_BUS_ID, or name the GPUs by UUID"):
        require_gpu("1", FakeReader(mixed), allotted="2,3")
    assert require_gpu("1", FakeReader(mixed), allotted=f"{four[2].uuid},{mixed[3].uuid}") == mixed[3]
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert require_gpu("1", FakeReader(mixed), allotted="2,3") == mixed[3]


def test_a_gpu_set_only_in_the_environment_is_pinned_too(monkeypatch: pytest.MonkeyPatch) -> None:
    main = importlib.import_module("batchvision.cli.main")  # the package's `main` is a function
    pinned: list[str] = []

    def refuse(s: Settings, gpu: str) -> None:
        pinned.append(gpu)
        raise GpuNotVisible(f"GPU {gpu} is not visible: this host shows no GPU")

    monkeypatch.setenv("BATCHVISION_GPU", "3")
    monkeypatch.setattr(main, "pin_gpu", refuse)
    args = argparse.Namespace(gpu=None, models=None, name=None, loglevel="info")
    assert main.cmd_worker(args) == 2
    assert pinned == ["3"]
