"""The plain transformers engine (``engine: hf``): same outputs as vLLM, no vLLM needed.

Prompts are decoded together, left-padded, with a KV cache. Each step samples from the logits
after temperature, top-k and top-p, and records the sampled token's raw log-probability
(log-softmax before those), matching vLLM's ``raw_logprobs``. A row stops at its first EOS
(kept as its last token, finish reason ``"stop"``) or after ``max_new_tokens`` (``"length"``).
The model runs on CPU in the generator's dtype; logits are taken in float32 before sampling.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from rlfleet.actors.engine import Completion, SamplingSpec, check_prompts, engine_dtype
from rlfleet.common.config import Dtype


class HFEngine:
    def __init__(
        self,
        model_dir: str | Path,
        seed: int,
        trust_remote_code: bool = False,
        dtype: Dtype | None = None,
    ) -> None:
        """``dtype``: the generator's (``GeneratorConfig.dtype``); None is float32."""
        from transformers import AutoModelForCausalLM

        self._model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=engine_dtype(dtype),
            trust_remote_code=trust_remote_code,
        )
        self._model.eval()
        config = self._model.config
        eos = self._model.generation_config.eos_token_id
        self._eos_ids = _as_list(config.eos_token_id if eos is None else eos)
        self._pad_id = self._eos_ids[0] if self._eos_ids else 0
        self._context = getattr(config, "n_positions", None) or config.max_position_embeddings
        self._rng = torch.Generator().manual_seed(seed)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the tensors into the parameters of the same names (copying casts them to the
        engine's dtype)."""
        unexpected = self._model.load_state_dict(dict(named_tensors), strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"the model has no parameters named {unexpected}")

    def sleep(self) -> None:
        """Nothing to free: this engine runs on CPU."""

    def wake_up(self) -> None:
        """Nothing to take back (see ``sleep``)."""

    @torch.inference_mode()
    @property
    def context(self) -> int:
        """The most tokens (prompt and completion) one sequence may hold."""
        return self._context

    def generate(self, prompt_ids: list[list[int]], params: SamplingSpec) -> list[Completion]:
        check_prompts(prompt_ids, params, self._context)
        if not prompt_ids:
            return []
        rngs = self._row_generators(params, len(prompt_ids))
        input_ids, mask = self._left_pad(prompt_ids)
        tokens, logprobs = [], []
        stop_ids = self._eos_ids + list(params.stop_token_ids)
        finished = torch.zeros(len(prompt_ids), dtype=torch.bool)
        past = None
        for _ in range(params.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
            out = self._model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            logits = out.logits[:, -1].float()
            next_ids = _sample(logits, params, rngs)
            tokens.append(next_ids)
            logprobs.append(torch.log_softmax(logits, -1).gather(1, next_ids[:, None])[:, 0])
            finished |= torch.isin(next_ids, torch.tensor(stop_ids))
            if finished.all():
                break
            input_ids = next_ids[:, None]
            mask = torch.cat([mask, torch.ones_like(input_ids)], dim=1)
        return self._completions(torch.stack(tokens, 1), torch.stack(logprobs, 1), stop_ids)

    def _row_generators(self, params: SamplingSpec, n: int) -> list[torch.Generator]:
        if params.seeds is None:
            return [self._rng] * n
        return [torch.Generator().manual_seed(seed) for seed in params.seeds]

    def _left_pad(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        return input_ids, mask

    @staticmethod
    def _completions(
        tokens: torch.Tensor, logprobs: torch.Tensor, stop_ids: list[int]
    ) -> list[Completion]:
        """Cut each row after its first stop id; tokens decoded past it are discarded."""
        completions = []
        for row_tokens, row_logprobs in zip(tokens.tolist(), logprobs.tolist(), strict=True):
            stop = next((i for i, t in enumerate(row_tokens) if t in stop_ids), None)
            end = len(row_tokens) if stop is None else stop + 1
            completions.append(
                Completion(
                    token_ids=row_tokens[:end],
                    logprobs=row_logprobs[:end],
                    finish_reason="length" if stop is None else "stop",
                )
            )
        return completions


def _as_list(token_ids: int | list[int] | None) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


def _sample(
    logits: torch.Tensor, params: SamplingSpec, rngs: list[torch.Generator]
) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a draw after top-k and top-p.

    As in vLLM, temperature scales the logits first; top-k and top-p then filter them.
    """
    if params.temperature == 0:
        return logits.argmax(-1)
    scaled = _filter_top_p(_filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    probs = torch.softmax(scaled, -1)
    return torch.cat(
        [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, rngs, strict=True)]
    )


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities first sum to at least ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, -1)
    mass_before = probs.cumsum(-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
