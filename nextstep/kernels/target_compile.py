"""Compile the library's Triton kernels for a GPU that is not there, and read what each one needs.

Triton's interpreter checks what a kernel computes, on the CPU; it does not
check that the kernel compiles for a GPU, nor what the compiled code costs.
Inside `compile_for_target` every kernel that a fused operation launches on
CPU tensors is instead compiled for the named GPU architecture (Triton's own
compiler and ``ptxas``, which ship with Triton's wheel; no GPU and no CUDA
driver needed) and not run: its output tensors keep whatever they held. Each
distinct compiled kernel is recorded as a `CompiledKernel`:

- its registers per thread, the local memory it spills to, its shared memory;
- how many of its programs one multiprocessor holds at once (the occupancy
  the registers, shared memory and warps allow, from the target's limits);
- what its innermost loops do besides arithmetic: barriers (``BAR.SYNC``)
  and shared-memory accesses inside an innermost loop of the machine code
  (SASS) mean that threads exchange data at every step, which keeps a
  bandwidth-bound loop from having many loads in flight, and local-memory
  accesses there mean spilled registers read back at every step;
- its memory barriers and L1 invalidations (what releases and acquires
  compile to), anywhere in the kernel;
- the error, if it did not compile.

Usage, in a process where Triton was imported with ``TRITON_INTERPRET`` off::

    with compile_for_target("sm_90") as compiled:
        skinny_linear(torch.randn(2, 5120, dtype=torch.bfloat16), weight)  # compiled, not run
    for kernel in compiled:
        print(kernel.name, kernel.registers, kernel.programs_per_multiprocessor)

``benchmarks/kernel_resources.py`` compiles every kernel at the shapes and
tiles of the GPU benchmark this way.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from nextstep.kernels import triton_support

__all__ = ["TARGETS", "CompiledKernel", "TargetLimits", "compile_for_target", "programs_per_multiprocessor",
           "sass_fences", "sass_loop_profile"]


@dataclass(frozen=True)
class TargetLimits:
    """What one multiprocessor of a GPU architecture holds at once.

    Attributes:
        arch: the compute capability as Triton names it (90 for sm_90).
        registers: 32-bit registers.
        warps: resident warps.
        programs: resident programs (thread blocks).
        shared_bytes: shared memory.
        reserved_shared_bytes: shared memory the hardware reserves per program.
        multiprocessors: multiprocessors of the usual card of this architecture.
        card: that card.
    """

    arch: int
    registers: int
    warps: int
    programs: int
    shared_bytes: int
    reserved_shared_bytes: int
    multiprocessors: int
    card: str


#: The architectures `compile_for_target` knows the limits of (CUDA programming guide, compute capabilities).
TARGETS = {
    "sm_80": TargetLimits(80, 65536, 64, 32, 164 * 1024, 1024, 108, "A100"),
    "sm_89": TargetLimits(89, 65536, 48, 24, 100 * 1024, 1024, 128, "L40S"),
    "sm_90": TargetLimits(90, 65536, 64, 32, 228 * 1024, 1024, 132, "H100 SXM / H200"),
}


@dataclass
class CompiledKernel:
    """One kernel as compiled for the target.

    Attributes:
        name: the kernel function's name.
        constants: its compile-time arguments (the ``tl.constexpr`` ones).
        num_warps: warps per program.
        num_stages: the compiler's pipelining depth.
        grid: the launch grid, when it was a tuple.
        registers: registers per thread (None when not read).
        local_bytes: local memory per thread (register spills and stack; None when not read).
        shared_bytes: shared memory per program.
        programs_per_multiprocessor: programs one multiprocessor holds at once.
        loop_barriers: ``BAR.SYNC`` instructions inside innermost loops of the machine code.
        loop_shared_accesses: shared-memory loads and stores inside innermost loops.
        loop_global_loads: global-memory loads inside innermost loops.
        loop_vector_loads: those of them that move 128 bits per thread (``LDG.E.128``, ``LDGSTS.E.128``),
            the widest; a product that streams its weights with narrower ones issues more loads per byte.
        loop_local_accesses: local-memory loads and stores (spills) inside innermost loops.
        memory_barriers: ``MEMBAR`` instructions anywhere in the kernel (what a release makes).
        l1_invalidations: ``CCTL.IVALL`` instructions anywhere in the kernel (what an acquire makes).
        seconds: compile time.
        error: why it did not compile, or None.
    """

    name: str
    constants: dict[str, Any] = field(default_factory=dict)
    num_warps: int | None = None
    num_stages: int | None = None
    grid: tuple[int, ...] | None = None
    registers: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None
    programs_per_multiprocessor: int | None = None
    loop_barriers: int | None = None
    loop_shared_accesses: int | None = None
    loop_global_loads: int | None = None
    loop_vector_loads: int | None = None
    loop_local_accesses: int | None = None
    memory_barriers: int | None = None
    l1_invalidations: int | None = None
    seconds: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready values."""
        row = asdict(self)
        row["constants"] = {key: value if isinstance(value, (bool, int, float, str)) or value is None else repr(value)
                            for key, value in self.constants.items()}
        row["grid"] = list(self.grid) if self.grid is not None else None
        return row


