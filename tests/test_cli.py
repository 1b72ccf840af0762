import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, run_cli
from ep_jit import member_hash
from ep_jit.cache import _HOST, DiskCache
from ep_jit.transports import BUFFER_TEMPLATES

N_TEMPLATES = len(BUFFER_TEMPLATES)


def warm(*args, env=None):
    return run_cli("ep_jit.cli.warm", *args, env=env)


def inspect(*args, env=None):
    return run_cli("cache_tools", *args, env=env)


def warm_here(capsys, *args):
    """ep-jit-warm in this process (quick, for input that is refused before any work)."""
    from ep_jit.cli.warm import main
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


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
    p.write_text(p.read_text().replace("blockIdx.x, a.topk_idx", "nope, a.topk_idx"))
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
    (("--preset", "tiny", "--arch", "sm_12"), "--arch: expected an arch NVRTC"),
    (("--preset", "tiny", "--arch", "sm_999"), "got 'sm_999'"),
    (("--preset", "tiny", "--world-size", "0"), "--world-size: expected a positive int, got 0"),
    (("--hidden", "1024", "--experts", "128", "--topk", "2", "--world-size", "128"),
     "--world-size: expected at most 64 ranks per group, got 128"),
    (("--hidden", "1024", "--experts", "256", "--topk", "2", "--world-size", "256", "--ep-size", "128"),
     "--ep-size: expected at most 64 ranks per group"),
    (("--hidden", "1024", "--experts", "4096", "--topk", "2", "--world-size", "2"),
     "--experts: expected at most 1024 experts per rank"),
    (("--hidden", "-1024", "--experts", "8", "--topk", "2", "--world-size", "2"), "--hidden: expected a positive"),
    (("--hidden", "1024", "--experts", "8", "--topk", "2", "--world-size", "100000000", "--ep-size", "1"),
     "expands to 400000000 kernels; expected at most 100000"),
    (("--preset", "tiny", "--world", "2"), "unrecognized arguments: --world"),  # no abbreviations
]


@pytest.mark.parametrize("args, needle", BAD_WARM)
def test_warm_bad_input_exits_2_and_writes_nothing(cache_env, capsys, args, needle):
    _one_line_error(warm_here(capsys, *args), needle)
    assert not cache_env.exists()


JOB = "[[job]]\nexperts = 8\ntopk = 2\n"


@pytest.mark.parametrize("text, needle", [
    ("not toml [", "not valid TOML"),
    ("[[job]]\nhidden = 1024\nexperts = 8\ntopk = 2\nworld_size = 2\ncolour = 1\n", "job 0: colour: unknown key"),
    ("[[job]]\nhidden = 1024\nexperts = 8\ntopk = 2\n", "world_size"),
    ("[[job]]\nhidden = 1024\nexperts = 8\ntopk = 2\ngroups = [[0, 0]]\n", "expected each rank once"),
    ("[[job]]\nhidden = -5\nexperts = 8\ntopk = 2\nworld_size = 2\n", "job 0: hidden: expected a positive int"),
    ("[other]\nx = 1\n", "expected one or more [[job]]"),
    ("job = 5\n", "expected one or more [[job]]"),
    ("job = [5]\n", "job 0: expected a table of job keys"),
    (JOB + "hidden = [[1024]]\nworld_size = 2\n", "job 0: hidden: expected a positive int or a non-empty list"),
    (JOB + "hidden = []\nworld_size = 2\n", "job 0: hidden: expected a positive int or a non-empty list"),
    (JOB + "hidden = 1024\ndtype = 5\nworld_size = 2\n", "job 0: dtype: expected a string"),
    (JOB + "hidden = 1024\ndtype = 'fp16'\nworld_size = 2\n", "job 0: dtype: expected one of"),
    (JOB + "hidden = 1024\nworld_size = '8'\n", "job 0: world_size: expected a positive int, got '8'"),
    (JOB + "hidden = 1024\nworld_size = [2]\n", "job 0: world_size: expected a positive int"),
    (JOB + "hidden = 1024\nname = 5\nworld_size = 2\n", "job 0: name: expected a string"),
    (JOB + "hidden = 1024\ngroups = [[0, 1], [1, 2]]\n", "groups: expected groups that do not overlap"),
    (JOB + "hidden = 1024\ngroups = [[0, -1]]\n", "groups: expected ranks"),
    (JOB + "hidden = 1024\ngroups = [[0, 1], 2]\n", "groups: expected a non-empty list of non-empty lists"),
    (JOB + "hidden = 1024\ngroups = [[]]\n", "groups: expected a non-empty list of non-empty lists"),
    (JOB + "hidden = 1024\ngroups = [[0, 5]]\nworld_size = 4\n", "got 5 in [0, 5]"),
    (JOB + "hidden = 1024\ngroups = [[0, 1]]\nep_size = 2\n", "ep_size: give either groups or ep_size"),
    (JOB + "hidden = 1024\narch = 'sm_12'\nworld_size = 2\n", "job 0: arch: expected an arch NVRTC"),
    (JOB + "hidden = 100\nworld_size = 2\n", "job 0: hidden: expected a multiple of 128, got 100"),
    (JOB + "hidden = 1024\nworld_size = 2\n" + JOB.replace("]]\n", "]]\nname = 'second'\n") +
     "hidden = 1024\nworld_size = 0\n",
     "job 1 ('second'): world_size: expected a positive int, got 0"),
])
def test_bad_plan_files_exit_2(cache_env, tmp_path, capsys, text, needle):
    plan = tmp_path / "bad.toml"
    plan.write_text(text)
    _one_line_error(warm_here(capsys, "--plan", str(plan)), needle)
    assert not cache_env.exists()


