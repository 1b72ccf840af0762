"""The host's ctypes mirrors match the device structs (checked by NVRTC): every size, and
every offset where NVRTC has __builtin_offsetof (13.5 has it, 13.0 does not)."""

import ctypes

from cuda.bindings import nvrtc

from ep_jit.compiler import cuda_include_dirs, template_dir
from ep_jit.kernels import COMBINE_CHUNK_ROWS, NUM_FLAG_KINDS, SIGNATURES, Mailbox, Status, SymLayout, meta_row_bytes
from ep_jit.spec import DTYPES, TEMPLATES


def _compile(source: str) -> tuple[bool, str]:
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"mirrors.cu", 0, [], [])
    opts = [b"-std=c++17", b"-arch=sm_90a", f"-I{template_dir()}".encode(),
            *[f"-I{d}".encode() for d in cuda_include_dirs()]]
    (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(prog)
    return result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")


HAS_OFFSETOF = _compile("struct S { int a; long long b; };\n"
                        "static_assert(__builtin_offsetof(S, b) == 8, \"\");\n")[0]


def _asserts(cpp: str, mirror: type, size: int | None = None) -> list[str]:
    out = [f"static_assert(sizeof({cpp}) == {size or ctypes.sizeof(mirror)}, \"sizeof {cpp}\");"]
    for name, _ in mirror._fields_ if HAS_OFFSETOF else ():
        if size is not None and getattr(mirror, name).offset >= size:
            continue  # host-only tail
        out.append(f"static_assert(__builtin_offsetof({cpp}, {name}) == {getattr(mirror, name).offset}, "
                   f"\"offset of {cpp}::{name}\");")
    return out


def test_structs_and_constants_match_their_mirrors():
    checks = [*_asserts("ep_jit::SymLayout", SymLayout), *_asserts("ep_jit::Status", Status),
              *_asserts("ep_jit::Mailbox", Mailbox, size=Mailbox.status.offset),
              f"static_assert(ep_jit::kCombineChunkRows == {COMBINE_CHUNK_ROWS}, \"kCombineChunkRows\");",
              f"static_assert(ep_jit::kNumFlagKinds == {NUM_FLAG_KINDS}, \"kNumFlagKinds\");"]
    ok, log = _compile('#include "dispatch.cu"\n' + "\n".join(checks) + "\n")
    assert ok, log


def test_meta_rows_match_their_host_size():
    checks = [f"static_assert(ep_jit::MetaRow<{h}, {k}, {DTYPES[d]}>::kBytes == {meta_row_bytes(h, k, d)}, "
              f"\"MetaRow {h} {k} {d}\");"
              for h in (128, 2048, 7168) for k in (1, 2, 8, 9) for d in DTYPES]
    ok, log = _compile('#include "collective.cu"\n' + "\n".join(checks) + "\n")
    assert ok, log


def test_every_kernel_has_a_signature():
    assert set(SIGNATURES) == set(TEMPLATES)
    for name, template in TEMPLATES.items():
        assert len(SIGNATURES[name]) == len(template.kernels)