def programs_per_multiprocessor(limits: TargetLimits, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Programs of a kernel that one multiprocessor holds at once.

    Registers are allocated per warp in units of 256, shared memory per program
    plus the reserved part; the least of the register, warp, shared-memory and
    program limits decides.
    """
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (limits.registers // per_warp) // num_warps
    by_warps = limits.warps // num_warps
    by_shared = limits.shared_bytes // (shared_bytes + limits.reserved_shared_bytes)
    return max(0, min(by_registers, by_warps, by_shared, limits.programs))


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_SHARED_OPCODES = ("LDS", "STS", "LDSM", "STSM", "ATOMS")


def sass_loop_profile(sass: str) -> dict[str, int]:
    """Barriers, shared-memory accesses, global loads (all, and the 128-bit ones) and local-memory (spill)
    accesses inside the innermost loops of a kernel's SASS.

    A loop is the address range from a backward branch's target to the branch;
    an innermost loop holds no other loop.

    Args:
        sass: ``cuobjdump -sass`` output of one kernel.

    Returns:
        ``{"loop_barriers", "loop_shared_accesses", "loop_global_loads", "loop_vector_loads",
        "loop_local_accesses"}`` counts.
    """
    instructions = [(int(address, 16), opcode, operands) for address, opcode, operands in _INSTRUCTION.findall(sass)]
    loops = []
    for address, opcode, operands in instructions:
        if opcode.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target is not None and int(target.group(1), 16) < address:
                loops.append((int(target.group(1), 16), address))
    innermost = [(start, end) for start, end in loops
                 if not any((start, end) != (other_start, other_end) and start <= other_start and other_end <= end
                            for other_start, other_end in loops)]
    inside = [(opcode, operands) for address, opcode, operands in instructions
              if any(start <= address <= end for start, end in innermost)]
    global_loads = [opcode.split(".") for opcode, _ in inside if opcode.split(".")[0] in ("LDG", "LDGSTS")]
    return {
        "loop_barriers": sum(opcode.startswith("BAR") for opcode, _ in inside),
        "loop_shared_accesses": sum(opcode.split(".")[0] in _SHARED_OPCODES for opcode, _ in inside),
        "loop_global_loads": len(global_loads),
        "loop_vector_loads": sum("128" in parts for parts in global_loads),
        "loop_local_accesses": sum(opcode.split(".")[0] in ("LDL", "STL") for opcode, _ in inside),
    }


def sass_fences(sass: str) -> dict[str, int]:
    """The memory-ordering instructions of a kernel's SASS: ``MEMBAR`` (a release, or a fence) and
    ``CCTL.IVALL`` (the L1 invalidation of an acquire), anywhere in the kernel.

    Args:
        sass: ``cuobjdump -sass`` output of one kernel.

    Returns:
        ``{"memory_barriers", "l1_invalidations"}`` counts.
    """
    opcodes = [opcode for _, opcode, _ in _INSTRUCTION.findall(sass)]
    return {"memory_barriers": sum(opcode.startswith("MEMBAR") for opcode in opcodes),
            "l1_invalidations": sum(opcode.startswith("CCTL.IVALL") for opcode in opcodes)}


@functools.cache
def _cuobjdump() -> str | None:
    """The ``cuobjdump`` that ships with Triton's NVIDIA backend, or one on the PATH."""
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and Path(path).exists():
            return path
    except Exception:  # an older Triton without knobs
        pass
    try:
        import triton.backends.nvidia as nvidia

        candidate = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
        if candidate.exists():
            return str(candidate)
    except Exception:
        pass
    return shutil.which("cuobjdump")


def _read_cubin(record: CompiledKernel, cubin: bytes, limits: TargetLimits) -> None:
    tool = _cuobjdump()
    if tool is None:
        return
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kernel.cubin"
        path.write_bytes(cubin)
        # Resource usage (REG:..., STACK:..., LOCAL:...) and then the SASS, in one listing.
        listing = subprocess.run([tool, "--dump-resource-usage", "--dump-sass", str(path)], capture_output=True,
                                 text=True).stdout
    numbers = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", listing)}
    if "REG" in numbers:
        record.registers = numbers["REG"]
        record.local_bytes = numbers.get("STACK", 0) + numbers.get("LOCAL", 0)
        record.programs_per_multiprocessor = programs_per_multiprocessor(
            limits, record.registers, record.num_warps or 4, record.shared_bytes or 0)
    for key, value in {**sass_loop_profile(listing), **sass_fences(listing)}.items():
        setattr(record, key, value)


class _TargetDriver:
    """Stands in for Triton's CUDA driver: names the target and a device key of its own, launches nothing."""

    def __init__(self, target):
        self.target = target
        self.device = ("compile_for_target", target.arch)

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextmanager
def compile_for_target(arch: str = "sm_90") -> Iterator[list[CompiledKernel]]:
    """Inside, the library's kernels launched on CPU tensors are compiled for ``arch`` and not run.

    Every Triton kernel launched inside is compiled and not run (fused
    operations route CPU tensors to their kernels while it is active); outputs
    keep whatever they held. Not reentrant, and not for use while other
    threads launch Triton kernels.

    Args:
        arch: a key of `TARGETS`.

    Yields:
        the list the compiled kernels are appended to, one per distinct kernel
        (a kernel compiled again with the same arguments is listed once).

    Raises:
        ValueError: an architecture not in `TARGETS`.
        RuntimeError: Triton missing, or imported under its interpreter in this
            process (its library functions are then interpreted, and cannot be compiled).
    """
    if arch not in TARGETS:
        raise ValueError(f"arch must be one of {sorted(TARGETS)}, found {arch!r}")
    triton_support.triton_module()
    if triton_support.interpreter_enabled() or triton_support.interpreter_active():
        raise RuntimeError("compile_for_target needs a process with TRITON_INTERPRET off when Triton is imported; "
                           "found it on")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    limits = TARGETS[arch]
    target_driver = _TargetDriver(GPUTarget("cuda", limits.arch, 32))
    compiled: list[CompiledKernel] = []
    seen: set[tuple[str, str]] = set()
    original_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        name = getattr(self, "__name__", None) or self.fn.__name__
        constants = {key: value for key, value in kwargs.items() if key in self.arg_names}  # the rest: options
        record = CompiledKernel(name, constants, kwargs.get("num_warps"), kwargs.get("num_stages"),
                                tuple(grid) if isinstance(grid, (tuple, list)) else None)
        start = time.perf_counter()
        try:
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as error:  # what the compiler says is the result
            record.error = f"{type(error).__name__}: {str(error).strip()[:2000]}"
            record.seconds = time.perf_counter() - start
            compiled.append(record)
            return None
        record.seconds = time.perf_counter() - start
        if (name, kernel.hash) in seen:
            return kernel
        seen.add((name, kernel.hash))
        metadata = kernel.metadata
        record.num_warps, record.num_stages = metadata.num_warps, metadata.num_stages
        record.shared_bytes = metadata.shared
        _read_cubin(record, kernel.asm["cubin"], limits)
        compiled.append(record)
        return kernel

    previous_driver = getattr(driver, "_active", None)  # None: no driver was chosen yet (no GPU here)
    JITFunction.run = compile_only
    driver.set_active(target_driver)
    compiling_before = triton_support.set_compiling_for(limits.arch)
    try:
        yield compiled
    finally:
        triton_support.set_compiling_for(compiling_before)
        driver._active = previous_driver
        JITFunction.run = original_run
