"""`dsbs-train`: the command line of `train.train`, with T5X's flags.

`--gin_file` (repeatable), `--gin.KEY=VALUE` (or `--gin_bindings`) and
`--gin_search_paths` work as in `t5x.train`. A user error (configuration,
data, paths, checkpoints) prints one line naming the file, line or setting and
exits 2; `DSBS_DEBUG=1` shows its traceback too. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn, Optional

from dsbs_jax.errors import ConfigError, DataError

log = logging.getLogger('dsbs_jax')
DEBUG_ENV = 'DSBS_DEBUG'
# Allocations between garbage collections, at least (`set_process_defaults`).
GC_YOUNG_THRESHOLD = 10_000

# Startup lines TensorFlow (the input pipeline's engine) prints on a host without a GPU
# build's drivers. TensorFlow feeds data only, on the CPU; JAX owns the accelerators.
_TENSORFLOW_NOISE = (
    'All log messages before absl::InitializeLog()',
    'cudart_stub.cc',
    'failed call to cuInit',
    'oneDNN custom operations',
    'cpu_feature_guard.cc',
    'To enable the following instructions',
    'Unable to register cu',
)


def set_process_defaults() -> None:
  """Process defaults for a dsbs-jax command, unless the user set them.

  EPATH_USE_TF=0: `gs://` goes through etils.epath's fsspec backend (gcsfs), the
  path tested against a Cloud Storage emulator, also where TensorFlow is installed.
  TF_ENABLE_ONEDNN_OPTS=0: TensorFlow only moves data here, and its oneDNN kernels
  log a notice per process.

  Python's cyclic garbage collector waits for at least `GC_YOUNG_THRESHOLD`
  net allocations between collections, instead of 700 (a higher threshold, or
  0 for collection turned off, is kept): tracing a program allocates
  millions of short-lived objects, and each third-generation pass walks every
  object TensorFlow, JAX and SeqIO keep (a tiny `dsbs-train` of 34 s spent
  2.5 s in the collector, and 0.85 s at 10,000). Arrays are freed by reference
  counting as before; only garbage in reference cycles waits longer.
  """
  os.environ.setdefault('EPATH_USE_TF', '0')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  young, *older = gc.get_threshold()
  if young:
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), *older)


@contextlib.contextmanager
def _quiet_stderr(noise: Sequence[str]) -> Iterator[None]:
  """Runs the body with the process's stderr (C++ logging too) captured, then
  re-emits every captured line but the known noise."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode('utf-8', errors='replace').splitlines(keepends=True):
        if not any(n in line for n in noise):
          sys.stderr.write(line)


def start_tensorflow() -> None:
  """Imports TensorFlow, keeps it off the GPUs and drops its startup noise."""
  with _quiet_stderr(_TENSORFLOW_NOISE):
    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')


class _DropMessages(logging.Filter):

  def __init__(self, *fragments: str):
    super().__init__()
    self._fragments = fragments

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(f in message for f in self._fragments)


def configure_logging() -> None:
  logging.basicConfig(
      level=logging.WARNING,
      format='%(asctime)s %(levelname)s %(message)s',
      datefmt='%H:%M:%S',
      stream=sys.stdout,
      force=True,
  )
  log.setLevel(logging.INFO)
  drop = _DropMessages(
      # gin logs each search-path miss of an include; only a final miss matters.
      'Path not found',
      # Our SeqIO sources shuffle every row in memory (tasks.rows_source), so SeqIO's
      # advice against uncached FunctionDatasets does not apply.
      'uncached FunctionDataset',
      # gcsfs, on every Cloud Storage client, where no default credentials exist (an
      # emulator on loopback); real buckets fail on their first request instead.
      'Could not determine bucket type',
  )
  for handler in logging.getLogger().handlers:
    handler.addFilter(drop)


Scopes = Mapping[str, Mapping[str, Any]]


def scoped_flags(args: Any, scopes: Scopes, active: Callable[[str], bool]) -> None:
  """Flags only some runs read (`scopes`: scope -> {flag: default}, the flags' parser
  defaults None): fills in the defaults; refuses one given where its scope is not
  `active`, so that no flag is silently ignored."""
  for scope, flags in scopes.items():
    on = active(scope)
    for flag, default in flags.items():
      if getattr(args, flag) is None:
        setattr(args, flag, default)
      elif not on:
        raise ConfigError(f'--{flag}: only read with {scope}')


def scoped_help(parser: Any, scopes: Scopes) -> None:
  """Appends each scoped flag's scope and default to its help."""
  defaults = {
      f'--{flag}': (scope, d) for scope, flags in scopes.items() for flag, d in flags.items()
  }
  for action in parser._actions:
    if action.option_strings and action.option_strings[0] in defaults:
      scope, default = defaults[action.option_strings[0]]
      action.help = f'{action.help or ""} ({scope}; default {default})'.lstrip()


