"""Greedy label decoding (`predict:` only, as deployed): ours versus HF `generate`.

Same weights, same test-split inputs, same batch and maximum new tokens;
interleaved timing after warm-up; peak memory per side in a child process.
Prints one JSON object. `--prepared` as in train_throughput.py.

    python bench/decode_throughput.py --config=small
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import torch

from bench import harness, reference_torch
from dsbs_jax import decoding


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='mini', choices=sorted(harness.CONFIGS))
  p.add_argument('--datasets', default='svamp,cqa')
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--inputs', type=int, default=512)
  p.add_argument('--max_new_tokens', type=int, default=64, help="the reference's gen_max_len")
  p.add_argument('--batches', type=int, default=3)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  harness.add_shared_flags(p)
  return p.parse_args(argv)


def _inputs(args) -> dict:
  """`--batches` batches of `predict:` inputs as token ids, and the vocabulary's shape."""
  from bench import examples  # seqio + TensorFlow: only where the inputs are built

  rows = examples.examples(
      args.datasets.split(','), 'test', {'inputs': args.inputs, 'targets': args.max_new_tokens}
  )
  if len(rows) < args.batches * args.batch_size:
    raise ValueError(
        f'the test splits of {args.datasets} hold {len(rows)} examples, fewer than '
        f'--batches={args.batches} of --batch_size={args.batch_size}'
    )
  return {
      'batches': [
          [r['predict'] for r in rows[i : i + args.batch_size]]
          for i in range(0, args.batches * args.batch_size, args.batch_size)
      ],
      'vocab': examples.vocab_shape(),
  }


def build(args):
  config = dataclasses.replace(harness.CONFIGS[args.config], dtype=args.dtype)
  key = {
      'benchmark': 'decode_throughput',
      'datasets': args.datasets,
      'inputs': args.inputs,
      'batch_size': args.batch_size,
      'batches': args.batches,
      'max_new_tokens': args.max_new_tokens,
  }
  inputs = harness.prepared(args.prepared, key, lambda: _inputs(args))
  torch_model, params = harness.same_weights(config)
  params = jax.device_put(params)  # once, as a server holds them
  autocast = torch.bfloat16 if args.dtype == 'bfloat16' else None
  model = harness.student(config, inputs['vocab'])
  predict = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_length=args.max_new_tokens))

  def ours(rows):
    tokens = np.zeros((len(rows), args.inputs), np.int32)
    for i, r in enumerate(rows):
      tokens[i, : len(r)] = r
    batch = {
        'encoder_input_tokens': tokens,
        'decoder_input_tokens': np.zeros((len(rows), args.max_new_tokens), np.int32),
    }
    return np.asarray(predict(params, decoding.trim_inputs(batch, decoding.INPUT_LENGTH_MULTIPLE)))

  def reference(rows):
    return reference_torch.generate(torch_model, rows, args.max_new_tokens, autocast)

  return {'ours': ours, 'reference': reference}, inputs['batches']


def timed(fn, inputs):
  start = time.perf_counter()
  fn(inputs)
  return time.perf_counter() - start


def memory_child(args):
  """Prints one side's peak memory (bytes) while it decodes every batch, after a first
  pass that compiled each width and made the first allocations."""
  sides, batches = build(args)
  for b in batches:
    sides[args.memory_side](b)
  before = harness.reset_peak_memory(args.memory_side)
  for b in batches:
    sides[args.memory_side](b)
  harness.print_child_memory(args.memory_side, before)


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(os.cpu_count())
  if args.memory_side:
    return memory_child(args)
  memory = harness.children_memory(
      'bench/decode_throughput.py', sys.argv[1:] if argv is None else list(argv)
  )
  sides, batches = build(args)
  for name in sides:  # every batch once: each trimmed input width compiles before timing
    harness.progress(f'warm-up {name}: {sum(timed(sides[name], b) for b in batches):.3f}s')
  times = {name: [] for name in sides}
  for i, b in enumerate(batches):
    for name, fn in sides.items():
      times[name].append(timed(fn, b))
    harness.progress(
        f'batch {i + 1}/{len(batches)}: ours {times["ours"][-1]:.3f}s, '
        f'reference {times["reference"][-1]:.3f}s'
    )
  report = {}
  for name in sides:
    median = float(np.median(times[name]))
    report[name] = {
        'median_batch_s': median,
        'examples_per_s': args.batch_size / median,
        **memory[name],
    }
  report['ratio_ours_over_reference'] = {
      k: report['ours'][k] / report['reference'][k] for k in report['ours']
  }
  print(
      json.dumps(
          {
              'benchmark': 'decode_throughput',
              'config': args.config,
              'datasets': args.datasets,
              'batch_size': args.batch_size,
              'max_new_tokens': args.max_new_tokens,
              'dtype': args.dtype,
              'machine': harness.machine(),
              **report,
          },
          indent=1,
      )
  )


if __name__ == '__main__':
  main()
