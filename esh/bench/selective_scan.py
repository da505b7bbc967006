"""Benchmark of the selective-scan backends against the reference loop and mambapy.

For each shape: forward and forward+backward time and the peak memory of forward+backward,
for esh's reference loop, mambapy's parallel scan (when installed), esh's fast PyTorch path
("esh", the chunked backend) and esh's fused C kernel, forward and backward ("esh-cpu", the
default on the CPU where a C compiler is available), all measured in the same run, with

* speed-ups of the fast path over the faster of the two baselines, and
* every time as a multiple of this machine's *floor*: one exponential per state element at
  the measured rate of the fastest exponential torch offers (``exp`` or ``exp2``), plus one
  read and one write of the (batch, dim, L, N) state at the measured copy bandwidth. That is
  the floor of any scan made of PyTorch ops; the C kernel, which computes its exponentials
  inline and never writes the state, can go below it. Forward+backward is measured against
  the same floor (the backward recomputes the states, so at least two exponentials per
  element are needed).

The inputs are a Mamba block's: softplus(delta + delta_bias) with dt in [1e-3, 1e-1],
A = -exp(A_log) with the S4D-real init, input-dependent B and C, D and a z gate. ``--layout``
picks how u, delta and z lie in memory: ``channel`` (default), contiguous (batch, dim, L) as
mamba_ssm's Mamba block hands them to its scan, or ``sequence``, (batch, dim, L) views of
(batch, L, dim) memory as esh's mixers produce them (from a linear layer, untransposed).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from esh._compat import has_module
from esh.bench.measure import peak_memory, time_call
from esh.errors import InputError
from esh.ops.selective_scan import selective_scan

SHAPES: dict[str, tuple[int, int, int, int]] = {
    "mambavision_window": (32, 160, 196, 8),
    "vim_tiny": (8, 384, 197, 16),
    "lm": (4, 1024, 1024, 16),
    "lm_long": (1, 1024, 4096, 16),
}
QUICK_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "small": (2, 32, 64, 8),
    "small_long": (1, 16, 300, 4),
}
METHODS = ("reference", "mambapy", "esh", "esh-cpu")
LAYOUTS = ("channel", "sequence")
_PER_CHANNEL = ("u", "delta", "z")  # the (batch, dim, L) inputs whose layout --layout sets
OURS = ("esh", "esh-cpu")


def make_inputs(
    shape: Sequence[int], seed: int = 0, requires_grad: bool = False, layout: str = "channel"
) -> dict[str, torch.Tensor]:
    batch, dim, seqlen, dstate = shape
    g = torch.Generator().manual_seed(seed)
    dt_init = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = {
        "u": torch.randn(batch, dim, seqlen, generator=g),
        "delta": 0.5 * torch.randn(batch, dim, seqlen, generator=g),
        "A": -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, dstate, seqlen, generator=g),
        "C": torch.randn(batch, dstate, seqlen, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, seqlen, generator=g),
        "delta_bias": dt_init + torch.log(-torch.expm1(-dt_init)),  # inverse softplus
    }
    if layout == "sequence":
        for k in _PER_CHANNEL:
            inputs[k] = inputs[k].transpose(1, 2).contiguous().transpose(1, 2)
    return {k: v.requires_grad_(requires_grad) for k, v in inputs.items()}


def _esh(backend: str) -> Callable[[dict], torch.Tensor]:
    def run(x: dict) -> torch.Tensor:
        return selective_scan(**x, delta_softplus=True, backend=backend)

    return run


def _mambapy(x: dict) -> torch.Tensor:
    """mambapy's MambaBlock.selective_scan (Blelloch parallel scan), on (batch, L, dim)."""
    from mambapy.pscan import pscan

    u, z = x["u"].transpose(1, 2), x["z"].transpose(1, 2)
    dt = F.softplus(x["delta"].transpose(1, 2) + x["delta_bias"])
    B, C = x["B"].transpose(1, 2), x["C"].transpose(1, 2)
    deltaA = torch.exp(dt.unsqueeze(-1) * x["A"])  # (batch, L, dim, N)
    BX = dt.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
    hs = pscan(deltaA, BX)
    y = (hs @ C.unsqueeze(-1)).squeeze(3) + x["D"] * u
    return (y * F.silu(z)).transpose(1, 2)


