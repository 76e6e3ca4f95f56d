"""Training entry point: `dsbs-train` / `python -m dsbs_jax.train`, configured by gin.

Flags mirror `t5x.train`: `--gin_file`, `--gin.KEY=VALUE` (or `--gin_bindings`)
and `--gin_search_paths`. `train()` is the one function gin configures; the
library objects it receives (model, optimizer, partitioner) are plain Python.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import difflib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any, Iterator, Mapping, Optional, Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from dsbs_jax import hf_checkpoint  # noqa: E402
from dsbs_jax.checkpoints import BestCheckpoint, Checkpointer  # noqa: E402
from dsbs_jax.data import tasks  # noqa: E402
from dsbs_jax.errors import ConfigError  # noqa: E402
from dsbs_jax.evaluation import Evaluator, LossEvaluator  # noqa: E402
from dsbs_jax.models import StepByStepModel  # noqa: E402
from dsbs_jax.monitoring import MetricWriter, Progress  # noqa: E402
from dsbs_jax.optimizers import Optimizer  # noqa: E402
from dsbs_jax.partitioning import Partitioner  # noqa: E402
from dsbs_jax.trainer import TrainState, Trainer, memory_plan  # noqa: E402

log = logging.getLogger('dsbs_jax')
REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gin')


def _check_task(name: str) -> None:
  known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  if name not in known:
    close = difflib.get_close_matches(name, known, n=5)
    hint = f' Did you mean: {", ".join(close)}?' if close else ''
    raise ConfigError(f'MIXTURE_OR_TASK_NAME {name!r} is not a registered SeqIO task or '
                      f'mixture.{hint} (`dsbs-train --list_tasks` lists them.)')


def _check_lengths(task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
  lengths = dict(task_feature_lengths)
  for key in ('inputs', 'targets'):
    if key not in lengths:
      raise ConfigError(f'TASK_FEATURE_LENGTHS must set {key!r}; got {lengths}')
    if not isinstance(lengths[key], int) or lengths[key] < 1:
      raise ConfigError(f'TASK_FEATURE_LENGTHS[{key!r}] must be an integer >= 1; '
                        f'got {lengths[key]!r}')
  return lengths


def _check_model_dir(model_dir: str) -> str:
  model_dir = os.path.abspath(os.path.expanduser(model_dir))
  try:
    os.makedirs(model_dir, exist_ok=True)
    # A probe file of its own: every process of a multi-host run checks the same directory.
    with tempfile.NamedTemporaryFile(dir=model_dir, prefix='.write_test'):
      pass
  except OSError as e:
    raise ConfigError(f'MODEL_DIR {model_dir!r} cannot be written: {e.strerror or e}') from None
  return model_dir


def _load_initial_params(path: str, state: TrainState, trainer: Trainer,
                         input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
  """Params from a HF `save_pretrained` directory or a dsbs checkpoint directory."""
  if os.path.exists(os.path.join(path, 'config.json')):
    config, params = hf_checkpoint.load_hf_checkpoint(path)
    ours = trainer.model.module.config
    mismatched = [f for f in ('vocab_size', 'emb_dim', 'num_heads', 'num_encoder_layers',
                              'num_decoder_layers', 'head_dim', 'mlp_dim', 'mlp_activations',
                              'logits_via_embedding') if getattr(config, f) != getattr(ours, f)]
    if mismatched:
      raise ConfigError(f'INITIAL_CHECKPOINT_PATH {path}: its config differs from the model in '
                        f'{mismatched}; choose the matching gin/models file')
    shardings = trainer.state_shardings(input_shapes).params
    params = jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings)
    return state.replace(params=params)
  if not os.path.isdir(path):
    raise ConfigError(f'INITIAL_CHECKPOINT_PATH {path!r} does not exist')
  restored, _ = Checkpointer(path, async_save=False).restore(trainer.abstract_state(input_shapes))
  return state.replace(params=restored.params)


def _dataset(name: str, lengths: Mapping[str, int], batch_size: int, model: StepByStepModel,
             pack: bool, seed: int, use_cached: bool, num_input_shards: Optional[int],
             skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of the infinite, deterministic training stream.

  The stream is `num_input_shards` SeqIO shards (`ShardInfo`), each giving
  `batch_size / num_input_shards` rows per batch; a process reads only its own
  consecutive shards. The global batch is then the same on any number of
  processes, so 1 process and 2 processes with 2 input shards train alike.
  The first `skip` batches (those consumed before a restart) are dropped.
  """
  processes = jax.process_count()
  shards = num_input_shards or processes
  if shards % processes or batch_size % shards:
    raise ConfigError(f'num_input_shards={shards} must be a multiple of the {processes} '
                      f'processes and divide BATCH_SIZE={batch_size}')
  per_process = shards // processes
  streams = [seqio.get_dataset(
      name, task_feature_lengths=lengths, dataset_split='train', shuffle=True, num_epochs=None,
      seed=seed, use_cached=use_cached, feature_converter=model.FEATURE_CONVERTER_CLS(pack=pack),
      shard_info=seqio.ShardInfo(index, shards), batch_size=batch_size // shards
  ).skip(skip).as_numpy_iterator() for index in range(jax.process_index() * per_process,
                                           (jax.process_index() + 1) * per_process)]
  for parts in zip(*streams):
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


