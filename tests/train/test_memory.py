"""esh.train.memory: the saved-activation measurement behind the trainer's checkpointing default."""

import torch
from torch import nn

from esh.train.memory import available_memory, needs_grad_checkpointing, saved_activation_bytes


def test_saved_activations_are_counted_once_without_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    x = torch.randn(2, 16)
    # addmm keeps its input (2 x 16 floats; the weight is a parameter), ReLU its output (2 x 32)
    assert saved_activation_bytes(model, x) == 4 * (2 * 16 + 2 * 32)
    # a tensor that is saved twice is counted once
    double = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Tanh())
    assert saved_activation_bytes(double, x) == 4 * (2 * 16 + 2 * 16)


def test_measurement_leaves_buffers_and_random_streams_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    state = torch.get_rng_state()
    assert saved_activation_bytes(model, x) > 0
    assert torch.equal(torch.get_rng_state(), state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpointing_is_needed_when_activations_exceed_half_the_free_memory(monkeypatch):
    from esh.train import memory

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
    x = torch.randn(2, 16)
    per_batch = 4 * (2 * 16 + 2 * 32) * 64 / 2  # the batch of 64 is scaled from the batch of 2
    monkeypatch.setattr(memory, "available_memory", lambda device: int(2 * per_batch) + 8)
    assert needs_grad_checkpointing(model, x, 64)[0] is False
    monkeypatch.setattr(memory, "available_memory", lambda device: int(2 * per_batch) - 8)
    assert needs_grad_checkpointing(model, x, 64)[0] is True
    monkeypatch.setattr(memory, "available_memory", lambda device: None)
    assert needs_grad_checkpointing(model, x, 64) == (True, "free memory on cpu unknown")


def test_available_memory_reads_the_host():
    free = available_memory(torch.device("cpu"))
    assert free is None or free > 0
    assert available_memory(torch.device("meta")) is None
