import json
import os
import time

import pytest

from conftest import run_cli
from ep_jit import member_hash
from ep_jit.cache import DiskCache
from ep_jit.kernels import BUFFER_TEMPLATES

N_TEMPLATES = len(BUFFER_TEMPLATES)


def warm(*args, env=None):
    return run_cli("ep_jit.cli.warm", *args, env=env)


def inspect(*args, env=None):
    return run_cli("cache_tools", *args, env=env)


def _one_line_error(out, needle):
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0], lines[0]


def test_warm_flags_are_a_product_and_idempotent(cache_env):
    args = ("--hidden", "1024", "--hidden", "2048", "--experts", "8", "--topk", "1", "--topk", "2",
            "--dtype", "bf16", "--dtype", "fp8", "--world-size", "4", "--ep-size", "2", "--json")
    first = warm(*args)
    assert first.returncode == 0, first.stderr
    s = json.loads(first.stdout)
    n = 2 * 2 * 2 * 2 * N_TEMPLATES  # hidden x topk x dtype x groups x kernels of a Buffer
    assert (s["specs"], s["compiled"], s["cached"], s["failed"]) == (n, n, 0, 0)
    assert s["seconds"] > 0
    second = json.loads(warm(*args).stdout)
    assert (second["compiled"], second["cached"]) == (0, n)
    assert len(list(DiskCache(cache_env).entry_paths())) == n


