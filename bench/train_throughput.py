"""Train-step throughput: our fused, packed step versus the reference's two-pass step.

Both sides train the same model config from the same weights on the same real
examples (SVAMP and CQA with their PaLM rationales), with the same batch of
examples and vocabulary, timed in one process, interleaved A, B, A, B after
warm-up. Peak memory is measured in a child process per side. Prints one JSON
object. On a GPU both sides run there; `--prepared` lets a host without
TensorFlow (a GPU box) run from inputs prepared where the data is.

    python bench/train_throughput.py --config=small --variant=step_by_step

`--sides=ours` times our step alone (no reference model is built), e.g. to find
the largest model one device trains: `--config=xl --sides=ours --remat`, with
`--optimizer=adafactor` if AdamW's state does not fit. `--vocab_size=32128`
gives both sides T5's SentencePiece-sized head (the ids stay bytes), and
`--loss_chunk_length` has our loss take its logits a chunk at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import torch

from bench import harness, reference_torch
from dsbs_jax import losses, network, optimizers, partitioning, trainer

BATCHES = 16  # our distinct packed batches, cycled
# What each --sides times; a memory child runs for each.
SIDES = {'both': ('ours', 'reference'), 'ours': ('ours',)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='mini', choices=sorted(harness.CONFIGS))
  p.add_argument('--variant', default='step_by_step', choices=['step_by_step', 'standard'])
  p.add_argument('--datasets', default='svamp,cqa')
  p.add_argument('--batch_size', type=int, default=64, help='examples per step (reference)')
  p.add_argument('--inputs', type=int, default=512, help='input feature length')
  p.add_argument('--targets', type=int, default=384, help='target feature length')
  p.add_argument(
      '--rows',
      type=int,
      default=0,
      help='our packed rows per step; 0 picks the rows that hold batch_size examples',
  )
  p.add_argument(
      '--grad_steps',
      type=int,
      default=1,
      help="gradient accumulation on both sides (the authors' --grad_steps): our "
      'microbatches, their HF accumulation; T5 1.1 small at batch 64 needs 2',
  )
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument(
      '--remat',
      action='store_true',
      help='our layers recompute their activations in the backward pass '
      "(T5Config.remat); the authors' trainer does not checkpoint",
  )
  p.add_argument(
      '--attention_block_size',
      type=int,
      default=network.T5Config.attention_block_size,
      help='query rows our attention takes at a time (T5Config.attention_block_size)',
  )
  p.add_argument(
      '--bfloat16_attention_logits',
      action='store_true',
      help="our attention's logits and softmax in bfloat16, as T5X's default "
      '(T5Config.float32_attention_logits=False); needs --dtype=bfloat16',
  )
  p.add_argument(
      '--vocab_size',
      type=int,
      default=0,
      help="both sides' output vocabulary (0: the config's 384, the byte vocabulary's); "
      "32128 is T5's SentencePiece head, whose logits dominate a step's activations",
  )
  p.add_argument(
      '--loss_chunk_length',
      type=int,
      default=0,
      help='target positions whose logits our loss computes at a time '
      '(StepByStepModel.loss_chunk_length); 0: all at once',
  )
  p.add_argument(
      '--sides',
      default='both',
      choices=sorted(SIDES),
      help='ours: time our step alone, building no reference model',
  )
  p.add_argument(
      '--optimizer',
      default='adamw',
      choices=['adamw', 'adafactor'],
      help="ours; adafactor needs --sides=ours, as the reference's is AdamW",
  )
  harness.add_shared_flags(p)
  args = p.parse_args(argv)
  if args.optimizer != 'adamw' and 'reference' in SIDES[args.sides]:
    p.error(f'--optimizer={args.optimizer} needs --sides=ours: the reference trains with AdamW')
  if args.bfloat16_attention_logits and args.dtype != 'bfloat16':
    p.error('--bfloat16_attention_logits needs --dtype=bfloat16 (float32 logits already)')
  if args.vocab_size < 0 or args.loss_chunk_length < 0:
    p.error('--vocab_size and --loss_chunk_length must be >= 0 (0: the default)')
  return args


class Ours:
  """Our jitted, packed, single-pass step (alpha = 0.5 and lr 5e-5 as the reference,
  with its AdamW unless `optimizer` says otherwise).

  params None: the step trains its own initialisation (`--sides=ours`).
  """

  def __init__(
      self,
      config,
      params,
      vocab,
      batches,
      rationale,
      grad_steps=1,
      optimizer='adamw',
      loss_chunk_length=None,
  ):
    weights = losses.task_weights(alpha=0.5) if rationale else (1.0, 0.0)
    model = harness.student(
        config, vocab, task_weights=weights, loss_chunk_length=loss_chunk_length
    )
    self.trainer = trainer.Trainer(
        model,
        optimizers.create_optimizer(optimizer, 5e-5),
        partitioning.Partitioner(devices=jax.devices()[:1]),
        num_microbatches=grad_steps,
    )
    self.batches = itertools.cycle(batches)
    first, _ = batches[0]
    shapes = {k: first[k].shape for k in ('encoder_input_tokens', 'decoder_input_tokens')}
    state = self.trainer.create_state(shapes)
    if params is not None:
      state = state.replace(
          params=jax.device_put(params, self.trainer.state_shardings(shapes).params)
      )
    self.state = state
    self.step_fn = self.trainer.compile_train_step(shapes)
    self.first = first

  def matmuls(self):
    """The dot products one step computes (`harness.matmuls`)."""
    batch = self.trainer.partitioner.shard_batch(self.first)
    with self.trainer.partitioner.activate():
      return harness.matmuls(self.trainer.train_step, self.state, batch)

  def step(self):
    batch, n_examples = next(self.batches)
    start = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.trainer.partitioner.shard_batch(batch))
    loss = float(metrics['loss'])
    elapsed = time.perf_counter() - start
    enc = int((batch['encoder_input_tokens'] > 0).sum())
    dec = int((batch['decoder_target_tokens'] > 0).sum())
    slots = batch['encoder_input_tokens'].size + batch['decoder_target_tokens'].size
    return elapsed, n_examples, enc, dec, slots, loss


class Reference:
  """The reference step on the next `batch_size` examples, in `grad_steps` parts."""

  def __init__(self, model, rows, batch_size, rationale, grad_steps=1, autocast_dtype=None):
    self.trainer = reference_torch.ReferenceTrainer(model, alpha=0.5, autocast_dtype=autocast_dtype)
    self.rows = itertools.cycle(rows)
    self.batch_size, self.rationale, self.grad_steps = batch_size, rationale, grad_steps

  def step(self):
    chunk = [next(self.rows) for _ in range(self.batch_size)]
    parts, halves = [], []
    size = -(-len(chunk) // self.grad_steps)
    for part in (chunk[i : i + size] for i in range(0, len(chunk), size)):
      label = reference_torch.half([r['predict'] for r in part], [r['label'] for r in part])
      rationale = None
      if self.rationale:
        rationale = reference_torch.half(
            [r['explain'] for r in part], [r['rationale'] for r in part]
        )
      parts.append((label, rationale))
      halves += [h for h in (label, rationale) if h is not None]
    start = time.perf_counter()
    loss = self.trainer.step(parts)
    elapsed = time.perf_counter() - start
    enc = sum(int(h['attention_mask'].sum()) for h in halves)
    dec = sum(int((h['labels'] != reference_torch.IGNORE).sum()) for h in halves)
    slots = sum(h['input_ids'].numel() + h['labels'].numel() for h in halves)
    return elapsed, len(chunk), enc, dec, slots, loss


def prepared_key(args) -> dict:
  """The flags the prepared inputs depend on."""
  return {
      'benchmark': 'train_throughput',
      'datasets': args.datasets,
      'lengths': {'inputs': args.inputs, 'targets': args.targets},
      'variant': args.variant,
      'batch_size': args.batch_size,
      'rows': args.rows,
      'grad_steps': args.grad_steps,
      'packing': 'first-fit, each batch_size examples alone',
  }


def build(args):
  config = harness.CONFIGS[args.config]
  config = dataclasses.replace(
      config,
      dtype=args.dtype,
      remat=args.remat,
      attention_block_size=args.attention_block_size,
      float32_attention_logits=not args.bfloat16_attention_logits,
      vocab_size=args.vocab_size or config.vocab_size,
  )
  lengths = {'inputs': args.inputs, 'targets': args.targets}
  rationale = args.variant == 'step_by_step'
  inputs = harness.prepared(
      args.prepared, prepared_key(args), lambda: _inputs(args, lengths, rationale)
  )
  with_reference = 'reference' in SIDES[args.sides]
  torch_model, params = harness.same_weights(config) if with_reference else (None, None)
  return config, lengths, inputs, rationale, torch_model, params


def _inputs(args, lengths, rationale) -> dict:
  """The examples (as token ids), our packed batches of them, and the vocabulary's shape."""
  from bench import examples  # seqio + TensorFlow: only where the inputs are built

  rows = examples.examples(args.datasets.split(','), 'train', lengths)
  packing = {'rationale': rationale, 'step_examples': args.batch_size}
  if args.rows:
    packed_rows = args.rows
  else:  # the rows that hold about batch_size examples on average
    sample = list(itertools.islice(examples.packed_batches(rows, lengths, 8, **packing), 8))
    per_row = sum(n for _, n in sample) / (8 * len(sample))
    packed_rows = max(1, round(args.batch_size / per_row))
  packed_rows = -(-packed_rows // args.grad_steps) * args.grad_steps
  batches = list(
      itertools.islice(examples.packed_batches(rows, lengths, packed_rows, **packing), BATCHES)
  )
  return {
      'rows': rows,
      'batches': batches,
      'packed_rows': packed_rows,
      'vocab': examples.vocab_shape(),
  }


def sides(args, config, inputs, rationale, torch_model, params):
  """Each side's constructor (ours alone with `--sides=ours`), so a memory child
  process builds only its own."""
  autocast = torch.bfloat16 if args.dtype == 'bfloat16' else None
  made = {
      'ours': lambda: Ours(
          config,
          params,
          inputs['vocab'],
          inputs['batches'],
          rationale,
          args.grad_steps,
          args.optimizer,
          args.loss_chunk_length or None,
      ),
  }
  if 'reference' in SIDES[args.sides]:
    made['reference'] = lambda: Reference(
        torch_model, inputs['rows'], args.batch_size, rationale, args.grad_steps, autocast
    )
  return made


def measure(side, steps, warmup):
  for _ in range(warmup):
    side.step()
  return [side.step() for _ in range(steps)]


def rates(results, config, lengths, peak):
  times = [r[0] for r in results]
  median = float(np.median(times))
  per_step = np.mean([r[1:] for r in results], axis=0)
  examples, enc, dec, slots = per_step[:4]
  flops = harness.train_flops(config, enc, dec, lengths['inputs'], lengths['targets'])
  return {
      'median_step_s': median,
      'examples_per_s': examples / median,
      'real_tokens_per_s': (enc + dec) / median,
      'padding_fraction': 1 - (enc + dec) / slots,
      'model_flops_per_s': flops / median,
      'flop_utilisation': flops / median / peak,
  }


def timed_steps(built: dict, dots, warmup: int, steps: int) -> tuple[dict, list[float]]:
  """Each side's step results after `warmup`, the sides interleaved, and our dots alone
  timed after each round, under the same conditions as the steps (when `dots`)."""
  results: dict[str, list] = {name: [] for name in built}
  dots_alone: list[float] = []
  for i in range(warmup + steps):
    this = {name: side.step() for name, side in built.items()}
    if i >= warmup:
      for name, result in this.items():
        results[name].append(result)
      if dots is not None:
        dots_alone.append(harness.matmul_seconds(dots))
    label = f'step {i + 1 - warmup}/{steps}' if i >= warmup else f'warm-up {i + 1}/{warmup}'
    harness.progress(
        f'{label}: '
        + ', '.join(f'{name} {result[0]:.3f}s' for name, result in this.items())
        + (f', our dots alone {dots_alone[-1]:.3f}s' if dots_alone else '')
    )
  return results, dots_alone


def memory_child(args):
  """Prints one side's peak memory (bytes) during steady-state steps, and what it held before
  them (model, optimizer state, data and framework; see `harness.reset_peak_memory`)."""
  config, _lengths, inputs, rationale, torch_model, params = build(args)
  side = sides(args, config, inputs, rationale, torch_model, params)[args.memory_side]()
  del torch_model, params
  measure(side, 0, 1)  # compilation and first allocations
  before = harness.reset_peak_memory(args.memory_side)
  measure(side, 2, 0)
  harness.print_child_memory(args.memory_side, before)


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(os.cpu_count())
  if args.memory_side:
    return memory_child(args)
  harness.check_prepared(args.prepared, prepared_key(args))
  memory = harness.children_memory(
      'bench/train_throughput.py',
      sys.argv[1:] if argv is None else list(argv),
      SIDES[args.sides],
  )
  config, lengths, inputs, rationale, torch_model, params = build(args)
  built = {
      name: make()
      for name, make in sides(args, config, inputs, rationale, torch_model, params).items()
  }
  peak = harness.matmul_peak_flops(args.dtype)
  harness.progress(
      f'{args.config}: {" and ".join(built)} built; matmul peak {peak / 1e12:.1f} TFLOP/s'
  )
  # Our dots alone bound what faster non-matmul code could gain over the reference.
  dots = built['ours'].matmuls() if 'reference' in built else None
  results, dots_alone = timed_steps(built, dots, args.warmup, args.steps)
  report = {name: rates(results[name], config, lengths, peak) | memory[name] for name in built}
  if 'reference' in report:
    report['ratio_ours_over_reference'] = harness.ratios(report['ours'], report['reference'])
    report['ours_matmuls_alone'] = harness.matmuls_alone(float(np.median(dots_alone)), report)
  print(
      json.dumps(
          {
              'benchmark': 'train_throughput',
              'config': args.config,
              'variant': args.variant,
              'datasets': args.datasets,
              'batch_examples': args.batch_size,
              'our_packed_rows': inputs['packed_rows'],
              'grad_steps': args.grad_steps,
              'remat': args.remat,
              'attention_block_size': args.attention_block_size,
              'float32_attention_logits': config.float32_attention_logits,
              'vocab_size': config.vocab_size,
              'loss_chunk_length': args.loss_chunk_length or None,
              'lengths': lengths,
              'dtype': args.dtype,
              'steps': args.steps,
              'sides': args.sides,
              'optimizer': args.optimizer,
              'machine': harness.machine(peak),
              **report,
          },
          indent=1,
      )
  )


if __name__ == '__main__':
  main()
