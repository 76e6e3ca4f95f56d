"""Greedy label decoding (`predict:` only, as deployed): ours versus HF `generate`.

Same weights, same test-split inputs, same batch and maximum new tokens;
interleaved timing after warm-up; peak memory per side in a child process.
Prints one JSON object.

    python bench/decode_throughput.py --config=small
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import harness, reference_torch  # noqa: E402
from dsbs_jax import evaluation, models, network  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='mini', choices=sorted(harness.CONFIGS))
  p.add_argument('--datasets', default='svamp,cqa')
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--inputs', type=int, default=512)
  p.add_argument('--max_new_tokens', type=int, default=64, help="the reference's gen_max_len")
  p.add_argument('--batches', type=int, default=3)
  p.add_argument('--memory_side', choices=['ours', 'reference'], help=argparse.SUPPRESS)
  return p.parse_args(argv)


def build(args):
  config = harness.CONFIGS[args.config]
  rows = harness.examples(args.datasets.split(','), 'test',
                          {'inputs': args.inputs, 'targets': args.max_new_tokens})
  batches = [[r['predict'] for r in rows[i:i + args.batch_size]]
             for i in range(0, args.batches * args.batch_size, args.batch_size)]
  torch_model, params = harness.same_weights(config)
  vocab = harness.VOCAB
  model = models.StepByStepModel(network.Transformer(config), vocab, vocab)
  predict = jax.jit(lambda p, b: model.predict_batch(p, b, max_decode_length=args.max_new_tokens))

  def ours(inputs):
    tokens = np.zeros((len(inputs), args.inputs), np.int32)
    for i, r in enumerate(inputs):
      tokens[i, :len(r)] = r
    batch = {'encoder_input_tokens': tokens,
             'decoder_input_tokens': np.zeros((len(inputs), args.max_new_tokens), np.int32)}
    return np.asarray(predict(params, evaluation.trim_inputs(
        batch, evaluation.INPUT_LENGTH_MULTIPLE)))

  def reference(inputs):
    return reference_torch.generate(torch_model, inputs, args.max_new_tokens)

  return {'ours': ours, 'reference': reference}, batches


def timed(fn, inputs):
  start = time.perf_counter()
  fn(inputs)
  return time.perf_counter() - start


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(os.cpu_count())
  sides, batches = build(args)
  if args.memory_side:
    sides[args.memory_side](batches[0])  # compilation and first allocations
    before = harness.reset_peak_rss()
    for b in batches:
      sides[args.memory_side](b)
    print(json.dumps({'peak_rss_bytes': harness.peak_rss(), 'setup_rss_bytes': before}))
    return
  for name in sides:
    timed(sides[name], batches[0])  # warm-up (and compilation)
  times = {name: [] for name in sides}
  for b in batches:
    for name, fn in sides.items():
      times[name].append(timed(fn, b))
  report = {}
  flags = sys.argv[1:] if argv is None else list(argv)
  for name in sides:
    child = json.loads(harness.run_child(
        ['bench/decode_throughput.py', *flags, f'--memory_side={name}']).splitlines()[-1])
    median = float(np.median(times[name]))
    report[name] = {'median_batch_s': median, 'examples_per_s': args.batch_size / median,
                    'peak_memory_bytes': child['peak_rss_bytes'],
                    'step_memory_bytes': child['peak_rss_bytes'] - child['setup_rss_bytes']}
  report['ratio_ours_over_reference'] = {k: report['ours'][k] / report['reference'][k]
                                         for k in report['ours']}
  print(json.dumps({'benchmark': 'decode_throughput', 'config': args.config,
                    'datasets': args.datasets, 'batch_size': args.batch_size,
                    'max_new_tokens': args.max_new_tokens, 'cores': os.cpu_count(), **report},
                   indent=1))


if __name__ == '__main__':
  main()
