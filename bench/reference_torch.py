"""The authors' training step and decoding, re-implemented with transformers + torch.

What the reference trainer (`Seq2SeqTrainer` subclass + `T5ForConditionalGeneration`)
does per step of distilling step-by-step:

- the `predict:` half and the `explain:` half of a batch are each padded to
  their own longest member (labels padded with -100);
- two forward passes, one per half, each giving HF's mean token loss;
- loss = alpha * L_label + (1 - alpha) * L_rationale, one backward through both,
  AdamW (lr 5e-5);
- with `--grad_steps` > 1 (HF's gradient accumulation), the batch is split into
  that many parts, each part's loss / grad_steps is backpropagated, then one
  optimizer step;
- decoding is `model.generate` (greedy) on `predict:` inputs;
- `--bf16` is HF's mixed precision: float32 weights and optimizer, forward
  passes under `torch.autocast(bfloat16)`.

Standard finetuning is the same with the label half only. Token ids come from
the caller, so both implementations see identical data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import transformers

IGNORE = -100


def build_model(hf_config: dict, seed: int = 0) -> transformers.T5ForConditionalGeneration:
  """A randomly initialised model; a T5 v1.1 config gets its own (untied) output head,
  which transformers 5 would otherwise tie to the embedding."""
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config))
  if not hf_config.get('tie_word_embeddings', True):
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
  return model


def device() -> torch.device:
  """Where the reference runs: the GPU when there is one, as the authors train."""
  return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def precision(model: torch.nn.Module, autocast_dtype: torch.dtype | None):
  """HF Trainer's `--bf16`: autocast over float32 weights; a no-op without a dtype."""
  if autocast_dtype is None:
    return contextlib.nullcontext()
  return torch.autocast(next(model.parameters()).device.type, dtype=autocast_dtype)


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
  """[n, longest] int64, right-padded with `value` (the DataCollatorForSeq2Seq layout)."""
  longest = max(len(r) for r in rows)
  return torch.tensor([list(r) + [value] * (longest - len(r)) for r in rows], dtype=torch.long)


def half(
    inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
) -> dict[str, torch.Tensor]:
  """One task's half of a batch, padded to its own longest input and target."""
  input_ids = pad(inputs, 0)
  return {
      'input_ids': input_ids,
      'attention_mask': (input_ids != 0).long(),
      'labels': pad(targets, IGNORE),
  }


def step_by_step_loss(
    model: transformers.T5ForConditionalGeneration,
    label_half: dict[str, torch.Tensor],
    rationale_half: dict[str, torch.Tensor] | None,
    alpha: float = 0.5,
) -> torch.Tensor:
  """alpha * L_label + (1 - alpha) * L_rationale from two forward passes."""
  label_loss = model(**label_half).loss
  if rationale_half is None:
    return label_loss
  return alpha * label_loss + (1.0 - alpha) * model(**rationale_half).loss


class ReferenceTrainer:
  """AdamW steps of the reference objective."""

  def __init__(
      self,
      model: transformers.T5ForConditionalGeneration,
      learning_rate: float = 5e-5,
      alpha: float = 0.5,
      autocast_dtype: torch.dtype | None = None,
  ):
    self.model = model.train()
    self.alpha = alpha
    self.autocast_dtype = autocast_dtype
    # HF's default optimizer since torch 2.8 ('adamw_torch_fused'); weight decay 0 as theirs.
    self.optimizer = torch.optim.AdamW(
        model.parameters(), lr=learning_rate, weight_decay=0.0, fused=True
    )

  def step(
      self, parts: Sequence[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]]
  ) -> float:
    """One optimizer step over (label half, rationale half) parts, accumulated as HF does.
    The halves are moved to the model's device here, as the Trainer does per step."""
    self.optimizer.zero_grad(set_to_none=True)
    where = next(self.model.parameters()).device
    total = torch.zeros((), device=where)  # read once, after the step, as HF logs it
    for label_half, rationale_half in parts:
      label_half = {k: v.to(where) for k, v in label_half.items()}
      if rationale_half is not None:
        rationale_half = {k: v.to(where) for k, v in rationale_half.items()}
      with precision(self.model, self.autocast_dtype):
        loss = step_by_step_loss(self.model, label_half, rationale_half, self.alpha)
      loss = loss / len(parts)
      loss.backward()
      total += loss.detach().float()
    self.optimizer.step()
    return float(total)


@torch.no_grad()
def generate(
    model: transformers.T5ForConditionalGeneration,
    inputs: Sequence[Sequence[int]],
    max_new_tokens: int,
    autocast_dtype: torch.dtype | None = None,
) -> list[list[int]]:
  """Greedy decoding with `model.generate`, as the reference evaluates."""
  model.eval()
  input_ids = pad(inputs, 0).to(next(model.parameters()).device)
  with precision(model, autocast_dtype):
    out = model.generate(
        input_ids=input_ids,
        attention_mask=(input_ids != 0).long(),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
    )
  return out[:, 1:].tolist()
