"""`dsbs-teacher`: rationales for a task's split from a teacher LLM.

    dsbs-teacher --task=svamp --split=train --data_root=DATA --out=OUT \\
        --backend=openai --base_url=http://127.0.0.1:8000/v1 --model=NAME
    dsbs-teacher --task=demo --split=train --out=OUT --backend=transformers --model_dir=DIR

The key for `--backend=openai` comes from $OPENAI_API_KEY (or the variable
`--api_key_env` names). Ctrl-C or a crash keeps every answer received; the same
command resumes. `extraction` says what is written where.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

from dsbs_jax import cli, extraction, prompts, teachers
from dsbs_jax.data import benchmarks, custom
from dsbs_jax.errors import ConfigError

BACKENDS = ('openai', 'transformers')
# Flags only one backend, or only --input_file, reads, with their defaults: given
# where nothing reads them, they are refused.
_SCOPED: dict[str, dict[str, Any]] = {
    '--backend=openai': {
        'base_url': None,
        'model': None,
        'api': 'completions',
        'api_key_env': teachers.API_KEY_ENV,
        'concurrency': 32,
        'timeout': 120.0,
        'max_retries': 5,
    },
    '--backend=transformers': {'model_dir': None, 'batch_size': 8, 'device': 'cpu'},
    '--input_file': {'input_field': 'input', 'label_field': 'label', 'metric': 'accuracy'},
}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='dsbs-teacher', description=__doc__.split('\n')[0])
  add = p.add_argument
  add('--task', required=True, help=f'{", ".join(prompts.PROMPTS)}, or a name for --input_file')
  add('--split', default='train', choices=extraction.SPLITS)
  add('--out', required=True, help='output root (a directory or URL)')
  add(
      '--data_root',
      default=None,
      help=f"the benchmarks' root (default ${benchmarks.DATA_ROOT_ENV})",
  )
  add('--input_file', default=None, help="your task's inputs: JSON lines or CSV")
  add('--input_field', default=None)
  add('--label_field', default=None, help="--input_file's gold label column ('' for none)")
  add('--metric', default=None, choices=sorted(custom.METRICS))
  add('--limit', type=int, default=None, help='only the first N inputs')
  add('--backend', default='openai', choices=BACKENDS)
  add('--base_url', default=None, help='an OpenAI-compatible server, e.g. http://host:8000/v1')
  add('--model', default=None, help="the server's model name")
  add('--api', default=None, choices=teachers.APIS)
  add('--api_key_env', default=None, help='the variable holding the key')
  add('--concurrency', type=int, default=None, help='requests in flight: twice the server batch')
  add('--timeout', type=float, default=None, help='seconds per request')
  add('--max_retries', type=int, default=None, help='on 429, 5xx, timeouts; with backoff')
  add('--model_dir', default=None, help='a transformers causal LM directory')
  add('--batch_size', type=int, default=None, help='prompts per generate call')
  add('--device', default=None)
  add('--prompt_file', default=None, help='a JSON prompt for your task (prompts.load)')
  add('--exemplars', default=None, help='JSON lines (input, rationale, answer) replacing ours')
  add('--zero_shot', action='store_true', help='no exemplars: "Let\'s think step by step."')
  add('--temperature', type=float, default=0.0)
  add('--top_p', type=float, default=1.0)
  add('--num_samples', type=int, default=1, help='rationales per input, each a training row')
  add('--max_tokens', type=int, default=256)
  add('--seed', type=int, default=0)
  add('--filter_gold_match', action='store_true', help="keep samples whose label is gold's")
  add('--drop_degenerate', action='store_true', help='drop empty or looping rationales')
  cli.scoped_help(p, _SCOPED)
  return p


def _scoped_flags(args: argparse.Namespace) -> None:
  def active(scope: str) -> bool:
    if scope == '--input_file':
      return args.input_file is not None
    return scope == f'--backend={args.backend}'

  cli.scoped_flags(args, _SCOPED, active)


def _teacher(args: argparse.Namespace) -> teachers.Teacher:
  if args.backend == 'openai':
    if not args.base_url or not args.model:
      raise ConfigError('--backend=openai needs --base_url and --model')
    return teachers.OpenAITeacher(
        args.base_url,
        args.model,
        args.api,
        args.api_key_env,
        args.concurrency,
        args.timeout,
        args.max_retries,
    )
  if not args.model_dir:
    raise ConfigError('--backend=transformers needs --model_dir')
  return teachers.TransformersTeacher(args.model_dir, args.batch_size, args.device)


def _settings(args: argparse.Namespace, prompt: prompts.Prompt) -> dict[str, Any]:
  """The run's settings as recorded: no key, and the URL without credentials."""
  settings = {k: v for k, v in vars(args).items() if k != 'api_key_env'}
  if args.base_url:
    settings['base_url'] = teachers.redact_url(args.base_url)
  settings['prompt_fingerprint'] = prompt.fingerprint()
  return settings


