"""ESH LM as a transformers model: same weights and tokens as esh's, transformers' hybrid cache,
save_pretrained / AutoModelForCausalLM round trip. Skipped without transformers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache, LinearAttentionAndFullAttentionLayer  # noqa: E402

from esh.models.esh_lm import ESHConfig, ESHModel  # noqa: E402
from esh.models.hf_esh import CACHE_FIELD, ESHForCausalLM, ESHHFConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(seed: int = 0) -> tuple[ESHModel, ESHForCausalLM]:
    torch.manual_seed(seed)
    config = ESHConfig(
        vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_experts=4, expert_hidden=48, layer_scale_init=1.0
    )
    model = ESHModel(config).eval()
    return model, ESHForCausalLM.from_esh(model).eval()


def _prompt(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(1, 97, (batch, length))  # 0 is the pad id given to generate


def test_config_round_trips_and_declares_hybrid_layers():
    config = ESHConfig(vocab_size=50, d_model=32, n_layers=3, n_heads=2, expert_hidden=16, capacity_factor=1.5)
    hf_config = ESHHFConfig.from_esh_config(config)
    assert hf_config.to_esh_config() == config
    assert hf_config.layer_types == ["hybrid"] * 3 and hf_config.tie_word_embeddings
    cache = DynamicCache(config=hf_config)
    assert all(isinstance(layer, LinearAttentionAndFullAttentionLayer) for layer in cache.layers)
    with pytest.raises(ValueError, match="n_heads"):
        ESHHFConfig(d_model=32, n_heads=3)


def test_same_logits_and_loss_as_the_esh_model():
    model, hf = _pair()
    ids = _prompt()
    ours, theirs = model(ids, labels=ids), hf(ids, labels=ids)
    assert torch.equal(theirs.logits, ours.logits)
    torch.testing.assert_close(theirs.loss, ours.loss)
    torch.testing.assert_close(theirs.aux_loss, ours.aux_loss)


def test_greedy_hf_generate_gives_the_esh_tokens_with_and_without_cache():
    model, hf = _pair(seed=1)
    ids = _prompt()
    expected = model.generate(ids, max_new_tokens=12)
    cached = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    uncached = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)


def test_forward_with_cache_fills_the_transformers_hybrid_cache():
    model, hf = _pair(seed=5)
    ids = _prompt(2, 9)
    out = hf(ids[:, :6], use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 6
    assert cache.has_previous_state(0) and cache.get_recurrent_state(1).shape == (2, 64, 16)
    steps = [hf(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(6, 9)]
    torch.testing.assert_close(torch.cat([out.logits, *steps], 1), model(ids).logits, rtol=1e-4, atol=1e-5)


def test_beam_search_reorders_the_hybrid_cache():
    _, hf = _pair(seed=2)
    ids = _prompt()
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(ids, **kwargs), hf.generate(ids, use_cache=False, **kwargs))


def test_save_pretrained_then_auto_model_loads_identical_weights(tmp_path):
    model, hf = _pair(seed=3)
    hf.save_pretrained(tmp_path)
    assert "model.lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied: stored once
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ESHHFConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ESHForCausalLM)
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    ids = _prompt()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # and back to a plain esh model
    assert torch.equal(loaded.to_esh()(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_trust_remote_code_loads_in_a_fresh_process(tmp_path):
    model, hf = _pair(seed=4)
    hf.save_pretrained(tmp_path)
    ids = _prompt(1, 5)
    torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert "esh.models.hf_esh" not in sys.modules  # found through auto_map, not a registration
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        e = torch.load({str(tmp_path / "expected.pt")!r})
        torch.testing.assert_close(m(e["ids"]).logits, e["logits"], rtol=1e-5, atol=1e-6)  # other thread count
        print("ok", type(m).__name__)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok ESHForCausalLM" in result.stdout


def test_forward_takes_the_cache_as_cache_or_past_key_values():
    model, hf = _pair(seed=6)
    ids = _prompt(2, 8)
    expected = model(ids).logits[:, -1]
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=hf.config)
        hf(ids[:, :5], **{name: cache}, use_cache=True)
        steps = [hf(ids[:, t : t + 1], **{name: cache}).logits[:, -1] for t in range(5, 8)]
        torch.testing.assert_close(steps[-1], expected, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="not both"):
        hf(ids, cache=DynamicCache(config=hf.config), past_key_values=DynamicCache(config=hf.config))


def test_output_carries_the_cache_under_the_installed_transformers_name():
    _, hf = _pair()
    out = hf(_prompt(), use_cache=True)
    assert CACHE_FIELD in out and isinstance(out[CACHE_FIELD], DynamicCache)
    assert CACHE_FIELD in type(out).__dataclass_fields__


def _left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_generates_each_prompts_own_tokens(use_cache):
    _, hf = _pair(seed=7)
    prompts = [torch.randint(1, 97, (n,)) for n in (9, 3, 6)]
    ids, mask = _left_padded(prompts)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=use_cache)
    batched = hf.generate(ids, attention_mask=mask, **kwargs)
    for i, p in enumerate(prompts):
        alone = hf.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(p) :]), i


def test_left_padded_beam_search_matches_each_prompt_alone():
    _, hf = _pair(seed=8)
    prompts = [torch.randint(1, 97, (n,)) for n in (7, 4)]
    ids, mask = _left_padded(prompts)
    kwargs = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    batched = hf.generate(ids, attention_mask=mask, **kwargs)
    for i, p in enumerate(prompts):
        alone = hf.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(p) :]), i


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 97)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", padding_side="left")


def test_text_generation_pipeline_batches_prompts_of_different_lengths():
    from transformers import pipeline

    _, hf = _pair(seed=9)
    tokenizer = _word_tokenizer()
    texts = ["w5 w17 w3 w88 w41 w9 w60", "w2 w70", "w33 w34 w35 w36"]
    pipe = pipeline("text-generation", model=hf, tokenizer=tokenizer, device="cpu")
    kwargs = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    batched = [r[0]["generated_text"] for r in pipe(texts, batch_size=3, **kwargs)]
    alone = [pipe(t, **kwargs)[0]["generated_text"] for t in texts]
    assert batched == alone and all(len(t.split()) == 6 for t in batched)
