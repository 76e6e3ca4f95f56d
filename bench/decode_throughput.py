"""Greedy label decoding (`predict:` only, as deployed): ours versus HF `generate`.

Same weights, the same `--batches` x `--batch_size` test-split inputs, the same
maximum new tokens. Each side decodes the whole set as its evaluation does:
ours as the Evaluator, longest inputs first (`decoding.length_sorted_batches`)
at widths chosen from the set (`decoding.batch_widths`); the reference in the
split's order, each batch padded to its longest. `ours_in_order` is ours
batched as the reference, to show what the sort brings (and that it changes
no prediction). `--devices=N` splits our batches over N devices, as the
Evaluator splits its batches over its mesh. Interleaved timing after a warm-up
pass; peak memory per side in a child process. Prints one JSON object.
`--prepared` as in train_throughput.py.

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
from dsbs_jax import decoding, partitioning


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='mini', choices=sorted(harness.CONFIGS))
  p.add_argument('--datasets', default='svamp,cqa')
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--inputs', type=int, default=512)
  p.add_argument('--max_new_tokens', type=int, default=64, help="the reference's gen_max_len")
  p.add_argument('--batches', type=int, default=3, help='the set is this many batches')
  p.add_argument('--repeats', type=int, default=3, help='timed passes over the set per side')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument(
      '--devices',
      type=int,
      default=1,
      help='split each of our batches over this many devices, as the Evaluator does over '
      'its mesh (N CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=N)',
  )
  p.add_argument(
      '--max_input_widths',
      type=int,
      default=decoding.MAX_INPUT_WIDTHS,
      help="the Evaluator's EvaluationConfig.max_input_widths: input widths per set",
  )
  harness.add_shared_flags(p)
  args = p.parse_args(argv)
  if args.max_input_widths < 1:
    p.error(f'--max_input_widths={args.max_input_widths}: must be >= 1')
  if args.devices < 1 or args.batch_size % args.devices:
    p.error(f'--devices={args.devices}: must be >= 1 and divide --batch_size={args.batch_size}')
  # Asked only when it matters: asking starts the backend (children_memory wants it idle).
  if args.devices > 1 and args.devices > jax.device_count():
    p.error(f'--devices={args.devices}: JAX sees {jax.device_count()} device(s)')
  return args


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


def prepared_key(args) -> dict:
  """The flags the prepared inputs depend on."""
  return {
      'benchmark': 'decode_throughput',
      'datasets': args.datasets,
      'inputs': args.inputs,
      'batch_size': args.batch_size,
      'batches': args.batches,
      'max_new_tokens': args.max_new_tokens,
  }


def build(args):
  config = dataclasses.replace(harness.CONFIGS[args.config], dtype=args.dtype)
  inputs = harness.prepared(args.prepared, prepared_key(args), lambda: _inputs(args))
  torch_model, params = harness.same_weights(config)
  partitioner = partitioning.Partitioner(devices=jax.devices()[: args.devices])
  params = jax.device_put(params, partitioner.replicated())  # once, as a server holds them
  autocast = torch.bfloat16 if args.dtype == 'bfloat16' else None
  model = harness.student(config, inputs['vocab'])
  predict = jax.jit(
      lambda p, b: model.predict_batch(p, b, max_decode_length=args.max_new_tokens),
      out_shardings=partitioner.batch_sharding(),
  )

  def decode(rows, chosen, width):
    tokens = np.zeros((args.batch_size, args.inputs), np.int32)
    for i, r in enumerate(chosen):
      tokens[i, : len(rows[r])] = rows[r]
    batch = {
        'encoder_input_tokens': tokens,
        'decoder_input_tokens': np.zeros((args.batch_size, args.max_new_tokens), np.int32),
    }
    with partitioner.activate():
      out = predict(params, partitioner.shard_batch(decoding.with_input_width(batch, width)))
    return np.asarray(out)[: len(chosen)].tolist()

  def ours(rows, batches=None):
    lengths = np.array([len(r) for r in rows])
    batches = batches or decoding.length_sorted_batches(lengths, args.batch_size)
    widths = decoding.batch_widths(lengths, batches, args.max_input_widths)
    predictions: list = [None] * len(rows)
    for chosen, width in zip(batches, widths, strict=True):
      for i, tokens in zip(chosen, decode(rows, chosen, int(width)), strict=True):
        predictions[i] = tokens
    return predictions

  def in_order(rows):
    return ours(
        rows,
        [
            np.arange(i, min(i + args.batch_size, len(rows)))
            for i in range(0, len(rows), args.batch_size)
        ],
    )

  def reference(rows):
    return [
        tokens
        for i in range(0, len(rows), args.batch_size)
        for tokens in reference_torch.generate(
            torch_model, rows[i : i + args.batch_size], args.max_new_tokens, autocast
        )
    ]

  rows = [r for batch in inputs['batches'] for r in batch]
  return {'ours': ours, 'ours_in_order': in_order, 'reference': reference}, rows


def timed(fn, rows):
  """(seconds, fn(rows))."""
  start = time.perf_counter()
  out = fn(rows)
  return time.perf_counter() - start, out


def memory_child(args):
  """Prints one side's peak memory (bytes) while it decodes the set, after a first
  pass that compiled each width and made the first allocations."""
  sides, rows = build(args)
  sides[args.memory_side](rows)
  before = harness.reset_peak_memory(args.memory_side)
  sides[args.memory_side](rows)
  harness.print_child_memory(args.memory_side, before)


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(os.cpu_count())
  if args.memory_side:
    return memory_child(args)
  harness.check_prepared(args.prepared, prepared_key(args))
  memory = harness.children_memory(
      'bench/decode_throughput.py', sys.argv[1:] if argv is None else list(argv)
  )
  sides, rows = build(args)
  predictions = {}
  for name in sides:  # a whole pass: each input width compiles before timing
    seconds, predictions[name] = timed(sides[name], rows)
    harness.progress(f'warm-up {name}: {seconds:.3f}s')
  times: dict[str, list[float]] = {name: [] for name in sides}
  for i in range(args.repeats):
    for name, fn in sides.items():
      times[name].append(timed(fn, rows)[0])
    harness.progress(
        f'pass {i + 1}/{args.repeats}: '
        + ', '.join(f'{name} {t[-1]:.3f}s' for name, t in times.items())
    )
  report: dict = {}
  for name in sides:
    median = float(np.median(times[name]))
    report[name] = {
        'median_set_s': median,
        'examples_per_s': len(rows) / median,
        **memory.get(name, {}),
    }
  report['ratio_ours_over_reference'] = harness.ratios(report['ours'], report['reference'])
  # Sorting changes the batches, not the predictions, nor their order.
  report['ours_equals_ours_in_order'] = predictions['ours'] == predictions['ours_in_order']
  report['ratio_ours_over_ours_in_order'] = (
      report['ours']['examples_per_s'] / report['ours_in_order']['examples_per_s']
  )
  print(
      json.dumps(
          {
              'benchmark': 'decode_throughput',
              'config': args.config,
              'datasets': args.datasets,
              'batch_size': args.batch_size,
              'examples': len(rows),
              'max_new_tokens': args.max_new_tokens,
              'dtype': args.dtype,
              'max_input_widths': args.max_input_widths,
              'devices': args.devices,
              'machine': harness.machine(),
              **report,
          },
          indent=1,
      )
  )


if __name__ == '__main__':
  main()
