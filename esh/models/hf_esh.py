"""ESH LM as a Hugging Face ``transformers`` model (needs the ``hf`` extra: transformers >= 5.23, < 6).

``ESHForCausalLM`` wraps the very modules of ``esh.models.esh_lm.ESHModel`` (under ``.model``), so
its weights are the ESH model's weights and ``from_esh`` / ``to_esh`` convert without copying
layouts. Its ``generate`` is transformers' own, with transformers' cache: the config declares
``layer_types = ["hybrid"] * n_layers``, so ``DynamicCache(config=...)`` holds, per layer, the
attention keys/values and the Mamba conv and recurrent states, and the ESH block code drives it
through the same calls (``update``, ``get_conv_state``, ``update_recurrent_state``, ...) as
esh's own ``ESHCache``.

Importing this module registers the classes with ``AutoConfig`` and ``AutoModelForCausalLM`` (model type ``"esh_lm"``)::

    import esh.models.hf_esh  # noqa: F401
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("path/to/saved")

Saved directories also carry this file and an ``auto_map``, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works in a process that
has ``esh`` installed but never imported this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from esh._compat import require
from esh.models.esh_lm import ESHConfig, ESHModel

_transformers = require("transformers", "hf", "The Hugging Face wrapper of ESH LM")
MIN_TRANSFORMERS = "5.23"  # the hybrid cache's get_conv_state / get_recurrent_state

from packaging import version as _version  # noqa: E402  (a dependency of transformers)

if _version.parse(_transformers.__version__) < _version.parse(MIN_TRANSFORMERS):
    raise ImportError(
        f"The Hugging Face wrapper of ESH LM needs transformers >= {MIN_TRANSFORMERS} (its hybrid cache); "
        f"found {_transformers.__version__}: pip install -U 'esh[hf]'"
    )

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402
from transformers.utils import ModelOutput  # noqa: E402

from esh.errors import InputError  # noqa: E402

__all__ = ["CACHE_FIELD", "ESHCausalLMOutput", "ESHForCausalLM", "ESHHFConfig"]

_ESH_FIELDS = {f.name: f for f in dataclasses.fields(ESHConfig)}


class ESHHFConfig(PretrainedConfig):
    """Every ``ESHConfig`` field, plus the names transformers reads (``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``tie_word_embeddings``, ``layer_types``)."""

    model_type = "esh_lm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs: Any):
        esh_kwargs = {}
        for name, f in _ESH_FIELDS.items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            esh_kwargs[name] = kwargs.pop(name, default)
        if "tie_word_embeddings" in kwargs:
            esh_kwargs["tie_embeddings"] = bool(kwargs.pop("tie_word_embeddings"))
        esh_config = ESHConfig(**esh_kwargs)  # validates
        for name, value in dataclasses.asdict(esh_config).items():
            setattr(self, name, value)
        self.hidden_size = esh_config.d_model
        self.num_hidden_layers = esh_config.n_layers
        self.num_attention_heads = esh_config.n_heads
        self.tie_word_embeddings = esh_config.tie_embeddings
        self.layer_types = ["hybrid"] * esh_config.n_layers  # attention + SSM state in every layer
        for derived in ("hidden_size", "num_hidden_layers", "num_attention_heads", "layer_types"):
            kwargs.pop(derived, None)
        super().__init__(**kwargs)

    def to_esh_config(self) -> ESHConfig:
        return ESHConfig(**{name: getattr(self, name) for name in _ESH_FIELDS})

    @classmethod
    def from_esh_config(cls, config: ESHConfig, **kwargs: Any) -> ESHHFConfig:
        return cls(**dataclasses.asdict(config), **kwargs)


# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to ``cache``;
# the output carries it under the installed release's name, so ``generate`` finds it.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

ESHCausalLMOutput = dataclasses.make_dataclass(
    "ESHCausalLMOutput",
    [
        (name, Any, dataclasses.field(default=None))
        for name in ("loss", "logits", CACHE_FIELD, "aux_loss", "ce_loss", "alphas")
    ],
    bases=(ModelOutput,),
    namespace={
        "__module__": __name__,
        "__doc__": f"""``loss`` (cross-entropy + weighted MoE losses), ``logits``, ``{CACHE_FIELD}`` (the
        hybrid cache, under the installed transformers' name for it), ``aux_loss`` (weighted MoE
        load-balancing + z-loss, summed over layers), ``ce_loss``, ``alphas`` (per layer (batch, T)
        router values).""",
    },
)


class ESHPreTrainedModel(PreTrainedModel):
    config_class = ESHHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ESHBlock"]
    _supports_sdpa = True
    _is_stateful = True
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module: torch.nn.Module) -> None:
        # ESHModel's own per-module init; transformers skips the tensors it loaded from a checkpoint
        model = self.__dict__.get("_modules", {}).get("model")
        if isinstance(model, ESHModel):
            model._init_weights(module)


class ESHForCausalLM(ESHPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ESHHFConfig):
        super().__init__(config)
        self.model = ESHModel(config.to_esh_config())
        self.post_init()

    # ---- conversion
    @classmethod
    def from_esh(cls, model: ESHModel) -> ESHForCausalLM:
        """A transformers model with a copy of ``model``'s weights."""
        hf = cls(ESHHFConfig.from_esh_config(model.config))
        hf.model.load_state_dict(model.state_dict())
        return hf.to(next(model.parameters()).device)

    def to_esh(self) -> ESHModel:
        """The wrapped ``ESHModel`` (shared modules, not a copy)."""
        return self.model

    # ---- transformers hooks
    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.model.set_grad_checkpointing(True)

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        self.model.set_grad_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self.model.set_grad_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.grad_checkpointing

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Any | None = None,
        **kwargs: Any,
    ) -> ModelOutput:
        """``input_ids`` (batch, T); ``cache`` (transformers >= 5.24's name; ``past_key_values``
        before it, both accepted) a ``DynamicCache`` built from this config, made here when
        ``use_cache`` and none is given. ``attention_mask`` (batch, past + T) may pad on the left or
        the right; ``position_ids`` default to the real tokens counted from 0."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise InputError("ESHForCausalLM: pass the cache once, as cache= (or past_key_values=), not both")
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is not None or input_ids is None:
            raise InputError("ESHForCausalLM takes input_ids (inputs_embeds is not supported)")
        if use_cache is None:
            use_cache = cache is not None or getattr(self.config, "use_cache", False)
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        out = self.model(
            input_ids,
            labels=labels,
            past_key_values=cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep if labels is None else 0,
        )
        return ESHCausalLMOutput(
            loss=out.loss,
            logits=out.logits,
            aux_loss=out.aux_loss,
            ce_loss=out.ce_loss,
            alphas=tuple(out.alphas),
            **{CACHE_FIELD: cache},
        )


AutoConfig.register("esh_lm", ESHHFConfig, exist_ok=True)
AutoModelForCausalLM.register(ESHHFConfig, ESHForCausalLM, exist_ok=True)
ESHHFConfig.register_for_auto_class()
ESHForCausalLM.register_for_auto_class("AutoModelForCausalLM")
