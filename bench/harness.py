"""What the benchmarks share: model configs, the same weights for both sides, model
FLOPs, the machine's measured matmul peak, the dot products a step computes and
their time alone, peak memory, and prepared inputs.

No seqio or TensorFlow here (`bench/examples.py` holds what needs them): from a
`prepared` inputs file the benches run on a host with JAX and torch alone, as a
GPU box has.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import torch

from bench import reference_torch
from dsbs_jax import hf_checkpoint, models, network

# The benches run JAX and torch in one process: on a GPU JAX must not take 75% of
# its memory up front, and its peak-memory count then shows what it really uses.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    # T5 v1.1 small with the byte vocabulary both sides use.
    'small': network.T5Config(
        vocab_size=384,
        emb_dim=512,
        num_heads=6,
        num_encoder_layers=8,
        num_decoder_layers=8,
        head_dim=64,
        mlp_dim=1024,
        dropout_rate=0.0,
    ),
    # A config that runs in seconds on a CPU.
    'mini': network.T5Config(
        vocab_size=384,
        emb_dim=128,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        head_dim=32,
        mlp_dim=512,
        dropout_rate=0.0,
    ),
    # T5 v1.1 base, for a GPU.
    'base': network.T5Config(
        vocab_size=384,
        emb_dim=768,
        num_heads=12,
        num_encoder_layers=12,
        num_decoder_layers=12,
        head_dim=64,
        mlp_dim=2048,
        dropout_rate=0.0,
    ),
    # T5 v1.1 large, for a GPU.
    'large': network.T5Config(
        vocab_size=384,
        emb_dim=1024,
        num_heads=16,
        num_encoder_layers=24,
        num_decoder_layers=24,
        head_dim=64,
        mlp_dim=2816,
        dropout_rate=0.0,
    ),
    # T5 v1.1 XL (3B), the largest that one 139 GiB GPU should train at batch 64
    # (bench/README.md); `--sides=ours`, as the reference would need its own copy.
    'xl': network.T5Config(
        vocab_size=384,
        emb_dim=2048,
        num_heads=32,
        num_encoder_layers=24,
        num_decoder_layers=24,
        head_dim=64,
        mlp_dim=5120,
        dropout_rate=0.0,
    ),
}


def add_shared_flags(parser: argparse.ArgumentParser) -> None:
  """The flags the train and decode benches share: `--prepared` inputs, and the hidden
  `--memory_side` their memory child processes run with (`children_memory`)."""
  parser.add_argument(
      '--prepared',
      help='inputs file: read when it exists, else written '
      '(built from DSBS_DATA_ROOT, which needs TensorFlow)',
  )
  parser.add_argument('--memory_side', choices=['ours', 'reference'], help=argparse.SUPPRESS)


def on_gpu() -> bool:
  return jax.default_backend() == 'gpu'


def student(config: network.T5Config, vocab: Mapping[str, int], **kwargs) -> models.StepByStepModel:
  """Our model over `config`. `vocab` holds the two numbers the model reads of seqio's
  ByteVocabulary (`examples.vocab_shape()`), so building it needs no seqio."""
  shape = types.SimpleNamespace(**vocab)
  return models.StepByStepModel(network.Transformer(config), shape, shape, **kwargs)


def _encode(value: Any, arrays: list) -> Any:
  """A JSON-able description of nested dicts/lists/scalars; arrays go to `arrays`."""
  if isinstance(value, np.ndarray):
    arrays.append(value)
    return {'array': len(arrays) - 1}
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    return {'dict': [[k, _encode(v, arrays)] for k, v in value.items()]}
  if isinstance(value, (list, tuple)):
    return {'list': [_encode(v, arrays) for v in value]}
  if value is None or isinstance(value, (bool, int, float, str)):
    return {'scalar': value}
  raise TypeError(f'cannot store a {type(value).__name__} in a prepared inputs file')


def _decode(node: Any, arrays: Any) -> Any:
  if 'array' in node:
    return arrays[f'a{node["array"]}']
  if 'dict' in node:
    return {k: _decode(v, arrays) for k, v in node['dict']}
  if 'list' in node:
    return [_decode(v, arrays) for v in node['list']]
  return node['scalar']


def prepared(path: str | None, key: Mapping[str, Any], build: Callable[[], Any]) -> Any:
  """`build()`'s result, read from `path` when that file exists, else built (and written
  to `path` when one is given). `key`, the flags the result depends on, must match the
  file's, so a file prepared for other flags is an error rather than wrong data.

  The file is an `.npz` of plain arrays plus a JSON description of the nesting, read
  with `allow_pickle=False`: loading one executes nothing (a pickle could).
  """
  key = dict(key)
  if path and os.path.exists(path):
    with np.load(path, allow_pickle=False) as saved:
      description = _description(saved)
      _check_key(path, description, key)
      return _decode(description['inputs'], saved)
  inputs = build()
  if path:
    arrays: list[np.ndarray] = []
    description = json.dumps({'key': key, 'inputs': _encode(inputs, arrays)})
    with open(path, 'wb') as f:
      np.savez(
          f,
          structure=np.frombuffer(description.encode('utf-8'), np.uint8),
          **{f'a{i}': a for i, a in enumerate(arrays)},
      )
  return inputs


def check_prepared(path: str | None, key: Mapping[str, Any]) -> None:
  """Refuses a `--prepared` file made for other flags before any child process starts."""
  if path and os.path.exists(path):
    with np.load(path, allow_pickle=False) as saved:
      _check_key(path, _description(saved), dict(key))


def _description(saved: Any) -> dict[str, Any]:
  return json.loads(saved['structure'].tobytes().decode('utf-8'))


def _check_key(path: str, description: Mapping[str, Any], key: dict[str, Any]) -> None:
  if description['key'] != key:
    raise ValueError(
        f'{path} was prepared for {description["key"]}, not {key}: pass '
        'another --prepared path or delete this one'
    )


def same_weights(config: network.T5Config, seed: int = 0) -> tuple[Any, Any]:
  """(HF torch model, our params) holding identical weights."""
  model = reference_torch.build_model(hf_checkpoint.config_to_hf(config), seed)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return model.to(reference_torch.device()), hf_checkpoint.params_from_hf_state_dict(state, config)


def forward_flops_per_token(
    config: network.T5Config, enc_len: int, dec_len: int
) -> tuple[float, float]:
  """(encoder, decoder) forward FLOPs per real token: 2 x matmul weights + attention."""
  inner = config.num_heads * config.head_dim
  mlp_mats = len(config.mlp_activations) + 1
  enc = (
      2 * (4 * config.emb_dim * inner + mlp_mats * config.emb_dim * config.mlp_dim)
      + 4 * inner * enc_len
  )
  dec = 2 * (
      8 * config.emb_dim * inner + mlp_mats * config.emb_dim * config.mlp_dim
  ) + 4 * inner * (dec_len + enc_len)
  return (
      config.num_encoder_layers * enc,
      config.num_decoder_layers * dec + 2 * config.emb_dim * config.vocab_size,
  )


def train_flops(
    config: network.T5Config, enc_tokens: float, dec_tokens: float, enc_len: int, dec_len: int
) -> float:
  """Model FLOPs of a train step on these real tokens (backward = 2 x forward)."""
  enc, dec = forward_flops_per_token(config, enc_len, dec_len)
  return 3 * (enc * enc_tokens + dec * dec_tokens)


def matmul_peak_flops(dtype: str = 'float32', repeats: int = 5) -> float:
  """The default device's dense matmul rate in `dtype` (best of `repeats`), measured now
  on random operands: 2048 x 2048 on a CPU, 8192 x 8192 to fill a GPU."""
  n = 8192 if on_gpu() else 2048
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_time(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n**3 / best


# A dot product as (dtype, batch, m, k, n): [batch, m, k] @ [batch, k, n].
Matmul = tuple[str, int, int, int, int]


def matmuls(fn: Callable[..., Any], *args: Any) -> collections.Counter[Matmul]:
  """The dot products `fn(*args)` computes, counted by shape, read from its jaxpr.

  A scan's body counts `length` times; gradients and rematerialisation show up
  as the dots they add. A while loop or cond is an error: how often its dots
  run is not in the jaxpr.
  """
  return _jaxpr_matmuls(jax.make_jaxpr(fn)(*args).jaxpr)


def matmul_flops(found: collections.Counter[Matmul]) -> float:
  return float(sum(2 * b * m * k * n * count for (_, b, m, k, n), count in found.items()))


def _jaxpr_matmuls(jaxpr: jax.extend.core.Jaxpr) -> collections.Counter[Matmul]:
  found: collections.Counter[Matmul] = collections.Counter()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      lhs, rhs = (v.aval for v in eqn.invars)
      (lhs_contract, _), (lhs_batch, _) = eqn.params['dimension_numbers']
      batch = math.prod(lhs.shape[d] for d in lhs_batch)
      k = math.prod(lhs.shape[d] for d in lhs_contract)
      found[(str(lhs.dtype), batch, lhs.size // (batch * k), k, rhs.size // (batch * k))] += 1
      continue
    if name in ('while', 'cond'):
      raise ValueError(f'matmuls: a {name} runs its dots a data-dependent number of times')
    times = eqn.params['length'] if name == 'scan' else 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      for shape, count in _jaxpr_matmuls(sub).items():
        found[shape] += times * count
  return found


def matmul_seconds(found: collections.Counter[Matmul], repeats: int = 3) -> float:
  """How long the dot products in `found` take run alone, one after another, each on
  operands in the layout it prefers (best of `repeats`).

  For a train step's dots, each of which fills the device for milliseconds,
  this is about the least time a step computing them can take on a CPU, whatever
  else it does. Not so for decoding's microsecond dots, which a compiled step
  runs several at a time on a CPU's cores, nor on a GPU, where each dot timed
  alone pays a launch and a synchronisation that a compiled step does not.
  """
  f = jax.jit(jnp.matmul)
  total = 0.0
  for (dtype, b, m, k, n), count in found.items():
    run = functools.partial(_blocking, f, jnp.ones((b, m, k), dtype), jnp.ones((b, k, n), dtype))
    run()
    total += count * min(_time(run) for _ in range(repeats))
  return total


def _blocking(f: Callable[..., Any], *args: Any) -> Any:
  return f(*args).block_until_ready()


def matmuls_alone(seconds: float, report: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """Our side of a train bench's `report` as it would be if its step's dot products,
  taking `seconds`, were all it ran: the ceiling of what faster non-matmul code,
  with the same padding, could bring against the reference."""
  ours = report['ours']
  speedup = ours['median_step_s'] / seconds
  return {
      'median_step_s': seconds,
      'examples_per_s': ours['examples_per_s'] * speedup,
      'flop_utilisation': ours['flop_utilisation'] * speedup,
      'examples_per_s_over_reference': (
          ours['examples_per_s'] * speedup / report['reference']['examples_per_s']
      ),
  }


_START = time.perf_counter()


def progress(message: str) -> None:
  """A stderr line with the seconds since start-up: the JSON comes only at the end, and
  compiling a step can take minutes (T5 1.1 base on a GPU)."""
  print(f'[{time.perf_counter() - _START:7.1f}s] {message}', file=sys.stderr, flush=True)


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def reset_peak_memory(side: str) -> float:
  """Starts counting `side`'s peak memory; returns what it holds now, in bytes.

  On a CPU both sides are this process's RSS (Linux `clear_refs` 5 restarts its
  peak), after glibc's `malloc_trim` gives back what the first step freed: else
  a step can reuse pages malloc kept and add nothing to RSS (our mini step at
  44 rows read 0.07 GB, where XLA's buffer plan has 1.58 GB). On a GPU, 'ours'
  is JAX's device allocator, whose peak cannot be restarted: it counts from
  start-up, which in a memory child process is set-up and one step.
  'reference' is torch's CUDA allocator.
  """
  if not on_gpu():
    trim = getattr(ctypes.CDLL(None), 'malloc_trim', None)  # glibc's; musl has none
    if trim:
      trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return _status_bytes('VmRSS')
  if side == 'reference':
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return float(torch.cuda.memory_allocated())
  return float(jax.local_devices()[0].memory_stats()['bytes_in_use'])


def peak_memory(side: str) -> float:
  """`side`'s peak memory since `reset_peak_memory`, in bytes."""
  if not on_gpu():
    return _status_bytes('VmHWM')
  if side == 'reference':
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated())
  return float(jax.local_devices()[0].memory_stats()['peak_bytes_in_use'])


