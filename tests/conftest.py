"""pytest hooks and fixtures; the helpers tests import live in helpers.py."""

import shutil

import pytest

from helpers import GPU_COUNT


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none here")
    for item in items:
        if "gpu" in item.keywords and GPU_COUNT == 0:
            item.add_marker(skip)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """An empty private cache root and lock folder, and an empty memory tier."""
    from ep_jit.jit import clear_memory_cache

    root = tmp_path / "cache"
    monkeypatch.setenv("EP_JIT_CACHE_DIR", str(root))
    monkeypatch.setenv("EP_JIT_LOCK_DIR", str(tmp_path / "locks"))
    for var in ("EP_JIT_ARCH", "EP_JIT_NVRTC_OPTIONS", "EP_JIT_TEMPLATE_DIR", "EP_JIT_ALLOW_SHARED_CACHE",
                "EP_JIT_LOCK_TIMEOUT", "EP_JIT_SHARED_CACHE_DIR", "EP_JIT_REQUIRE_WARM"):
        monkeypatch.delenv(var, raising=False)
    clear_memory_cache()
    yield root
    clear_memory_cache()


@pytest.fixture
def template_copy(tmp_path, monkeypatch):
    """A private copy of templates/ that a test may edit, used through EP_JIT_TEMPLATE_DIR."""
    from ep_jit.compiler import template_dir

    copy = tmp_path / "templates"
    shutil.copytree(template_dir(), copy)
    monkeypatch.setenv("EP_JIT_TEMPLATE_DIR", str(copy))
    return copy
