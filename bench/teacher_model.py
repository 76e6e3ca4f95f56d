"""A stand-in teacher: a small GPT-2 with a byte-level tokenizer, built from a config.

No weights can be downloaded here, so the teacher benches, the tests and the
README's teacher workflow use this model, saved with `save_pretrained` like
any HF causal LM. Untrained (`--train_steps=0`) it writes noise; trained for a
few hundred steps on the demo's problems in the zero-shot chain-of-thought
format (`prompts.Prompt.render` with `zero_shot`) it answers in the demo's
format, so `dsbs-teacher --task=demo --zero_shot` parses most of its answers.

    python -m bench.teacher_model --out=/tmp/teacher --train_steps=600
"""

from __future__ import annotations

import argparse
import json
import random
import time

EOS = '<|endoftext|>'


def _tokenizer():
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
  vocab[EOS] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS
  )


def build(out: str, width: int = 64, layers: int = 2, context: int = 2048, seed: int = 0):
  """Saves an untrained GPT-2 and its tokenizer to `out`; returns (model, tokenizer)."""
  import torch
  import transformers

  tokenizer = _tokenizer()
  torch.manual_seed(seed)
  config = transformers.GPT2Config(
      vocab_size=len(tokenizer),
      n_positions=context,
      n_embd=width,
      n_layer=layers,
      n_head=max(width // 32, 1),
      bos_token_id=tokenizer.eos_token_id,
      eos_token_id=tokenizer.eos_token_id,
  )
  model = transformers.GPT2LMHeadModel(config)
  model.save_pretrained(out)
  tokenizer.save_pretrained(out)
  return model, tokenizer


def train(out: str, steps: int, batch_size: int = 16, seed: int = 0) -> dict[str, float]:
  """Builds the model, then trains it on the demo's training problems rendered as
  zero-shot CoT prompts followed by the rationale, and saves it over `out`."""
  import torch

  from dsbs_jax import prompts
  from dsbs_jax.data import demo

  model, tokenizer = build(out, width=128, layers=2, context=512, seed=seed)
  prompt = prompts.resolve('demo', zero_shot=True)
  pairs = [(prompt.render(r['input']), f' {r["rationale"]}{EOS}') for r in demo.generate()['train']]
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
  rng = random.Random(seed)
  model.train()
  start, loss = time.perf_counter(), float('nan')
  for step in range(steps):
    chosen = rng.sample(pairs, batch_size)
    batch = tokenizer([q + a for q, a in chosen], return_tensors='pt', padding=True)
    labels = batch['input_ids'].masked_fill(batch['attention_mask'] == 0, -100)
    for row, (question, _) in enumerate(chosen):  # learn the answers, not the questions
      labels[row, : len(tokenizer(question)['input_ids'])] = -100
    out_ = model(**batch, labels=labels)
    out_.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    loss = out_.loss.item()
    if step % 100 == 0:
      print(f'step {step}/{steps} loss {loss:.3f}', flush=True)
  model.eval()
  model.save_pretrained(out)
  return {'steps': steps, 'final_loss': loss, 'seconds': time.perf_counter() - start}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--train_steps', type=int, default=0)
  args = parser.parse_args()
  if args.train_steps:
    print(json.dumps(train(args.out, args.train_steps)))
  else:
    build(args.out)
    print(json.dumps({'built': args.out}))


if __name__ == '__main__':
  main()
