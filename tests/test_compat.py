"""The driver/NVRTC check, and the CUDA extras: each resolves to one CUDA major, and the
default extra to the same NVRTC and headers as the test environment."""

import json
import re
import subprocess
import sys
import tomllib

import pytest

from helpers import REPO
from ep_jit import CudaVersionError, compat, compiler, runtime
from ep_jit.errors import ConfigError


@pytest.mark.parametrize("driver, nvrtc, fix", [
    ((12, 8), "13.0", "pip install 'ep_jit[cu12]'"),
    ((12, 2), "13.5", "pip install 'ep_jit[cu12]'"),
    ((11, 8), "12.9", "need a CUDA 12 or newer driver"),
])
def test_driver_too_old_for_nvrtc(driver, nvrtc, fix, monkeypatch):
    monkeypatch.setattr(compat, "driver_cuda_version", lambda: driver)
    with pytest.raises(CudaVersionError) as err:
        compat.check_driver(nvrtc)
    text = str(err.value)
    assert f"CUDA {driver[0]}.{driver[1]}" in text and f"NVRTC is {nvrtc}" in text and fix in text


@pytest.mark.parametrize("driver, nvrtc", [((13, 0), "13.0"), ((13, 0), "13.5"), ((13, 2), "12.9"), ((12, 4), "12.9"),
                                           (None, "13.0")])
def test_driver_that_can_load_the_cubins(driver, nvrtc, monkeypatch):
    monkeypatch.setattr(compat, "driver_cuda_version", lambda: driver)
    compat.check_driver(nvrtc)


def test_first_cuda_use_checks_the_driver(monkeypatch):
    monkeypatch.setattr(runtime.driver, "cuInit", lambda flags: (runtime.driver.CUresult.CUDA_SUCCESS,))
    monkeypatch.setattr(compat, "driver_cuda_version", lambda: (12, 8))
    monkeypatch.setattr(runtime, "nvrtc_version", lambda: "13.0")
    with pytest.raises(CudaVersionError, match=r"CUDA 12\.8, but NVRTC is 13\.0"):
        runtime._init.__wrapped__()
    monkeypatch.setattr(compat, "driver_cuda_version", lambda: (13, 0))
    runtime._init.__wrapped__()


def test_missing_nvrtc_names_the_extras(monkeypatch):
    from cuda.pathfinder import DynamicLibNotFoundError

    def absent():
        raise DynamicLibNotFoundError("libnvrtc.so.13: not found")
    monkeypatch.setattr(compiler.nvrtc, "nvrtcVersion", absent)
    with pytest.raises(ConfigError, match=r"NVRTC: expected the NVRTC library \(pip install 'ep_jit\[cu13\]'"):
        compiler.nvrtc_version.__wrapped__()


# ---- what pip resolves for each extra ----------------------------------------------------

# distributions whose version (or -cuNN suffix) is the CUDA major; library wheels such as
# nvidia-cufft number themselves otherwise
CUDA_MAJOR_NAMES = re.compile(r"^(cuda-bindings|cuda-toolkit|nvidia-cuda-(nvrtc|runtime|cccl))(-cu(\d+))?$")


@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    """extra -> {distribution: version} that `pip install --dry-run` picks in a fresh venv."""
    root = tmp_path_factory.mktemp("resolve")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    out = {}
    for extra in ("cu12", "cu13", "test"):
        report = root / f"{extra}.json"
        run = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--ignore-installed",
                              "-q", "--report", str(report), f"{REPO}[{extra}]"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        out[extra] = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    return out


def _cuda_majors(dists: dict) -> dict[str, int]:
    majors = {}
    for name, version in dists.items():
        m = CUDA_MAJOR_NAMES.match(name)
        if m:
            majors[name] = int(m.group(4) or version.split(".")[0])
    return majors


@pytest.mark.parametrize("extra, major", [("cu12", 12), ("cu13", 13), ("test", 13)])
def test_each_extra_resolves_to_one_cuda_major(resolved, extra, major):
    majors = _cuda_majors(resolved[extra])
    nvrtc = [n for n in majors if n.startswith("nvidia-cuda-nvrtc")]
    assert len(nvrtc) == 1, majors  # one NVRTC, never a 12 and a 13 side by side
    assert "cuda-bindings" in majors and set(majors.values()) == {major}, majors


def test_the_default_extra_warms_the_keys_the_test_environment_uses(resolved):
    """NVRTC (major.minor) and the header wheels enter the cache key: the README's first
    command (the cu13 extra) and the test extras must agree on them."""
    for name in ("nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cuda-cccl"):
        assert resolved["cu13"][name] == resolved["test"][name], name


def test_no_user_facing_extra_brings_a_paddle_wheel():
    """paddlepaddle and paddlepaddle-gpu are two distributions of one package: an extra that
    brought either could overwrite the other. Only the CPU test environment names one."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [e for e, deps in extras.items() if e != "test" and any(d.startswith("paddle") for d in deps)]
