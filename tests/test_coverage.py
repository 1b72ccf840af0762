"""cache-inspect coverage and ep_jit.check_warm: before and after warming, through a shared
tier, and misses explained by a key input of this environment."""

import json
import os
import subprocess
import sys

import pytest

import ep_jit
from helpers import REPO, run_cli, run_py
from ep_jit import compat
from ep_jit.compiler import nvrtc_version

PLAN = "[[job]]\nhidden = 1024\nexperts = 8\ntopk = 2\nworld_size = 2\n"
N = 4  # a Buffer's kernels, either transport


@pytest.fixture
def plan(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text(PLAN)
    return path


def coverage(*args, env=None):
    return run_cli("cache_tools", "coverage", *args, env=env)


def warm(*args, env=None):
    out = run_cli("ep_jit.cli.warm", *args, "--json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_coverage_before_and_after_warming(cache_env, plan):
    before = coverage(str(plan))
    assert before.returncode == 1
    missing = [l for l in before.stdout.splitlines() if l.startswith("MISSING ")]
    assert len(missing) == N and all("no ep-jit-warm run recorded" in l for l in missing)
    assert any("layout(hidden=1024, experts=8, ep_size=2, topk=2" in l for l in missing)
    warm("--plan", str(plan))
    after = coverage(str(plan), "--json")
    assert after.returncode == 0, after.stdout
    assert json.loads(after.stdout) | {"driver": None} == {"ok": True, "specs": N, "driver": None, "local": N,
                                                            "shared": 0, "missing": [], "problems": []}
    assert coverage("--preset", "tiny").returncode == 0          # the same kernels as the tiny preset
    assert coverage("--preset", "deepseek-v3").returncode == 1


def test_coverage_counts_the_shared_tier(cache_env, plan, tmp_path):
    shared = tmp_path / "shared"
    warm("--plan", str(plan), "--cache-dir", str(shared))
    out = coverage(str(plan), "--json", env={"EP_JIT_SHARED_CACHE_DIR": str(shared)})
    assert out.returncode == 0 and (json.loads(out.stdout)["local"], json.loads(out.stdout)["shared"]) == (0, N)
    assert not cache_env.exists()  # coverage only reads


# warm as if with another NVRTC: the binding reports another version, so keys and records carry it
OTHER_NVRTC = "13.5" if nvrtc_version() != "13.5" else "13.4"
WARM_WITH_OTHER_NVRTC = f"""
import sys
from cuda.bindings import nvrtc
nvrtc.nvrtcVersion = lambda: (nvrtc.nvrtcResult.NVRTC_SUCCESS, {OTHER_NVRTC.replace('.', ', ')})
from ep_jit.cli.warm import main
sys.exit(main(["--plan", sys.argv[1], "--jobs", "1"]))
"""


def test_nvrtc_mismatch_is_explained(cache_env, plan):
    out = subprocess.run([sys.executable, "-c", WARM_WITH_OTHER_NVRTC, str(plan)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    result = coverage(str(plan))
    assert result.returncode == 1
    expected = f"warmed with NVRTC {OTHER_NVRTC}, this environment has {nvrtc_version()}"
    missing = [l for l in result.stdout.splitlines() if l.startswith("MISSING ")]
    assert len(missing) == N and all(expected in l for l in missing), result.stdout
    py = ep_jit.check_warm(plan)  # the same answer from Python
    assert not py.ok and [m.reasons for m in py.missing] == [[expected]] * N


def test_pruned_entries_are_explained(cache_env, plan):
    warm("--plan", str(plan))
    run_cli("cache_tools", "prune", "--all")
    result = ep_jit.check_warm(plan)
    assert len(result.missing) == N and all("its entry is gone" in m.reasons[0] for m in result.missing)


def test_check_warm_from_python_and_the_driver(cache_env, plan, monkeypatch):
    specs = ep_jit.buffer_specs(hidden=1024, num_experts=8, topk=2, dtype="bf16", members=[0, 1], arch="sm_90a")
    assert not ep_jit.check_warm(specs).ok
    ep_jit.warm(specs, ep_jit.GroupInfo([0], 0))
    assert ep_jit.check_warm(specs).ok and ep_jit.check_warm(preset="tiny").ok and ep_jit.check_warm(plan).ok
    monkeypatch.setattr(compat, "driver_cuda_version", lambda: (12, 4))  # cubins of NVRTC 13 need a CUDA 13 driver
    old_driver = ep_jit.check_warm(plan)
    assert not old_driver.ok and old_driver.missing == []
    assert "the CUDA driver supports CUDA 12.4" in old_driver.problems[0]
    assert "pip install 'ep_jit[cu12]'" in old_driver.problems[0]
    with pytest.raises(ValueError, match="plan: expected a plan file or specs, or a preset"):
        ep_jit.check_warm(plan, preset="tiny")


def test_check_warm_compiles_and_writes_nothing(cache_env, plan):
    out = run_py(f"import ep_jit; r = ep_jit.check_warm({str(plan)!r}); print(r.ok, ep_jit.stats()['compiles'])")
    assert out.stdout.split() == ["False", "0"], out.stderr
    assert not cache_env.exists()


@pytest.mark.parametrize("planted", ["file", "link"])
def test_a_coverage_folder_that_is_not_a_folder_fails_the_run_in_one_line(cache_env, plan, tmp_path, planted):
    outside = tmp_path / "outside"
    outside.mkdir()
    cache_env.mkdir(mode=0o700)
    target = cache_env / "coverage"
    if planted == "file":
        target.write_text("not a folder")
    else:
        target.symlink_to(outside)
    out = run_cli("ep_jit.cli.warm", "--plan", str(plan), "--json")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    summary = json.loads(out.stdout)
    assert summary["coverage_record"] is None and summary["failures"][-1]["spec"] == "coverage record"
    assert list(outside.iterdir()) == []  # nothing written through the link