def test_warm_preset_and_dry_run_write_nothing(cache_env):
    out = warm("--preset", "deepseek-v3", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["specs"] == 2 * N_TEMPLATES and not cache_env.exists()
    assert all((k["hidden"], k["experts"], k["ep_size"], k["topk"]) == (7168, 256, 8, 8) for k in plan["kernels"])
    real = json.loads(warm("--preset", "deepseek-v3", "--json").stdout)
    keys = {p.name.split(".")[0] for p in DiskCache(cache_env).entry_paths()}
    assert real["compiled"] == 2 * N_TEMPLATES and keys == {k["key"] for k in plan["kernels"]}


def test_warm_verifies_disk_hits_and_rebuilds_bad_ones(cache_env):
    warm("--preset", "tiny")
    path = next(DiskCache(cache_env).entry_paths())
    path.write_bytes(b"garbage")
    s = json.loads(warm("--preset", "tiny", "--json").stdout)
    assert (s["cached"], s["compiled"]) == (N_TEMPLATES - 1, 1)
    assert len(list((cache_env / "quarantine").iterdir())) == 1


def test_warm_plan_file_with_explicit_groups(cache_env, tmp_path):
    plan = tmp_path / "p.toml"
    plan.write_text('[[job]]\nhidden = 2048\nexperts = 16\ntopk = 2\ngroups = [[0, 1], [3, 2]]\n'
                    '[[job]]\nhidden = 1024\nexperts = 8\ntopk = 2\narch = ["sm_90a", "sm_100a"]\n'
                    'world_size = 2\n')
    out = warm("--plan", str(plan), "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    specs = json.loads(out.stdout)["kernels"]
    assert len(specs) == 4 * N_TEMPLATES
    assert any(s["group"] == member_hash([3, 2]) for s in specs)
    assert any(s["arch"] == "sm_100a" for s in specs)


def test_warm_reports_compile_failures(cache_env, template_copy):
    p = template_copy / "layout.cu"
    p.write_text(p.read_text().replace("blockIdx.x, topk_idx", "nope, topk_idx"))
    out = warm("--preset", "tiny", "--json", env={"EP_JIT_TEMPLATE_DIR": str(template_copy)})
    s = json.loads(out.stdout)
    assert out.returncode == 1 and s["failed"] == 1 and "NVRTC could not compile" in s["failures"][0]["error"]
    assert s["compiled"] == N_TEMPLATES - 1
    again = json.loads(warm("--preset", "tiny", "--json", env={"EP_JIT_TEMPLATE_DIR": str(template_copy)}).stdout)
    assert (again["failed"], again["compiled"], again["cached"]) == (1, 0, N_TEMPLATES - 1)  # remembered


BAD_WARM = [
    (("--hidden", "100", "--experts", "8", "--topk", "2", "--world-size", "2"), "hidden: expected a multiple of 128"),
    (("--hidden", "1024", "--experts", "7", "--topk", "2", "--world-size", "2"), "--experts: expected a multiple"),
    (("--hidden", "1024", "--experts", "8", "--topk", "2", "--world-size", "3", "--ep-size", "2"),
     "--world-size: expected a multiple of ep_size=2, got 3"),
    (("--hidden", "1024", "--experts", "8", "--topk", "2", "--world-size", "2", "--dtype", "fp16"), "dtype"),
    (("--hidden", "1024", "--experts", "8", "--topk", "2", "--world-size", "2", "--arch", "hopper"), "arch"),
    (("--hidden", "1024", "--experts", "8", "--world-size", "2"), "--topk: expected a value"),
    (("--hidden", "x",), "invalid int value"),
    (("--preset", "gpt-9",), "invalid choice"),
    (("--preset", "tiny", "--hidden", "1024"), "--preset"),
    (("--preset", "tiny", "--jobs", "0"), "--jobs"),
    ((), "expected --preset, --plan"),
    (("--plan", "/nonexistent/plan.toml"), "--plan: expected a file"),
    (("--preset", "tiny", "--plan", "x.toml"), "not allowed with"),
]


@pytest.mark.parametrize("args, needle", BAD_WARM)
def test_warm_bad_input_exits_2_and_writes_nothing(cache_env, args, needle):
    _one_line_error(warm(*args), needle)
    assert not cache_env.exists()


@pytest.mark.parametrize("text, needle", [
    ("not toml [", "not valid TOML"),
    ("[[job]]\nhidden = 1024\nexperts = 8\ntopk = 2\nworld_size = 2\ncolour = 1\n", "job 0: colour: unknown key"),
    ("[[job]]\nhidden = 1024\nexperts = 8\ntopk = 2\n", "world_size"),
    ("[[job]]\nhidden = 1024\nexperts = 8\ntopk = 2\ngroups = [[0, 0]]\n", "expected each rank once"),
    ("[[job]]\nhidden = -5\nexperts = 8\ntopk = 2\nworld_size = 2\n", "job 0: hidden: expected a positive int"),
    ("[other]\nx = 1\n", "expected one or more [[job]]"),
])
def test_bad_plan_files_exit_2(cache_env, tmp_path, text, needle):
    plan = tmp_path / "bad.toml"
    plan.write_text(text)
    _one_line_error(warm("--plan", str(plan)), needle)
    assert not cache_env.exists()


# ---- cache-inspect ------------------------------------------------------------

@pytest.fixture
def warmed(cache_env):
    out = warm("--preset", "deepseek-v3", "--json")
    assert out.returncode == 0, out.stderr
    return cache_env


def test_inspect_list_show_stats(warmed):
    rows = json.loads(inspect("list", "--json").stdout)
    assert len(rows) == 2 * N_TEMPLATES and {r["dtype"] for r in rows} == {"bf16", "fp8_e4m3"}
    assert {r["template"] for r in rows} == set(BUFFER_TEMPLATES)
    rows = [r for r in rows if r["template"] == "layout"]
    for r in rows:
        assert r["arch"] == "sm_90a" and r["group"] == member_hash(range(8))
        assert r["size"] > 0 and r["created"] and r["last_used"] and r["nvrtc"]
    text = inspect("list").stdout
    assert rows[0]["key"][:10] in text
    shown = json.loads(inspect("show", rows[0]["key"][:10], "--json", "--source").stdout)
    assert shown["inputs"]["params"]["hidden"] == 7168 and "layout_kernel" in shown["source"]
    assert list(shown["lowered_names"].values())[0].startswith("_ZN6ep_jit")
    assert "ep_common.cuh" in shown["headers"]
    assert "lowered names:" in inspect("show", rows[0]["key"][:10]).stdout
    stats = json.loads(inspect("stats", "--json").stdout)
    n = 2 * N_TEMPLATES
    assert (stats["entries"], stats["ok"], stats["corrupt"]) == (n, n, 0)
    assert stats["by_template"] == {t: 2 for t in BUFFER_TEMPLATES}
    other = json.loads(inspect("stats", "--json", "--cache-dir", str(warmed.parent / "elsewhere")).stdout)
    assert other["entries"] == 0


def test_inspect_verify_and_fix(warmed):
    assert inspect("verify").returncode == 0
    path = next(DiskCache(warmed).entry_paths())
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    out = inspect("verify", "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["corrupt"][0]["problem"] == "checksum mismatch"
    assert path.exists()  # verify alone changes nothing
    fixed = inspect("verify", "--fix", "--json")
    assert fixed.returncode == 0 and len(json.loads(fixed.stdout)["quarantined"]) == 1  # fixed: nothing left
    assert not path.exists() and inspect("verify").returncode == 0


def test_inspect_prune_lru_first(warmed):
    paths = sorted(DiskCache(warmed).entry_paths())
    now = time.time()
    for age, path in enumerate(paths):  # paths[0] was used longest ago; the mtime is the last use
        os.utime(path, (now, now - (len(paths) - age) * 86400 - 3600))
    dry = json.loads(inspect("prune", "--older-than", f"{len(paths) * 24 - 12}h", "--dry-run", "--json").stdout)
    assert dry["removed"] == [paths[0].name.split(".")[0]] and paths[0].exists()
    keep = sum(p.stat().st_size for p in paths[-2:])
    out = json.loads(inspect("prune", "--max-size", str(keep), "--json").stdout)
    assert out["removed"] == [p.name.split(".")[0] for p in paths[:-2]] and out["kept"] == 2  # LRU first
    assert not paths[0].exists() and paths[-1].exists() and paths[-2].exists()
    assert json.loads(inspect("prune", "--all", "--json").stdout)["kept"] == 0
    assert list(DiskCache(warmed).entry_paths()) == []


@pytest.mark.parametrize("args, needle", [
    (("frobnicate",), "invalid choice"),
    (("prune",), "expected --all, --failed, --max-size or --older-than"),
    (("prune", "--max-size", "lots"), "--max-size: expected a size"),
    (("prune", "--older-than", "forever"), "--older-than: expected an age"),
    (("show", "zzzz"), "KEY_PREFIX: expected exactly one entry"),
    ((), "required"),
])
def test_inspect_bad_input_exits_2(warmed, args, needle):
    before = sorted(p.name for p in warmed.rglob("*"))
    _one_line_error(inspect(*args), needle)
    assert sorted(p.name for p in warmed.rglob("*")) == before


def test_inspect_launcher_script(warmed):
    import subprocess
    import sys
    from conftest import REPO
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "cache-inspect"), "stats", "--json"],
                         capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0 and json.loads(out.stdout)["entries"] == 2 * N_TEMPLATES
