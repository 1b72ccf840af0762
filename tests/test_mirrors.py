"""The host's ctypes mirrors match the device structs byte for byte (checked by NVRTC)."""

import ctypes

from cuda.bindings import nvrtc

from ep_jit.compiler import cuda_include_dirs, template_dir
from ep_jit.kernels import SIGNATURES, Mailbox, Status, SymLayout
from ep_jit.spec import TEMPLATES


def _asserts(cpp: str, mirror: type, size: int | None = None) -> list[str]:
    out = [f"static_assert(sizeof({cpp}) == {size or ctypes.sizeof(mirror)}, \"sizeof {cpp}\");"]
    for name, _ in mirror._fields_:
        if size is not None and getattr(mirror, name).offset >= size:
            continue  # host-only tail
        out.append(f"static_assert(__builtin_offsetof({cpp}, {name}) == {getattr(mirror, name).offset}, "
                   f"\"offset of {cpp}::{name}\");")
    return out


def test_structs_match_their_ctypes_mirrors():
    checks = [*_asserts("ep_jit::SymLayout", SymLayout), *_asserts("ep_jit::Status", Status),
              *_asserts("ep_jit::Mailbox", Mailbox, size=Mailbox.status.offset)]
    source = '#include "notify.cu"\n' + "\n".join(checks) + "\n"
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"mirrors.cu", 0, [], [])
    opts = [b"-std=c++17", b"-arch=sm_90a", f"-I{template_dir()}".encode(),
            *[f"-I{d}".encode() for d in cuda_include_dirs()]]
    (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(prog)
    assert result == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode()


def test_every_kernel_has_a_signature():
    for name in ("layout", "notify", "dispatch", "combine"):
        assert len(SIGNATURES[name]) == len(TEMPLATES[name].kernels)
