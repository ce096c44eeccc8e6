"""A causal language model with a scalar value head, saved as one Hugging Face checkpoint.

The value head's weights live in the wrapped model's checkpoint as ``v_head.summary.weight`` and
``v_head.summary.bias``: ``transformers.AutoModelForCausalLM.from_pretrained`` ignores them and
loads the policy, :meth:`AutoModelForCausalLMWithValueHead.from_pretrained` restores both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

V_HEAD_PREFIX = "v_head."
VALUE_HEAD_ARGS = ("summary_dropout_prob", "v_head_initializer_range", "v_head_init_strategy")


def _hidden_size(config: PretrainedConfig) -> int:
    """Width of the last hidden state (OPT-style models project to ``word_embed_proj_dim``)."""
    if hasattr(config, "word_embed_proj_dim"):
        return config.word_embed_proj_dim
    return config.hidden_size


class ValueHead(nn.Module):
    """Dropout, then a linear map from the last hidden state to one value per position."""

    def __init__(self, config: PretrainedConfig, summary_dropout_prob: float = 0.1) -> None:
        super().__init__()
        dropout_prob = getattr(config, "summary_dropout_prob", summary_dropout_prob)
        self.dropout = nn.Dropout(dropout_prob) if dropout_prob else nn.Identity()
        self.summary = nn.Linear(_hidden_size(config), 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.dropout(hidden_states)
        if output.dtype != self.summary.weight.dtype:
            output = output.to(self.summary.weight.dtype)
        return self.summary(output)


class AutoModelForCausalLMWithValueHead(nn.Module):
    """A ``transformers`` causal LM (``pretrained_model``) plus a :class:`ValueHead` (``v_head``).

    ``forward`` returns ``(logits in float32, loss, values)``. The value head is initialised by
    ``nn.Linear``'s default, or, with ``v_head_init_strategy="normal"``, from
    ``N(0, v_head_initializer_range)`` with a zero bias.
    """

    def __init__(
        self,
        pretrained_model: PreTrainedModel,
        summary_dropout_prob: float = 0.1,
        v_head_initializer_range: float = 0.2,
        v_head_init_strategy: str | None = None,
    ) -> None:
        super().__init__()
        if pretrained_model.get_output_embeddings() is None:
            raise ValueError("the model has no language-model head; wrap a causal LM")
        if v_head_init_strategy not in (None, "normal"):
            raise ValueError(
                f"v_head_init_strategy must be None or 'normal', got {v_head_init_strategy!r}"
            )
        self.pretrained_model = pretrained_model
        self.config = pretrained_model.config
        self.is_peft_model = False
        self.v_head = ValueHead(self.config, summary_dropout_prob=summary_dropout_prob)
        if v_head_init_strategy == "normal":
            self.v_head.summary.weight.data.normal_(mean=0.0, std=v_head_initializer_range)
            self.v_head.summary.bias.data.zero_()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str] | PreTrainedModel,
        *args,
        **kwargs,
    ) -> AutoModelForCausalLMWithValueHead:
        """Load a causal LM (a directory, hub name or model object) and wrap it.

        The value-head options (``summary_dropout_prob``, ``v_head_initializer_range``,
        ``v_head_init_strategy``) are taken from ``kwargs``; the rest go to
        ``AutoModelForCausalLM.from_pretrained``. A value head saved in the checkpoint is restored.
        """
        head_kwargs = {key: kwargs.pop(key) for key in VALUE_HEAD_ARGS if key in kwargs}
        if isinstance(pretrained_model_name_or_path, PreTrainedModel):
            model = cls(pretrained_model_name_or_path, **head_kwargs)
            saved_head = _value_head_from_state_dict(pretrained_model_name_or_path.state_dict())
        else:
            pretrained = AutoModelForCausalLM.from_pretrained(
                pretrained_model_name_or_path, *args, **kwargs
            )
            model = cls(pretrained, **head_kwargs)
            saved_head = _value_head_from_checkpoint(Path(pretrained_model_name_or_path))
        if saved_head:
            model.v_head.load_state_dict(saved_head)
        return model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        return_past_key_values: bool = False,
        **kwargs,
    ) -> tuple:
        kwargs["output_hidden_states"] = True
        output = self.pretrained_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        values = self.v_head(output.hidden_states[-1]).squeeze(-1)
        logits = output.logits.float()
        if return_past_key_values:
            return logits, output.loss, values, output.past_key_values
        return logits, output.loss, values

    def generate(self, *args, **kwargs):
        """``generate`` of the wrapped model."""
        return self.pretrained_model.generate(*args, **kwargs)

    @property
    def backbone(self) -> nn.Module:
        """The transformer without its LM head (returns the last, final-normed hidden state)."""
        return self.pretrained_model.base_model

    @property
    def lm_head(self) -> nn.Module:
        return self.pretrained_model.get_output_embeddings()

    @property
    def current_device(self) -> torch.device:
        """The device the weights are on (TRL's wrapper attribute; scripts move inputs there)."""
        return next(self.parameters()).device

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The wrapped model's state dict (its own names) plus ``v_head.*`` (as parameters too
        with ``keep_vars=True``)."""
        state = self.pretrained_model.state_dict(*args, **kwargs)
        keep_vars = kwargs.get("keep_vars", False)
        for name, tensor in self.v_head.state_dict(keep_vars=keep_vars).items():
            state[f"{V_HEAD_PREFIX}{name}"] = tensor
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign=False):
        """Inverse of :meth:`state_dict`."""
        head = _value_head_from_state_dict(state_dict)
        policy = {k: v for k, v in state_dict.items() if not k.startswith(V_HEAD_PREFIX)}
        result = self.pretrained_model.load_state_dict(policy, strict=strict, assign=assign)
        self.v_head.load_state_dict(head, strict=strict, assign=assign)
        return result

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs) -> None:
        """One HF checkpoint (safetensors) with the policy and ``v_head.summary.*``."""
        kwargs.setdefault("state_dict", self.state_dict())
        self.pretrained_model.save_pretrained(save_directory, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """Push the wrapped model, value head included in its weights."""
        self.pretrained_model.v_head = self.v_head
        return self.pretrained_model.push_to_hub(*args, **kwargs)

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        self.pretrained_model.gradient_checkpointing_enable(*args, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.pretrained_model.gradient_checkpointing_disable()


def _value_head_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {
        key[len(V_HEAD_PREFIX) :]: value
        for key, value in state_dict.items()
        if key.startswith(V_HEAD_PREFIX)
    }


def _value_head_from_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """Read ``v_head.*`` from a local safetensors checkpoint (single file or sharded)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {weight_map[k] for k in weight_map if k.startswith(V_HEAD_PREFIX)}
    elif (directory / "model.safetensors").is_file():
        files = {"model.safetensors"}
    else:
        return {}
    head = {}
    for file in files:
        with safe_open(str(directory / file), framework="pt") as checkpoint:
            for key in checkpoint.keys():
                if key.startswith(V_HEAD_PREFIX):
                    head[key[len(V_HEAD_PREFIX) :]] = checkpoint.get_tensor(key)
    return head
