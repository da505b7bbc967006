"""The selective-scan benchmark on an accelerator: `esh bench scan --device cuda`.

For each shape of the CPU table and each dtype (float32, bfloat16), forward and
forward+backward of every backend that runs here (esh's chunked PyTorch path, esh's Triton
kernel, mamba_ssm's CUDA kernel when its compiled extension imports, mambapy when installed),
all measured in one run:

* median and p10/p90 milliseconds, and the first call's extra time (Triton compiles then);
* the speed-up over chunked and the time as a multiple of mamba_ssm's;
* achieved GB/s on the *minimal bytes* (every input read once, every output written once:
  forward u, delta, z, B, C in, out out; backward also dout in and du, ddelta, dz, dB, dC out)
  and as a share of the device's copy bandwidth, measured in the same run;
* the peak memory of forward+backward;
* the largest error, relative to the largest magnitude, of the output and of every gradient
  against the float64 reference loop on the same inputs.

Nothing here is specific to CUDA except the names: on a CPU it runs too (tests use that, with
tiny shapes), though the CPU table (`esh bench scan`) is the one to read there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from esh.bench.measure import peak_memory
from esh.errors import InputError
from esh.ops.selective_scan import selective_scan

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
METHODS = ("chunked", "triton", "mamba_ssm", "mambapy")


def available_methods(device: torch.device) -> list[str]:
    """The methods that can run on ``device`` here."""
    from esh._compat import has_module
    from esh.ops.selective_scan import available_backends

    backends = available_backends(device.type)
    present = {
        "chunked": True,
        "triton": "triton" in backends,
        "mamba_ssm": "cuda" in backends,
        "mambapy": has_module("mambapy"),
    }
    return [m for m in METHODS if present[m]]


def method_fn(method: str) -> Callable[[dict], torch.Tensor]:
    if method == "mambapy":
        from esh.bench.selective_scan import method_fn as cpu_method_fn

        return cpu_method_fn("mambapy")
    backend = {"chunked": "chunked", "triton": "triton", "mamba_ssm": "cuda", "reference": "reference"}[method]

    def run(x: dict) -> torch.Tensor:
        return selective_scan(**x, delta_softplus=True, backend=backend)

    return run


def make_inputs(
    shape: Sequence[int], device: torch.device, dtype: torch.dtype, requires_grad: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A Mamba block's inputs (see ``esh.bench.selective_scan.make_inputs``): u, delta, B, C, z in
    ``dtype``; A, D and delta_bias stay float32, as a model's parameters do under autocast."""
    from esh.bench.selective_scan import make_inputs as cpu_inputs

    inputs = cpu_inputs(shape, seed=seed)
    out = {}
    for name, t in inputs.items():
        t = t.to(device=device, dtype=dtype if name in ("u", "delta", "B", "C", "z") else torch.float32)
        out[name] = t.requires_grad_(requires_grad)
    return out


def minimal_bytes(shape: Sequence[int], dtype: torch.dtype, backward: bool) -> int:
    """Bytes a scan must move at least: each tensor of (batch, dim, L) or (batch, N, L) read or
    written once (the small (dim, N) / (dim,) parameters are left out)."""
    batch, dim, seqlen, dstate = shape
    size = torch.empty((), dtype=dtype).element_size()
    bdl, bnl = batch * dim * seqlen, batch * dstate * seqlen
    forward = 4 * bdl + 2 * bnl  # u, delta, z, B, C in; out
    if not backward:
        return forward * size
    return (forward + 7 * bdl + 4 * bnl) * size  # dout, u, delta, z, B, C in; du, ddelta, dz, dB, dC out


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), best of ``repeats``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_samples(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, list[float]]:
    """(seconds of the first call, seconds of each of ``repeats`` calls after one more warm-up)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return first, samples


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, interpolated linearly."""
    return float(torch.quantile(torch.tensor(sorted(samples), dtype=torch.float64), q))