def print_child_memory(side: str, setup_bytes: float) -> None:
  """A memory child's report: `side`'s peak since `reset_peak_memory` returned
  `setup_bytes`, as the last line of its stdout.

  The peak is at least `setup_bytes`, since that was held when counting began.
  Linux's RSS counters are per-CPU approximations, so when the steps add almost
  nothing VmHWM can read a few pages below the VmRSS taken at the reset; such a
  step adds 0 bytes, not a negative amount.
  """
  peak = max(peak_memory(side), setup_bytes)
  print(json.dumps({'peak_bytes': peak, 'setup_bytes': setup_bytes}))


def children_memory(
    script: str, flags: Sequence[str], sides: Sequence[str] = ('ours', 'reference')
) -> dict[str, dict[str, float]]:
  """Each of `sides`' peak memory and what its steps add to it, from `script` run with
  `flags` as that side's memory child.

  Call it before this process touches the device: on a GPU both frameworks keep
  the memory they pooled, and a child started later finds the device full.
  """
  memory = {}
  for side in sides:
    progress(f'peak memory of {side} (a child process)')
    child = json.loads(run_child([script, *flags, f'--memory_side={side}']).splitlines()[-1])
    memory[side] = {
        'peak_memory_bytes': child['peak_bytes'],
        'step_memory_bytes': child['peak_bytes'] - child['setup_bytes'],
    }
  return memory


