"""EP_JIT_* settings: one parser, clear errors everywhere, the configuration view."""

import json
import os
import re

import pytest

from helpers import REPO, run_cli, run_py
from ep_jit import ConfigError, config
from ep_jit.cache import DiskCache
from ep_jit.jit import clear_memory_cache, resolve
from helpers import layout_spec

BAD_SETTINGS = [
    ("EP_JIT_LOCK_TIMEOUT", "soon", "expected a positive number of seconds, got 'soon'"),
    ("EP_JIT_LOCK_TIMEOUT", "-3", "expected a positive number of seconds"),
    ("EP_JIT_LOCK_TIMEOUT", "nan", "expected a positive number of seconds"),
    ("EP_JIT_ARCH", "hopper", "expected an arch NVRTC can target, like sm_90a, got 'hopper'"),
    ("EP_JIT_ARCH", "sm_12", "got 'sm_12'; NVRTC"),
    ("EP_JIT_LOG", "loud", "expected one of debug, info, warning, error, got 'loud'"),
    ("EP_JIT_ALLOW_SHARED_CACHE", "yes", "expected 0 or 1, got 'yes'"),
    ("EP_JIT_ALWAYS_COMPILE", "true", "expected 0 or 1, got 'true'"),
    ("EP_JIT_NVRTC_OPTIONS", "-DX='unclosed", "no closing quotation"),
    ("EP_JIT_TEMPLATE_DIR", "/nonexistent/templates", "it does not exist"),
    ("EP_JIT_CACHE_DIR", "{file}", "is not a folder"),
    ("EP_JIT_CACHE_DIR", "{file}/below", "is not a folder"),
    ("EP_JIT_CACHE_DIR", "/tmp/" + "x" * 300, "a name in it longer than 255"),
    ("EP_JIT_CACHE_DIR", "/tmp" + "/x" * 2100, "longer than 4096 bytes"),
    ("EP_JIT_LOCK_DIR", "{file}", "is not a folder"),
]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def _bad(name, value, a_file):
    return name, value.replace("{file}", str(a_file))


@pytest.mark.parametrize("name, value, needle", BAD_SETTINGS)
def test_bad_setting_is_a_config_error_naming_it(cache_env, monkeypatch, a_file, name, value, needle):
    monkeypatch.setenv(*_bad(name, value, a_file))
    with pytest.raises(ConfigError) as err:
        config.check_environment()
    assert str(err.value).startswith(f"{name}: expected ") and needle in str(err.value)


CLIS = [("ep_jit.cli.warm", ("--preset", "tiny", "--jobs", "2")), ("cache_tools", ("list",)), ("ep_jit", ())]


@pytest.mark.parametrize("index", range(len(BAD_SETTINGS)))
def test_bad_setting_exits_2_from_the_clis(cache_env, a_file, index):
    name, value, needle = BAD_SETTINGS[index]
    module, args = CLIS[index % len(CLIS)]  # each tool sees several kinds of bad value
    out = run_cli(module, *args, env=dict([_bad(name, value, a_file)]))
    assert out.returncode == 2, (module, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"error: {name}: expected" in lines[0] and needle in lines[0], out.stderr
    assert not cache_env.exists()


def test_importing_with_a_bad_setting_works_and_the_api_raises(cache_env):
    code = ("import sys; sys.path.insert(0, 'tests'); from helpers import layout_spec\n"
            "import ep_jit\n"
            "try:\n    ep_jit.get_kernel(layout_spec())\n"
            "except ep_jit.ConfigError as e:\n    print('ConfigError', e)")
    out = run_py(code, env={"EP_JIT_LOG": "loud"}, cwd=REPO)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("ConfigError EP_JIT_LOG: expected one of")


def test_bad_setting_is_found_on_a_warm_cache(cache_env, monkeypatch):
    resolve(layout_spec())
    clear_memory_cache()
    monkeypatch.setenv("EP_JIT_LOCK_TIMEOUT", "soon")  # a disk hit needs no lock, yet the value is refused
    with pytest.raises(ConfigError, match="EP_JIT_LOCK_TIMEOUT"):
        resolve(layout_spec())


def test_cache_dir_flag_that_is_a_file_exits_2(cache_env, a_file):
    for module, args in [("ep_jit.cli.warm", ("--preset", "tiny")), ("cache_tools", ("stats",))]:
        out = run_cli(module, *args, "--cache-dir", str(a_file))
        assert out.returncode == 2 and "error: --cache-dir: expected a folder path" in out.stderr, out.stderr


def test_always_compile_bypasses_the_disk_tier(cache_env, monkeypatch):
    spec = layout_spec()
    resolve(spec)
    entry = DiskCache().entry_path(resolve(spec)[0].key)
    os.utime(entry, (1e9, 1e9))
    clear_memory_cache()
    monkeypatch.setenv("EP_JIT_ALWAYS_COMPILE", "1")
    assert resolve(spec)[1] == "compiled" and resolve(spec)[1] == "memory"  # once per process
    assert entry.stat().st_mtime == 1e9  # neither read (last use) nor written
    assert resolve(layout_spec(topk=2))[1] == "compiled"
    assert len(list(DiskCache().entry_paths())) == 1
    out = run_cli("ep_jit.cli.warm", "--preset", "tiny", env={"EP_JIT_ALWAYS_COMPILE": "1"})
    assert out.returncode == 2 and "EP_JIT_ALWAYS_COMPILE" in out.stderr


def test_config_view_shows_versions_paths_and_every_setting(cache_env):
    env = {"EP_JIT_NVRTC_OPTIONS": "-lineinfo", "EP_JIT_TYPO": "1"}
    views = [json.loads(run_cli(m, *a, "--json", env=env).stdout) for m, a in [("ep_jit", ()),
                                                                              ("cache_tools", ("config",))]]
    assert views[0] == views[1]
    v = views[0]
    assert v["ep_jit"] == __import__("ep_jit").__version__ and re.match(r"^\d+\.\d+$", v["nvrtc"]["version"])
    assert "nvrtc" in os.path.basename(v["nvrtc"]["library"]) and set(v["cuda_headers"]) == {"cudart", "cccl"}
    assert v["cache_dir"] == str(cache_env) and v["lock_dir"].endswith("locks") and v["default_arch"] == "sm_90a"
    assert set(v["settings"]) == set(config.SETTINGS)
    assert v["settings"]["EP_JIT_NVRTC_OPTIONS"]["value"] == "-lineinfo" and v["unknown_settings"] == ["EP_JIT_TYPO"]
    text = run_cli("ep_jit", env=env).stdout
    assert "-lineinfo" in text and "EP_JIT_TYPO" in text and v["nvrtc"]["library"] in text


def test_readme_lists_every_setting_with_its_form():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Configuration")[1].split("\n## ")[0]
    rows = {m[0]: m[1] for m in re.findall(r"^\| `(EP_JIT_\w+)` \| ([^|]+) \|", section, re.MULTILINE)}
    assert set(rows) == set(config.SETTINGS)
    for name, setting in config.SETTINGS.items():
        assert rows[name].strip() == setting.form, name


def test_a_template_override_may_not_change_what_the_host_mirrors(cache_env, template_copy):
    from ep_jit.compiler import template_dir
    assert template_dir() == template_copy  # an identical copy is fine
    path = template_copy / "ep_constants.cuh"
    path.write_text(path.read_text().replace("kCopyThreads = 512", "kCopyThreads = 256"))
    with pytest.raises(ConfigError, match="EP_JIT_TEMPLATE_DIR: expected ep_constants.cuh identical"):
        template_dir()
