"""`dsbs-export-hf`: a checkpoint of a run as a HuggingFace `save_pretrained` directory.

    dsbs-export-hf --checkpoint=MODEL_DIR [--step=N] --output=DIR

`--checkpoint` is a MODEL_DIR (its newest restorable step), its `best/` or its
`checkpoints/` directory, local or a URL. Every checkpoint records its network
config, so no gin file is needed. `T5ForConditionalGeneration.from_pretrained(DIR)`
then loads the student (with the run's vocabulary's tokenizer, which is not
exported).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from dsbs_jax import checkpoints, cli, hf_checkpoint
from dsbs_jax.errors import ConfigError


def export(checkpoint: str, output: str, step: Optional[int] = None) -> int:
  """Writes the checkpoint's params to `output`; returns the step exported."""
  directory = checkpoints.checkpoint_directory(checkpoint)
  if directory is None:
    raise ConfigError(f'--checkpoint {checkpoint}: no dsbs-jax checkpoint there (expected a '
                      'MODEL_DIR, its best/ or its checkpoints/)')
  checkpointer = checkpoints.Checkpointer(directory, async_save=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step not in checkpointer.all_steps():
      raise ConfigError(f'--step {step}: {directory} holds steps {checkpointer.all_steps()}')
    saved = checkpointer.metadata(step).get('model_config')
    if saved is None:
      raise ConfigError(f'{directory}/{step}: this checkpoint records no network config (it '
                        'predates dsbs-jax 0.2); load it with hf_checkpoint.save_hf_checkpoint')
    config = checkpoints.config_from_dict(saved)
    params = checkpointer.restore_params(None, step)
  finally:
    checkpointer.close()
  hf_checkpoint.save_hf_checkpoint(output, config, params)
  return step


def main(argv: Optional[Sequence[str]] = None) -> int:
  cli.set_process_defaults()
  parser = argparse.ArgumentParser(prog='dsbs-export-hf', description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True, help='MODEL_DIR, its best/ or checkpoints/')
  parser.add_argument('--step', type=int, default=None, help='default: the newest')
  parser.add_argument('--output', required=True, help='the HF directory to write')
  args = parser.parse_args(argv)

  def body() -> int:
    step = export(args.checkpoint, args.output, args.step)
    print(f'exported step {step} of {args.checkpoint} to {args.output}')
    return 0

  return cli.run('dsbs-export-hf', body)


def console_main() -> None:
  sys.exit(main())


if __name__ == '__main__':
  console_main()