def test_plan_that_is_not_utf8_or_not_a_file_exits_2(cache_env, tmp_path):
    plan = tmp_path / "latin1.toml"
    plan.write_bytes(b"[[job]]\nname = 'caf\xe9'\n")
    _one_line_error(warm("--plan", str(plan)), "is not UTF-8 text (byte 19)")
    os.mkfifo(tmp_path / "fifo.toml")  # reading it would block
    _one_line_error(warm("--plan", str(tmp_path / "fifo.toml")), "--plan: expected a file")
    assert not cache_env.exists()


# ---- cache-inspect ------------------------------------------------------------

@pytest.fixture
def warmed(cache_env, deepseek_cache):
    """A cache holding the DeepSeek-V3 preset's kernels (a copy: each test may change it)."""
    shutil.copytree(deepseek_cache, cache_env)
    return cache_env


@pytest.fixture(scope="module")
def deepseek_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek") / "cache"
    out = warm("--preset", "deepseek-v3", "--json", env={"EP_JIT_CACHE_DIR": str(root)})
    assert out.returncode == 0, out.stderr
    return root


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
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "cache-inspect"), "stats", "--json"],
                         capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 0 and json.loads(out.stdout)["entries"] == 2 * N_TEMPLATES


# ---- the compile pool -------------------------------------------------------------

MANY = ("--hidden", "1024", "--hidden", "2048", "--hidden", "3072", "--hidden", "4096", "--hidden", "5120",
        "--experts", "8", "--topk", "1", "--topk", "2", "--world-size", "2", "--jobs", "2")
N_MANY = 5 * 2 * N_TEMPLATES