class _Preemption:
  """SIGTERM (how preemptible TPU VMs are stopped) asks the loop to save and exit 0.

  With several processes, all of them agree on the step to stop at.
  """

  def __enter__(self) -> '_Preemption':
    self._requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._requested = True

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._requested
    return bool(multihost_utils.process_allgather(np.int32(self._requested)).any())

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _flatten(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  return {f'{group}/{name}': value for group, values in results.items()
          for name, value in values.items()}


def train(*, model_dir: str, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
          train_steps: int, batch_size: int, model: StepByStepModel, optimizer: Optimizer,
          partitioner: Optional[Partitioner] = None, pack: bool = True, seed: int = 0,
          num_microbatches: int = 1, num_input_shards: Optional[int] = None,
          log_period: int = 50, eval_period: int = 0, eval_split: str = 'validation',
          final_eval_split: Optional[str] = 'test', eval_batch_size: Optional[int] = None,
          eval_num_examples: Optional[int] = None, best_metric: Optional[str] = None,
          best_mode: str = 'max', checkpoint_period: int = 1000, keep_checkpoints: int = 3,
          initial_checkpoint_path: Optional[str] = None, use_cached: bool = False,
          evaluate_rationales: bool = False,
          plan_mesh: Optional[Mapping[str, int]] = None) -> dict[str, Any]:
  """Trains `model` on a SeqIO task/mixture, resuming from MODEL_DIR if it holds a checkpoint.

  Every `eval_period` steps the validation split is evaluated: teacher-forced
  loss per task, and SeqIO metrics of the decoded label task (plus the
  rationale task with `evaluate_rationales`). The state with the best
  `best_metric` (default: the label task's first metric) is kept in
  MODEL_DIR/best, and the final test evaluation uses it; the test split never
  takes part in selection. SIGTERM saves a checkpoint and returns.

  Returns {'step', 'train': last logged metrics, 'eval': {split: metrics}}; the
  same summary is written to MODEL_DIR/results.json. With `plan_mesh` (e.g.
  {'data': 32, 'model': 8}) it prints the memory plan for that mesh and returns.
  """
  lengths = _check_lengths(task_feature_lengths)
  model_lengths = model.FEATURE_CONVERTER_CLS(pack=pack).get_model_feature_lengths(lengths)
  input_shapes = {k: (batch_size, model_lengths[k])
                  for k in ('encoder_input_tokens', 'decoder_input_tokens')}
  partitioner = partitioner or Partitioner()
  trainer = Trainer(model, optimizer, partitioner, seed, num_microbatches)
  if plan_mesh is not None:
    plan = memory_plan(trainer, input_shapes, dict(plan_mesh))
    print(plan)
    return {'plan': plan}
  _check_task(mixture_or_task_name)
  model_dir = _check_model_dir(model_dir)
  if train_steps < 1 or batch_size < 1:
    raise ConfigError(f'TRAIN_STEPS and BATCH_SIZE must be >= 1; got {train_steps}, {batch_size}')
  if batch_size % partitioner.data_size:
    raise ConfigError(f'BATCH_SIZE={batch_size} must be divisible by the data axis '
                      f'({partitioner.data_size})')
  log.info('%s; model %s', partitioner.describe(), model.module.config)
  checkpointer = Checkpointer(os.path.join(model_dir, 'checkpoints'), checkpoint_period,
                              keep_checkpoints)
  if checkpointer.latest_step() is not None:
    state, consumed = checkpointer.restore(trainer.abstract_state(input_shapes))
    log.info('Resumed from %s at step %d', checkpointer.directory, int(state.step))
  else:
    state, consumed = trainer.create_state(input_shapes), 0
    if initial_checkpoint_path:
      state = _load_initial_params(initial_checkpoint_path, state, trainer, input_shapes)
      log.info('Initialised parameters from %s', initial_checkpoint_path)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  log.info('%.2fM parameters', n_params / 1e6)

  batches = _dataset(mixture_or_task_name, lengths, batch_size, model, pack, seed,
                     use_cached, num_input_shards, skip=consumed)
  train_step = trainer.compile_train_step(input_shapes)
  is_chief = jax.process_index() == 0
  writer = MetricWriter(os.path.join(model_dir, 'train'), enabled=is_chief)
  param_shardings = trainer.state_shardings(input_shapes).params
  eval_tasks = tasks.evaluation_tasks(mixture_or_task_name, evaluate_rationales)

  def evaluate(split: str, params: Any, step: int) -> dict[str, dict[str, float]]:
    if split not in evaluators:
      evaluators[split] = (
          MetricWriter(os.path.join(model_dir, 'eval', split), enabled=is_chief),
          LossEvaluator(mixture_or_task_name, split, lengths, model, partitioner,
                        eval_batch_size or batch_size, param_shardings, eval_num_examples),
          Evaluator(eval_tasks, split, lengths, model, partitioner,
                    eval_batch_size or batch_size, param_shardings,
                    os.path.join(model_dir, 'inference_eval', split) if is_chief else None,
                    eval_num_examples))
    split_writer, losses_, decoded = evaluators[split]
    results = {'teacher_forced': losses_.evaluate(params), **decoded.evaluate(params, step)}
    split_writer.write(step, _flatten(results))
    log.info('%s metrics at step %d: %s', split, step, results)
    return results

  def select(step: int, state: TrainState, consumed: int) -> None:
    flat = _flatten(evaluate(eval_split, state.params, step))
    best.metric = best.metric or next(k for k in flat if k.startswith(f'{eval_tasks[0]}/'))
    best.update(step, state, consumed, flat)

  evaluators: dict[str, tuple[MetricWriter, LossEvaluator, Evaluator]] = {}
  best = BestCheckpoint(os.path.join(model_dir, 'best'), best_metric, best_mode) if eval_period else None
  step = int(state.step)
  progress = Progress(train_steps, step)
  history, last_logged, compiled = [], {}, False
  t_start = time.perf_counter()
  preempted = False
  try:  # a failure still waits for in-flight saves, so they stay restorable
    with _Preemption() as preemption:
      while step < train_steps:
        state, metrics = train_step(state, partitioner.shard_batch(next(batches)))
        step, consumed = step + 1, consumed + 1
        history.append(metrics)
        if not compiled:
          compiled = True
          jax.block_until_ready(metrics)
          log.info('First step (with compilation) took %.1fs', time.perf_counter() - t_start)
          progress.start(step)
          history = []
        elif step % log_period == 0 or step == train_steps:
          last_logged = _mean_metrics(history)
          history = []
          _check_finite(last_logged, step, checkpointer)
          rate = progress.report(step, {k: last_logged[k] for k in ('loss', 'label/loss',
                                                                     'rationale/loss')
                                        if k in last_logged})
          tokens = last_logged.get('label/tokens', 0) + last_logged.get('rationale/tokens', 0)
          writer.write(step, {**last_logged, 'steps_per_sec': rate,
                              'examples_per_sec': rate * batch_size,
                              'tokens_per_sec': rate * tokens})
        if checkpointer.should_save(step):
          _check_finite(metrics, step, checkpointer)
          checkpointer.save(step, state, consumed)
        if best is not None and step % eval_period == 0:
          select(step, state, consumed)
        if preemption.requested():
          preempted = True
          break
    if checkpointer.latest_step() != step:
      _check_finite(metrics, step, checkpointer)
      checkpointer.save(step, state, consumed, force=True)
  finally:
    checkpointer.close()
    writer.close()
  if preempted:
    log.info('SIGTERM: saved step %d to %s; exiting', step, checkpointer.directory)
    return {'step': step, 'preempted': True}

  results: dict[str, Any] = {'step': step, 'train': last_logged, 'eval': {}}
  if best is not None:
    if step % eval_period:
      select(step, state, consumed)
    results['best'] = {'step': best.step, 'metric': best.metric, 'value': best.value}
    log.info('Best %s: %s at step %d', best.metric, best.value, best.step)
    state = best.restore(trainer.abstract_state(input_shapes))
    best.close()
  if final_eval_split:
    results['eval'][final_eval_split] = evaluate(final_eval_split, state.params, int(state.step))
  for split_writer, _, _ in evaluators.values():
    split_writer.close()
  if is_chief:
    with open(os.path.join(model_dir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
  log.info('Done in %.1fs. Outputs in %s', time.perf_counter() - t_start, model_dir)
  return results


def _check_finite(metrics: Mapping[str, Any], step: int, checkpointer: Checkpointer) -> None:
  """Stops on a non-finite loss or parameters, before they reach a checkpoint."""
  for key in ('loss', 'param_norm'):
    value = float(metrics[key])
    if not np.isfinite(value):
      raise FloatingPointError(
          f'{key} is {value} at step {step}; stopping before saving it. The last good '
          f'checkpoint in {checkpointer.directory} is kept (step {checkpointer.latest_step()})')


def initialize_distributed(multihost: bool, coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts `jax.distributed` for a multi-process run; a no-op for one process.

  On a Cloud TPU pod `--multihost` alone suffices (JAX finds its peers). Elsewhere
  the coordinator address, process count and id come from the flags. CPU
  processes exchange collectives through gloo.
  """
  if not (multihost or coordinator_address):
    return
  if coordinator_address and (num_processes is None or process_id is None):
    raise ConfigError('--coordinator_address needs --num_processes and --process_id')
  if coordinator_address:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  log.info('process %d of %d; %d local / %d global devices', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def _parse_mesh(text: str) -> dict[str, int]:
  """'32x8' -> {'data': 32, 'model': 8}; 'here' -> this machine's (devices, 1)."""
  if text == 'here':
    return {'data': jax.device_count(), 'model': 1}
  match = re.fullmatch(r'(\d+)x(\d+)', text)
  if not match:
    raise ConfigError(f'--plan={text!r}: expected DATAxMODEL, e.g. 32x8, or "here"')
  return {'data': int(match.group(1)), 'model': int(match.group(2))}


def _rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.KEY=VALUE` -> `--gin_bindings=KEY = VALUE`, as t5x does."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      key, sep, value = arg[len('--gin.'):].partition('=')
      if not sep:
        raise ConfigError(f'{arg}: expected --gin.KEY=VALUE')
      arg = f'--gin_bindings={key} = {value}'
    out.append(arg)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  from absl import flags
  import gin

  fv = flags.FlagValues()
  flags.DEFINE_multi_string('gin_file', [], 'Gin config files, applied in order.', flag_values=fv)
  flags.DEFINE_multi_string('gin_bindings', [], 'Individual gin bindings.', flag_values=fv)
  flags.DEFINE_multi_string('gin_search_paths', ['.'], 'Paths searched for gin files.',
                            flag_values=fv)
  flags.DEFINE_boolean('list_tasks', False, 'Print registered tasks and mixtures, then exit.',
                       flag_values=fv)
  flags.DEFINE_string('plan', None, 'Print the memory plan for a DATAxMODEL mesh (e.g. 32x8: '
                      'each parameter\'s sharding and GiB per device), then exit. "here" uses '
                      'this machine\'s devices.', flag_values=fv)
  flags.DEFINE_boolean('multihost', False, 'Initialise jax.distributed from the environment '
                       '(Cloud TPU pods need nothing else).', flag_values=fv)
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process '
                      'runs outside a TPU pod (see launch/local_multihost.sh).', flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).',
                       flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).',
                       flag_values=fv)
  logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(levelname)s %(message)s',
                      datefmt='%H:%M:%S', stream=sys.stdout, force=True)
  log.setLevel(logging.INFO)
  # gin logs each search-path miss of an include at ERROR; only a final miss matters.
  logging.getLogger().addFilter(lambda r: not r.getMessage().startswith('Path not found'))
  argv = list(sys.argv if argv is None else argv)
  try:
    fv(_rewrite_gin_args(argv))
    tf.config.set_visible_devices([], 'GPU')
    initialize_distributed(fv.multihost, fv.coordinator_address, fv.num_processes,
                           fv.process_id)
    if fv.list_tasks:
      import dsbs_jax.data.benchmarks  # noqa: F401  registers the paper's datasets
      import dsbs_jax.data.demo  # noqa: F401  registers the demo
      print(tasks.describe_families())
      return 0
    for path in [*fv.gin_search_paths, REPO_GIN_DIR]:
      gin.add_config_file_search_path(path)
    gin.parse_config_files_and_bindings(fv.gin_file, fv.gin_bindings, finalize_config=False)
    from dsbs_jax import train as train_module  # the gin-registered copy under `python -m`
    configured = gin.get_configurable(train_module.train)
    required = ('model_dir', 'mixture_or_task_name', 'task_feature_lengths', 'train_steps',
                'batch_size', 'model', 'optimizer')
    if fv.plan:
      gin.bind_parameter('train.train.model_dir', '/tmp/unused')  # plans write nothing
      configured(plan_mesh=_parse_mesh(fv.plan), **{name: gin.REQUIRED for name in required
                                                    if name != 'model_dir'})
      return 0
    configured(**{name: gin.REQUIRED for name in required})
  except (ConfigError, flags.Error, FileNotFoundError, FloatingPointError) as e:
    print(f'dsbs-train: error: {e}', file=sys.stderr)
    return 2
  except (ValueError, TypeError, KeyError, NameError) as e:
    if 'gin' not in type(e).__module__ and 'gin' not in str(e).lower() and 'binding' not in str(e):
      raise
    unset_macro = re.search(r"configurable 'macro' .* in scope '([^']+)'", str(e))
    if unset_macro:
      name = unset_macro.group(1)
      e = f'the macro {name} has no value; set it with --gin.{name}=... or in a gin file'
    print(f'dsbs-train: gin configuration error: {e}', file=sys.stderr)
    return 2
  return 0


def console_main() -> None:
  sys.exit(main())


if __name__ == '__main__':
  console_main()