def ratios(ours: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
  """ours / reference for each figure the reference has a nonzero value of (a side's
  step memory can be 0 on CPU: its second pass reuses what the first allocated)."""
  return {k: ours[k] / reference[k] for k in ours if reference.get(k)}


def machine(matmul_peak: float | None = None) -> dict[str, Any]:
  """The JSON's description of where it ran."""
  return {
      'cpu': platform.processor() or platform.machine(),
      'cores': os.cpu_count(),
      'jax_backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind,
      'jax': jax.__version__,
      'torch': torch.__version__,
      'memory': 'device allocator peak' if on_gpu() else 'process RSS peak',
      **({'matmul_peak_flops_per_s': matmul_peak} if matmul_peak else {}),
  }


def _status_bytes(field: str) -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return float(line.split()[1]) * 1024.0
  raise RuntimeError(f'{field} not in /proc/self/status')


def run_child(argv: Sequence[str]) -> str:
  """stdout of `python argv` run from the repository root."""
  path = os.pathsep.join(p for p in (os.environ.get('PYTHONPATH'), REPO) if p)
  try:
    return subprocess.run(
        [sys.executable, *argv],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=path),
    ).stdout
  except subprocess.CalledProcessError as error:
    error.add_note(f'its stderr ends with:\n{error.stderr[-4000:]}')
    raise
