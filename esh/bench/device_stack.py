"""End-to-end figures on an accelerator, in one run (``python benchmarks/device_stack.py``;
``scripts/gpu_check.sh`` calls it):

* bf16-autocast inference images/s of esh's vision models beside timm's at batches 64 and
  256, 224², and training images/s (forward + backward + AdamW) at batch 64;
* ESH LM small: training tokens/s (batch 8 × 1024, bf16) and cached greedy decoding, ms per
  token at contexts 128 and 2048, with and (on CUDA) without a CUDA graph of the decode step
  (the graph's capture, three eager steps, is inside the timing, spread over the 32 tokens);
* the peak memory of one esh_medium training step (bf16 autocast, gradient checkpointing,
  batch 4 × 1024), to compare with the 12 GB of a consumer GPU.

Random weights and inputs. Every size is a parameter, so the tests run the same code on a CPU
with tiny settings.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Sequence

import torch

from esh.bench.measure import peak_memory, time_call
from esh.errors import InputError

VISION_MODELS = (
    "mambavision_t",
    "vim_tiny",
    "esh_vision_tiny",
    "convnext_tiny",
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def vision_rows(
    device: torch.device,
    models: Sequence[str] = VISION_MODELS,
    infer_batches: Sequence[int] = (64, 256),
    train_batch: int = 64,
    img_size: int = 224,
    bf16: bool = True,
    repeats: int = 5,
) -> list[dict]:
    """Images/s of inference at each batch and of training at ``train_batch``, per model."""
    from esh.bench.vision_throughput import build

    rows = []
    for name in models:
        model = build(name, img_size if img_size != 224 else None).to(device)
        row = {"model": name}
        for batch in infer_batches:
            x = torch.randn(batch, 3, img_size, img_size, device=device)

            def infer(model=model, x=x):
                with torch.inference_mode(), _autocast(device, bf16):
                    model(x)

            row[f"infer b{batch} img/s"] = batch / time_call(infer, repeats=repeats, device=device)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(train_batch, 3, img_size, img_size, device=device)
        y = torch.randint(0, model.num_classes, (train_batch,), device=device)

        def train_step(model=model, opt=opt, x=x, y=y):
            with _autocast(device, bf16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        row[f"train b{train_batch} img/s"] = train_batch / time_call(train_step, repeats=repeats, device=device)
        rows.append(row)
        del model, opt
    return rows


def _lm_training(cfg, device: torch.device, batch: int, block: int, bf16: bool):
    """An ESH LM of ``cfg`` on ``device``, its AdamW, and one training step on random tokens."""
    from esh.models import esh_lm

    model = esh_lm.ESHModel(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, block), device=device)

    def step():
        with _autocast(device, bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, step


def lm_rows(
    device: torch.device,
    config: str = "small",
    batch: int = 8,
    block: int = 1024,
    contexts: Sequence[int] = (128, 2048),
    new_tokens: int = 32,
    bf16: bool = True,
    repeats: int = 3,
    **overrides,
) -> list[dict]:
    """ESH LM training tokens/s and cached greedy decoding ms/token at each context."""
    from esh.models import esh_lm

    cfg = getattr(esh_lm, f"esh_{config}")(**overrides)
    model, opt, train_step = _lm_training(cfg, device, batch, block, bf16)
    tokens_per_s = batch * block / time_call(train_step, repeats=repeats, device=device)
    rows = [{"case": f"esh_{config} train {batch}x{block}", "value": tokens_per_s, "unit": "tokens/s"}]
    opt.state.clear()
    model.eval()
    graph_modes = (False, True) if device.type == "cuda" else (False,)
    for context in contexts:
        prompt = torch.randint(0, cfg.vocab_size, (1, context), device=device)
        for graph in graph_modes:

            def prefill_only(prompt=prompt, graph=graph):
                with _autocast(device, bf16):
                    model.generate(prompt, max_new_tokens=1, cuda_graph=graph)

            def generate(prompt=prompt, graph=graph):
                with _autocast(device, bf16):
                    model.generate(prompt, max_new_tokens=new_tokens + 1, cuda_graph=graph)

            full = time_call(generate, repeats=repeats, device=device)
            per_token = (full - time_call(prefill_only, repeats=repeats, device=device)) / new_tokens
            case = f"esh_{config} decode, context {context}" + (", CUDA graph" if graph else "")
            rows.append({"case": case, "value": 1e3 * per_token, "unit": "ms/token"})
    return rows


def memory_row(device: torch.device, config: str = "medium", batch: int = 4, block: int = 1024, **overrides) -> dict:
    """Peak memory of one training step (bf16 autocast, gradient checkpointing, AdamW)."""
    from esh.models import esh_lm

    cfg = getattr(esh_lm, f"esh_{config}")(use_checkpoint=True, **overrides)
    model, opt, step = _lm_training(cfg, device, batch, block, bf16=True)
    step()  # the optimizer state exists from here on, as in a run
    extra = peak_memory(step, device=device)
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *_opt_tensors(opt)])
    total = None if extra is None else resident + extra
    case = f"esh_{config} train step {batch}x{block}, bf16 + checkpointing"
    return {"case": case, "value": None if total is None else total / 2**30, "unit": "GiB peak"}


def _opt_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_tables(device_name: str, vision: list[dict], lm: list[dict]) -> str:
    lines = [f"esh on {device_name}, bf16 autocast, random weights"]
    if vision:
        keys = [k for k in vision[0] if k != "model"]
        lines += ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        lines += ["| " + r["model"] + " | " + " | ".join(f"{r[k]:.0f}" for k in keys) + " |" for r in vision]
    if lm:
        lines += ["", "| case | value | unit |", "|---|---:|---|"]
        lines += [f"| {r['case']} | {_number(r['value'])} | {r['unit']} |" for r in lm]
    return "\n".join(lines)


def run(device: str = "cuda", quick: bool = False, print_fn: Callable[[str], None] = print) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device_stack: no CUDA device is visible to torch")
    if quick:  # the code paths in seconds (tests, a CPU)
        vision = vision_rows(dev, ("mambavision_nano", "deit_tiny_patch16_224"), (2,), 2, 64, repeats=1)
        tiny = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2, expert_hidden=64)
        lm = lm_rows(dev, "small", 2, 32, (16, 32), 4, repeats=1, **tiny)
        lm.append(memory_row(dev, "medium", 1, 32, **tiny))
    else:
        vision = vision_rows(dev)
        lm = lm_rows(dev) + [memory_row(dev)]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    table = format_tables(name, vision, lm)
    print_fn(table)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the code paths in seconds")
    args = parser.parse_args(argv)
    run(args.device, args.quick)
