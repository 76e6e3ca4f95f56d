"""dsbs-serve's app on loopback, through the official openai client and raw HTTP:
answers against the student decoding each input alone, batching and shape
buckets, checkpoints of every kind, and the errors a client gets."""

import collections
import concurrent.futures
import functools
import json
import urllib.request

import jax
import numpy as np
import openai
import pytest
import seqio

from conftest import initial_params, serve_app, tiny_config
from dsbs_jax import checkpoints, export, models, network, server, serving
from dsbs_jax.data import demo

LENGTHS = {'inputs': 256, 'targets': 24}


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  """A MODEL_DIR whose checkpoint records what serving needs, as dsbs-train writes it."""
  config = tiny_config(vocab_size=384)
  vocab = seqio.ByteVocabulary()
  model = models.StepByStepModel(network.Transformer(config), vocab, vocab)
  params = initial_params(model)
  directory = tmp_path_factory.mktemp('serve') / 'run'
  checkpointer = checkpoints.Checkpointer(directory / 'checkpoints', async_save=False)
  metadata = {
      'model_config': checkpoints.config_to_dict(config),
      'vocabulary': {'kind': 'bytes', 'extra_ids': 0},
      'task_feature_lengths': LENGTHS,
  }
  checkpointer.save(7, {'params': params}, 0, force=True, metadata=metadata)
  checkpointer.close()
  return directory, model, params


@pytest.fixture(scope='module')
def student(model_dir):
  return serving.load_student(str(model_dir[0]), max_batch=8)


@pytest.fixture(scope='module')
def url(student):
  # Batches wait long enough to fill: the test counts them.
  with serve_app(server.App(student, 'student', max_batch=8, wait_ms=1000)) as base:
    yield base


def _alone(model, params, text: str) -> str:
  """The reference: one input, its exact length, decoded with `predict_batch`."""
  vocab = seqio.ByteVocabulary()
  ids = [*vocab.encode(text), 1]
  out = np.asarray(_predict(model)(params, np.array([ids], np.int32)))[0].tolist()
  return vocab.decode(out[: out.index(1)] if 1 in out else out)


@functools.cache
def _predict(model):
  return jax.jit(
      lambda params, tokens: model.predict_batch(
          params, {'encoder_input_tokens': tokens}, max_decode_length=LENGTHS['targets']
      )
  )


def _same_length_inputs(n: int) -> list[str]:
  """`n` demo inputs of one byte length, so that the reference compiles once."""
  by_length = collections.defaultdict(list)
  for row in demo.generate()['test']:
    by_length[len(row['input'].encode())].append(row['input'])
  return next(texts[:n] for texts in by_length.values() if len(texts) >= n)


def test_concurrent_requests_batch_into_buckets_and_match_decoding_alone(model_dir, url, student):
  _, model, params = model_dir
  client = openai.OpenAI(base_url=url, api_key='unused', max_retries=0)

  def ask(text, explain=True, max_tokens=None):
    return client.chat.completions.create(
        model='student',
        messages=[{'role': 'user', 'content': text}],
        extra_body={'explain': explain},
        max_tokens=max_tokens,
    )

  texts = _same_length_inputs(4)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    responses = list(pool.map(ask, texts))
  for text, response in zip(texts, responses, strict=True):
    message = response.choices[0].message
    assert message.content == _alone(model, params, 'predict: ' + text)
    assert message.model_extra['reasoning_content'] == _alone(model, params, 'explain: ' + text)
    assert response.usage.prompt_tokens == len(('predict: ' + text).encode()) + 1
  health = json.loads(urllib.request.urlopen(url[: -len('/v1')] + '/health').read())
  # Four labels in one batch, four rationales in another: one compiled shape.
  assert (health['requests'], health['batches']) == (8, 2)
  ((rows, width),) = {tuple(s) for s in health['compiled_shapes']}
  assert rows == 4 and width % 64 == 0
  # Inputs of other lengths in the same bucket compile nothing new; max_tokens cuts.
  others = [t[:-k] for k, t in enumerate(texts, start=1)]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    cut = list(pool.map(lambda t: ask(t, explain=False, max_tokens=2), others))
  assert all(c.usage.completion_tokens <= 2 for c in cut)
  assert student.compiled == {(rows, width)}