def error_line(error: BaseException) -> str:
  """The first line of an error's message: gin appends where in the config it happened."""
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def run(program: str, body: Callable[[], int]) -> int:
  """Runs a command's body; a user error becomes one line on stderr and exit 2."""
  from absl import flags

  try:
    return body()
  except (ConfigError, DataError, FloatingPointError, flags.Error) as e:
    return _user_error(program, error_line(e), e)
  except (ValueError, TypeError, KeyError, NameError, OSError) as e:
    if not _from_gin(e):
      raise
    from dsbs_jax import gin_utils

    macro = gin_utils.unset_macro(e)
    message = (
        f'the macro {macro} has no value; set it with --gin.{macro}=... or in a gin file'
        if macro
        else error_line(e)
    )
    return _user_error(program, f'gin configuration error: {message}', e)


def _from_gin(error: BaseException) -> bool:
  """Whether gin itself raised the error (a configuration it cannot apply), rather than
  code it called (where anything but our own errors is a bug)."""
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and f'{os.sep}gin{os.sep}' in frames[-1].filename


def _user_error(program: str, message: str, error: BaseException) -> int:
  if os.environ.get(DEBUG_ENV):
    traceback.print_exception(error)
  print(f'{program}: error: {message}', file=sys.stderr)
  return 2


def _parse_mesh(text: str) -> dict[str, int]:
  """'32x8' -> {'data': 32, 'model': 8}."""
  match = re.fullmatch(r'(\d+)x(\d+)', text)
  if not match:
    raise ConfigError(f'--plan={text!r}: expected DATAxMODEL, e.g. 32x8')
  return {'data': int(match.group(1)), 'model': int(match.group(2))}


def _define_flags():
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_multi_string('gin_file', [], 'Gin config files, applied in order.', flag_values=fv)
  flags.DEFINE_multi_string('gin_bindings', [], 'Individual gin bindings.', flag_values=fv)
  flags.DEFINE_multi_string(
      'gin_search_paths',
      ['.'],
      'Paths searched for gin files (the shipped gin/ always is).',
      flag_values=fv,
  )
  flags.DEFINE_boolean(
      'list_tasks', False, 'Print the built-in tasks and mixtures, then exit.', flag_values=fv
  )
  flags.DEFINE_string(
      'plan',
      None,
      'Print the memory plan for a DATAxMODEL mesh (e.g. 32x8: '
      "each parameter's sharding and GiB per device), then exit; needs no "
      'devices.',
      flag_values=fv,
  )
  flags.DEFINE_boolean(
      'multihost',
      False,
      'Initialise jax.distributed from the environment (Cloud TPU pods need nothing else).',
      flag_values=fv,
  )
  flags.DEFINE_string(
      'coordinator_address',
      None,
      'host:port of process 0, for multi-process '
      'runs outside a TPU pod (see launch/local_multihost.sh).',
      flag_values=fv,
  )
  flags.DEFINE_integer(
      'num_processes', None, 'Number of processes (with --coordinator_address).', flag_values=fv
  )
  flags.DEFINE_integer(
      'process_id', None, 'This process (with --coordinator_address).', flag_values=fv
  )
  return fv


