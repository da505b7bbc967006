"""ESH LM: sizes, router/MoE maths, gated attention, Mamba recurrence, cached generation, saving."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import esh
from esh.errors import InputError
from esh.layers import GatedAttention, Mamba, SwitchMoE
from esh.layers.gated_attention import apply_rotary, rotary_cos_sin
from esh.models.esh_lm import (
    ESHCache,
    ESHConfig,
    ESHModel,
    ESHOutput,
    MambaLM,
    esh_large,
    esh_lm_param_formula,
    esh_medium,
    esh_small,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> ESHConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_experts=4, expert_hidden=48, layer_scale_init=1.0)
    return ESHConfig(**{**base, **kw})


def tiny_model(seed: int = 0, **kw) -> ESHModel:
    torch.manual_seed(seed)
    return ESHModel(tiny_config(**kw))


# ---------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "make, target", [(esh_small, 125e6), (esh_medium, 350e6), (esh_large, 500e6)], ids=["small", "medium", "large"]
)
def test_sizes_match_formula_and_are_within_3_percent(make, target):
    config = make()
    with torch.device("meta"):
        model = ESHModel(config)
    counted = model.num_parameters()
    formula = esh_lm_param_formula(config)
    assert counted == formula
    assert counted["total"] == sum(p.numel() for p in model.parameters())  # tied head counted once
    assert abs(counted["total"] / target - 1) < 0.03
    assert counted["non_embedding"] == counted["total"] - config.vocab_size * config.d_model
    assert counted["active"] < counted["total"]


def test_formula_counts_untied_head_and_disabled_options():
    config = tiny_config(tie_embeddings=False, layer_scale_init=None, branch_norm=False, dt_rank=3)
    model = ESHModel(config)
    assert model.num_parameters() == esh_lm_param_formula(config)
    assert sum(p.numel() for p in model.parameters()) == esh_lm_param_formula(config)["total"]


def test_print_model_size_prints_and_returns_the_counts(capsys):
    model = tiny_model()
    sizes = model.print_model_size()
    printed = capsys.readouterr().out
    assert "total parameters" in printed and "active per token" in printed and "moe experts" in printed
    assert sizes["total"] == sum(sizes["components"].values())
    expert = sum(p.numel() for p in model.layers[0].moe.experts[0].parameters())
    assert sizes["active"] == sizes["total"] - 2 * 3 * expert


def test_seed_quick_start_imports_build_the_medium_model():
    from esh import ESHConfig as TopConfig
    from esh import ESHModel as TopModel
    from esh.model import esh_medium as seed_medium

    assert TopConfig is ESHConfig and TopModel is ESHModel
    with torch.device("meta"):
        model = TopModel(seed_medium())
    assert abs(model.num_parameters()["total"] / 350e6 - 1) < 0.03


def test_config_round_trips_through_asdict_and_rejects_bad_values():
    config = tiny_config(capacity_factor=1.25, use_checkpoint=True)
    assert ESHConfig(**dataclasses.asdict(config)) == config
    assert ESHConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    with pytest.raises(ValueError, match="n_heads"):
        tiny_config(n_heads=3)
    with pytest.raises(ValueError, match="ssm_type"):
        tiny_config(ssm_type="s4")
    with pytest.raises(ValueError, match="unknown field"):
        ESHConfig.from_dict({"d_model": 32, "colour": "blue"})


def test_size_presets_return_configs_and_a_typo_names_the_close_field():
    assert isinstance(esh_small(), ESHConfig) and isinstance(esh_medium(n_layers=2), ESHConfig)
    with pytest.raises(InputError, match="unknown field.*d_modle; did you mean d_model"):
        esh_small(d_modle=64)
    with pytest.raises(InputError, match="did you mean n_layers"):
        esh.create_model("esh_lm_small", n_layer=2)


def test_registered_builders_take_overrides():
    assert {"esh_lm_small", "esh_lm_medium", "esh_lm_large"} <= set(esh.list_models("esh_lm*"))
    model = esh.create_model("esh_lm_small", vocab_size=50, d_model=32, n_layers=1, n_heads=2, expert_hidden=16)
    assert isinstance(model, ESHModel) and model.config.d_model == 32
    with pytest.raises(ValueError, match="no released"):
        esh.create_model("esh_lm_small", pretrained=True)


# ---------------------------------------------------------------- MoE
def _moe(capacity_factor=None, seed=0):
    torch.manual_seed(seed)
    return SwitchMoE(16, 24, n_experts=4, capacity_factor=capacity_factor)


def test_load_balance_and_z_loss_follow_switch_and_st_moe():
    moe = _moe()
    x = torch.randn(3, 10, 16)
    _, aux = moe(x)
    with torch.no_grad():
        logits = x.reshape(-1, 16) @ moe.router.weight.t()
    probs = logits.softmax(-1)
    choice = probs.argmax(-1)
    n_tok, n_exp = probs.shape
    f = [sum(int(c == i) for c in choice) / n_tok for i in range(n_exp)]
    p = [float(probs[:, i].sum()) / n_tok for i in range(n_exp)]
    assert aux.load_balance_loss.item() == pytest.approx(n_exp * sum(fi * pi for fi, pi in zip(f, p)), rel=1e-5)
    z = sum(float(torch.log(torch.exp(row).sum())) ** 2 for row in logits) / n_tok
    assert aux.z_loss.item() == pytest.approx(z, rel=1e-5)
    assert aux.expert_fraction.tolist() == pytest.approx(f)


def test_load_balance_loss_is_one_for_uniform_and_n_for_collapsed_routing():
    moe = _moe()
    x = torch.randn(64, 16)
    nn.init.zeros_(moe.router.weight)  # p uniform; argmax ties -> all to expert 0, but P_i = 1/N
    assert moe(x)[1].load_balance_loss.item() == pytest.approx(1.0)
    with torch.no_grad():
        moe.router.weight[0] = 1e4 * torch.ones(16)
    x = x.abs()  # every token's logit for expert 0 is huge: f_0 = P_0 = 1
    assert moe(x)[1].load_balance_loss.item() == pytest.approx(4.0)


def test_dropless_moe_sends_every_token_through_its_expert_times_the_gate():
    moe = _moe()
    x = torch.randn(2, 9, 16)
    y, aux = moe(x)
    assert aux.dropped_fraction.item() == 0.0
    probs = (x.reshape(-1, 16) @ moe.router.weight.t()).softmax(-1)
    gate, choice = probs.max(-1)
    expected = torch.stack([moe.experts[int(e)](t) * g for t, e, g in zip(x.reshape(-1, 16), choice, gate)])
    torch.testing.assert_close(y.reshape(-1, 16), expected, rtol=1e-5, atol=1e-6)


def test_capacity_factor_drops_overflow_tokens_to_zero_and_reports_it():
    moe = _moe(capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
    x = torch.randn(8, 16)
    x[:, 0] = x[:, 0].abs() + 1.0  # every token prefers expert 0; capacity = ceil(1.0 * 8 / 4) = 2
    y, aux = moe(x)
    assert aux.dropped_fraction.item() == pytest.approx(6 / 8)
    assert torch.all(y[2:] == 0)  # first come, first served
    gate = (x[:2] @ moe.router.weight.t()).softmax(-1)[:, 0:1]
    torch.testing.assert_close(y[:2], moe.experts[0](x[:2]) * gate)
    moe.capacity_factor = None
    assert moe(x)[1].dropped_fraction.item() == 0.0
    assert torch.all(moe(x)[0] != 0)


def test_moe_gradient_reaches_router_through_the_gate():
    moe = _moe()
    y, aux = moe(torch.randn(4, 5, 16))
    (y.square().mean() + aux.load_balance_loss + aux.z_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert all(e.w1.weight.grad is None or e.w1.weight.grad.abs().sum() > 0 for e in moe.experts)


# ---------------------------------------------------------------- gated attention
class _Const(nn.Module):
    def __init__(self, value: float, width: int):
        super().__init__()
        self.value, self.width = value, width

    def forward(self, x):
        return x.new_full((*x.shape[:-1], self.width), self.value)


def _capture_o_proj_input(attn: GatedAttention) -> list:
    seen = []
    attn.o_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    return seen


def test_gated_attention_shape_and_closed_gate_gives_zero_before_o_proj():
    torch.manual_seed(0)
    attn = GatedAttention(32, 4)
    x = torch.randn(2, 7, 32)
    assert attn(x).shape == (2, 7, 32)
    seen = _capture_o_proj_input(attn)
    attn.gate_proj = _Const(-1e4, 32)  # sigmoid -> 0
    out = attn(x)
    assert torch.all(seen[-1] == 0) and torch.all(out == 0)


def test_open_gate_gives_plain_causal_rotary_attention():
    torch.manual_seed(0)
    attn = GatedAttention(32, 4)
    x = torch.randn(2, 7, 32)
    seen = _capture_o_proj_input(attn)
    gate_logits = attn.gate_proj(x)
    gated = attn(x)
    attn.gate_proj = _Const(1e4, 32)  # sigmoid -> 1
    attn(x)
    q, k, v = (p(x).view(2, 7, 4, 8).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    cos, sin = rotary_cos_sin(torch.arange(7), 8)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(seen[-1], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gated, attn.o_proj(ref * torch.sigmoid(gate_logits)), rtol=1e-5, atol=1e-6)


def test_kv_cache_decode_equals_full_causal_attention():
    torch.manual_seed(0)
    attn = GatedAttention(32, 4).eval()
    x = torch.randn(2, 10, 32)
    full = attn(x)
    cache = ESHCache(1, max_length=6)  # too small on purpose: the buffers must grow
    parts = [attn(x[:, :4], cache=cache), attn(x[:, 4:7], cache=cache)]  # q_len 3 < kv_len 7
    parts += [attn(x[:, t : t + 1], cache=cache) for t in range(7, 10)]  # one query, 8..10 keys
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-6)
    assert cache.get_seq_length() == 10


def test_use_flash_without_the_package_warns_and_falls_back_to_sdpa():
    pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="scaled_dot_product_attention"):
        attn = GatedAttention(32, 4, use_flash=True)
        x = torch.randn(1, 5, 32)
        out = attn(x)
    ref = GatedAttention(32, 4)
    ref.load_state_dict(attn.state_dict())
    torch.testing.assert_close(out, ref(x))


# ---------------------------------------------------------------- Mamba recurrence
def test_mamba_step_by_step_equals_the_full_forward():
    torch.manual_seed(0)
    mixer = Mamba(16, d_state=8).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    full = mixer(x)
    conv_state, ssm_state = mixer.allocate_inference_cache(2, 12)
    assert conv_state.shape == (2, 32, 4) and ssm_state.shape == (2, 32, 8)
    steps = torch.cat([mixer.step(x[:, t : t + 1], conv_state, ssm_state)[0] for t in range(12)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-10)
    # prefill 2 tokens (shorter than d_conv: the conv state is left-padded), then step
    conv2, ssm2 = mixer.allocate_inference_cache(2, 12)
    head = mixer(x[:, :2], conv_state=conv2, ssm_state=ssm2)
    tail = [mixer.step(x[:, t : t + 1], conv2, ssm2)[0] for t in range(2, 12)]
    torch.testing.assert_close(torch.cat([head, *tail], 1), full, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ssm2, ssm_state)
    torch.testing.assert_close(conv2, conv_state)


def test_mamba2_step_by_step_equals_the_full_forward():
    from esh.layers.mamba2 import Mamba2

    torch.manual_seed(0)
    mixer = Mamba2(16, d_state=8, headdim=8, ngroups=2).double()  # 4 heads in 2 groups
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    full = mixer(x)
    conv_state, ssm_state = mixer.allocate_inference_cache(2)
    head = mixer(x[:, :3], conv_state=conv_state, ssm_state=ssm_state)
    tail = [mixer.step(x[:, t : t + 1], conv_state, ssm_state)[0] for t in range(3, 10)]
    torch.testing.assert_close(torch.cat([head, *tail], 1), full, rtol=1e-9, atol=1e-10)
    conv0, ssm0 = mixer.allocate_inference_cache(2)
    steps = torch.cat([mixer.step(x[:, t : t + 1], conv0, ssm0)[0] for t in range(10)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ssm0, ssm_state)


# ---------------------------------------------------------------- the model
def test_forward_contract_loss_is_shifted_cross_entropy_plus_aux():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    assert isinstance(out, ESHOutput) and out.logits.shape == (2, 9, 97)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.ce_loss, ce)
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)
    assert len(out.alphas) == 2 and out.alphas[0].shape == (2, 9) and out.alphas[0].dtype == torch.float32
    assert set(out.moe_stats) >= {"dropped_fraction", "load_balance_loss", "z_loss", "max_expert_fraction"}
    assert all(isinstance(v, float) for v in out.moe_stats.values())
    assert model(ids).loss is None and model(ids).ce_loss is None


def test_aux_loss_is_the_weighted_sum_over_layers():
    model = tiny_model(aux_loss_coef=0.5, z_loss_coef=0.25)
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids)
    x = model.embed_tokens(ids)
    expected = 0.0
    for layer in model.layers:
        x, _, aux = layer(x, torch.arange(9))
        expected = expected + 0.5 * aux.load_balance_loss + 0.25 * aux.z_loss
    torch.testing.assert_close(out.aux_loss, expected)


def test_bad_inputs_raise_value_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="LongTensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, past \+ T\) = \(1, 3\)"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.tensor([[2, 1]]))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, temperature=1.0, top_p=0.0)


def test_gradients_reach_alpha_router_moe_router_and_experts():
    model = tiny_model()
    ids = torch.randint(0, 97, (4, 16))
    model(ids, labels=ids).loss.backward()
    for layer in model.layers:
        assert layer.router.proj.weight.grad.abs().sum() > 0
        assert layer.moe.router.weight.grad.abs().sum() > 0
        assert sum(e.w1.weight.grad.abs().sum() for e in layer.moe.experts if e.w1.weight.grad is not None) > 0
        assert layer.ssm.A_log.grad.abs().sum() > 0 and layer.attn.gate_proj.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 97, (2, 12))
    grads = []
    for use_checkpoint in (False, True):
        model = tiny_model(seed=1)
        model.set_grad_checkpointing(use_checkpoint)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# ---------------------------------------------------------------- generation
def test_cached_decoding_gives_the_logits_of_the_full_forward():
    model = tiny_model(seed=2).eval()
    ids = torch.randint(0, 97, (2, 13))
    full = model(ids).logits
    cache = model.new_cache()
    parts = [model(ids[:, :5], past_key_values=cache).logits, model(ids[:, 5:8], past_key_values=cache).logits]
    parts += [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(8, 13)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ssm_type", ["mamba1", "mamba2"])
def test_greedy_generate_with_cache_equals_without(ssm_type):
    model = tiny_model(seed=3, ssm_type=ssm_type)
    prompt = torch.randint(0, 97, (3, 7))
    cached = model.generate(prompt, max_new_tokens=24)
    uncached = model.generate(prompt, max_new_tokens=24, use_cache=False)
    assert cached.shape == (3, 31) and torch.equal(cached[:, :7], prompt)
    assert torch.equal(cached, uncached)
    assert model.training  # generate restores the mode


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k():
    model = tiny_model(seed=4)
    prompt = torch.randint(0, 97, (2, 5))
    runs = [
        model.generate(prompt, 12, temperature=1.3, top_k=3, top_p=0.9, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    model.eval()
    with torch.no_grad():
        one = model.generate(prompt, 1, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(0))
        assert torch.equal(one, model.generate(prompt, 1))  # top_k=1 is greedy


def test_eos_stops_generation_and_pads_finished_rows():
    model = tiny_model(seed=5)
    prompt = torch.randint(0, 97, (1, 4))
    greedy = model.generate(prompt, 10)
    eos = int(greedy[0, 6])  # the third new token
    out = model.generate(prompt, 10, eos_token_id=eos)
    first = (greedy[0, 4:] == eos).nonzero()[0].item() + 4
    assert out.shape[1] == first + 1 and out[0, -1].item() == eos


# ---------------------------------------------------------------- saving
def test_save_pretrained_round_trip_stores_the_tied_head_once(tmp_path):
    model = tiny_model(seed=6).eval()
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_file(target / "model.safetensors")
    assert json.loads((target / "config.json").read_text()) == dataclasses.asdict(model.config)
    loaded = ESHModel.from_pretrained(target).eval()
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # saving again into the directory keeps files that others put there (a tokenizer)
    (target / "tokenizer.json").write_text("{}")
    model.save_pretrained(target)
    assert (target / "tokenizer.json").exists()
    assert not [p for p in target.iterdir() if p.name.startswith(".")]
    # and the registry loads it too
    again = esh.create_model("esh_lm_small", checkpoint_path=str(target), **_tiny_overrides())
    assert torch.equal(again.eval()(ids).logits, model(ids).logits)


def _tiny_overrides() -> dict:
    small = dataclasses.asdict(esh_small())
    return {k: v for k, v in dataclasses.asdict(tiny_config()).items() if small[k] != v}


def test_from_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        ESHModel.from_pretrained(tmp_path)
    tiny_model().save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="shape mismatch|does not fit"):
        esh.create_model("esh_lm_small", checkpoint_path=str(tmp_path / "a"), **{**_tiny_overrides(), "d_model": 64})


# ---------------------------------------------------------------- baseline
def test_mamba_lm_baseline_follows_the_same_contract():
    torch.manual_seed(0)
    model = MambaLM(vocab_size=50, d_model=32, n_layers=2)
    ids = torch.randint(0, 50, (2, 8))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 8, 50) and out.loss is out.ce_loss and out.aux_loss.item() == 0
    assert model.lm_head.weight is model.embed_tokens.weight
    out.loss.backward()
    assert model.layers[0].mixer.A_log.grad.abs().sum() > 0
    assert model.generate(ids, 3).shape == (2, 11)


@pytest.mark.slow
def test_the_esh_lm_does_not_import_transformers():
    import subprocess
    import sys

    script = (
        "import sys, torch, esh\n"
        "from esh.model import esh_small\n"
        "m = esh.ESHModel(esh.ESHConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, expert_hidden=16))\n"
        "m.generate(torch.zeros(1, 2, dtype=torch.long), 2)\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------- no host syncs on CUDA
def _as_on_cuda(monkeypatch, model: ESHModel) -> None:
    """Take the paths a CUDA input takes: device-side value checks, padded MoE dispatch."""
    import esh.models.lm_common as lm_common

    monkeypatch.setattr(lm_common, "checks_on_device", lambda t: True)
    for layer in model.layers:
        layer.moe.dispatch = "padded"


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_forward_backward_and_decode_steps_read_nothing_on_the_host_on_cuda(monkeypatch, capacity_factor):
    from host_syncs import HostSyncs

    model = tiny_model(capacity_factor=capacity_factor)
    _as_on_cuda(monkeypatch, model)
    ids = torch.randint(0, 97, (2, 9))
    with HostSyncs() as syncs:
        model(ids, labels=ids).loss.backward()
    assert syncs.ops == []
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, use_cache=True, past_key_values=cache)
        with HostSyncs() as syncs:
            model(ids[:, :1], use_cache=True, past_key_values=cache)
    assert syncs.ops == []


def test_the_device_side_range_check_rejects_out_of_range_ids(monkeypatch):
    model = tiny_model()
    _as_on_cuda(monkeypatch, model)
    model(torch.randint(0, 97, (2, 5)))
    # on a CPU tensor the asynchronous assert fails at once; on CUDA at the next sync
    with pytest.raises(RuntimeError, match=r"input_ids must lie in \[0, 97\)"):
        model(torch.tensor([[1, 97]]))


def test_moe_stats_are_read_from_the_device_when_first_accessed():
    from host_syncs import HostSyncs

    model = tiny_model()
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids)
    with HostSyncs() as syncs:
        tensors = out.moe_stats.tensors()
        assert len(out.moe_stats) == 5 and "z_loss" in out.moe_stats
    assert syncs.ops == [] and all(t.dim() == 0 for t in tensors.values())
    stats = dict(out.moe_stats)
    assert stats == {k: t.item() for k, t in tensors.items()}
    assert stats["alpha_mean"] == pytest.approx(torch.stack([a.mean() for a in out.alphas]).mean().item())
    assert stats["max_expert_fraction"] >= 1 / model.config.n_experts
