"""Conversion between HuggingFace `T5ForConditionalGeneration` checkpoints and our parameters.

A HF checkpoint is a directory written by `save_pretrained`: `config.json` plus
`model.safetensors` (optionally sharded with an index) or `pytorch_model.bin`.
Safetensors are read with numpy, so torch is needed only for `.bin` files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dsbs_jax import storage
from dsbs_jax.errors import ConfigError, DataError
from dsbs_jax.network import T5Config

Params = dict[str, Any]

_HF_ACTIVATIONS = {
    'gelu_new': 'gelu',
    'gelu_pytorch_tanh': 'gelu',
    'gelu': 'gelu_exact',
    'gelu_python': 'gelu_exact',
    'relu': 'relu',
    'silu': 'silu',
    'swish': 'silu',
}
# HF reads `gated-gelu` as tanh-GELU (`gelu_new`), so a gated exact GELU is spelled
# with `gelu_python`, HF's erf GELU, which it keeps as written.
_OUR_ACTIVATIONS = {'gelu': 'gelu_new', 'gelu_exact': 'gelu', 'relu': 'relu', 'silu': 'silu'}
_OUR_GATED_ACTIVATIONS = {**_OUR_ACTIVATIONS, 'gelu_exact': 'gelu_python'}


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> T5Config:
  """Our `T5Config` from the fields of a HF `config.json`.

  T5 v1.0 ties the output head to the embedding and scales the decoder output by
  d_model**-0.5; v1.1 does neither. transformers >= 5 always ties the head
  (`tie_word_embeddings: true`) and records the scaling separately in
  `scale_decoder_outputs`, so that flag, when present, decides. An unscaled head
  becomes our untied `logits_dense` (equal to the embedding if HF tied them).
  """
  proj = hf_config.get('feed_forward_proj', 'relu')
  gated = proj.startswith('gated-')
  act = proj.split('-')[-1]
  act = 'gelu_new' if gated and act == 'gelu' else act
  if act not in _HF_ACTIVATIONS:
    raise ConfigError(
        f'HF feed_forward_proj {proj!r} has no counterpart here; supported: '
        f'{sorted(_HF_ACTIVATIONS)}, optionally gated-'
    )
  ours = _HF_ACTIVATIONS[act]
  fields = {
      'vocab_size': hf_config['vocab_size'],
      'emb_dim': hf_config['d_model'],
      'num_heads': hf_config['num_heads'],
      'num_encoder_layers': hf_config['num_layers'],
      'num_decoder_layers': hf_config.get('num_decoder_layers') or hf_config['num_layers'],
      'head_dim': hf_config['d_kv'],
      'mlp_dim': hf_config['d_ff'],
      'mlp_activations': (ours, 'linear') if gated else (ours,),
      'logits_via_embedding': hf_config.get(
          'scale_decoder_outputs', hf_config.get('tie_word_embeddings', True)
      ),
      'dropout_rate': hf_config.get('dropout_rate', 0.1),
      'relative_attention_num_buckets': hf_config.get('relative_attention_num_buckets', 32),
      'relative_attention_max_distance': hf_config.get('relative_attention_max_distance', 128),
      'layer_norm_epsilon': hf_config.get('layer_norm_epsilon', 1e-6),
  }
  fields.update(overrides)
  return T5Config(**fields)


def config_to_hf(config: T5Config) -> dict[str, Any]:
  """The `config.json` fields of a HF T5 equivalent to `config`."""
  acts = config.mlp_activations
  gated = len(acts) == 2 and acts[1] == 'linear'
  if not (gated or len(acts) == 1):
    raise ConfigError(f'HF T5 cannot express mlp_activations={acts}')
  if gated:
    hf_act = _OUR_GATED_ACTIVATIONS[acts[0]]
    proj = 'gated-gelu' if hf_act == 'gelu_new' else f'gated-{hf_act}'
  else:
    proj = _OUR_ACTIVATIONS[acts[0]]
  return {
      'architectures': ['T5ForConditionalGeneration'],
      'model_type': 't5',
      'vocab_size': config.vocab_size,
      'd_model': config.emb_dim,
      'num_heads': config.num_heads,
      'num_layers': config.num_encoder_layers,
      'num_decoder_layers': config.num_decoder_layers,
      'd_kv': config.head_dim,
      'd_ff': config.mlp_dim,
      'feed_forward_proj': proj,
      'tie_word_embeddings': config.logits_via_embedding,
      'scale_decoder_outputs': config.logits_via_embedding,
      'dropout_rate': config.dropout_rate,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance': config.relative_attention_max_distance,
      'layer_norm_epsilon': config.layer_norm_epsilon,
      'is_encoder_decoder': True,
      'pad_token_id': 0,
      'eos_token_id': 1,
      'decoder_start_token_id': 0,
  }


def _mlp_names(config: T5Config) -> list[str]:
  n = len(config.mlp_activations)
  return ['wi'] if n == 1 else [f'wi_{i}' for i in range(n)]


def _attention_pairs(ours: str, theirs: str) -> list[tuple[str, str, bool]]:
  """(our kernel path, HF weight name, transpose) for one attention block."""
  return [
      (f'{ours}/{o}/kernel', f'{theirs}.{t}.weight', True)
      for o, t in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o'))
  ]


def _name_map(config: T5Config) -> list[tuple[str, str, bool]]:
  """Every (our path, HF name, transpose) pair; relpos tables transpose too."""
  pairs = [('token_embedder/embedding', 'shared.weight', False)]
  for stack, n_layers in (
      ('encoder', config.num_encoder_layers),
      ('decoder', config.num_decoder_layers),
  ):
    pairs.append(
        (
            f'{stack}/relpos_bias/rel_embedding',
            f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
            True,
        )
    )
    for i in range(n_layers):
      ours, hf = f'{stack}/layers_{i}', f'{stack}.block.{i}.layer'
      pairs += _attention_pairs(
          f'{ours}/attention' if stack == 'encoder' else f'{ours}/self_attention',
          f'{hf}.0.SelfAttention',
      )
      pairs.append(
          (
              f'{ours}/pre_attention_layer_norm/scale'
              if stack == 'encoder'
              else f'{ours}/pre_self_attention_layer_norm/scale',
              f'{hf}.0.layer_norm.weight',
              False,
          )
      )
      mlp_idx = 1
      if stack == 'decoder':
        pairs += _attention_pairs(f'{ours}/encoder_decoder_attention', f'{hf}.1.EncDecAttention')
        pairs.append(
            (f'{ours}/pre_cross_attention_layer_norm/scale', f'{hf}.1.layer_norm.weight', False)
        )
        mlp_idx = 2
      for name in _mlp_names(config):
        pairs.append(
            (f'{ours}/mlp/{name}/kernel', f'{hf}.{mlp_idx}.DenseReluDense.{name}.weight', True)
        )
      pairs.append((f'{ours}/mlp/wo/kernel', f'{hf}.{mlp_idx}.DenseReluDense.wo.weight', True))
      pairs.append((f'{ours}/pre_mlp_layer_norm/scale', f'{hf}.{mlp_idx}.layer_norm.weight', False))
    norm = 'encoder_norm' if stack == 'encoder' else 'decoder_norm'
    pairs.append((f'{stack}/{norm}/scale', f'{stack}.final_layer_norm.weight', False))
  if not config.logits_via_embedding:
    pairs.append(('decoder/logits_dense/kernel', 'lm_head.weight', True))
  return pairs


def _set(tree: Params, path: str, value: np.ndarray) -> None:
  *parents, leaf = path.split('/')
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get(tree: Mapping[str, Any], path: str) -> Any:
  for p in path.split('/'):
    tree = tree[p]
  return tree


def params_from_hf_state_dict(
    state_dict: Mapping[str, np.ndarray], config: T5Config, source: str = 'state dict'
) -> Params:
  """HF tensor names -> our nested parameter tree (float32 numpy)."""
  state_dict = dict(state_dict)
  head = state_dict.get('lm_head.weight')
  if config.logits_via_embedding:
    if head is not None and not np.array_equal(head, state_dict['shared.weight']):
      raise DataError(
          f'{source}: the config scales decoder outputs (a tied T5 v1.0 head) but '
          'the checkpoint has a separate lm_head.weight'
      )
  elif head is None and 'shared.weight' in state_dict:
    state_dict['lm_head.weight'] = state_dict['shared.weight']
  params: Params = {}
  used = set()
  for ours, theirs, transpose in _name_map(config):
    if theirs not in state_dict:
      raise DataError(f'{source}: missing tensor {theirs!r} (needed for {ours})')
    value = np.asarray(state_dict[theirs], dtype=np.float32)
    _set(params, ours, value.T if transpose else value)
    used.add(theirs)
  tied = {'encoder.embed_tokens.weight', 'decoder.embed_tokens.weight'}
  if config.logits_via_embedding:
    tied.add('lm_head.weight')
  unknown = sorted(k for k in state_dict if k not in used and k not in tied)
  if unknown:
    raise DataError(
        f'{source}: tensors with no counterpart in the network: {unknown[:8]}'
        f'{" ..." if len(unknown) > 8 else ""}'
    )
  return params


def params_to_hf_state_dict(params: Mapping[str, Any], config: T5Config) -> dict[str, np.ndarray]:
  """Our parameter tree -> HF tensor names (float32 numpy, contiguous)."""
  out = {}
  for ours, theirs, transpose in _name_map(config):
    value = np.asarray(_get(params, ours), dtype=np.float32)
    out[theirs] = np.ascontiguousarray(value.T if transpose else value)
  return out


def read_hf_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads the weights of a `save_pretrained` directory (local or a URL)."""
  single = os.path.join(path, 'model.safetensors')
  index = os.path.join(path, 'model.safetensors.index.json')
  torch_bin = os.path.join(path, 'pytorch_model.bin')
  if storage.exists(single) or storage.exists(index):
    from safetensors.numpy import load

    if storage.exists(single):
      return load(storage.read_bytes(single))
    shards = sorted(set(_read_json(index)['weight_map'].values()))
    state: dict[str, np.ndarray] = {}
    for shard in shards:
      state.update(load(storage.read_bytes(os.path.join(path, shard))))
    return state
  if storage.exists(torch_bin):
    import torch

    tensors = torch.load(
        io.BytesIO(storage.read_bytes(torch_bin)), map_location='cpu', weights_only=True
    )
    return {k: v.float().numpy() for k, v in tensors.items()}
  raise DataError(
      f'{path}: no model.safetensors, model.safetensors.index.json or '
      'pytorch_model.bin (expected a HF save_pretrained directory)'
  )


