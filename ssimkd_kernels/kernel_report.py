"""Static GPU evidence for the Triton kernels, with no GPU (SPEC section 4, STYLE 18).

Triton compiles for a named target without a device (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``) and its wheel ships ``cuobjdump``. From the cubin this module
reads each kernel's resources (registers, stack = local memory, shared memory), its theoretical
occupancy and its SASS instruction mix, per output element. The CI test (python_tests/test_triton_fit.py),
bench/kernel_report.py and ``ssimkd kernels`` all compile through `analyse_many`, which caches in
memory (and Triton caches the compiled kernels on disk, so a second run takes seconds); a process that
runs Triton's interpreter (the tests) compiles in one child process per call.

Per-element counts. A kernel's work per output row is the body of its row loop (the SASS loop that
holds the row's barriers: one per row in the forward, two in the backward, so an unrolled body is
divided by the unroll factor); the rest runs once per program. `per_element` spreads both over a
level's geometry (programs and rows from the launcher's own plan). The body is counted whole, the
border-row branches included, so integer and load counts are upper estimates; FFMA lies outside those
branches and is exact.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

# SASS opcodes by what they cost, per warp instruction. MMA: MACs of one warp instruction by shape.
FP32_OPS = ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK", "MUFU")
MEMORY_OPS = ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDSM", "STSM", "LDC", "ATOM", "RED", "SHFL")
REPORTED_OPS = ("FFMA", "FMUL", "FADD", "HMMA", "LDG", "STG", "LDS", "STS", "LDL", "STL", "BAR", "SHFL", "MOV")
ROW_BARRIERS = {"fwd": 1, "bwd": 2}  # barriers per output row of the rolling-rows kernels

# Per SM of the architectures the project targets (sm_80 A100, sm_90 H100/H200).
SM_LIMITS = {
    80: dict(registers=65536, shared=167936, threads=2048, blocks=32, warps=64),
    90: dict(registers=65536, shared=233472, threads=2048, blocks=32, warps=64),
}


@dataclass(frozen=True)
class KernelConfig:
    """One specialisation of a kernel, as ssim_kd_loss would launch it."""

    kernel: str  # "fwd" or "bwd"
    dtype: str = "float32"
    padding: str = "reflect"
    window: int = 11
    exponents: tuple = (1.0, 1.0, 1.0)
    teacher_grad: bool = False  # backward: dL/dy too (NEED_Y)
    affine: bool = True  # min-max normalisation (any mode but "none")
    masked: bool = False  # per-pixel weights of m and one loss per plane (ssim's mask, reduction "none")
    ms_ssim: bool = False  # ms_ssim's launch: alpha 0 or 1 per level (chosen at run time), one loss per plane
    l1: bool = False  # l1_ssim_loss's launch: the L1 term in the same pass (HAS_L1)

    @property
    def name(self) -> str:
        parts = [self.kernel, self.dtype, self.padding, f"w{self.window}"]
        if self.exponents != (1.0, 1.0, 1.0):
            parts.append("exp" + ",".join(f"{e:g}" for e in self.exponents))
        if self.kernel == "bwd":
            parts.append("x+y" if self.teacher_grad else "x")
        if not self.affine:
            parts.append("no-affine")
        if self.masked:
            parts.append("masked")
        if self.ms_ssim:
            parts.append("ms-ssim")
        if self.l1:
            parts.append("l1")
        return "/".join(parts)


def default_configs() -> list[KernelConfig]:
    """Every configuration the report covers: the defaults, then each padding, window 3/11/15, general
    exponents, teacher gradient off/on, each dtype (the backward with and without a teacher gradient),
    and the image losses' launches: a mask, MS-SSIM's levels, l1_ssim_loss's L1 term."""
    configs = []
    for kernel in ("fwd", "bwd"):
        grads = (False, True) if kernel == "bwd" else (False,)
        variants = [dict()] + [dict(padding=p) for p in ("zero", "valid")] + [dict(window=w) for w in (3, 15)]
        variants += [dict(exponents=(0.0, 0.0, 1.0)), dict(exponents=(1.0, 0.5, 2.0))]
        variants += [dict(dtype=d) for d in ("float16", "bfloat16")] + [dict(affine=False)]
        variants += [
            dict(window=15, padding="zero"),
            dict(window=15, padding="valid"),
            dict(window=15, exponents=(1.0, 0.5, 2.0)),
            dict(window=15, masked=True, affine=False),
            dict(padding="valid", ms_ssim=True, affine=False),
            dict(padding="zero", l1=True, affine=False),
        ]
        for variant in variants:
            for grad in grads:
                configs.append(KernelConfig(kernel, teacher_grad=grad, **variant))
    return configs


