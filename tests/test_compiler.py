import pytest

from ep_jit import CompileError, KernelSpec, member_hash
from ep_jit.compiler import compile_source, render
from helpers import layout_spec


def test_layout_compiles_to_cubin_with_lowered_names(cache_env):
    spec = layout_spec(hidden=7168, num_experts=256, num_ranks=8, topk=8, member_hash=member_hash(range(8)))
    src = render(spec)
    prog = compile_source(src, "k")
    assert prog.cubin[:4] == b"\x7fELF"
    (expr,) = spec.name_expressions()
    assert expr.startswith("ep_jit::layout_kernel<7168, 256, 8, 8, __nv_bfloat16, 0x")
    assert prog.lowered_names[expr].startswith("_ZN6ep_jit13layout_kernel")
    assert "ep_common.cuh" in src.headers  # local includes are found and handed over


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a", "sm_100a"])
def test_any_arch_compiles(cache_env, arch):
    prog = compile_source(render(layout_spec(arch=arch)), "k")
    assert prog.cubin[:4] == b"\x7fELF"


def test_fp8_dtype_compiles(cache_env):
    spec = layout_spec(dtype="fp8")
    assert spec.dtype == "fp8_e4m3"
    assert "__nv_fp8_e4m3" in spec.name_expressions()[0]
    assert compile_source(render(spec), "k").cubin[:4] == b"\x7fELF"


def test_compile_error_carries_log_spec_and_source(cache_env, template_copy):
    path = template_copy / "layout.cu"
    path.write_text(path.read_text().replace("blockIdx.x, a.topk_idx", "undeclared_name, a.topk_idx"))
    spec = layout_spec()
    src = render(spec)
    with pytest.raises(CompileError) as err:
        compile_source(src, "thekey")
    e = err.value
    assert "undeclared_name" in e.log and "error" in e.log
    assert e.spec == spec and e.key == "thekey" and "undeclared_name" in e.source
    assert "thekey" in str(e) and "layout(hidden=2048" in str(e)


def test_missing_local_header_is_a_clear_error(cache_env, template_copy):
    (template_copy / "ep_common.cuh").unlink()
    with pytest.raises(Exception, match="ep_common.cuh"):
        render(layout_spec())


@pytest.mark.parametrize("field, value, needle", [
    ("hidden", 100, "hidden: expected a multiple of 128, got 100"),
    ("hidden", 0, "hidden: expected a positive int, got 0"),
    ("num_experts", 63, "num_experts: expected a multiple of num_ranks=4, got 63"),
    ("topk", 65, "topk: expected at most num_experts=64 and 32, got 65"),
    ("topk", 33, "topk: expected at most num_experts=64 and 32, got 33"),
    ("dtype", "fp16", "dtype: expected one of"),
    ("arch", "sm90", "arch: expected an arch NVRTC"),
    ("arch", "sm_12", "got 'sm_12'"),
    ("arch", "sm_999", "got 'sm_999'"),
    ("arch", "sm_80a", "suffix a from sm_90"),
    ("member_hash", "abc", "member_hash: expected 64 lowercase hex digits"),
    ("template", "nope", "template: expected one of"),
])
def test_spec_rejects_bad_values(field, value, needle):
    with pytest.raises(ValueError) as err:
        layout_spec(**{field: value})
    assert needle in str(err.value)


def test_spec_is_hashable_value():
    a, b = layout_spec(), layout_spec()
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert isinstance(a, KernelSpec)


def test_cubin_is_deterministic_across_processes(cache_env):
    import hashlib
    import os
    from helpers import run_py
    code = ("import sys, hashlib; sys.path.insert(0, 'tests'); from helpers import layout_spec\n"
            "from ep_jit.compiler import render, compile_source\n"
            "print(hashlib.sha256(compile_source(render(layout_spec()), 'k').cubin).hexdigest())")
    repo = os.path.dirname(os.path.dirname(__file__))
    outs = {run_py(code, cwd=repo).stdout.strip() for _ in range(2)}
    here = hashlib.sha256(compile_source(render(layout_spec()), "k").cubin).hexdigest()
    assert outs == {here}


def test_compiling_leaves_the_interpreters_shared_bytes_alone(cache_env):
    # NVRTC writes into the buffer it is handed; an empty log has size 1, and b" " is a
    # one-byte object the whole interpreter shares
    from helpers import REPO, run_py
    code = ("import sys; sys.path.insert(0, 'tests'); from helpers import layout_spec\n"
            "from ep_jit.compiler import render, compile_source\n"
            "prog = compile_source(render(layout_spec()), 'k')\n"
            "print(repr(prog.log), b' ' == bytes([32]))")
    out = run_py(code, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["''", "True"]
