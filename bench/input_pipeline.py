"""Input pipeline: batches/s of our SeqIO pipeline (preprocessing, tokenizing, mixing,
packing) versus the rate at which the train step consumes those batches.

    python bench/input_pipeline.py --config=small
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import seqio

from bench import examples, harness
from dsbs_jax import losses, optimizers, partitioning, trainer
from dsbs_jax.data import benchmarks
from dsbs_jax.data.feature_converters import StepByStepFeatureConverter


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='mini', choices=sorted(harness.CONFIGS))
  p.add_argument('--mixture', default='svamp_llm_step_by_step')
  p.add_argument('--rows', type=int, default=16, help='packed rows per batch')
  p.add_argument('--inputs', type=int, default=512)
  p.add_argument('--targets', type=int, default=384)
  p.add_argument('--batches', type=int, default=200)
  p.add_argument('--steps', type=int, default=5)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  benchmarks.register(args.mixture.split('_')[0], root=examples.data_root())
  lengths = {'inputs': args.inputs, 'targets': args.targets}
  ds = seqio.get_dataset(
      args.mixture,
      task_feature_lengths=lengths,
      dataset_split='train',
      shuffle=True,
      num_epochs=None,
      seed=0,
      feature_converter=StepByStepFeatureConverter(pack=True),
      batch_size=args.rows,
  )
  it = ds.as_numpy_iterator()
  first = next(it)
  for _ in range(10):
    next(it)
  start = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  pipeline_rate = args.batches / (time.perf_counter() - start)

  config = harness.CONFIGS[args.config]
  model = harness.student(
      config, examples.vocab_shape(), task_weights=losses.task_weights(lambda_=1.0)
  )
  t = trainer.Trainer(
      model,
      optimizers.create_optimizer('adamw', 5e-5),
      partitioning.Partitioner(devices=jax.devices()[:1]),
  )
  shapes = {k: first[k].shape for k in ('encoder_input_tokens', 'decoder_input_tokens')}
  state = t.create_state(shapes)
  step = t.compile_train_step(shapes)
  batch = t.partitioner.shard_batch(first)
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, t.partitioner.shard_batch(first))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_rate = 1.0 / float(np.median(times))
  print(
      json.dumps(
          {
              'benchmark': 'input_pipeline',
              'mixture': args.mixture,
              'config': args.config,
              'rows_per_batch': args.rows,
              'lengths': lengths,
              'pipeline_batches_per_s': pipeline_rate,
              'train_steps_per_s': step_rate,
              'headroom': pipeline_rate / step_rate,
              'target_headroom': 5.0,
              'cores': os.cpu_count(),
          },
          indent=1,
      )
  )


if __name__ == '__main__':
  main()