def initialize_distributed(
    multihost: bool,
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> None:
  """Starts `jax.distributed` for a multi-process run; a no-op for one process.

  On a Cloud TPU pod `--multihost` alone suffices (JAX finds its peers). Elsewhere
  the coordinator address, process count and id come from the flags. CPU
  processes exchange collectives through gloo.
  """
  import jax

  if not (multihost or coordinator_address):
    return
  if coordinator_address and (num_processes is None or process_id is None):
    raise ConfigError('--coordinator_address needs --num_processes and --process_id')
  if coordinator_address:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  log.info(
      'process %d of %d; %d local / %d global devices',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


_TRAIN_REQUIRED = ('model_dir', 'train_steps', 'dataset', 'model', 'optimizer')


def train_main(argv: Optional[Sequence[str]] = None) -> int:
  """`dsbs-train`."""
  set_process_defaults()
  configure_logging()
  argv = list(sys.argv if argv is None else argv)

  def body() -> int:
    import gin
    from dsbs_jax import gin_utils

    fv = _define_flags()
    fv(gin_utils.rewrite_gin_args(argv))
    start_tensorflow()
    initialize_distributed(fv.multihost, fv.coordinator_address, fv.num_processes, fv.process_id)
    if fv.list_tasks:
      from dsbs_jax.data import catalog, tasks

      catalog.register_all()
      print(tasks.describe_families())
      return 0
    gin_utils.parse(fv.gin_file, fv.gin_bindings, fv.gin_search_paths)
    from dsbs_jax import train
    from dsbs_jax.run_record import RunRecord

    if not gin_utils.binds_any('train.train', _TRAIN_REQUIRED):
      raise ConfigError(
          f"no gin file configures train.train (--gin_file: {', '.join(fv.gin_file) or 'none'}); "
          'start from train.gin or a run such as demo.gin (the gin/ directory lists them)'
      )
    configured = gin.get_configurable(train.train)
    gin_utils.check_bindings_used('train.train', fv.gin_file, fv.gin_bindings)
    if fv.plan:
      gin.bind_parameter('train.train.model_dir', None)  # a plan writes nothing
      required = {name: gin.REQUIRED for name in _TRAIN_REQUIRED if name != 'model_dir'}
      configured(plan_mesh=_parse_mesh(fv.plan), **required)
      return 0
    configured(
        run_record=RunRecord(gin.operative_config_str),
        **dict.fromkeys(_TRAIN_REQUIRED, gin.REQUIRED),
    )
    return 0

  return run('dsbs-train', body)


def exit_with(main: Callable[[], int]) -> NoReturn:
  """A console script's end: runs `main` and exits with its code, without the
  interpreter's teardown of every module's objects.

  TensorFlow's and XLA's destructors keep a finished process alive 1-2 s more
  (`python -c 'import tensorflow'`: 1.1 s after its last atexit handler; a tiny
  `dsbs-train`: 1.8 s), which each run of a grid, and each test's subprocess,
  would pay. The handler that exits is registered here, so it runs after every
  handler registered later, and after the interpreter has joined the
  non-daemon threads (an asynchronous save, say). Handlers registered earlier
  would be skipped, so call this before importing anything that registers one
  (JAX, orbax, seqio, TensorFlow Datasets); `logging`'s, registered when it was
  imported, is run by the handler itself. A `main` that raises, or calls
  `sys.exit` itself, exits as usual. For entry points only: it ends the process.
  """
  returned: list[int] = []
  atexit.register(_exit_before_teardown, returned)
  returned.append(main())
  sys.exit(returned[0])


def _exit_before_teardown(returned: list[int]) -> None:
  if not returned:
    return
  logging.shutdown()  # its own atexit handler was registered before this one
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(returned[0])


def console_main() -> NoReturn:
  exit_with(train_main)


def experiment_main(argv: Optional[Sequence[str]] = None) -> int:
  """`dsbs-experiment`: runs (or prints) an experiment grid, then summarises it."""
  set_process_defaults()
  configure_logging()
  argv = list(sys.argv if argv is None else argv)

  def body() -> int:
    import jax

    import gin
    from dsbs_jax import experiment, gin_utils

    fv = _define_experiment_flags()
    fv(gin_utils.rewrite_gin_args(argv))
    gin_utils.parse(fv.gin_file, fv.gin_bindings, fv.gin_search_paths)
    gin_utils.check_bindings_used('experiment.Grid', fv.gin_file, fv.gin_bindings)
    grid = gin.get_configurable(experiment.Grid)()
    gin.clear_config()
    search = [f'--gin_search_paths={p}' for p in fv.gin_search_paths if p != '.']
    if fv.print_commands:
      print('\n'.join(experiment.commands(grid, search)))
      return 0
    if not fv.summarize_only:
      if fv.compilation_cache_dir:
        # Every run of a grid compiles the same few programs: compile each once.
        jax.config.update('jax_compilation_cache_dir', os.path.expanduser(fv.compilation_cache_dir))
      start_tensorflow()
      experiment.run(grid, lambda args: train_main(['dsbs-train', *search, *args]))
    records = experiment.summarize(grid)
    log.info('experiment %s: %d runs summarised in %s', grid.name, len(records), grid.output_dir)
    print(experiment.table(grid, records))
    return 0

  return run('dsbs-experiment', body)


def _define_experiment_flags():
  from absl import flags

  fv = flags.FlagValues()
  flags.DEFINE_multi_string('gin_file', [], "The experiment's gin files.", flag_values=fv)
  flags.DEFINE_multi_string('gin_bindings', [], 'Individual gin bindings.', flag_values=fv)
  flags.DEFINE_multi_string(
      'gin_search_paths', ['.'], 'Paths searched for gin files.', flag_values=fv
  )
  flags.DEFINE_boolean(
      'print_commands',
      False,
      'Print a dsbs-train command per unfinished run (for a pod or cluster), then exit.',
      flag_values=fv,
  )
  flags.DEFINE_string(
      'compilation_cache_dir',
      '~/.cache/dsbs_jax/compilation',
      "JAX's persistent compilation cache, shared by the runs (saves ~20 s of each "
      'demo-sized run on CPU); empty turns it off.',
      flag_values=fv,
  )
  flags.DEFINE_boolean(
      'summarize_only', False, 'Only write the table and plots of finished runs.', flag_values=fv
  )
  return fv


def teacher_console_main() -> NoReturn:
  """`dsbs-teacher`; TensorFlow starts first because its data readers import it."""
  _exit_with_tensorflow_started('teacher_cli')


def serve_console_main() -> NoReturn:
  """`dsbs-serve`; TensorFlow starts first because its vocabularies import it."""
  _exit_with_tensorflow_started('server')


def _exit_with_tensorflow_started(module: str) -> NoReturn:
  """Runs `dsbs_jax.<module>.main` with TensorFlow started quietly first; the imports
  happen inside `exit_with`, after its handler is registered."""

  def main() -> int:
    set_process_defaults()
    start_tensorflow()
    return importlib.import_module(f'dsbs_jax.{module}').main()

  exit_with(main)


def experiment_console_main() -> NoReturn:
  exit_with(experiment_main)


if __name__ == '__main__':
  console_main()