def _read_json(path: str) -> Any:
  try:
    return json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from None


def read_hf_config(path: str) -> T5Config:
  """Our `T5Config` from a `save_pretrained` directory's `config.json`."""
  config_path = os.path.join(path, 'config.json')
  hf_config = _read_json(config_path)
  if not isinstance(hf_config, dict):
    raise DataError(f'{config_path}: expected a JSON object')
  if hf_config.get('model_type', 't5') != 't5':
    raise DataError(f'{config_path}: model_type is {hf_config["model_type"]!r}, expected "t5"')
  try:
    return config_from_hf(hf_config)
  except KeyError as e:
    raise DataError(f'{config_path}: missing field {e.args[0]!r}') from None
  except (TypeError, ValueError) as e:
    raise DataError(f'{config_path}: {e}') from None


def load_hf_checkpoint(path: str, **config_overrides: Any) -> tuple[T5Config, Params]:
  """(config, params) from a HF `save_pretrained` directory (local or a URL)."""
  config = dataclasses.replace(read_hf_config(path), **config_overrides)
  return config, params_from_hf_state_dict(read_hf_state_dict(path), config, source=path)


def save_hf_checkpoint(path: str, config: T5Config, params: Mapping[str, Any]) -> None:
  """Writes `config.json` and `model.safetensors` that `from_pretrained` loads."""
  from safetensors.numpy import save

  hf_config = config_to_hf(config)
  storage.write_atomic(
      os.path.join(path, 'model.safetensors'),
      save(params_to_hf_state_dict(params, config), metadata={'format': 'pt'}),
  )
  storage.write_atomic(os.path.join(path, 'config.json'), json.dumps(hf_config, indent=2))