def method_fn(name: str) -> Callable[[dict], torch.Tensor]:
    return {"reference": _esh("reference"), "esh": _esh("chunked"), "esh-cpu": _esh("cpu"), "mambapy": _mambapy}[name]


def available_methods() -> list[str]:
    from esh.ops.selective_scan import cpu_kernel

    unavailable = {"mambapy": not has_module("mambapy"), "esh-cpu": not cpu_kernel.available()}
    return [m for m in METHODS if not unavailable.get(m, False)]


def runs_shape(method: str, shape: Sequence[int]) -> bool:
    """Whether ``method`` can run the benchmark's inputs of ``shape`` (the C kernel needs a
    multiple of 16 channels and at most 64 states)."""
    if method != "esh-cpu":
        return True
    from esh.ops.selective_scan import cpu_kernel

    return cpu_kernel.shape_unsupported_reason(shape[1], shape[3]) is None


@dataclass
class Floor:
    exp_per_s: float
    copy_bytes_per_s: float

    def seconds(self, numel: int, itemsize: int = 4) -> float:
        return numel / self.exp_per_s + numel * itemsize / self.copy_bytes_per_s


def measure_floor(state_numel: int, repeats: int = 20) -> Floor:
    """This machine's exp rate (fastest of exp and exp2) and copy bandwidth for the state
    size, each the best of ``repeats`` runs: a floor is what the machine can do at best."""
    x = -torch.rand(1 << 22)
    y = torch.empty_like(x)
    exp_time = min(
        time_call(lambda: torch.exp(x, out=y), repeats=repeats, best=True),
        time_call(lambda: torch.exp2(x, out=y), repeats=repeats, best=True),
    )
    n = min(state_numel, 1 << 26)  # copies past 256 MiB run at the same DRAM bandwidth
    src = torch.rand(n)
    dst = torch.empty_like(src)
    copy_time = time_call(lambda: dst.copy_(src), repeats=repeats, best=True)
    return Floor(exp_per_s=x.numel() / exp_time, copy_bytes_per_s=n * 4 / copy_time)


@dataclass
class Row:
    shape_name: str
    shape: tuple[int, int, int, int]
    method: str
    fwd_s: float
    fwd_bwd_s: float
    peak_bytes: int | None
    floor_s: float
    max_rel_err: float | None = None
    speedup_fwd: float | None = None
    speedup_fwd_bwd: float | None = None
    extra: dict = field(default_factory=dict)


def _workloads(shape: tuple[int, int, int, int], method: str, layout: str = "channel"):
    """(forward, forward_backward) closures over fresh inputs of ``shape``."""
    return scan_workloads(
        method_fn(method), make_inputs(shape, layout=layout), make_inputs(shape, requires_grad=True, layout=layout)
    )


def scan_workloads(fn: Callable[[dict], torch.Tensor], fwd_inputs: dict, grad_inputs: dict):
    """(forward under no_grad, forward + backward of the sum) closures of ``fn`` over the inputs."""

    def forward():
        with torch.no_grad():
            return fn(fwd_inputs)

    def forward_backward():
        fn(grad_inputs).sum().backward()
        for t in grad_inputs.values():
            t.grad = None

    return forward, forward_backward


def bench_shape(
    name: str,
    shape: tuple[int, int, int, int],
    methods: Sequence[str],
    floor: Floor,
    repeats: int = 5,
    max_seconds: float = 20.0,
    layout: str = "channel",
) -> list[Row]:
    """Times (no memory: see ``measure_peaks``) of every method on one shape."""
    rows = []
    outputs = {}
    for method in [m for m in methods if runs_shape(m, shape)]:
        forward, forward_backward = _workloads(shape, method, layout)
        slow = method == "reference"  # one timed call of the loop is plenty
        outputs[method] = forward()
        fwd = time_call(forward, repeats=1 if slow else repeats, warmup=0 if slow else 1, max_seconds=max_seconds)
        fb = time_call(forward_backward, repeats=1 if slow else repeats, warmup=1, max_seconds=max_seconds)
        rows.append(Row(name, shape, method, fwd, fb, None, floor.seconds(math.prod(shape))))
    reference_out = outputs.get("reference")
    baselines = [r for r in rows if r.method not in OURS]
    for r in rows:
        if reference_out is not None:
            err = (outputs[r.method].float() - reference_out.float()).abs().max()
            r.max_rel_err = float(err / reference_out.float().abs().max())
        if r.method in OURS and baselines:
            r.speedup_fwd = min(b.fwd_s for b in baselines) / r.fwd_s
            r.speedup_fwd_bwd = min(b.fwd_bwd_s for b in baselines) / r.fwd_bwd_s
    return rows


