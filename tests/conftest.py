"""Shared fixtures. Sets up 8 simulated CPU devices before JAX initialises."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def hf_t5(tmp_path, feed_forward_proj: str, tie: bool, seed: int = 0):
  """A small randomly initialised HF T5 saved with save_pretrained; returns (model, dir)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = transformers.T5Config(
      vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
      num_heads=4, feed_forward_proj=feed_forward_proj, tie_word_embeddings=tie,
      relative_attention_num_buckets=8, relative_attention_max_distance=20,
      decoder_start_token_id=0, dropout_rate=0.0)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  path = tmp_path / f'hf_{feed_forward_proj}_{tie}'
  model.save_pretrained(path)
  return model, str(path)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def data_root():
  """The authors' released data: $DSBS_DATA_ROOT, else shared/datasets beside the repo.

  Missing data skips locally but fails under CI=true, where it must be present.
  """
  root = os.environ.get('DSBS_DATA_ROOT') or os.path.join(REPO, '..', 'shared', 'datasets')
  if not os.path.isdir(os.path.join(root, 'cqa')):
    message = f'released datasets not found at {root}; set DSBS_DATA_ROOT'
    if os.environ.get('CI') == 'true':
      pytest.fail(message)
    pytest.skip(message)
  return os.path.abspath(root)


@pytest.fixture
def rng():
  return np.random.RandomState(0)
