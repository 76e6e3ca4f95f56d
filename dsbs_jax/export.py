"""`dsbs-export`: a checkpoint of a run as a HuggingFace directory or a T5X checkpoint.

    dsbs-export --checkpoint=MODEL_DIR [--step=N] --output=DIR [--to=hf|t5x]

`--checkpoint` is a MODEL_DIR (its newest restorable step), its `best/` or its
`checkpoints/` directory, local or a URL. Every checkpoint records its network
config, so no gin file is needed. With `--to=hf` (the default),
`T5ForConditionalGeneration.from_pretrained(DIR)` loads the student (with the
run's vocabulary's tokenizer, which is not exported; `dsbs_serving.json` beside
`config.json` records it and the feature lengths for `dsbs-serve`); with
`--to=t5x`, DIR gets
`checkpoint_<step>`, which `t5x.train` starts from as INITIAL_CHECKPOINT_PATH
(`gin/t5x/finetune.gin`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Optional

from dsbs_jax import checkpoints, cli, hf_checkpoint, storage, t5x_checkpoints
from dsbs_jax.errors import ConfigError

FORMATS = ('hf', 't5x')
# Beside an exported config.json: the vocabulary and feature lengths dsbs-serve needs.
SERVING_FILE = 'dsbs_serving.json'


def export(
    checkpoint: str, output: str, step: Optional[int] = None, to: str = 'hf'
) -> tuple[int, str]:
  """Writes the checkpoint's params to `output`; returns (the step, where)."""
  directory = checkpoints.checkpoint_directory(checkpoint)
  if directory is None:
    raise ConfigError(
        f'--checkpoint {checkpoint}: no dsbs-jax checkpoint there (expected a '
        'MODEL_DIR, its best/ or its checkpoints/)'
    )
  step, config, params, recorded = checkpoints.read_checkpoint(directory, step)
  if to == 't5x':
    return step, t5x_checkpoints.write_params(output, params, step)
  hf_checkpoint.save_hf_checkpoint(output, config, params)
  serving_info = {k: recorded[k] for k in ('vocabulary', 'task_feature_lengths') if recorded.get(k)}
  if serving_info:  # what dsbs-serve needs beside config.json
    storage.write_atomic(os.path.join(output, SERVING_FILE), json.dumps(serving_info, indent=2))
  return step, output


def main(argv: Optional[Sequence[str]] = None) -> int:
  cli.set_process_defaults()
  parser = argparse.ArgumentParser(prog='dsbs-export', description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True, help='MODEL_DIR, its best/ or checkpoints/')
  parser.add_argument('--step', type=int, default=None, help='default: the newest')
  parser.add_argument('--output', required=True, help='the directory to write')
  parser.add_argument('--to', choices=FORMATS, default='hf', help='HuggingFace or T5X')
  args = parser.parse_args(argv)

  def body() -> int:
    step, written = export(args.checkpoint, args.output, args.step, args.to)
    print(f'exported step {step} of {args.checkpoint} to {written}')
    return 0

  return cli.run('dsbs-export', body)


def console_main() -> None:
  sys.exit(main())


if __name__ == '__main__':
  console_main()
