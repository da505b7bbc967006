"""Where the trainers put things on a CUDA machine: the GPU of each torchrun process, the CUDA
random state in checkpoints, the autocast dtype, the gradient scaler and TF32. No GPU is
needed: torch.cuda and torch.distributed are replaced by recorders, and the tests assert on
devices, calls and checkpoint contents."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esh.train.lm
import esh.train.trainer
from esh.train import distributed
from esh.train.checkpoint import rng_state, set_rng_state
from esh.train.precision import amp_dtype_for, autocast, enable_tf32, grad_scaler


@pytest.fixture
def torchrun(monkeypatch):
    """Process 1 of 2 on one machine, as torchrun starts it; records the process-group calls."""
    import torch.distributed as dist

    calls = {"init": [], "set_device": []}
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls["init"]))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls["init"].append(kw))
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
    return calls


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))


@pytest.fixture
def ddp_calls(monkeypatch):
    import torch.nn.parallel

    calls = []

    def ddp(module, device_ids=None, **kw):
        calls.append({"device_ids": device_ids, **kw})
        return module

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp)
    return calls


@pytest.fixture
def tf32_flags(monkeypatch):
    """The TF32 switches, off for the test and restored after it."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# --- one GPU per process ------------------------------------------------------------------


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank(torchrun, two_gpus, ddp_calls):
    setup = distributed.init_distributed("cuda")
    assert (str(setup.device), setup.rank, setup.world, setup.local_rank) == ("cuda:1", 1, 2, 1)
    assert torchrun["set_device"] == [torch.device("cuda:1")]
    assert [c["backend"] for c in torchrun["init"]] == ["nccl"]
    distributed.wrap_ddp(nn.Linear(2, 2), setup.device)
    assert ddp_calls[0]["device_ids"] == [1]


def test_auto_under_torchrun_is_the_local_gpu(torchrun, two_gpus):
    assert str(distributed.init_distributed("auto").device) == "cuda:1"