def measure_peaks(rows: Sequence[Row], layout: str = "channel") -> None:
    """Fill in the peak memory of forward+backward. Run after all timings: measuring memory
    makes the allocator return freed memory to the OS, which slows every later call."""
    for r in rows:
        _, forward_backward = _workloads(r.shape, r.method, layout)
        r.peak_bytes = peak_memory(forward_backward)


def format_table(rows: Sequence[Row], floor: Floor, threads: int, layout: str = "channel") -> str:
    lines = [
        f"selective scan, float32, {threads} threads, {layout}-major inputs; "
        f"floor: exp {floor.exp_per_s / 1e9:.2f} G/s, "
        f"copy {floor.copy_bytes_per_s / 1e9:.1f} GB/s",
        "| shape (batch, dim, L, N) | method | fwd ms | fwd x floor | fwd+bwd ms | fwd+bwd x floor "
        "| peak MiB fwd+bwd | max rel err | esh speed-up fwd / fwd+bwd |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        err = "" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"
        speed = "" if r.speedup_fwd is None else f"{r.speedup_fwd:.1f}x / {r.speedup_fwd_bwd:.1f}x"
        lines.append(
            f"| {r.shape_name} {r.shape} | {r.method} | {r.fwd_s * 1e3:.1f} | {r.fwd_s / r.floor_s:.1f} "
            f"| {r.fwd_bwd_s * 1e3:.1f} | {r.fwd_bwd_s / r.floor_s:.1f} | {peak} | {err} | {speed} |"
        )
    return "\n".join(lines)


def run(
    shapes: dict[str, tuple[int, int, int, int]] | None = None,
    methods: Sequence[str] | None = None,
    threads: int | None = 2,
    repeats: int = 5,
    memory: bool = True,
    max_seconds: float = 20.0,
    print_fn: Callable[[str], None] = print,
    layout: str = "channel",
) -> list[Row]:
    if threads:
        torch.set_num_threads(threads)
    shapes = shapes or SHAPES
    methods = [m for m in (methods or METHODS) if m in available_methods()]
    floor = measure_floor(max(math.prod(s) for s in shapes.values()))
    rows: list[Row] = []
    for name, shape in shapes.items():
        rows += bench_shape(name, shape, methods, floor, repeats=repeats, max_seconds=max_seconds, layout=layout)
    if memory:
        measure_peaks(rows, layout)
    print_fn(format_table(rows, floor, torch.get_num_threads(), layout))
    return rows


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is batch,dim,L,N (four positive integers); got {text!r}")
    return shape  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", type=_parse_shape, action="append", help="batch,dim,L,N (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test in seconds")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all installed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2; 0 = leave as is)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="channel",
        help="memory layout of u, delta and z: channel = contiguous (batch, dim, L), as mamba_ssm's Mamba "
        "block passes them (default); sequence = (batch, L, dim) memory, as esh's mixers produce them (CPU only)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (this table) or an accelerator such as cuda: every backend that runs there, float32 and "
        "bfloat16, against chunked, mamba_ssm and the copy bandwidth (esh.bench.selective_scan_device)",
    )


def main_from_args(args: argparse.Namespace) -> list:
    if args.shape:
        shapes = {f"custom{i}": s for i, s in enumerate(args.shape)}
    else:
        shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.device != "cpu":
        from esh.bench import selective_scan_device

        if args.layout != "channel":
            raise InputError("--layout sequence applies to the CPU table only; leave it out with --device")
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise InputError(
                f"--device must be cpu or a torch device such as cuda or cuda:1; got {args.device!r}"
            ) from e
        return selective_scan_device.run(shapes, device, repeats=max(args.repeats, 10))
    return run(shapes, args.methods, args.threads or None, args.repeats, not args.no_memory, layout=args.layout)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main_from_args(parser.parse_args(argv))
