"""cache-inspect export / import: a round trip, and bundles that must be refused whole."""

import hashlib
import io
import json
import tarfile

import pytest

from helpers import run_cli
from ep_jit.cache import DiskCache

N = 4  # the tiny preset's kernels


def inspect(*args, env=None):
    return run_cli("cache_tools", *args, env=env)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A cache holding the tiny preset and other kernels, and a bundle of the tiny preset from it."""
    root = tmp_path_factory.mktemp("bundle-source")
    env = {"EP_JIT_CACHE_DIR": str(root / "cache"), "EP_JIT_LOCK_DIR": str(root / "locks")}
    for args in (("--preset", "tiny"), ("--hidden", "2048", "--experts", "8", "--topk", "2", "--world-size", "2")):
        out = run_cli("ep_jit.cli.warm", *args, env=env)
        assert out.returncode == 0, out.stderr
    out = inspect("export", str(root / "tiny.tar"), "--preset", "tiny", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["entries"] == N
    return root


@pytest.fixture
def bundle(source, cache_env):
    return source / "tiny.tar"


def _entries(root) -> dict:
    cache = DiskCache(root)
    return {p.name: cache.load(p).payload for p in cache.entry_paths()}


def test_round_trip(bundle, source, tmp_path):
    target = tmp_path / "image-cache"
    out = inspect("import", str(bundle), "--cache-dir", str(target), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["imported"] == N
    mine = {k: v for k, v in _entries(source / "cache").items() if k in _entries(target)}
    assert len(mine) == N and _entries(target) == mine
    assert inspect("verify", "--cache-dir", str(target)).returncode == 0
    assert inspect("coverage", "--preset", "tiny", "--cache-dir", str(target)).returncode == 0
    again = json.loads(inspect("import", str(bundle), "--cache-dir", str(target), "--json").stdout)
    assert (again["imported"], again["already_present"]) == (0, N)


def test_export_of_a_plan_that_is_not_warm_is_refused(cache_env, tmp_path):
    out = inspect("export", str(tmp_path / "x.tar"), "--preset", "deepseek-v3")
    assert out.returncode == 1 and "not in" in out.stderr and len(out.stderr.splitlines()) == 1
    assert not (tmp_path / "x.tar").exists()


# ---- refused bundles ----------------------------------------------------------------

def _members(path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _write(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)


def _entry_and_manifest(members):
    manifest = next(d for m, d in members if m.name == "manifest.json")
    return json.loads(manifest), [(m, d) for m, d in members if m.name != "manifest.json"]


def _with_manifest(doc, entries):
    return [(tarfile.TarInfo("manifest.json"), json.dumps(doc).encode()), *entries]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def tampered(members):
    (m, d), *rest = members[1:]
    return [members[0], (m, _flip(d, 200)), *rest]


def tampered_with_manifest(members):
    """The entry changed and the manifest's hash changed to match: the entry's own checksum still catches it."""
    doc, entries = _entry_and_manifest(members)
    (m, d), *rest = entries
    d = _flip(d, 200)
    doc["entries"][m.name[8:-6]]["sha256"] = hashlib.sha256(d).hexdigest()
    return _with_manifest(doc, [(m, d), *rest])


def entry_under_another_key(members):
    doc, entries = _entry_and_manifest(members)
    (m1, d1), (m2, d2), *rest = entries
    doc["entries"][m2.name[8:-6]]["sha256"] = hashlib.sha256(d1).hexdigest()
    return _with_manifest(doc, [(m1, d1), (m2, d1), *rest])


def foreign_manifest(members):
    doc, entries = _entry_and_manifest(members)
    return _with_manifest({**doc, "kind": "something-else"}, entries)


def no_manifest(members):
    return members[1:]


def unlisted_entry(members):
    doc, entries = _entry_and_manifest(members)
    doc["entries"].pop(entries[0][0].name[8:-6])
    return _with_manifest(doc, entries)


def _member(name, data=b"x", kind=tarfile.REGTYPE, target=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, data


KEY = "ab" * 32
REFUSALS = {
    "tampered": (tampered, "does not match the manifest's sha256"),
    "tampered_with_manifest": (tampered_with_manifest, "does not verify: checksum mismatch"),
    "entry_under_another_key": (entry_under_another_key, "does not verify: header names key"),
    "foreign_manifest": (foreign_manifest, "does not describe an ep_jit bundle"),
    "no_manifest": (no_manifest, "not an ep_jit bundle"),
    "unlisted_entry": (unlisted_entry, "the manifest and the entries differ"),
    "dotdot": (lambda m: [*m, _member("../escaped.entry")], "escapes the cache"),
    "dotdot_inside": (lambda m: [*m, _member(f"entries/../../{KEY}.entry")], "escapes the cache"),
    "absolute": (lambda m: [*m, _member("/tmp/ep_jit-escaped.entry")], "escapes the cache"),
    "symlink": (lambda m: [*m, _member(f"entries/{KEY}.entry", b"", tarfile.SYMTYPE, "/etc/passwd")],
                "is a link"),
    "hardlink": (lambda m: [*m, _member(f"entries/{KEY}.entry", b"", tarfile.LNKTYPE, "manifest.json")],
                 "is a link"),
    "directory": (lambda m: [*m, _member("entries", b"", tarfile.DIRTYPE)], "is a link or a special file"),
    "stray_file": (lambda m: [*m, _member("README.txt")], "is not manifest.json or entries/<key>.entry"),
    "duplicate": (lambda m: [*m, m[1]], "appears twice"),
}


def _refused(path, target):
    out = inspect("import", str(path), "--cache-dir", str(target))
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not target.exists()  # nothing from it landed
    return out.stderr


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_bad_bundles_are_refused_whole(bundle, tmp_path, kind):
    change, needle = REFUSALS[kind]
    bad = tmp_path / f"{kind}.tar"
    _write(bad, change(_members(bundle)))
    assert needle in _refused(bad, tmp_path / "target")
    assert not (tmp_path / "escaped.entry").exists() and not (tmp_path.parent / "escaped.entry").exists()


@pytest.mark.parametrize("cut", [0.5, 0.95])
def test_truncated_bundle_is_refused(bundle, tmp_path, cut):
    data = bundle.read_bytes()
    bad = tmp_path / "truncated.tar"
    bad.write_bytes(data[: int(len(data) * cut)])
    assert "not a readable tar file" in _refused(bad, tmp_path / "target")


def test_not_a_tar_is_refused(tmp_path, cache_env):
    bad = tmp_path / "noise.tar"
    bad.write_bytes(b"\x93NUMPY" + bytes(5000))
    _refused(bad, tmp_path / "target")
    assert "not a readable tar file" in _refused(tmp_path / "missing.tar", tmp_path / "target")


def test_import_into_a_cache_that_cannot_be_written_ends_in_one_line(bundle, tmp_path):
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (target / "v1").write_text("a file where the entries folder goes")
    out = inspect("import", str(bundle), "--cache-dir", str(target))
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