# ------------------------------------------------------------------------------------------------
# Compiling
# ------------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether this process imported Triton under TRITON_INTERPRET=1 (the tests without a GPU). Then
    triton.language's own jit helpers (tl.zeros, tl.sum, ...) are interpreter functions, and compiling
    a kernel that calls them would patch the language for the interpreter in the middle of the
    compile; such a process compiles in a child process instead (compile_in_child)."""
    import triton.language as tl

    return type(tl.standard.zeros).__name__ == "InterpretedFunction"


_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _signature(fn, dtype: str, constants: dict) -> dict:
    """Triton types of a kernel's arguments, by the project's naming: x/y/gx/gy pointers carry the
    input dtype, the table is int64, the level scales float64, every other pointer float32; num_levels
    int32, other scalars fp32."""
    signature = {}
    for arg in fn.arg_names:
        if arg in constants:
            signature[arg] = "constexpr"
        elif arg in ("x_ptr", "y_ptr", "gx_ptr", "gy_ptr"):
            signature[arg] = "*" + _TRITON_TYPES[dtype]
        elif arg == "table_ptr":
            signature[arg] = "*i64"
        elif arg == "scales_ptr":
            signature[arg] = "*fp64"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32"
        elif arg == "num_levels":
            signature[arg] = "i32"
        else:
            signature[arg] = "fp32"
    return signature


def kernel_constants(config: KernelConfig) -> dict:
    """The constexprs the launchers would pass for `config`."""
    from . import triton_kernels as module
    from ._constants import PADDING_CODES
    from .ops import KernelOptions

    options = KernelOptions(
        config.window, 1.5, 1e-4, 9e-4, PADDING_CODES[config.padding], *config.exponents, True, plane_sums=False
    )
    constants = dict(
        module.kernel_constants(options),
        HAS_AFFINE=config.affine,
        HAS_PIXEL_WEIGHTS=config.masked,
        HAS_L1=config.l1,
        WIDE=False,
    )
    if config.ms_ssim:  # levels with (0, 1, 1) and (1, 1, 1): alpha's kind is decided per level
        constants.update(KINDS=(module.EXPONENT_PER_LEVEL.value, *constants["KINDS"][1:]))
    if config.kernel == "fwd":
        constants.update(WRITE_MAP=False)
    else:
        plane_sums = config.masked or config.ms_ssim
        constants.update(HAS_GRAD_MAP=False, PLANE_SUMS=plane_sums, NEED_X=True, NEED_Y=config.teacher_grad)
    return constants


def compile_kernel(fn, constants: dict, dtype: str, arch: int, options: dict):
    """triton.compile of one specialisation for sm_<arch>; needs no GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=fn, signature=_signature(fn, dtype, constants), constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def cuda_tool(name: str) -> str:
    """A CUDA binary utility shipped in the Triton wheel (cuobjdump, nvdisasm, ptxas)."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


# ------------------------------------------------------------------------------------------------
# Reading a cubin
# ------------------------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", re.M)
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _mma_macs(opcode: str) -> int:
    """MACs of one warp-wide MMA instruction from its shape suffix, e.g. HMMA.1688 = 16x8x8."""
    match = re.search(r"\.(\d{2})(\d)(\d+)", opcode)
    if not match:
        return 0
    m, n, k = (int(g) for g in match.groups())
    return m * n * k


@dataclass
class SassMix:
    """Warp-instruction counts of a SASS range, by base opcode; MMA instructions also as MACs."""

    counts: Counter = field(default_factory=Counter)
    mma_macs: int = 0

    def add(self, opcode: str, times: float = 1.0):
        base = opcode.split(".")[0]
        self.counts[base] += times
        if base in ("HMMA", "IMMA", "DMMA", "HGMMA"):
            self.mma_macs += _mma_macs(opcode) * times

    def scaled(self, factor: float) -> SassMix:
        out = SassMix(Counter({k: v * factor for k, v in self.counts.items()}), self.mma_macs * factor)
        return out

    def __add__(self, other: SassMix) -> SassMix:
        return SassMix(self.counts + other.counts, self.mma_macs + other.mma_macs)

    @property
    def total(self) -> float:
        return sum(self.counts.values())

    def group(self, opcodes) -> float:
        return sum(self.counts[o] for o in opcodes)


def parse_sass(sass: str, kernel: str) -> dict:
    """Split a kernel's SASS into what runs once per program and the bodies of its loops.

    Loops are backward branches. A row loop holds the row barriers (ROW_BARRIERS per row; an unrolled
    body holds a multiple, and is divided back to one row). The kernels keep no shared memory of their
    own, so a row body with shared-memory traffic holds layout conversions (each with barriers: seen
    with triton 3.6); it is not divided, and "row_barriers" (the interior body's) shows it.
    The kernels run their rows in three loops: rows whose window crosses the top edge, interior rows,
    rows crossing the bottom edge; the interior loop is the smallest (no index map). Returns SassMix
    values: "program" (outside every loop), "interior" (per row), "border" (per row, one per border
    loop) and "other" (per iteration of loops without barriers: the backward's tail), and
    "row_barriers"."""
    parsed = [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(sass)]
    loops = []
    for address, op, rest in parsed:
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", rest)
            if target and int(target.group(1), 16) < address:
                loops.append((int(target.group(1), 16), address))
    loops = [(a, b) for a, b in loops if not any(a2 <= a and b <= b2 and (a2, b2) != (a, b) for a2, b2 in loops)]

    def mix(inside):
        out = SassMix()
        for address, op, _ in parsed:
            if inside(address):
                out.add(op)
        return out

    barriers = ROW_BARRIERS.get(kernel, 1)
    rows, others = [], []
    for a, b in loops:
        body = mix(lambda address, a=a, b=b: a <= address <= b)
        if body.counts["BAR"] >= barriers:
            converts = body.counts["LDS"] + body.counts["STS"] > 0
            unrolled = 1 if converts else max(1, round(body.counts["BAR"] / barriers))
            rows.append((body.scaled(1.0 / unrolled), body.counts["BAR"]))
        elif body.total > 1:
            others.append(body)
    rows.sort(key=lambda row: row[0].total)
    program = mix(lambda address: not any(a <= address <= b for a, b in loops))
    return dict(
        program=program,
        interior=rows[0][0] if rows else SassMix(),
        border=[r[0] for r in rows[1:]],
        other=others,
        row_barriers=rows[0][1] if rows else 0,
    )


@dataclass
class KernelStats:
    """What the compiler made of one specialisation for one architecture."""

    config: str
    arch: int
    num_warps: int
    registers: int
    stack_bytes: int  # local memory per thread: spills and stack frames
    shared_bytes: int
    local_bytes: int
    spill_stores: int  # LDL/STL in the SASS
    spill_loads: int
    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float  # warps_per_sm / max warps
    per_program: dict  # warp instructions outside the loops, by opcode
    per_row: dict  # warp instructions of one interior row (the row loop's body), by opcode
    per_border_row: list  # the same for each border-row loop
    other_loops: list  # per iteration, by opcode (the backward's tail loop)
    mma_macs_per_row: float
    row_barriers: int  # barriers in the interior row loop's body (ROW_BARRIERS unless layouts convert)
    compile_seconds: float

    @property
    def local_memory(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0 or self.spill_stores > 0 or self.spill_loads > 0


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> tuple[int, int]:
    """(blocks, warps) per SM from registers (allocated per warp in units of 256), shared memory and
    threads."""
    limits = SM_LIMITS[arch]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = limits["registers"] // (per_warp * num_warps)
    by_shared = limits["shared"] // shared if shared else limits["blocks"]
    by_threads = limits["threads"] // (32 * num_warps)
    blocks = max(0, min(by_registers, by_shared, by_threads, limits["blocks"]))
    return blocks, blocks * num_warps


def read_cubin(cubin: bytes) -> tuple[str, str]:
    """(cuobjdump --dump-resource-usage, cuobjdump -sass) of a cubin."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run(
            [cuda_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [cuda_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True
        ).stdout
    return usage, sass


def stats_of(compiled, config_name: str, kernel: str, arch: int, num_warps: int, seconds: float) -> KernelStats:
    usage, sass = read_cubin(compiled.asm["cubin"])
    registers, stack, shared, local = (int(v) for v in _RESOURCES.search(usage).groups())
    shared = max(shared, compiled.metadata.shared)
    parts = parse_sass(sass, kernel)
    every = parts["program"] + parts["interior"]
    for other in parts["border"] + parts["other"]:
        every = every + other
    blocks, warps = occupancy(registers, shared, num_warps, arch)
    return KernelStats(
        config=config_name,
        arch=arch,
        num_warps=num_warps,
        registers=registers,
        stack_bytes=stack,
        shared_bytes=shared,
        local_bytes=local,
        spill_stores=int(every.counts["STL"]),
        spill_loads=int(every.counts["LDL"]),
        blocks_per_sm=blocks,
        warps_per_sm=warps,
        occupancy=warps / SM_LIMITS[arch]["warps"],
        per_program=dict(parts["program"].counts),
        per_row=dict(parts["interior"].counts),
        per_border_row=[dict(b.counts) for b in parts["border"]],
        other_loops=[dict(o.counts) for o in parts["other"]],
        mma_macs_per_row=parts["interior"].mma_macs,
        row_barriers=int(parts["row_barriers"]),
        compile_seconds=seconds,
    )


_ANALYSED: dict = {}  # (config, arch) -> KernelStats, for the process


def _compile_here(config: KernelConfig, arch: int) -> KernelStats:
    import time

    from . import triton_kernels as module

    fn = module._ssim_fwd_kernel if config.kernel == "fwd" else module._ssim_bwd_kernel
    start = time.perf_counter()
    options = module.launch_options(config.kernel)
    compiled = compile_kernel(fn, kernel_constants(config), config.dtype, arch, options)
    return stats_of(compiled, config.name, config.kernel, arch, options["num_warps"], time.perf_counter() - start)


def compile_in_child(jobs: list[tuple[KernelConfig, int]]) -> list[KernelStats]:
    """Compile and read `jobs` in one child Python with the interpreter off (this package first on its
    path); the results come back as JSON on its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    request = json.dumps([[asdict(config), arch] for config, arch in jobs])
    result = subprocess.run(
        [sys.executable, "-m", __name__, "--compile"], input=request, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"ssimkd: compiling the Triton kernels in a child process failed:\n{result.stderr[-4000:]}")
    return [KernelStats(**stats) for stats in json.loads(result.stdout.splitlines()[-1])]  # the last line


def analyse_many(configs, archs=(90,)) -> list[KernelStats]:
    """Compile each config for each sm_<arch> and read the results, in the order (arch, config); cached
    for the process (and Triton caches compiled kernels on disk, so a second process takes seconds)."""
    jobs = [(config, arch) for arch in archs for config in configs]
    missing = [job for job in dict.fromkeys(jobs) if job not in _ANALYSED]
    if missing:
        found = compile_in_child(missing) if interpreting() else [_compile_here(*job) for job in missing]
        _ANALYSED.update(zip(missing, found))
    return [_ANALYSED[job] for job in jobs]


def analyse(config: KernelConfig, arch: int = 90) -> KernelStats:
    """Compile `config` for sm_<arch> and read the result (cached, see analyse_many)."""
    return analyse_many([config], [arch])[0]


def _compile_requests():
    """The child's side of compile_in_child: JSON [[config fields, arch], ...] on stdin, stats out."""
    jobs = [
        (KernelConfig(**dict(fields, exponents=tuple(fields["exponents"]))), arch)
        for fields, arch in json.load(sys.stdin)
    ]
    results = [asdict(_compile_here(config, arch)) for config, arch in jobs]
    print("\n" + json.dumps(results))


# ------------------------------------------------------------------------------------------------
# Per output element, over a workload's levels
# ------------------------------------------------------------------------------------------------


def level_work(
    stats: KernelStats, kernel: str, batch: int, channels: int, planes, window: int = 11, padding: str = "reflect"
) -> dict:
    """Thread instructions by opcode of one kernel over the given levels, per element of one input:
    programs x warps x 32 x (once + interior rows x interior body + border rows x border body + tail x
    tail body) / elements, programs from the launcher's plan (triton_kernels.level_plan). A kernel
    without row loops (the previous design) counts its whole SASS once per program."""
    from . import triton_kernels as module
    from .reference import output_extent

    radius = window // 2
    total = Counter()
    elements = 0
    for h, w in planes:
        halo = 2 * radius if kernel == "bwd" else radius
        plan = module.level_plan(batch * channels, w, halo)
        rows = output_extent(h, window, padding)
        border = 0 if padding == "valid" else min(rows, 2 * radius)
        tail = (2 * radius if padding == "valid" else radius) if kernel == "bwd" else 0
        work = Counter(stats.per_program)
        for k, v in stats.per_row.items():
            work[k] += v * (rows - border)
        for body in stats.per_border_row:
            for k, v in body.items():
                work[k] += v * border / len(stats.per_border_row)
        for body in stats.other_loops:
            for k, v in body.items():
                work[k] += v * tail / len(stats.other_loops)
        for k, v in work.items():
            total[k] += v * plan.programs * stats.num_warps * 32
        elements += batch * channels * h * w
    return dict(per_element={k: v / elements for k, v in total.items()}, elements=elements)


def fma_per_element(mix: dict, mma_macs: float = 0.0) -> float:
    """Issued multiply-adds per element: FFMA thread instructions plus tensor-core MACs one for one."""
    return mix.get("FFMA", 0.0) + mma_macs


def throughput_bound(
    mix: dict, elements: int, dram_bytes: float, sms: int, clock_hz: float, dram_bandwidth: float
) -> dict:
    """A lower bound on a kernel's time from its instruction mix (an estimate, not a measurement):
    the largest of issue (4 warp instructions per clock per SM), the fp32 pipe (4 per clock per SM),
    the load/store pipe (1 warp instruction per clock per SM, each taken as one L1 wavefront) and DRAM
    (each input read once, each output written once). Latency, occupancy and cache misses are ignored."""
    warp = {k: v * elements / 32 for k, v in mix.items()}
    total = sum(warp.values())
    fp32 = sum(warp.get(k, 0.0) for k in FP32_OPS)
    memory = sum(warp.get(k, 0.0) for k in MEMORY_OPS)
    per_second = sms * clock_hz
    bounds = dict(
        issue=total / (4 * per_second),
        fp32=fp32 / (4 * per_second),
        load_store=memory / per_second,
        dram=dram_bytes / dram_bandwidth,
    )
    bounds["bound"] = max(bounds.values())
    bounds["limiter"] = max(("issue", "fp32", "load_store", "dram"), key=lambda k: bounds[k])
    return bounds


# ------------------------------------------------------------------------------------------------
# The CUDA extension's kernels
# ------------------------------------------------------------------------------------------------


def extension_resources() -> list[dict] | str:
    """Registers, stack and shared memory of every kernel in the built extension's cubins, per
    architecture (cuobjdump --dump-resource-usage of the _C library); a sentence when there are none."""
    from . import _extension

    extension = _extension.load(build=False)  # a report never starts a build
    if extension is None:
        return f"the C++ extension is not built ({_extension.reason()})"
    if not extension.gpu_kernels:
        return "not built with CUDA"
    library = str(extension.path)
    result = subprocess.run([cuda_tool("cuobjdump"), "--dump-resource-usage", library], capture_output=True, text=True)
    kernels, arch = [], None
    for line in result.stdout.splitlines():
        found = re.search(r"arch = sm_(\d+)", line)
        if found:
            arch = int(found.group(1))
        function = re.search(r"Function (\S+):", line)
        resources = _RESOURCES.search(line)
        if function:
            kernels.append(dict(arch=arch, function=function.group(1)))
        elif resources and kernels:
            registers, stack, shared, local = (int(v) for v in resources.groups())
            kernels[-1].update(registers=registers, stack_bytes=stack, shared_bytes=shared, local_bytes=local)
    return kernels or f"cuobjdump found no kernels in {Path(library).name}: {result.stderr.strip()}"


def as_dict(stats: KernelStats) -> dict:
    return asdict(stats)


if __name__ == "__main__" and sys.argv[1:] == ["--compile"]:
    _compile_requests()
