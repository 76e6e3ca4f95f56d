"""HF T5 <-> dsbs: logits parity (padded and packed) and exact round trips."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import hf_t5
from dsbs_jax import hf_checkpoint, network
from dsbs_jax.errors import DataError

torch = pytest.importorskip('torch')

VARIANTS = [('gated-gelu', False), ('relu', True)]  # T5 v1.1, T5 v1.0


def _shift_right(targets):
  return np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)


def _hf_logits(model, enc, dec_in):
  with torch.no_grad():
    return model(
        input_ids=torch.tensor(enc),
        attention_mask=torch.tensor(enc > 0).long(),
        decoder_input_ids=torch.tensor(dec_in),
    ).logits.numpy()


@pytest.mark.parametrize('proj,tie', VARIANTS)
def test_padded_logits_match_transformers(tmp_path, rng, proj, tie):
  hf_model, path = hf_t5(tmp_path, proj, tie)
  config, params = hf_checkpoint.load_hf_checkpoint(path)
  assert config.logits_via_embedding == tie
  enc = rng.randint(2, 300, size=(3, 40))
  enc[1, 30:] = 0
  enc[2, 9:] = 0
  tgt = rng.randint(2, 300, size=(3, 35))
  tgt[0, 20:] = 0
  dec_in = _shift_right(tgt)
  ours = np.asarray(
      network.Transformer(config).apply({'params': params}, enc, dec_in, tgt, enable_dropout=False)
  )
  theirs = _hf_logits(hf_model, enc, dec_in)
  mask = tgt > 0
  assert np.abs(ours - theirs)[mask].max() <= 1e-4


@pytest.mark.parametrize('proj,tie', VARIANTS)
@pytest.mark.parametrize('block', [256, 5])
def test_packed_logits_match_transformers_per_example(tmp_path, rng, proj, tie, block):
  """block 5 splits the 48/28-long rows into padded blocks of query rows."""
  hf_model, path = hf_t5(tmp_path, proj, tie)
  config, params = hf_checkpoint.load_hf_checkpoint(path)
  config = dataclasses.replace(config, attention_block_size=block)
  examples = [
      (rng.randint(2, 300, size=n_in), rng.randint(2, 300, size=n_t))
      for n_in, n_t in ((12, 7), (20, 11), (5, 3))
  ]
  enc_len, dec_len = 48, 28
  enc, dec_tgt, dec_in = (np.zeros((1, n), int) for n in (enc_len, dec_len, dec_len))
  enc_seg, dec_seg = np.zeros((1, enc_len), int), np.zeros((1, dec_len), int)
  i = j = 0
  for seg, (x, y) in enumerate(examples, start=1):
    enc[0, i : i + len(x)], enc_seg[0, i : i + len(x)] = x, seg
    dec_tgt[0, j : j + len(y)], dec_seg[0, j : j + len(y)] = y, seg
    dec_in[0, j + 1 : j + len(y)] = y[:-1]  # each segment starts from token 0
    i, j = i + len(x), j + len(y)
  ours = np.asarray(
      network.Transformer(config).apply(
          {'params': params}, enc, dec_in, dec_tgt, enc_seg, dec_seg, enable_dropout=False
      )
  )
  j = 0
  for x, y in examples:
    theirs = _hf_logits(hf_model, x[None], _shift_right(y[None]))[0]
    assert np.abs(ours[0, j : j + len(y)] - theirs).max() <= 1e-4
    j += len(y)


@pytest.mark.parametrize('proj,tie', VARIANTS)
def test_round_trip_gives_identical_tensors(tmp_path, proj, tie):
  from safetensors.numpy import load_file

  transformers = pytest.importorskip('transformers')
  hf_model, path = hf_t5(tmp_path, proj, tie)
  config, params = hf_checkpoint.load_hf_checkpoint(path)
  out = tmp_path / 'exported'
  hf_checkpoint.save_hf_checkpoint(str(out), config, params)
  original = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  exported = load_file(str(out / 'model.safetensors'))
  for name, value in exported.items():
    np.testing.assert_array_equal(value, original[name], err_msg=name)
  assert set(original) - set(exported) <= {
      'encoder.embed_tokens.weight',
      'decoder.embed_tokens.weight',
      'lm_head.weight',
  }
  # transformers itself loads the export and computes the same function.
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(out)).eval()
  ids = np.arange(2, 14)[None]
  np.testing.assert_allclose(
      _hf_logits(reloaded, ids, ids), _hf_logits(hf_model, ids, ids), atol=1e-6
  )
  # and dsbs reads it back to the same parameters.
  config2, params2 = hf_checkpoint.load_hf_checkpoint(str(out))
  assert config2 == config
  import jax

  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_pytorch_bin_checkpoints_load(tmp_path):
  hf_model, path = hf_t5(tmp_path, 'gated-gelu', False)
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'config.json').write_text((tmp_path / path / 'config.json').read_text())
  torch.save(hf_model.state_dict(), bin_dir / 'pytorch_model.bin')
  _, a = hf_checkpoint.load_hf_checkpoint(path)
  _, b = hf_checkpoint.load_hf_checkpoint(str(bin_dir))
  import jax

  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_missing_tensor_and_directory_errors(tmp_path):
  from safetensors.numpy import load_file, save_file

  _, path = hf_t5(tmp_path, 'relu', True)
  state = load_file(f'{path}/model.safetensors')
  del state['decoder.final_layer_norm.weight']
  save_file(state, f'{path}/model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(DataError, match=r'decoder\.final_layer_norm\.weight'):
    hf_checkpoint.load_hf_checkpoint(path)
  with pytest.raises(DataError, match=r'nowhere/config\.json: file not found'):
    hf_checkpoint.load_hf_checkpoint(str(tmp_path / 'nowhere'))


def test_config_round_trip_through_hf_fields():
  config = network.T5Config(
      vocab_size=384,
      emb_dim=64,
      num_heads=2,
      num_encoder_layers=3,
      num_decoder_layers=2,
      head_dim=32,
      mlp_dim=128,
  )
  assert (
      hf_checkpoint.config_from_hf(json.loads(json.dumps(hf_checkpoint.config_to_hf(config))))
      == config
  )


def test_gated_exact_gelu_exports_as_exact_gelu(tmp_path, rng):
  """HF reads `gated-gelu` as tanh-GELU; the export must say erf-GELU and compute it."""
  transformers = pytest.importorskip('transformers')
  import flax.linen as nn
  import jax

  config = network.T5Config(
      vocab_size=300,
      emb_dim=32,
      num_heads=4,
      num_encoder_layers=2,
      num_decoder_layers=2,
      head_dim=8,
      mlp_dim=64,
      dropout_rate=0.0,
      mlp_activations=('gelu_exact', 'linear'),
  )
  enc = rng.randint(2, 300, size=(2, 24))
  tgt = rng.randint(2, 300, size=(2, 16))
  dec_in = _shift_right(tgt)
  module = network.Transformer(config)
  params = nn.meta.unbox(
      module.init(jax.random.PRNGKey(0), enc, dec_in, tgt, enable_dropout=False)['params']
  )
  hf_checkpoint.save_hf_checkpoint(str(tmp_path / 'hf'), config, params)
  hf_model = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / 'hf')).eval()
  assert hf_model.config.dense_act_fn == 'gelu_python' and hf_model.config.is_gated_act
  ours = np.asarray(module.apply({'params': params}, enc, dec_in, tgt, enable_dropout=False))
  assert np.abs(ours - _hf_logits(hf_model, enc, dec_in)).max() <= 1e-4
  assert hf_checkpoint.read_hf_config(str(tmp_path / 'hf')) == config
