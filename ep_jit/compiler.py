"""NVRTC: render a KernelSpec to source and compile it straight to a cubin.

Local headers (templates/*.cuh) are handed to NVRTC from memory, so the bytes that
are hashed into the cache key are exactly the bytes that are compiled. CUDA's own
headers come from the nvidia-cuda-runtime and nvidia-cuda-cccl wheels, found
through cuda.pathfinder; their versions enter the key, their paths never do.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cuda.bindings import nvrtc

from . import config
from .errors import CompileError, ConfigError
from .kernels.catalogue import TEMPLATES
from .kernels.constants import HOST_SHARED_HEADERS, shipped_template_dir
from .spec import KernelSpec
from .toolchain import check, cuda_header_versions, cuda_include_dirs, nvrtc_version

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
# A fixed seed makes the cubin a function of the inputs alone (symbol names of
# internal-linkage entities otherwise embed the time and the process id).
BASE_OPTIONS = ("-std=c++17", "--frandom-seed=ep_jit")


def template_dir() -> Path:
    """$EP_JIT_TEMPLATE_DIR, else templates/ inside an installed wheel, else beside the
    package in a source tree."""
    explicit = config.template_dir_override()  # an existing folder, else ConfigError
    if explicit is None:
        return shipped_template_dir()
    for name in HOST_SHARED_HEADERS:  # the host's structs and constants are built from the installed ones
        mine, theirs = shipped_template_dir() / name, explicit / name
        if theirs.is_file() and theirs.read_bytes() != mine.read_bytes():
            raise ConfigError(f"EP_JIT_TEMPLATE_DIR: expected {name} identical to the installed {mine} (the host "
                              f"mirrors it), got a different {theirs}")
    return explicit


@dataclass(frozen=True)
class Source:
    """Everything NVRTC is given for one spec, and nothing machine-specific."""

    spec: KernelSpec
    file_name: str
    text: str
    headers: dict[str, str]
    name_expressions: tuple[str, ...]
    options: tuple[str, ...]

    def source_sha256(self) -> str:
        h = hashlib.sha256()
        for name, text in [(self.file_name, self.text), *sorted(self.headers.items())]:
            h.update(f"{name}\0{len(text)}\0".encode())
            h.update(text.encode())
        return h.hexdigest()

    def key_inputs(self) -> dict[str, object]:
        """The compile's inputs as they enter the cache key (see cache.make_key)."""
        return {
            "template": self.spec.template,
            "source_sha256": self.source_sha256(),
            "params": self.spec.params(),
            "member_hash": self.spec.member_hash,
            "arch": self.spec.arch,
            "nvrtc": nvrtc_version(),
            "cuda_headers": cuda_header_versions(),
            "options": list(self.options),
            "name_expressions": list(self.name_expressions),
        }


@dataclass(frozen=True)
class CompiledProgram:
    cubin: bytes
    lowered_names: dict[str, str]
    log: str
    seconds: float


def _local_headers(text: str, root: Path) -> dict[str, str]:
    """Every templates/ header reachable through #include "...", recursively."""
    found: dict[str, str] = {}
    pending = _LOCAL_INCLUDE.findall(text)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = root / name
        if not path.is_file():
            raise ConfigError(f"templates: {name!r} is included but {path} does not exist")
        found[name] = path.read_text()
        pending.extend(_LOCAL_INCLUDE.findall(found[name]))
    return found


def render(spec: KernelSpec, root: Path | None = None) -> Source:
    """The source, headers, name expressions and options that compile `spec`."""
    root = root or template_dir()
    file = TEMPLATES[spec.template][0].file
    text = (root / file).read_text()
    exprs = spec.name_expressions()
    text += "".join(f"\n// ep_jit instantiates: {e}" for e in exprs) + "\n"
    options = (*BASE_OPTIONS, f"-arch={spec.arch}", *config.extra_nvrtc_options())
    return Source(spec, file, text, _local_headers(text, root), exprs, options)


def _fetch(prog, get_size, get, what: str) -> bytes:
    """An NVRTC output into a fresh writable buffer: NVRTC writes into the object it is
    given, and a bytes object of one byte is shared by the whole interpreter."""
    (size,) = check(get_size(prog), f"{what}Size")
    buf = bytearray(size)
    check(get(prog, buf), what)
    return bytes(buf)


def _program_log(prog) -> str:
    log = _fetch(prog, nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog, "nvrtcGetProgramLog")
    return log.rstrip(b"\0").decode(errors="replace")


def compile_source(source: Source, key: str) -> CompiledProgram:
    """Compile to a cubin for the spec's exact arch. Raises CompileError with the log."""
    start = time.perf_counter()
    names = list(source.headers)
    (prog,) = check(nvrtc.nvrtcCreateProgram(
        source.text.encode(), source.file_name.encode(), len(names),
        [source.headers[n].encode() for n in names], [n.encode() for n in names]), "nvrtcCreateProgram")
    try:
        for expr in source.name_expressions:
            check(nvrtc.nvrtcAddNameExpression(prog, expr.encode()), "nvrtcAddNameExpression")
        options = [*source.options, *(f"-I{d}" for d in cuda_include_dirs())]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
        log = _program_log(prog)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC could not compile {source.spec.describe()}",
                               spec=source.spec, key=key, log=log, source=source.text)
        cubin = _fetch(prog, nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN, "nvrtcGetCUBIN")
        lowered = {e: check(nvrtc.nvrtcGetLoweredName(prog, e.encode()), "nvrtcGetLoweredName")[0].decode()
                   for e in source.name_expressions}
    finally:
        check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")
    return CompiledProgram(cubin, lowered, log, time.perf_counter() - start)
