"""Every kernel compiles for an H100/H200 (sm_90) on this CPU, with no spills in its loops, and the product loops
exchange nothing between threads (`nextstep.kernels.target_compile`, through benchmarks/kernel_resources.py), with
the installed Triton and with each release `make tritons` put in .tritons/ (the GPU run's own)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nextstep.kernels.target_compile import TARGETS, programs_per_multiprocessor, sass_fences, sass_loop_profile

ROOT = Path(__file__).resolve().parent.parent

#: A loop (0x0040 back to 0x0010) holding a barrier, a shared store and a global load; a straight-line tail.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   STS.128 [R0], R4 ;
        /*0040*/              @!P0 BRA 0x10 ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   LDS.128 R8, [R0] ;
        /*0070*/                   EXIT ;
"""


def test_loop_profile_counts_only_what_is_inside_loops():
    spilling = SASS.replace("LDG.E.128 R4, desc[UR4][R2.64]", "LDL.64 R4, [R1+0x8]")
    assert sass_loop_profile(SASS) == {"loop_barriers": 1, "loop_shared_accesses": 1, "loop_global_loads": 1,
                                       "loop_vector_loads": 1, "loop_local_accesses": 0}
    assert sass_loop_profile(spilling) == {"loop_barriers": 1, "loop_shared_accesses": 1, "loop_global_loads": 0,
                                           "loop_vector_loads": 0, "loop_local_accesses": 1}
    assert sass_loop_profile("") == {"loop_barriers": 0, "loop_shared_accesses": 0, "loop_global_loads": 0,
                                     "loop_vector_loads": 0, "loop_local_accesses": 0}


def test_only_128_bit_loads_count_as_vector_loads():
    narrower = {"LDG.E.64": 0, "LDG.E.U16": 0, "LDG.E": 0, "LDG.E.128.STRONG.GPU": 1,
                "LDGSTS.E.BYPASS.128": 1, "LDG.E.EL.128": 1}
    for opcode, vector in narrower.items():
        profile = sass_loop_profile(SASS.replace("LDG.E.128", opcode))
        assert (profile["loop_global_loads"], profile["loop_vector_loads"]) == (1, vector), opcode


def test_fences_are_counted_anywhere():
    fenced = SASS.replace("MOV R1, c[0x0][0x28]", "MEMBAR.ALL.GPU").replace("EXIT", "CCTL.IVALL")
    assert sass_fences(fenced) == {"memory_barriers": 1, "l1_invalidations": 1}
    assert sass_fences(SASS) == {"memory_barriers": 0, "l1_invalidations": 0}


def test_loop_profile_looks_at_innermost_loops():
    nested = SASS.replace("/*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;",
                          "/*0050*/              @!P1 BRA 0x0 ;")
    assert sass_loop_profile(nested)["loop_barriers"] == 1  # the outer loop's own instructions are not counted


def test_occupancy_follows_the_tightest_limit():
    hopper = TARGETS["sm_90"]
    assert programs_per_multiprocessor(hopper, 32, 4, 0) == 16  # warps: 64 / 4
    assert programs_per_multiprocessor(hopper, 128, 4, 0) == 4  # registers: 65536 / (128 * 128)
    assert programs_per_multiprocessor(hopper, 32, 4, 100 * 1024) == 2  # shared memory
    assert programs_per_multiprocessor(hopper, 16, 1, 0) == 32  # programs


def test_bad_input_names_what_was_expected():
    from nextstep.kernels.target_compile import compile_for_target

    with pytest.raises(ValueError, match=r"arch must be one of \['sm_80', 'sm_89', 'sm_90'\], found 'sm_75'"):
        with compile_for_target("sm_75"):
            pass


def test_compiling_needs_triton_imported_without_its_interpreter():
    pytest.importorskip("triton")
    from nextstep.kernels.target_compile import compile_for_target
    from nextstep.kernels.triton_support import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is off in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET off"):
        with compile_for_target():
            pass


def _compiler_available() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except Exception:
        return False
    from nextstep.kernels.target_compile import _cuobjdump

    return _cuobjdump() is not None


#: Triton releases beside the installed one (`make tritons`).
TRITON_RELEASES = sorted(path.parent.name for path in (ROOT / ".tritons").glob("*/.installed"))


@pytest.mark.skipif(not _compiler_available(), reason="Triton's NVIDIA backend (ptxas, cuobjdump) is not installed")
@pytest.mark.parametrize("release", [None, *TRITON_RELEASES], ids=lambda release: release or "installed")
def test_every_kernel_compiles_for_hopper(tmp_path, release):
    environment = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    choice = ["--triton", release] if release else []
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--small",
                                "--out", str(tmp_path), *choice], capture_output=True, text=True, env=environment,
                               timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    name = f"kernel_resources_triton-{release}" if release else "kernel_resources"
    result = json.loads((tmp_path / f"{name}.json").read_text())
    if release:
        assert result["triton"] == release
    kernels = result["kernels"]
    names = {kernel["name"] for kernel in kernels}
    assert {"skinny_linear_kernel", "add_rms_norm_kernel", "rotary_cache_kernel", "swiglu_kernel",
            "layer_norm_modulate_kernel", "guided_update_kernel", "modulated_linear_kernel", "gated_linear_kernel",
            "persistent_head_kernel", "grid_barriers_kernel"} <= names
    for kernel in kernels:
        assert kernel["error"] is None, kernel
        assert kernel["loop_local_accesses"] == 0, f"{kernel['name']} {kernel['constants']} spills inside a loop"
        # The one-launch head may keep a few values on its stack, outside its loops; the others keep none.
        allowed = 64 if kernel["name"] == "persistent_head_kernel" else 0
        assert kernel["local_bytes"] <= allowed, f"{kernel['name']} {kernel['constants']} spills"
        assert kernel["programs_per_multiprocessor"] >= 1
    # The few-rows products and the row-by-row block products: loads and multiply-adds only in their loops.
    for kernel in kernels:
        if kernel["name"] == "skinny_linear_kernel" or kernel["constants"].get("ROWS_PRODUCT"):
            assert kernel["loop_barriers"] == 0 and kernel["loop_shared_accesses"] == 0, kernel
    # Every grid-wide barrier releases (a memory barrier) and acquires (an L1 invalidation): no compiler
    # dropped the acquire read, whose value nothing else uses.
    for kernel in kernels:
        if kernel["name"] in ("grid_barriers_kernel", "persistent_head_kernel"):
            assert 1 <= kernel["memory_barriers"] <= kernel["l1_invalidations"], kernel
    assert (tmp_path / f"{name}.md").read_text().startswith("Kernels compiled for sm_90")
    if result["dependent_launches"]:  # the fused decode stack's kernels, also launched dependently
        launched = {kernel["name"] for kernel in kernels if kernel["constants"].get("PDL")}
        assert launched == {"skinny_linear_kernel", "add_rms_norm_kernel", "rotary_cache_kernel", "swiglu_kernel"}