def test_an_hf_export_serves_the_same_answers(model_dir, tmp_path, student):
  _, written = export.export(str(model_dir[0]), str(tmp_path / 'hf'))
  assert (
      json.loads((tmp_path / 'hf' / export.SERVING_FILE).read_text())['task_feature_lengths']
      == LENGTHS
  )
  hf = serving.load_student(written)
  rows = [
      hf.prepare('Anna has 4 shells.', False, None),
      hf.prepare('Anna has 4 shells.', True, None),
  ]
  assert [a.text for a in hf.answer(rows)] == [a.text for a in student.answer(rows)]


def _post(url, path, body, headers=None):
  request = urllib.request.Request(
      url + path,
      data=body.encode(),
      headers={'Content-Type': 'application/json', **(headers or {})},
  )
  try:
    with urllib.request.urlopen(request) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


@pytest.mark.parametrize(
    'body, status, message',
    [
        ('{bad json', 400, 'the body is not valid JSON'),
        ('{"model": "student", "prompt": "  "}', 400, 'the input is empty'),
        ('{"model": "student", "prompt": "x", "explain": "yes"}', 400, 'explain: Input should be'),
        ('{"model": "student"}', 400, 'prompt: Field required'),
        ('{"model": "student", "prompt": "x", "temperature": 0.5}', 400, 'decodes greedily'),
        ('{"model": "student", "prompt": "x", "n": 0}', 400, 'n: Input should be greater'),
        ('{"model": "student", "prompt": "x", "logprobs": 3}', 400, 'logprobs: Extra inputs'),
        ('{"model": "student", "prompt": "x", "stream": true}', 400, 'streaming is not supported'),
        ('{"model": "gpt-4", "prompt": "x"}', 404, "model 'gpt-4' is not served here"),
        ('{"model": "student", "prompt": "' + 'x' * 300 + '"}', 400, 'the input is 310 tokens; '),
    ],
)
def test_bad_requests_get_4xx_json(url, body, status, message):
  code, payload = _post(url, '/completions', body)
  assert code == status and message in payload['error']['message'], payload


def test_overlong_inputs_truncate_when_configured_and_say_so(model_dir, student, monkeypatch):
  _, model, params = model_dir
  monkeypatch.setattr(student, 'overlong', 'truncate')  # --overlong=truncate
  with serve_app(server.App(student, 'student')) as base:
    code, payload = _post(
        base, '/completions', json.dumps({'model': 'student', 'prompt': 'y' * 300})
    )
  assert code == 200
  choice = payload['choices'][0]
  assert choice['warning'] == 'input truncated from 310 to 256 tokens'
  vocab = seqio.ByteVocabulary()
  kept = vocab.decode(vocab.encode('predict: ' + 'y' * 300)[:255])
  assert choice['text'] == _alone(model, params, kept)


def test_an_api_key_is_required_once_set(student):
  with serve_app(server.App(student, 'student', api_key='secret-123')) as base:
    body = json.dumps({'model': 'student', 'prompt': 'x'})
    code, payload = _post(base, '/completions', body, {'Authorization': 'Bearer wrong'})
    assert code == 401 and 'secret-123' not in json.dumps(payload)
    assert _post(base, '/completions', body, {'Authorization': 'Bearer secret-123'})[0] == 200
    # Health stays open for load balancers.
    assert (
        json.loads(urllib.request.urlopen(base[: -len('/v1')] + '/health').read())['status'] == 'ok'
    )


def test_a_path_that_is_no_model_is_one_line(tmp_path, capsys):
  assert server.main(['--model', str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
      (
          f'dsbs-serve: error: --model {tmp_path}: neither a dsbs-jax MODEL_DIR, best/ or '
          'checkpoints/, nor an HF directory (config.json)'
      )
  ]


@pytest.mark.parametrize(
    'model_type, flag, scope',
    [
        ('gpt2', '--precompile', 'a dsbs-jax student'),
        ('gpt2', '--overlong=truncate', 'a dsbs-jax student'),
        ('gpt2', '--vocabulary=bytes', 'a dsbs-jax student'),
        ('t5', '--device=cuda', 'a causal LM'),
    ],
)
def test_flags_the_models_kind_does_not_read_are_refused_before_it_loads(
    tmp_path, capsys, model_type, flag, scope
):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': model_type}))  # nothing else
  assert server.main(['--model', str(tmp_path), flag]) == 2
  name = flag.split('=')[0]
  assert capsys.readouterr().err.strip().splitlines() == [
      f'dsbs-serve: error: {name}: only read with {scope}'
  ]
