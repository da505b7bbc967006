"""Generation of every esh LM: greedy tokens equal a full recompute, padded prompts continue as
they would alone, and bad sampling arguments are one-line input errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from esh.errors import InputError
from esh.models.esh_lm import ESHConfig, ESHModel
from esh.models.gpt import GPT, GPTConfig
from esh.models.lm_common import sample_next_token
from esh.models.mamba_lm import MambaLM

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61


def _esh(seed: int = 0) -> ESHModel:
    torch.manual_seed(seed)
    return ESHModel(ESHConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, expert_hidden=48))


def _mamba(seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    return MambaLM(VOCAB, d_model=32, n_layers=2)


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=2, n_embd=32))


MODELS = {"esh": _esh, "mamba": _mamba, "gpt": _gpt}


def _context_dependent(model):
    """Full-size projections (nn.Linear's default init) instead of the small LM init, under which
    an untrained model only repeats its last token whatever came before."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.lm_head:
                module.reset_parameters()
    return model


@torch.no_grad()
def _greedy_by_recompute(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """The reference: run the whole sequence again for every token and take the argmax."""
    model.eval()
    seq = prompt
    for _ in range(new):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_generate_with_the_cache_equals_a_full_recompute(name):
    model = _context_dependent(MODELS[name](seed=1))
    prompt = torch.randint(0, VOCAB, (3, 6))
    expected = _greedy_by_recompute(model, prompt, 12)
    # the context matters: continuing from the last prompt token alone gives other tokens
    assert not torch.equal(_greedy_by_recompute(model, prompt[:, -1:], 12)[:, 1:], expected[:, 6:])
    assert torch.equal(model.generate(prompt, 12), expected)
    assert torch.equal(model.generate(prompt, 12, use_cache=False), expected)


def test_mamba_lm_cached_decoding_gives_the_logits_of_the_full_forward():
    model = _context_dependent(_mamba(seed=2)).eval()
    ids = torch.randint(0, VOCAB, (2, 11))
    full = model(ids).logits
    cache = model.new_cache()
    parts = [model(ids[:, :4], past_key_values=cache).logits, model(ids[:, 4:7], past_key_values=cache).logits]
    parts += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 11


@pytest.mark.parametrize("side", ["left", "right"])
def test_mamba_lm_padded_prompts_continue_as_they_would_alone(side):
    model = _context_dependent(_mamba(seed=3))
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (3, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[row, cols], mask[row, cols] = p, 1
    out = model.generate(ids, 5, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], 5)
        assert torch.equal(out[row, width:], alone[0, len(p) :])


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
        ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
        ({"temperature": 1.0, "top_p": math.nan}, "top_p"),
        ({"temperature": 1.0, "top_k": 0}, "top_k"),
        ({"temperature": 1.0, "top_k": 2.5}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_bad_sampling_arguments_are_input_errors(name, kwargs, message):
    model = MODELS[name]()
    prompt = torch.randint(0, VOCAB, (1, 3))
    with pytest.raises(InputError, match=message) as info:
        model.generate(prompt, **{"max_new_tokens": 2, **kwargs})
    assert "\n" not in str(info.value)


def test_sample_next_token_checks_its_arguments_too():
    logits = torch.randn(2, VOCAB)
    with pytest.raises(InputError, match="temperature"):
        sample_next_token(logits, temperature=math.nan)
    with pytest.raises(InputError, match="top_k"):
        sample_next_token(logits, temperature=1.0, top_k=-3)
    assert torch.equal(sample_next_token(logits), logits.argmax(-1))


def test_gpt_generate_stops_at_eos_like_the_other_models():
    model = _gpt(seed=5)
    prompt = torch.randint(0, VOCAB, (1, 4))
    greedy = model.generate(prompt, 10)
    eos = int(greedy[0, 6])
    out = model.generate(prompt, 10, eos_token_id=eos)
    first = (greedy[0, 4:] == eos).nonzero()[0].item() + 4
    assert out.shape[1] == first + 1 and out[0, -1].item() == eos


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temperature", "nan", "temperature"),
        ("--temperature", "-1", "temperature"),
        ("--top-p", "1.5", "top_p"),
        ("--top-k", "0", "top_k"),
        ("--max-new-tokens", "-2", "max_new_tokens"),
    ],
)
def test_esh_lm_generate_reports_bad_sampling_arguments_in_one_line(tmp_path, capsys, flag, value, message):
    from esh.cli import main
    from esh.data.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    ESHModel(ESHConfig(vocab_size=256, d_model=16, n_layers=1, n_heads=2, expert_hidden=16)).save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    args = ["lm", "generate", "--checkpoint", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "3"]
    assert main([*args, flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(args) == 0  # the same checkpoint generates with valid arguments


def test_gpt_cached_decoding_gives_the_logits_of_the_full_forward():
    model = _context_dependent(_gpt(seed=6)).eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    full = model(ids).logits
    cache = model.new_cache(16)
    parts = [model(ids[:, :4], past_key_values=cache).logits]
    parts += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 10


@pytest.mark.parametrize("use_cache", [True, False])
def test_gpt_refuses_to_generate_past_its_positions_before_starting(use_cache):
    model = _gpt()  # block_size 64
    with pytest.raises(InputError, match="70 tokens in all exceed block_size 64"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), 60, use_cache=use_cache)
    with pytest.raises(InputError, match="no support for padded batches"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, attention_mask=torch.ones(1, 3))
    with pytest.raises(InputError, match=r"must lie in \[0, 61\)"):
        model(torch.tensor([[0, 61]]))
