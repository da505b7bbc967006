from __future__ import annotations

import argparse
import sys

import pytest
import torch

from esh.bench import selective_scan as bench
from esh.bench.measure import peak_memory, time_call


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_peak_memory_sees_a_temporary_allocation():
    def allocate():
        x = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
        return float(x.sum())

    peak = peak_memory(allocate)
    assert 15 * 2**20 <= peak <= 40 * 2**20


def test_time_call_returns_a_positive_median():
    assert time_call(lambda: torch.ones(10).sum(), repeats=3) > 0


def test_baselines_compute_the_same_scan():
    x = bench.make_inputs((2, 16, 33, 4))
    ref = bench.method_fn("reference")(x)
    for method in bench.available_methods():
        with torch.no_grad():
            torch.testing.assert_close(bench.method_fn(method)(x), ref, rtol=1e-4, atol=1e-5)


def test_sequence_layout_is_the_same_scan_over_sequence_major_memory():
    channel = bench.make_inputs((2, 16, 33, 4))
    sequence = bench.make_inputs((2, 16, 33, 4), layout="sequence")
    for k in channel:
        torch.testing.assert_close(sequence[k], channel[k], rtol=0, atol=0)
    for k in ("u", "delta", "z"):
        assert channel[k].is_contiguous() and sequence[k].transpose(1, 2).is_contiguous()
    floor = bench.measure_floor(1 << 16, repeats=1)
    rows = bench.bench_shape("t", (1, 16, 16, 4), ["reference", "esh"], floor, repeats=1, layout="sequence")
    assert rows[-1].max_rel_err < 1e-5
    assert "sequence-major" in bench.format_table(rows, floor, 1, "sequence")


def test_layout_is_a_cpu_option():
    from esh.errors import InputError

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(InputError, match="CPU table only"):
        bench.main_from_args(parser.parse_args(["--device", "cuda", "--layout", "sequence"]))


def test_shapes_the_c_kernel_cannot_run_leave_it_out():
    floor = bench.measure_floor(1 << 16, repeats=1)
    rows = bench.bench_shape("t", (1, 8, 16, 4), ["esh", "esh-cpu"], floor, repeats=1)
    assert [r.method for r in rows] == ["esh"]
    if "esh-cpu" in bench.available_methods():
        rows = bench.bench_shape("t", (1, 16, 16, 4), ["reference", "esh-cpu"], floor, repeats=1)
        assert rows[-1].method == "esh-cpu" and rows[-1].max_rel_err < 1e-5 and rows[-1].speedup_fwd > 0
        assert rows[-1].speedup_fwd_bwd > 0  # the kernel has a backward: a fwd+bwd row
        assert "| - |" not in bench.format_table(rows, floor, 1)


def test_floor_is_positive_and_rows_carry_ratios():
    floor = bench.measure_floor(1 << 16, repeats=1)
    assert floor.exp_per_s > 0 and floor.copy_bytes_per_s > 0
    rows = bench.bench_shape("t", (1, 8, 16, 4), ["reference", "esh"], floor, repeats=1)
    esh_row = rows[-1]
    assert esh_row.method == "esh" and esh_row.speedup_fwd > 0 and esh_row.max_rel_err < 1e-5


def test_long_sequence_table_rebuilds_models_for_the_size():
    from esh.bench.vision_throughput import long_sequence

    lines = []
    rows = long_sequence(sizes=(64,), repeats=1, print_fn=lines.append)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("vim_tiny", 64, 17),
        ("deit_tiny_patch16_224", 64, 17),
        ("deit_tiny_patch16_224+eager", 64, 17),
    ]
    assert all(r[3] > 0 for r in rows) and "peak MiB" in lines[0]


def test_eager_deit_writes_attention_out_and_agrees_with_the_fused_one():
    from esh.bench.vision_throughput import build

    torch.manual_seed(0)
    fused = build("deit_tiny_patch16_224", 64)
    eager = build("deit_tiny_patch16_224+eager", 64)
    eager.load_state_dict(fused.state_dict())
    attn = [m for m in eager.modules() if hasattr(m, "fused_attn")]
    assert attn and not any(m.fused_attn for m in attn)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(eager(x), fused(x), rtol=1e-4, atol=1e-5)


