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
- decoding is `model.generate` (greedy) on `predict:` inputs.

Standard finetuning is the same with the label half only. Token ids come from
the caller, so both implementations see identical data.
"""

from __future__ import annotations

from typing import Sequence

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


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
  """[n, longest] int64, right-padded with `value` (the DataCollatorForSeq2Seq layout)."""
  longest = max(len(r) for r in rows)
  return torch.tensor([list(r) + [value] * (longest - len(r)) for r in rows], dtype=torch.long)


def half(inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
         ) -> dict[str, torch.Tensor]:
  """One task's half of a batch, padded to its own longest input and target."""
  input_ids = pad(inputs, 0)
  return {'input_ids': input_ids, 'attention_mask': (input_ids != 0).long(),
          'labels': pad(targets, IGNORE)}


def step_by_step_loss(model: transformers.T5ForConditionalGeneration,
                      label_half: dict[str, torch.Tensor],
                      rationale_half: dict[str, torch.Tensor] | None,
                      alpha: float = 0.5) -> torch.Tensor:
  """alpha * L_label + (1 - alpha) * L_rationale from two forward passes."""
  label_loss = model(**label_half).loss
  if rationale_half is None:
    return label_loss
  return alpha * label_loss + (1.0 - alpha) * model(**rationale_half).loss


class ReferenceTrainer:
  """AdamW steps of the reference objective."""

  def __init__(self, model: transformers.T5ForConditionalGeneration, learning_rate: float = 5e-5,
               alpha: float = 0.5):
    self.model = model.train()
    self.alpha = alpha
    self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)

  def step(self, parts: Sequence[tuple[dict[str, torch.Tensor],
                                       dict[str, torch.Tensor] | None]]) -> float:
    """One optimizer step over (label half, rationale half) parts, accumulated as HF does."""
    self.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for label_half, rationale_half in parts:
      loss = step_by_step_loss(self.model, label_half, rationale_half, self.alpha) / len(parts)
      loss.backward()
      total += float(loss.detach())
    self.optimizer.step()
    return total


@torch.no_grad()
def generate(model: transformers.T5ForConditionalGeneration, inputs: Sequence[Sequence[int]],
             max_new_tokens: int) -> list[list[int]]:
  """Greedy decoding with `model.generate`, as the reference evaluates."""
  model.eval()
  input_ids = pad(inputs, 0)
  out = model.generate(input_ids=input_ids, attention_mask=(input_ids != 0).long(),
                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
  return out[:, 1:].tolist()
