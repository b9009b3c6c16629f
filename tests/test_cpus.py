"""The cores the server sizes itself to: affinity, bounded by a container's CPU limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from muxserve.serving.cpus import available_cores, cgroup_cpu_limit

AFFINITY = len(os.sched_getaffinity(0))


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "400000 100000"}, 4.0),  # cgroup v2, --cpus 4
        ({"cpu.max": "150000 100000"}, 1.5),
        ({"cpu.max": "max 100000"}, None),  # v2, no limit
        ({"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"}, 2.0),  # cgroup v1
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),  # v1, no limit
        ({"cpu.max": "garbage"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_cgroup_cpu_limit_reads_v2_and_v1(tmp_path: Path, files: dict[str, str], limit: float | None) -> None:
    assert cgroup_cpu_limit(write(tmp_path, files)) == limit


def test_available_cores_is_bounded_by_the_limit_rounded_down_at_least_one(tmp_path: Path) -> None:
    assert available_cores(write(tmp_path / "none", {"cpu.max": "max 100000"})) == AFFINITY
    assert available_cores(write(tmp_path / "half", {"cpu.max": "50000 100000"})) == 1
    assert available_cores(write(tmp_path / "one-and-a-half", {"cpu.max": "150000 100000"})) == 1
    # a limit above the affinity does not add cores
    assert available_cores(write(tmp_path / "many", {"cpu.max": f"{(AFFINITY + 8) * 100000} 100000"})) == AFFINITY


@pytest.mark.parametrize(("cores", "device", "workers"), [(2, "", 1), (16, "", 4), (16, "cpu", 4), (16, "cuda", 8), (16, "cuda:1", 8), (4, "cuda", 2), (64, "", 8), (64, "cuda", 8)])
def test_frontend_processes_follow_the_cores_and_the_device(monkeypatch: pytest.MonkeyPatch, cores: int, device: str, workers: int) -> None:
    import muxserve.serving.server as server

    monkeypatch.setattr(server, "available_cores", lambda: cores)
    assert server.default_workers(device) == workers


def test_a_repository_that_asks_for_a_gpu_gets_the_gpu_default(tmp_path) -> None:
    """Without --device, a served model whose config.pbtxt puts it on a GPU counts as CUDA for
    the frontends' default; --device and --models decide first."""
    from muxserve.serving.server import serving_device
    from muxserve.serving.settings import Settings

    for name, kind in (("on-gpu", "KIND_GPU"), ("on-cpu", "KIND_CPU")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name}"\ninstance_group {{ kind: {kind} }}\n')
    assert serving_device(Settings(model_repository=str(tmp_path))) == "cuda"
    assert serving_device(Settings(model_repository=str(tmp_path), models=["on-cpu"])) == "cpu"
    assert serving_device(Settings(model_repository=str(tmp_path), device="cpu")) == "cpu"
    assert serving_device(Settings(model_repository=str(tmp_path / "missing"))) == "cpu"
