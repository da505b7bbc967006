"""A static-shape decoding cache (what a CUDA graph of a decode step needs): same logits and
tokens as the growing cache, fixed shapes from step to step; the graph itself on CUDA."""

from __future__ import annotations

import pytest
import torch

from esh.models.esh_lm import ESHCache, ESHConfig, ESHModel, MambaLM

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **kw) -> ESHModel:
    torch.manual_seed(seed)
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_experts=4, expert_hidden=48, layer_scale_init=1.0)
    return ESHModel(ESHConfig(**{**base, **kw})).eval()


@torch.no_grad()
def test_static_cache_prefill_and_decode_give_the_full_forward_logits():
    model = _model()
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(16, static=True)
    logits = [model(ids[:, :7], past_key_values=cache).logits]
    logits += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(logits, 1), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert int(cache.position) == 11 and cache.get_seq_length() == 11
    assert cache.keys[0].shape[-2] == 16  # never grown, never sliced


@pytest.mark.parametrize("ssm_type", ["mamba1", "mamba2"])
def test_static_cache_generates_the_same_tokens(ssm_type):
    model = _model(seed=2, ssm_type=ssm_type)
    ids = torch.randint(1, 97, (3, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.generate(ids, 10, static_cache=True), model.generate(ids, 10))


@torch.no_grad()
def test_static_cache_takes_a_padded_batch():
    model = _model(seed=4)
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    static, growing = model.new_cache(12, static=True), model.new_cache(12)
    a = model(ids, past_key_values=static, attention_mask=mask).logits
    b = model(ids, past_key_values=growing, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_decode_step_on_the_static_cache_has_the_same_shapes_every_token():
    model = _model(seed=6)
    ids = torch.randint(1, 97, (1, 5))
    cache = model.new_cache(9, static=True)
    model(ids, past_key_values=cache)
    shapes = set()
    for t in range(4):
        model(ids[:, t : t + 1], past_key_values=cache)
        shapes.add(
            tuple(tuple(k.shape) for k in cache.keys + cache.values + cache.conv_states + cache.recurrent_states)
        )
    assert len(shapes) == 1
    with pytest.raises(ValueError, match="do not fit max_length 9"):
        model(ids[:, :1], past_key_values=cache)


def test_bad_static_requests_are_clear_errors():
    with pytest.raises(ValueError, match="needs max_length"):
        ESHCache(2, static=True)
    model = _model()
    ids = torch.randint(1, 97, (1, 4))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        model.generate(ids, 3, cuda_graph=True)
    with pytest.raises(ValueError, match="use_cache=True and an unpadded batch"):
        model.generate(ids, 3, cuda_graph=True, use_cache=False)
    with pytest.raises(ValueError, match="no decoding cache"):
        MambaLM(97, 16, 1).generate(ids, 3, static_cache=True)


@pytest.mark.cuda
def test_cuda_graph_decoding_gives_the_eager_tokens():
    model = _model(seed=7).cuda()
    ids = torch.randint(1, 97, (2, 9), device="cuda")
    assert torch.equal(model.generate(ids, 16, cuda_graph=True), model.generate(ids, 16))