def max_errors(method: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Largest |method − float64 reference| / largest |reference| of the output and each gradient."""
    ours = make_inputs(shape, device, dtype, requires_grad=True)
    ref = {k: v.detach().double().requires_grad_() for k, v in ours.items()}
    out = method_fn(method)(ours)
    expected = method_fn("reference")(ref)
    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    out.backward(g.to(out.dtype))
    expected.backward(g)
    errors = {"out": _rel(out, expected)}
    for name in GRAD_NAMES:
        errors[f"d{name}"] = _rel(ours[name].grad, ref[name].grad)
    return errors


def _rel(value: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() or 1.0
    return (value.double() - expected).abs().max().item() / scale


@dataclass
class DeviceRow:
    shape_name: str
    shape: tuple[int, int, int, int]
    dtype: str
    method: str
    pass_name: str  # "fwd" or "fwd+bwd"
    median_s: float
    p10_s: float
    p90_s: float
    first_call_s: float
    gb_per_s: float
    copy_share: float
    peak_bytes: int | None = None
    speedup_vs_chunked: float | None = None
    vs_mamba_ssm: float | None = None
    max_error: float | None = None
    worst_error_of: str = ""


def bench_method(
    shape_name: str,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    method: str,
    device: torch.device,
    copy_bytes_per_s: float,
    repeats: int = 10,
    errors: bool = True,
) -> list[DeviceRow]:
    """The forward and forward+backward rows of one method on one shape and dtype."""
    from esh.bench.selective_scan import scan_workloads

    forward, forward_backward = scan_workloads(
        method_fn(method),
        make_inputs(shape, device, dtype),
        make_inputs(shape, device, dtype, requires_grad=True),
    )
    rows = []
    for pass_name, call, backward in (("fwd", forward, False), ("fwd+bwd", forward_backward, True)):
        first, samples = time_samples(call, device, repeats)
        median = percentile(samples, 0.5)
        nbytes = minimal_bytes(shape, dtype, backward)
        rows.append(
            DeviceRow(
                shape_name,
                shape,
                str(dtype).removeprefix("torch."),
                method,
                pass_name,
                median,
                percentile(samples, 0.1),
                percentile(samples, 0.9),
                max(0.0, first - median),
                nbytes / median / 1e9,
                nbytes / median / copy_bytes_per_s,
            )
        )
    rows[1].peak_bytes = peak_memory(forward_backward, device=device)
    if errors:
        errs = max_errors(method, shape, device, dtype)
        worst = max(errs, key=errs.get)
        for row in rows:
            row.max_error, row.worst_error_of = (errs["out"], "out") if row.pass_name == "fwd" else (errs[worst], worst)
    return rows


def fill_ratios(rows: Sequence[DeviceRow]) -> None:
    """Speed-up over chunked and time as a multiple of mamba_ssm's, per (shape, dtype, pass)."""
    by_key: dict[tuple, dict[str, DeviceRow]] = {}
    for r in rows:
        by_key.setdefault((r.shape_name, r.dtype, r.pass_name), {})[r.method] = r
    for group in by_key.values():
        for r in group.values():
            if "chunked" in group:
                r.speedup_vs_chunked = group["chunked"].median_s / r.median_s
            if "mamba_ssm" in group:
                r.vs_mamba_ssm = r.median_s / group["mamba_ssm"].median_s


def format_table(rows: Sequence[DeviceRow], device_name: str, copy_bytes_per_s: float) -> str:
    lines = [
        f"selective scan on {device_name}; copy bandwidth {copy_bytes_per_s / 1e9:.0f} GB/s (read + write)",
        "| shape (batch, dim, L, N) | dtype | method | pass | median ms | p10-p90 ms | first call +ms | GB/s "
        "(minimal bytes) | % of copy | peak MiB | x chunked | / mamba_ssm | max rel err (worst of) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.0f}"
        speed = "" if r.speedup_vs_chunked is None else f"{r.speedup_vs_chunked:.1f}x"
        mamba = "" if r.vs_mamba_ssm is None else f"{r.vs_mamba_ssm:.2f}"
        err = "" if r.max_error is None else f"{r.max_error:.1e} ({r.worst_error_of})"
        lines.append(
            f"| {r.shape_name} {r.shape} | {r.dtype} | {r.method} | {r.pass_name} | {r.median_s * 1e3:.3f} "
            f"| {r.p10_s * 1e3:.3f}-{r.p90_s * 1e3:.3f} | {r.first_call_s * 1e3:.0f} | {r.gb_per_s:.0f} "
            f"| {100 * r.copy_share:.0f}% | {peak} | {speed} | {mamba} | {err} |"
        )
    return "\n".join(lines)


def run(
    shapes: dict[str, tuple[int, int, int, int]],
    device: str | torch.device = "cuda",
    methods: Sequence[str] | None = None,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    repeats: int = 10,
    errors: bool = True,
    print_fn: Callable[[str], None] = print,
) -> list[DeviceRow]:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("esh bench scan --device cuda: no CUDA device is visible to torch")
    here = available_methods(device)
    methods = [m for m in (methods or METHODS) if m in here]
    copy = copy_bandwidth(device)
    rows: list[DeviceRow] = []
    for name, shape in shapes.items():
        for dtype in dtypes:
            for method in methods:
                rows += bench_method(name, shape, dtype, method, device, copy, repeats=repeats, errors=errors)
    fill_ratios(rows)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print_fn(format_table(rows, device_name, copy))
    return rows