def test_without_cuda_the_processes_use_gloo_on_the_cpu(torchrun, ddp_calls, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    setup = distributed.init_distributed("auto")
    assert str(setup.device) == "cpu" and (setup.rank, setup.world) == (1, 2)
    assert torchrun["set_device"] == [] and [c["backend"] for c in torchrun["init"]] == ["gloo"]
    distributed.wrap_ddp(nn.Linear(2, 2), setup.device)
    assert ddp_calls[0]["device_ids"] is None


def test_one_process_keeps_its_device_and_joins_no_group(two_gpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device in a single process"))
    setup = distributed.init_distributed("cuda:1")
    assert (str(setup.device), setup.rank, setup.world) == ("cuda:1", 0, 1)


def test_a_gpu_index_that_is_not_the_local_rank_or_a_missing_gpu_is_refused(torchrun, two_gpus, monkeypatch):
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        distributed.init_distributed("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="LOCAL_RANK 1 but this machine shows 1 GPUs"):
        distributed.init_distributed("cuda")


def test_the_lm_trainer_trains_on_its_local_gpu_under_ddp(torchrun, two_gpus, ddp_calls):
    # a module without parameters "moves" to a GPU that is not there, so the set-up runs as on a GPU machine
    class NoWeights(nn.Module):
        pass

    loader = [torch.zeros(1, 4, dtype=torch.long)]
    cfg = esh.train.lm.LMTrainConfig(device="cuda", max_steps=1, out_dir=None, progress=False)
    trainer = esh.train.lm.LMTrainer(NoWeights(), loader, cfg)
    assert str(trainer.device) == "cuda:1" and (trainer.rank, trainer.world) == (1, 2)
    assert ddp_calls[0]["device_ids"] == [1] and torchrun["init"][0]["backend"] == "nccl"


def test_both_trainers_share_one_distributed_setup():
    assert esh.train.trainer.init_distributed is esh.train.lm.init_distributed is distributed.init_distributed
    assert esh.train.trainer.wrap_ddp is esh.train.lm.wrap_ddp is distributed.wrap_ddp


# --- the CUDA random state in checkpoints -------------------------------------------------


@pytest.fixture
def cuda_rng(monkeypatch):
    """A fake CUDA generator: get returns its state, set records what it was given."""
    state = {"value": torch.tensor([7, 8, 9], dtype=torch.uint8), "set": []}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state["value"].clone())
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda s, device="cuda": state["set"].append((s.clone(), torch.device(device)))
    )
    return state


def test_the_rng_state_holds_the_cuda_generator_only_on_cuda(cuda_rng):
    assert "cuda" not in rng_state(torch.device("cpu"))
    state = rng_state(torch.device("cuda:1"))
    assert torch.equal(state["cuda"], cuda_rng["value"])
    set_rng_state(state, torch.device("cpu"))
    assert cuda_rng["set"] == []
    set_rng_state(state, torch.device("cuda:1"))
    assert torch.equal(cuda_rng["set"][0][0], cuda_rng["value"]) and cuda_rng["set"][0][1] == torch.device("cuda:1")


def test_the_vision_checkpoint_saves_and_restores_the_cuda_rng(tmp_path, cuda_rng):
    import numpy as np

    from esh.data.datasets import DIGITS_FILE

    with np.load(DIGITS_FILE) as f:
        keep = np.concatenate([np.flatnonzero(f["labels"] == c)[:8] for c in range(2)])
        np.savez(tmp_path / "two.npz", images=f["images"][keep], labels=f["labels"][keep])
    cfg = esh.train.VisionTrainConfig(data=str(tmp_path / "two.npz"), batch_size=4, out=str(tmp_path), progress=False)
    trainer = esh.train.trainer.VisionTrainer(cfg)
    trainer.device = torch.device("cuda:0")  # only the RNG calls see it: torch.cuda's are fakes
    path = trainer.save()
    saved = torch.load(path, weights_only=True)["rng"]
    assert torch.equal(saved["cuda"], cuda_rng["value"])
    cuda_rng["value"] = torch.tensor([1, 2, 3], dtype=torch.uint8)  # the generator moves on
    trainer.resume(path)
    restored, device = cuda_rng["set"][-1]
    assert torch.equal(restored, torch.tensor([7, 8, 9], dtype=torch.uint8)) and device == torch.device("cuda:0")


# --- mixed precision and TF32 -------------------------------------------------------------


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_the_default_autocast_dtype_on_cuda_is_bfloat16_where_the_gpu_has_it(monkeypatch, bf16, expected):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert amp_dtype_for(torch.device("cuda")) == expected
    assert asked == [False]  # an emulated bfloat16 is slower than float16
    assert amp_dtype_for(torch.device("cuda"), "float16") == torch.float16
    assert amp_dtype_for(torch.device("cuda"), "bfloat16") == torch.bfloat16


def test_the_cpu_autocasts_to_bfloat16_unless_told_otherwise():
    assert amp_dtype_for(torch.device("cpu")) == torch.bfloat16
    assert amp_dtype_for(torch.device("cpu"), "float16") == torch.float16
    with autocast(torch.device("cpu"), True):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), False):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="amp_dtype must be one of bfloat16, float16"):
        amp_dtype_for(torch.device("cpu"), "float8")


def test_the_gradient_scaler_is_on_only_for_float16_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GradScaler disables itself without CUDA
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert grad_scaler(cuda, True).is_enabled()  # no bfloat16 on this GPU: float16 and a scaler
    assert grad_scaler(cuda, True, "float16").is_enabled()
    assert not grad_scaler(cuda, True, "bfloat16").is_enabled()
    assert not grad_scaler(cuda, False, "float16").is_enabled()
    assert not grad_scaler(cpu, True, "float16").is_enabled()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert not grad_scaler(cuda, True).is_enabled()


@pytest.mark.parametrize("capability, on", [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_tf32_is_turned_on_for_ampere_and_newer(monkeypatch, tf32_flags, capability, on):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert enable_tf32(torch.device("cuda")) is on
    assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on


def test_tf32_is_left_alone_on_the_cpu(monkeypatch, tf32_flags):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: pytest.fail("asked a GPU"))
    assert enable_tf32(torch.device("cpu")) is False
    assert not torch.backends.cuda.matmul.allow_tf32


def test_the_lm_trainer_on_an_older_gpu_autocasts_to_float16_with_a_scaler_and_no_tf32(
    two_gpus, tf32_flags, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))

    class NoWeights(nn.Module):
        pass

    cfg = esh.train.lm.LMTrainConfig(device="cuda", use_amp=True, max_steps=1, out_dir=None, progress=False)
    trainer = esh.train.lm.LMTrainer(NoWeights(), [torch.zeros(1, 4, dtype=torch.long)], cfg)
    assert trainer.amp_dtype == torch.float16 and trainer.scaler.is_enabled()
    assert not torch.backends.cuda.matmul.allow_tf32
