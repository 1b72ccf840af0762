"""The host's ctypes mirrors match the device structs, and the transports fill only the
fields a kernel declares.

Sizes are checked by NVRTC itself; offsets by NVRTC where it has __builtin_offsetof
(13.5 has it, 13.0 does not) and always by the host compiler on the same header (the
structs hold only fixed-width ints, pointers and nested structs, laid out alike by both).
"""

import ast
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
from cuda.bindings import nvrtc

from ep_jit.compiler import cuda_include_dirs, template_dir
from ep_jit.kernels import CATALOGUE
from ep_jit.kernels.args import MIRRORS, meta_row_bytes
from ep_jit.spec import DTYPES

REPO = Path(__file__).resolve().parent.parent


def _compile(source: str) -> tuple[bool, str]:
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"mirrors.cu", 0, [], [])
    opts = [b"-std=c++17", b"-arch=sm_90a", f"-I{template_dir()}".encode(),
            *[f"-I{d}".encode() for d in cuda_include_dirs()]]
    (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = bytearray(size)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(prog)
    return result == nvrtc.nvrtcResult.NVRTC_SUCCESS, bytes(log).decode(errors="replace")


HAS_OFFSETOF = _compile("struct S { int a; long long b; };\n"
                        "static_assert(__builtin_offsetof(S, b) == 8, \"\");\n")[0]


def _asserts(offsetof: str | None) -> list[str]:
    out = []
    for name, mirror in MIRRORS.items():
        out.append(f"static_assert(sizeof(ep_jit::{name}) == {ctypes.sizeof(mirror)}, \"sizeof {name}\");")
        for field, _ in mirror._fields_ if offsetof else ():
            out.append(f"static_assert({offsetof}(ep_jit::{name}, {field}) == {getattr(mirror, field).offset}, "
                       f"\"offset of {name}::{field}\");")
    return out


def test_every_struct_has_the_size_and_offsets_of_its_mirror_on_the_device():
    ok, log = _compile('#include "ep_args.cuh"\n' + "\n".join(_asserts("__builtin_offsetof" if HAS_OFFSETOF else None)))
    assert ok, log


@pytest.mark.skipif(shutil.which("g++") is None, reason="no host C++ compiler")
def test_every_field_offset_matches_its_mirror(tmp_path):
    shim = tmp_path / "cuda" / "std"  # the fixed-width ints, without the CUDA toolkit's host headers
    shim.mkdir(parents=True)
    (shim / "cstdint").write_text("#include <cstdint>\nnamespace cuda { namespace std {\nusing ::std::int32_t; "
                                  "using ::std::int64_t; using ::std::uint32_t; using ::std::uint64_t;\n} }\n")
    src = tmp_path / "mirrors.cpp"
    src.write_text('#include <cstddef>\n#include "ep_args.cuh"\n' + "\n".join(_asserts("offsetof")) + "\n")
    out = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", f"-I{tmp_path}", f"-I{template_dir()}", str(src)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_kernel_takes_its_declared_struct():
    for kernel in CATALOGUE:
        source = (template_dir() / kernel.file).read_text()
        assert f"{kernel.symbol}(const __grid_constant__ {kernel.args.__name__} a)" in source, kernel.name
        assert f"__launch_bounds__({'kLayoutThreads' if kernel.name == 'layout' else 'kCopyThreads'})" in source


def test_transports_pass_only_fields_their_structs_declare():
    """Every keyword of an *Args(...) call and every `x.field = ...` on a struct held by a
    transport names a field of that struct (an unknown one would be a silent no-op in
    plain ctypes; the structs' __slots__ make it an AttributeError at run time too)."""
    fields = {name: {f for f, _ in cls._fields_} for name, cls in MIRRORS.items()}
    checked = 0
    for path in (REPO / "ep_jit" / "transports").glob("*.py"):
        tree = ast.parse(path.read_text())
        held: dict[str, str] = {}  # attribute or local name -> struct it holds
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in fields:
                for kw in node.keywords:
                    assert kw.arg in fields[node.func.id], f"{path.name}: {node.func.id} has no field {kw.arg}"
                    checked += 1
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
                for target in node.targets:
                    if isinstance(target, ast.Tuple):
                        for t, v in zip(target.elts, node.value.elts):
                            if isinstance(t, ast.Attribute) and isinstance(v, ast.Call) and \
                                    isinstance(v.func, ast.Name) and v.func.id in fields:
                                held[t.attr] = v.func.id
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            local = {}  # a = self._send; a.x = ...
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and \
                        node.value.attr in held:
                    local.update({t.id: held[node.value.attr] for t in node.targets if isinstance(t, ast.Name)})
            for node in ast.walk(fn):
                for target in node.targets if isinstance(node, ast.Assign) else []:
                    for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in local:
                            assert t.attr in fields[local[t.value.id]], f"{path.name}: {local[t.value.id]} has no {t.attr}"
                            checked += 1
    assert checked > 40  # the check found the transports' launches


def test_an_undeclared_field_is_an_error():
    with pytest.raises(AttributeError):
        MIRRORS["SendArgs"]().not_a_field = 1


def test_meta_rows_match_their_host_size():
    checks = [f"static_assert(ep_jit::MetaRow<{h}, {k}, {DTYPES[d]}>::kBytes == {meta_row_bytes(h, k, d)}, "
              f"\"MetaRow {h} {k} {d}\");"
              for h in (128, 2048, 7168) for k in (1, 2, 8, 9) for d in DTYPES]
    ok, log = _compile('#include "collective.cu"\n' + "\n".join(checks) + "\n")
    assert ok, log