class _Progress:
  """A progress bar over the inputs still to query: rate, ETA and tokens."""

  def __init__(self):
    self.bar: Any = None
    self.tokens, self.start_time = 0, time.perf_counter()

  def start(self, to_query: int, cached: int) -> None:
    from tqdm import tqdm

    if cached:
      print(f'dsbs-teacher: {cached} inputs answered in the cache; querying {to_query}')
    self.bar = tqdm(total=to_query, unit='input', dynamic_ncols=True, mininterval=1.0)

  def update(self, inputs: int, prompt_tokens: int, completion_tokens: int) -> None:
    self.tokens += completion_tokens
    rate = self.tokens / max(time.perf_counter() - self.start_time, 1e-9)
    self.bar.set_postfix_str(f'{self.tokens} tokens out, {rate:.0f} tok/s', refresh=False)
    self.bar.update(inputs)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _interrupt(signum: int, frame: Any) -> None:
  raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
  _scoped_flags(args)
  if args.prompt_file is not None and args.task in benchmarks.BENCHMARKS:
    raise ConfigError(
        f"--prompt_file with --task={args.task}: its files are read with the authors' parser; "
        'keep the answer format and give your exemplars with --exemplars'
    )
  source = extraction.source_for(
      args.task,
      args.split,
      args.data_root,
      args.input_file,
      args.input_field,
      args.label_field or None,
      args.limit,
  )
  prompt = prompts.resolve(args.task, args.prompt_file, args.exemplars, args.zero_shot)
  sampling = teachers.Sampling(
      args.temperature, args.num_samples, args.max_tokens, prompt.stop, args.top_p, args.seed
  )
  extraction.check_out(args.out, source, args.data_root, args.input_file)
  job = extraction.Extraction(
      source,
      _teacher(args),
      prompt,
      sampling,
      args.out,
      extraction.Filters(args.filter_gold_match, args.drop_degenerate),
      custom_prompt=args.prompt_file is not None,
      metric=args.metric,
      settings=_settings(args, prompt),
  )
  progress = _Progress()
  previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    summary = job.run(progress)
  except KeyboardInterrupt:
    progress.close()
    print(
        f'dsbs-teacher: interrupted; the answers so far are kept in {job.task_dir}/'
        'teacher_cache; the same command resumes',
        file=sys.stderr,
        flush=True,
    )
    # The cache is closed; requests still in flight would only hold the exit up.
    os._exit(130)
  except teachers.TeacherError as e:
    progress.close()
    raise teachers.TeacherError(f'{e}; the answers so far are kept, and a rerun resumes') from None
  finally:
    signal.signal(signal.SIGTERM, previous)
  progress.close()
  _finish(args, source, summary)
  return 0


def _finish(args: argparse.Namespace, source: extraction.Source, summary: extraction.Summary):
  for line in summary.lines():
    print(f'dsbs-teacher: {line}')
  written = os.path.join(args.out, source.task)
  if source.benchmark is not None:
    extraction.copy_other_splits(args.out, source, args.data_root)
    print(f'dsbs-teacher: wrote {written}/; train on it with --gin.DATA_ROOT="\'{args.out}\'"')
    return
  if source.task == 'demo':
    extraction.write_demo_eval_splits(args.out, source)
  metric = 'equation_accuracy' if source.task == 'demo' else args.metric
  gin_file, missing = extraction.task_gin(args.out, source.task, metric)
  if gin_file is None:
    print(f'dsbs-teacher: wrote {written}/; no task.gin yet: {missing}')
    return
  print(f'dsbs-teacher: wrote {written}/; train on it with --gin_file={gin_file}')


def main(argv: Optional[Sequence[str]] = None) -> int:
  cli.set_process_defaults()
  cli.configure_logging()
  args = _parser().parse_args(argv)
  return cli.run('dsbs-teacher', lambda: run(args))


if __name__ == '__main__':
  sys.exit(main())