def _workers(pid):
    """Pool workers of process `pid` (spawned interpreters, not multiprocessing's helpers)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return [c for c in found if b"spawn_main" in _read(f"/proc/{c}/cmdline")]


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid):
    status = _read(f"/proc/{pid}/status")
    return bool(status) and b"State:\tZ" not in status


def _start_pool(cache_env, *extra):
    """ep-jit-warm with two compile processes, once both run and a first entry is written."""
    proc = subprocess.Popen([sys.executable, "-m", "ep_jit.cli.warm", *MANY, *extra], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (len(_workers(proc.pid)) == 2 and any(DiskCache(cache_env).entry_paths())):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.02)
    return proc, _workers(proc.pid)


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_pool_workers_end_when_the_main_process_dies(cache_env):
    proc, workers = _start_pool(cache_env)
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    try:
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers)
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_a_dead_worker_fails_its_specs_and_keeps_the_others(cache_env):
    proc, workers = _start_pool(cache_env, "--json")
    os.kill(workers[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err
    s = json.loads(out)
    assert s["failed"] >= 1 and s["compiled"] >= 1 and s["compiled"] + s["cached"] + s["failed"] == N_MANY
    assert all("compile process died" in f["error"] for f in s["failures"])
    assert len(list(DiskCache(cache_env).entry_paths())) >= s["compiled"]
    again = json.loads(warm(*MANY, "--json").stdout)  # the lost specs are built by the next run
    assert again["failed"] == 0 and again["cached"] + again["compiled"] == N_MANY


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_unwritable_cache_is_reported_by_warm(cache_env, jobs):
    cache_env.mkdir()
    (cache_env / "v1").write_text("a file where the entries' folder belongs")
    out = warm("--preset", "tiny", "--json", "--jobs", jobs)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    s = json.loads(out.stdout)
    assert s["failed"] == N_TEMPLATES and "never writes through it" in s["failures"][0]["error"]
    text = warm("--preset", "tiny", "--jobs", jobs)
    assert text.returncode == 1 and f"{N_TEMPLATES} failed" in text.stdout and "FAILED" in text.stderr


# ---- last use, prune, verify ---------------------------------------------------------

def _age_all(root, days):
    old = time.time() - days * 86400
    for p in DiskCache(root).entry_paths():
        os.utime(p, (old, old))


def test_inspecting_never_changes_what_prune_removes(warmed):
    _age_all(warmed, 40)
    key = next(DiskCache(warmed).entry_paths()).name[:8]
    for args in (("list",), ("list", "--json"), ("show", key, "--source"), ("verify",), ("stats",),
                 ("prune", "--older-than", "30d", "--dry-run")):
        assert inspect(*args).returncode == 0, args
    out = json.loads(inspect("prune", "--older-than", "30d", "--json").stdout)
    assert len(out["removed"]) == 2 * N_TEMPLATES and out["kept"] == 0


def test_last_use_is_not_the_access_time(warmed):
    old = time.time() - 40 * 86400
    for p in DiskCache(warmed).entry_paths():
        os.utime(p, (time.time(), old))  # read by a backup tool yesterday, not used for 40 days
    assert len(json.loads(inspect("prune", "--older-than", "30d", "--json").stdout)["removed"]) == 2 * N_TEMPLATES


def test_prune_cleans_left_overs_and_all_empties_quarantine(warmed, tmp_path):
    cache = DiskCache(warmed)
    entry = next(cache.entry_paths())
    dead = entry.parent / f".{entry.stem}.{_HOST}.999999999.x.tmp"
    dead.write_bytes(b"half an entry")  # a writer on this host that died (no such pid)
    live = entry.parent / f".{entry.stem}.{_HOST}.{os.getpid()}.y.tmp"
    live.write_bytes(b"being written")
    old_lock = tmp_path / "locks" / "0123.lock"
    old_lock.parent.mkdir(exist_ok=True)
    old_lock.touch()
    os.utime(old_lock, (1e9, 1e9))
    (tmp_path / "locks" / "4567.lock").touch()
    entry.write_bytes(b"garbage")
    assert inspect("verify", "--fix").returncode == 0
    stats = json.loads(inspect("stats", "--json").stdout)
    assert (stats["temp_files"], stats["stale_temp_files"], stats["stale_lock_files"], stats["quarantined"]) == \
        (2, 1, 1, 1)
    out = json.loads(inspect("prune", "--older-than", "30d", "--json").stdout)
    assert out["removed"] == [] and sorted(out["leftovers"]) == sorted([str(dead), str(old_lock)])
    assert not dead.exists() and live.exists() and not old_lock.exists() and (tmp_path / "locks" / "4567.lock").exists()
    inspect("prune", "--all")
    assert list(cache.entry_paths()) == [] and list((warmed / "quarantine").iterdir()) == []


def test_prune_failed_removes_remembered_failures(cache_env, template_copy):
    p = template_copy / "layout.cu"
    p.write_text(p.read_text().replace("blockIdx.x, a.topk_idx", "nope, a.topk_idx"))
    env = {"EP_JIT_TEMPLATE_DIR": str(template_copy)}
    assert warm("--preset", "tiny", env=env).returncode == 1
    out = json.loads(inspect("prune", "--failed", "--json", env=env).stdout)
    assert len(out["removed"]) == 1 and out["kept"] == N_TEMPLATES - 1
    rows = json.loads(inspect("list", "--json").stdout)
    assert {r["status"] for r in rows} == {"ok"}


def test_prune_and_verify_never_touch_what_a_link_leads_to(warmed, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    # two shard names the warmed cache does not use (its keys change with the templates)
    shard, other = [n for n in (f"{i:02x}" for i in range(255, -1, -1)) if not (warmed / "v1" / n).exists()][:2]
    (outside / (shard * 32 + ".entry")).write_bytes(b"not an entry")  # prune and verify --fix would remove it
    (outside / "notes.txt").write_text("keep")
    (warmed / "v1" / shard).symlink_to(outside)
    before = sorted(p.name for p in outside.iterdir())
    out = inspect("verify", "--json")
    assert out.returncode == 1 and any("folder of entries" in c["problem"] for c in json.loads(out.stdout)["corrupt"])
    assert inspect("verify", "--fix").returncode == 0  # the link itself was moved aside
    assert sorted(p.name for p in outside.iterdir()) == before
    (warmed / "v1" / other).symlink_to(outside)
    shutil.rmtree(warmed / "quarantine")
    (warmed / "quarantine").symlink_to(outside)
    assert inspect("prune", "--all").returncode == 0  # removes the link, not what it leads to
    assert sorted(p.name for p in outside.iterdir()) == before and (warmed / "quarantine").is_symlink()
    assert list(DiskCache(warmed).entry_paths()) == [] and not (warmed / "v1" / other).is_symlink()
    warm("--preset", "tiny")
    next(DiskCache(warmed).entry_paths()).write_bytes(b"garbage")
    fixed = inspect("verify", "--fix", "--json")  # quarantine/ is a link: refused, and said so
    assert fixed.returncode == 1 and json.loads(fixed.stdout)["not_fixed"]
    assert sorted(p.name for p in outside.iterdir()) == before


# ---- conventions ------------------------------------------------------------------

def test_closed_pipe_ends_quietly(warmed):
    for module, args in [("cache_tools", ("list", "--json")), ("ep_jit.cli.warm", ("--preset", "tiny", "--dry-run"))]:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()  # like `| head -1` that has read its line
        _, err = proc.communicate(timeout=60)
        assert err == b"" and proc.returncode == 141, (module, err)
    shell = subprocess.run("cache-inspect list | head -1", shell=True, capture_output=True, text=True,
                           env={**_env(), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert shell.stdout.startswith("key") and shell.stderr == ""


def test_version_and_help(cache_env):
    version = __import__("ep_jit").__version__
    for module in ("cache_tools", "ep_jit.cli.warm", "ep_jit"):
        out = run_cli(module, "--version")
        assert out.returncode == 0 and out.stdout.strip().endswith(f"(ep_jit) {version}")
    for module in ("cache_tools", "ep_jit.cli.warm"):
        text = run_cli(module, "--help").stdout
        assert "examples:" in text and "exit status:" in text and "  2  bad" in text


def test_tables_fit_100_columns_unless_wide(warmed):
    for args in (("list",), ("stats",)):
        lines = inspect(*args).stdout.splitlines()
        assert lines and all(len(line) <= 100 for line in lines if str(warmed) not in line), args
    dry = warm("--preset", "deepseek-v3", "--dry-run").stdout.splitlines()
    assert all(len(line) <= 100 for line in dry[:-1])
    assert max(len(line) for line in inspect("list", "--wide").stdout.splitlines()) > 100
    assert "{" not in inspect("stats").stdout  # a table, not a dict


def test_one_set_of_names_across_flags_dry_run_list_and_show(warmed):
    names = {"template", "hidden", "experts", "ep_size", "topk", "dtype", "arch", "group"}
    dry = json.loads(warm("--preset", "deepseek-v3", "--dry-run", "--json").stdout)["kernels"]
    listed = {r["key"]: r for r in json.loads(inspect("list", "--json").stdout)}
    for k in dry:
        assert names <= set(k) and {n: listed[k["key"]][n] for n in names} == {n: k[n] for n in names}
    shown = inspect("show", dry[0]["key"][:10]).stdout
    assert f"experts={dry[0]['experts']}, ep_size={dry[0]['ep_size']}" in shown
    help_text = run_cli("ep_jit.cli.warm", "--help").stdout
    assert all(f"--{n.replace('_', '-')}" in help_text for n in names - {"template", "group"})
