"""The built wheel carries the templates and compiles from a fresh environment."""

import json
import os
import subprocess
import sys
import zipfile

from helpers import REPO

from ep_jit.transports import BUFFER_TEMPLATES


def test_wheel_installs_into_fresh_venv_and_compiles(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("ep_jit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = [p.relative_to(REPO).as_posix() for d in ("ep_jit", "cache_tools") for p in (REPO / d).rglob("*.py")]
    assert sources and not set(sources) - set(names), "modules missing from the wheel"
    templates = [f"ep_jit/templates/{p.name}" for p in (REPO / "templates").iterdir() if p.suffix in (".cu", ".cuh")]
    assert templates and not set(templates) - set(names), "templates missing from the wheel"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # a real install, as the README's first command does: the wheel with the default CUDA extra and its
    # dependencies from the package index (pip's cache makes it quick). Without PYTHONPATH, which would
    # show pip the source tree's metadata as an installed ep_jit.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{wheel}[cu13]"], capture_output=True, text=True,
                          env=env)
    assert inst.returncode == 0, inst.stderr
    sp = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
    env.update(EP_JIT_CACHE_DIR=str(tmp_path / "cache"), EP_JIT_LOCK_DIR=str(tmp_path / "locks"))
    env.pop("EP_JIT_TEMPLATE_DIR", None)
    # a real install: the wheel plus its dependencies from the package index (pip's cache makes it quick)
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                          env=env)
    assert inst.returncode == 0, inst.stderr
    sp = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True, env=env).stdout.strip()
    out = subprocess.run([str(venv / "bin" / "ep-jit-warm"), "--preset", "tiny", "--json"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["compiled"] == len(BUFFER_TEMPLATES)  # a Buffer's kernels, either transport
    where = subprocess.run([str(py), "-c", "import ep_jit.compiler as c; print(c.template_dir())"], cwd=tmp_path,
                           env=env, capture_output=True, text=True).stdout.strip()
    assert where.startswith(sp), where  # templates came from the installed wheel, not the source tree
    listing = subprocess.run([str(venv / "bin" / "cache-inspect"), "list", "--json"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert listing.returncode == 0 and len(json.loads(listing.stdout)) == len(BUFFER_TEMPLATES)