def test_alignment_benchmark_runs_each_metric_in_its_own_process(capsys):
    from esh.bench.alignment import run

    rows = run(n=200, d=16, k=5, metrics=("mknn", "cknna", "cka"), threads=1)
    assert [r["metric"] for r in rows] == ["mknn", "cknna", "cka"]
    assert all(r["seconds"] > 0 and r["peak_bytes"] > 0 and 0 <= r["value"] <= 1 for r in rows)
    assert "| cknna |" in capsys.readouterr().out


def test_device_benchmark_table_runs_anywhere_and_checks_every_gradient(capsys):
    from esh.bench import selective_scan_device as dev

    rows = dev.run({"tiny": (1, 4, 6, 2)}, device="cpu", methods=["chunked"], dtypes=(torch.float32,), repeats=3)
    fwd, fwd_bwd = rows
    assert (fwd.pass_name, fwd_bwd.pass_name) == ("fwd", "fwd+bwd")
    assert fwd.p10_s <= fwd.median_s <= fwd.p90_s and fwd.gb_per_s > 0 and fwd.copy_share > 0
    assert fwd.speedup_vs_chunked == 1.0 and fwd.vs_mamba_ssm is None  # no mamba_ssm here
    assert fwd.max_error < 1e-5 and fwd_bwd.max_error < 1e-5  # against the float64 loop
    assert fwd_bwd.worst_error_of in {"d" + n for n in dev.GRAD_NAMES}
    assert "| tiny (1, 4, 6, 2) | float32 | chunked | fwd+bwd |" in capsys.readouterr().out


def test_minimal_bytes_count_each_tensor_once():
    from esh.bench.selective_scan_device import minimal_bytes

    # batch 2, dim 3, L 5, N 4: (batch, dim, L) = 30 elements, (batch, N, L) = 40
    assert minimal_bytes((2, 3, 5, 4), torch.float32, backward=False) == 4 * (4 * 30 + 2 * 40)
    assert minimal_bytes((2, 3, 5, 4), torch.bfloat16, backward=True) == 2 * (11 * 30 + 6 * 40)


def test_an_unknown_device_is_a_clear_error():
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(ValueError, match="--device must be cpu or a torch device"):
        bench.main_from_args(parser.parse_args(["--quick", "--device", "bogus"]))


@pytest.mark.slow
def test_device_stack_figures_run_on_any_device():
    from esh.bench import device_stack

    cpu = torch.device("cpu")
    vision = device_stack.vision_rows(cpu, ("mambavision_nano",), (2,), 2, 64, repeats=1)
    assert set(vision[0]) == {"model", "infer b2 img/s", "train b2 img/s"} and vision[0]["train b2 img/s"] > 0
    tiny = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, expert_hidden=32)
    lm = device_stack.lm_rows(cpu, "small", 2, 16, (8,), 2, repeats=1, **tiny)
    assert [r["unit"] for r in lm] == ["tokens/s", "ms/token"] and all(r["value"] > 0 for r in lm)
    memory = device_stack.memory_row(cpu, "medium", 1, 16, **tiny)
    assert memory["unit"] == "GiB peak" and (memory["value"] is None or memory["value"] > 0)
    table = device_stack.format_tables("cpu", vision, [*lm, memory])
    assert "| mambavision_nano | " in table and "esh_small decode, context 8" in table


def test_every_benchmark_script_is_an_esh_bench_command():
    from pathlib import Path

    from esh.cli.bench import BENCHMARKS

    scripts = {p.stem for p in (Path(__file__).parents[2] / "benchmarks").glob("*.py")}
    assert scripts and scripts == {module for module, _ in BENCHMARKS.values()}


def _fresh_python(code: str) -> str:
    import subprocess

    env = {k: v for k, v in __import__("os").environ.items() if k != "ESH_CPU_ALLOCATOR"}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-1]


def test_building_the_parser_imports_no_benchmark():
    code = (
        "import sys; from esh.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.startswith('esh.bench')) or 'none')"
    )
    assert _fresh_python(code) == "none"


def test_importing_the_benchmarks_leaves_the_allocator_alone():
    from esh.cli.bench import BENCHMARKS

    modules = ", ".join(f"esh.bench.{module}" for module, _ in BENCHMARKS.values())
    code = f"import esh.bench, {modules}; from esh import runtime; print(runtime.cpu_allocator_tuned())"
    assert _fresh_python(code) == "False"


def test_esh_bench_hands_its_arguments_to_the_benchmark(capsys):
    from esh.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "lm-generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: esh bench lm-generate") and "--new-tokens" in out
    assert sys.argv[0] != "esh bench lm-generate"  # restored
