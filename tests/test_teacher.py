"""dsbs-teacher against real servers on loopback: dsbs-serve's app serving a small
GPT-2 built from a config (no weights can be downloaded), through the official
`openai` client, and a fault-injecting proxy in front of it for 429s, 5xx,
timeouts and malformed answers."""

import contextlib
import http.server
import json
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import seqio

from conftest import REPO, SUBPROCESS_ENV, cli, serve_app
from dsbs_jax import extraction, prompts, server, serving, teacher_cli, teachers
from dsbs_jax.data import benchmarks, demo

pytest.importorskip('torch')
KEY = 'sk-test-not-to-be-seen-0123456789'


@pytest.fixture(scope='module')
def lm_dir(tmp_path_factory):
  from bench import teacher_model

  out = str(tmp_path_factory.mktemp('teacher') / 'gpt2')
  teacher_model.build(out, width=32, layers=1, context=1024)
  return out


@pytest.fixture(scope='module')
def lm_app(lm_dir):
  return server.App(serving.CausalLM(lm_dir), 'tiny', max_batch=8, wait_ms=2)


@pytest.fixture(scope='module')
def lm_url(lm_app):
  with serve_app(lm_app) as url:
    yield url


class FaultProxy:
  """Forwards to `upstream`, answering the first requests with `faults` instead:
  an HTTP status, 'sleep' (longer than the client's timeout) or 'malformed'; every
  request waits `delay` seconds first."""

  def __init__(self, upstream: str, faults=(), delay=0.0):
    self.faults, self.requests = list(faults), 0
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):
        pass

      def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        proxy.requests += 1
        fault = proxy.faults.pop(0) if proxy.faults else None
        time.sleep(delay)
        if fault == 'sleep':
          time.sleep(1.5)
        if isinstance(fault, int):
          return self._send(fault, b'{"error": {"message": "injected"}}')
        if fault == 'malformed':
          return self._send(200, b'{"id": "x", "object": "text_completion", "choices": 5}')
        request = urllib.request.Request(
            upstream + self.path[len('/v1') :],
            data=body,
            headers={'Content-Type': 'application/json'},
        )
        with urllib.request.urlopen(request) as response:
          self._send(response.status, response.read())

      def _send(self, status, payload):
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('retry-after-ms', '10')  # the client's backoff, shortened
        self.send_header('Content-Length', str(len(payload)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the client gave up (timeout)
          self.wfile.write(payload)

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/v1'
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def _teacher(url, out, *extra):
  return [
      '--task=demo',
      '--split=train',
      f'--out={out}',
      f'--base_url={url}',
      '--model=tiny',
      '--max_tokens=16',
      '--max_retries=0',
      *extra,
  ]


@pytest.mark.parametrize('task', sorted(prompts.PROMPTS))
def test_builtin_prompts_answer_in_the_format_the_authors_parsers_read(task):
  prompt = prompts.PROMPTS[task]
  parse = extraction.parser_for(task, prompt, custom_prompt=False)
  for ex in prompt.exemplars:
    completion = prompt.answer.format(rationale=ex.rationale, answer=ex.answer)
    rationale, label, parsed = parse(completion + '\n\n' + prompt.question_text(ex.input))
    assert parsed and rationale.strip() == ex.rationale
    # CQA's parser keeps the choice's text; the others the whole answer.
    assert label == (ex.answer.split(') ', 1)[1] if task == 'cqa' else ex.answer)
  text = 'Premise one.</s>Hypothesis two.' if task in ('anli1', 'esnli') else 'What is 2 + 3?'
  rendered = prompt.render(text)
  assert rendered.endswith(prompt.question_text(text)) and rendered.count('\n\n') == len(
      prompt.exemplars
  )
  zero = prompts.resolve(task, zero_shot=True).render(text)
  assert zero == f'{prompt.question_text(text)} {prompts.ZERO_SHOT_TRIGGER}'


def test_a_users_prompt_file_parses_by_its_own_answer_format(tmp_path):
  spec = {
      'instruction': 'Classify the ticket.',
      'question': 'Ticket: {input}\nReasoning:',
      'answer': ' {rationale}\nCategory: {answer}',
      'stop': ['\nTicket:'],
      'exemplars': [
          {'input': 'My card was charged twice.', 'rationale': 'A charge.', 'answer': 'billing'}
      ],
  }
  (tmp_path / 'p.json').write_text(json.dumps(spec))
  prompt = prompts.resolve('tickets', prompt_file=str(tmp_path / 'p.json'))
  assert prompt.render('x').startswith('Classify the ticket.\n\nTicket: My card')
  assert prompt.parse(' Refund asked.\nCategory: refunds\nTicket: y') == (
      'Refund asked.',
      'refunds',
      True,
  )
  assert prompt.parse(' no category here')[2] is False
  (tmp_path / 'ex.jsonl').write_text(
      '{"input": "a", "rationale": "b", "answer": "c"}\n{"input": 3}\n'
  )
  with pytest.raises(prompts.DataError, match=r'ex.jsonl:2: field .input. must be a string'):
    prompts.resolve('svamp', exemplars_file=str(tmp_path / 'ex.jsonl'))
  (tmp_path / 'typo.json').write_text(json.dumps({**spec, 'instrucion': 'x'}))
  with pytest.raises(prompts.DataError, match=r"typo\.json: unknown field 'instrucion'"):
    prompts.resolve('tickets', prompt_file=str(tmp_path / 'typo.json'))
  (tmp_path / 'bad.json').write_text('{"question": "no input", "answer": "{rationale} {answer}"}')
  with pytest.raises(prompts.DataError, match=r"bad.json: field 'question' must contain \{input\}"):
    prompts.resolve('tickets', prompt_file=str(tmp_path / 'bad.json'))


def test_extraction_writes_what_the_demo_and_custom_tasks_read(lm_url, lm_app, tmp_path, capsys):
  """The served model's answers, fetched with the openai client, land in the JSON
  lines, the cache and the summary; their counts are recomputed from the raw text."""
  out = tmp_path / 'out'
  assert teacher_cli.main(_teacher(lm_url, out, '--limit=12', '--api=chat')) == 0
  printed = capsys.readouterr().out
  assert 'inputs 12 (12 queried now, 0 from the cache)' in printed
  cache = [json.loads(line) for line in (out / 'demo' / 'teacher_cache' / 'train.jsonl').open()]
  assert len(cache) == 12 and all(len(c['texts']) == 1 for c in cache)
  # The same prompts straight through the model give the same completions.
  prompt = prompts.PROMPTS['demo']
  rows = demo.generate()['train'][:12]
  direct = lm_app.model.answer(
      [prompt.render(r['input']) for r in rows], teachers.Sampling(max_tokens=16, stop=prompt.stop)
  )
  by_key = {c['key']: c['texts'][0] for c in cache}
  assert sorted(by_key.values()) == sorted(d.texts[0] for d in direct)
  record = json.loads((out / 'demo' / 'teacher_train.json').read_text())
  parsed = sum(benchmarks.BENCHMARKS['svamp'].parse(t).parsed for t in by_key.values())
  assert record['summary']['parsed'] == parsed and record['summary']['unparsed'] == 12 - parsed
  assert (
      record['summary']['completion_tokens'] == sum(c['completion_tokens'] for c in cache)
      and record['settings']['base_url'] == lm_url
  )
  lines = (out / 'demo' / 'train.jsonl').read_text().splitlines()
  assert len(lines) == parsed == record['summary']['rows_written'] == 0  # an untrained model
  assert 'no task.gin yet: no training row has a teacher label yet' in printed
  test_rows = [json.loads(line) for line in (out / 'demo' / 'test.jsonl').open()]
  assert test_rows[0] == {
      'input': demo.generate()['test'][0]['input'],
      'label': demo.generate()['test'][0]['label'],
  }
  assert not (out / 'demo' / 'task.gin').exists()


def test_benchmark_output_is_the_authors_layout_and_trains_unchanged(lm_url, data_root, tmp_path):
  """SVAMP's train split: the loader reads our files exactly as it reads the released
  ones, and the test split, never queried, is evaluated against gold."""
  out = tmp_path / 'out'
  args = ['--task=svamp', '--split=train', f'--data_root={data_root}', f'--out={out}']
  args += [f'--base_url={lm_url}', '--model=tiny', '--max_tokens=8', '--limit=7']
  assert teacher_cli.main(args) == 0
  outputs = json.loads((out / 'svamp' / 'llm' / 'train_CoT_0.json').read_text())
  assert len(outputs) == 7 and not (out / 'svamp' / 'llm' / 'train_CoT_1.json').exists()
  released = pathlib.Path(data_root) / 'svamp'
  assert (out / 'svamp' / 'svamp_train.json').read_text().splitlines() == [
      json.dumps(json.loads(line))
      for line in (released / 'svamp_train.json').read_text().splitlines()[:7]
  ]
  assert (out / 'svamp' / 'svamp_test.json').read_bytes() == (
      released / 'svamp_test.json'
  ).read_bytes()
  rows, report = benchmarks.load_split(benchmarks.BENCHMARKS['svamp'], str(out), 'train')
  assert [r['rationale'] for r in rows] == [
      benchmarks.BENCHMARKS['svamp'].parse(o).rationale for o in outputs
  ]
  assert report.total == 7
  test_rows, test_report = benchmarks.load_split(benchmarks.BENCHMARKS['svamp'], str(out), 'test')
  assert test_report.summary() == (
      'svamp/test: no teacher outputs (an evaluation split, scored against gold)'
  )
  released_test = [
      json.loads(line) for line in (released / 'svamp_test.json').read_text().splitlines()
  ]
  assert [r['label_gt'] for r in test_rows] == [r['label'] for r in released_test]
  assert {r['rationale'] for r in test_rows} == {''}  # no teacher outputs: blank
  with pytest.raises(extraction.ConfigError, match='is the data root'):
    extraction.check_out(
        data_root, extraction.benchmark_source('svamp', 'test', data_root), data_root
    )


def test_a_killed_extraction_resumes_answering_each_input_once(lm_url, lm_app, tmp_path):
  """SIGKILL midway, rerun: the rerun asks only the inputs not yet answered, each input
  is answered once, and the files match an uninterrupted run's byte for byte."""
  proxy = FaultProxy(lm_url, delay=0.1)
  args = _teacher(proxy.url, tmp_path / 'killed', '--limit=40', '--concurrency=2')
  env = dict(SUBPROCESS_ENV)
  child = subprocess.Popen(
      [sys.executable, '-m', 'dsbs_jax.teacher_cli', *map(str, args)],
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
  )
  cache = tmp_path / 'killed' / 'demo' / 'teacher_cache' / 'train.jsonl'
  deadline = time.time() + 120
  while not (cache.exists() and len(cache.read_text().splitlines()) >= 10):
    assert time.time() < deadline and child.poll() is None, child.stdout.read().decode()
    time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait()
  answered = len(cache.read_text().splitlines())
  assert 10 <= answered < 40 and not (tmp_path / 'killed' / 'demo' / 'train.jsonl').exists()
  before = proxy.requests  # includes the (at most 2) in flight at the kill, never received
  assert answered <= before <= answered + 2
  assert teacher_cli.main(args) == 0
  assert proxy.requests - before == 40 - answered  # the rerun asks only what is missing
  keys = [json.loads(line)['key'] for line in cache.read_text().splitlines()]
  assert len(keys) == len(set(keys)) == 40
  assert teacher_cli.main(_teacher(lm_url, tmp_path / 'whole', '--limit=40')) == 0
  for name in ('train.jsonl', 'test.jsonl', 'validation.jsonl'):
    assert (tmp_path / 'killed' / 'demo' / name).read_bytes() == (
        tmp_path / 'whole' / 'demo' / name
    ).read_bytes()
  proxy.close()


def test_429_5xx_and_timeouts_are_retried_with_backoff(lm_url, tmp_path, capsys):
  proxy = FaultProxy(lm_url, faults=[429, 503, 'sleep', 500])
  args = _teacher(proxy.url, tmp_path / 'out', '--limit=3', '--concurrency=1', '--timeout=1')
  args.append('--max_retries=4')  # the last of a repeated flag wins
  assert teacher_cli.main(args) == 0
  assert proxy.requests == 3 + 4 and 'inputs 3 (3 queried now' in capsys.readouterr().out
  proxy.close()


def _one_error_line(capsys):
  err = [
      line
      for line in capsys.readouterr().err.splitlines()
      if line.startswith('dsbs-teacher: error')
  ]
  assert len(err) == 1
  return err[0]


def test_bad_servers_and_outputs_get_one_line_and_keep_the_answers(
    lm_url, lm_dir, tmp_path, capsys, monkeypatch
):
  # Unreachable: a port nobody listens on.
  import socket

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    dead = f'http://127.0.0.1:{s.getsockname()[1]}/v1'
  assert teacher_cli.main(_teacher(dead, tmp_path / 'a', '--limit=2')) == 2
  assert 'cannot connect (is the server running?)' in _one_error_line(capsys)
  # A wrong key: 401, and the key is in neither the message nor any file written.
  guarded = server.App(serving.CausalLM(lm_dir), 'tiny', api_key='the-right-key')
  monkeypatch.setenv('OPENAI_API_KEY', KEY)
  with serve_app(guarded) as url:
    assert teacher_cli.main(_teacher(url, tmp_path / 'b', '--limit=2')) == 2
  line = _one_error_line(capsys)
  assert 'refused the API key (401)' in line and KEY not in line
  written = [p for p in (tmp_path / 'b').rglob('*') if p.is_file()]
  assert all(KEY not in p.read_text() for p in written)
  # A malformed answer on the third request: the first two are kept, and a rerun
  # asks only for the third.
  proxy = FaultProxy(lm_url, faults=[None, None, 'malformed'])
  args = _teacher(proxy.url, tmp_path / 'c', '--limit=3', '--concurrency=1')
  assert teacher_cli.main(args) == 2
  assert 'malformed response' in _one_error_line(capsys)
  assert (
      len((tmp_path / 'c' / 'demo' / 'teacher_cache' / 'train.jsonl').read_text().splitlines()) == 2
  )
  assert teacher_cli.main(args) == 0 and proxy.requests == 4
  proxy.close()
  # A prompt longer than the model's context: the server's 400, in one line.
  assert teacher_cli.main(_teacher(lm_url, tmp_path / 'd', '--limit=1', '--max_tokens=900')) == 2
  line = _one_error_line(capsys)
  assert 'HTTP 400' in line and "exceeds this model's context of 1024 tokens" in line
  # An output directory that cannot be written.
  (tmp_path / 'file').write_text('')
  assert teacher_cli.main(_teacher(lm_url, tmp_path / 'file' / 'out', '--limit=1')) == 2
  assert '--out' in _one_error_line(capsys)


def test_samples_and_filters(lm_dir, tmp_path, capsys):
  """The local transformers backend: several sampled rationales per input, each a
  training row, and the filters' counts."""
  args = [
      '--task=demo',
      f'--out={tmp_path}',
      '--backend=transformers',
      f'--model_dir={lm_dir}',
      '--limit=4',
      '--num_samples=3',
      '--temperature=1.0',
      '--max_tokens=8',
  ]
  assert teacher_cli.main(args) == 0
  cache = [
      json.loads(line) for line in (tmp_path / 'demo' / 'teacher_cache' / 'train.jsonl').open()
  ]
  assert len(cache) == 4 and all(len(c['texts']) == 3 for c in cache)
  record = json.loads((tmp_path / 'demo' / 'teacher_train.json').read_text())['summary']
  assert record['samples'] == 12
  assert teacher_cli.main([*args, '--drop_degenerate', '--filter_gold_match']) == 0
  record = json.loads((tmp_path / 'demo' / 'teacher_train.json').read_text())['summary']
  assert record['queried'] == 0  # the same settings: all from the cache
  assert record['rows_written'] == 0 and record['teacher_accuracy'] == 0.0
  assert record['degenerate_dropped'] + record['gold_mismatch_dropped'] == 12
  assert teacher_cli.main([*args[:-3], '--num_samples=2']) == 2
  assert '--temperature > 0' in _one_error_line(capsys)


def test_degenerate_rationales():
  assert extraction.degenerate('   ')
  assert extraction.degenerate('the the the the the the the the the the')
  assert not extraction.degenerate('Start with 5. 5 + 3 = 8. The answer is (5 + 3).')


def test_output_to_cloud_storage(lm_url, gcs, tmp_path):
  out = 'gs://dsbs/teacher'
  assert teacher_cli.main(_teacher(lm_url, out, '--limit=3')) == 0
  from dsbs_jax import storage

  cache = storage.read_text(f'{out}/demo/teacher_cache/train.jsonl').splitlines()
  assert len(cache) == 3 and storage.exists(f'{out}/demo/test.jsonl')
  assert teacher_cli.main(_teacher(lm_url, out, '--limit=3')) == 0  # all from the cache
  summary = json.loads(storage.read_text(f'{out}/demo/teacher_train.json'))['summary']
  assert summary['queried'] == 0 and summary['inputs'] == 3


def test_the_key_is_not_recorded_and_urls_lose_credentials():
  assert teachers.redact_url('https://user:pw@host:8443/v1?key=abc') == 'https://host:8443/v1'
  args = teacher_cli._parser().parse_args(
      ['--task=demo', '--out=x', '--base_url=https://u:p@h/v1', '--model=m']
  )
  settings = teacher_cli._settings(args, prompts.PROMPTS['demo'])
  assert settings['base_url'] == 'https://h/v1' and 'api_key_env' not in settings


def test_the_written_task_gin_trains_on_teacher_labels_and_scores_on_gold(tmp_path):
  """dsbs-teacher's JSON lines and task.gin, stacked on the demo's recipe, register the
  family dsbs-train runs: teacher labels for training, gold for the splits never
  queried (which carry no teacher fields)."""
  task_dir = tmp_path / 'mine'
  task_dir.mkdir()
  train = [
      {
          'input': f'q{i}',
          'label': f'g{i}',
          'teacher_label': f't{i}',
          'rationale': f'r{i}',
          'raw': '',
      }
      for i in range(20)
  ]
  test = [{'input': f'x{i}', 'label': f'gold{i}'} for i in range(5)]
  for name, rows in (('train', train), ('test', test)):
    (task_dir / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    if name == 'train':
      assert extraction.task_gin(str(tmp_path), 'mine', 'accuracy') == (
          None,
          'training needs a test split too (extract --split=test)',
      )
  gin_file, _ = extraction.task_gin(str(tmp_path), 'mine', 'accuracy')
  assert (
      "TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 64}" in pathlib.Path(gin_file).read_text()
  )
  args = [
      '--gin_file=demo_student.gin',
      f'--gin_file={gin_file}',
      f"--gin.MODEL_DIR='{tmp_path}/m'",
  ]
  assert cli(*args, '--plan=1x1') == 0

  def targets(split):
    ds = seqio.get_mixture_or_task('mine_teacher_llm_label').get_dataset(
        {'inputs': 64, 'targets': 64}, split=split, shuffle=False
    )
    return {
        ex['inputs_pretokenized'].decode(): ex['targets_pretokenized'].decode()
        for ex in ds.as_numpy_iterator()
    }

  assert set(targets('train').values()) <= {f't{i}' for i in range(20)}
  assert targets('test') == {f'predict: x{i}': f'gold{i}' for i in range(5)}


def test_a_served_causal_lm_samples_n_completions(lm_url):
  import openai

  client = openai.OpenAI(base_url=lm_url, api_key='unused', max_retries=0)
  response = client.completions.create(
      model='tiny', prompt='Q: 1 + 1?\nA:', n=3, temperature=1.0, max_tokens=4, seed=1
  )
  assert len(response.choices) == 3 and response.usage.completion_tokens <= 12
  again = client.completions.create(
      model='tiny', prompt='Q: 1 + 1?\nA:', n=3, temperature=1.0, max_tokens=4, seed=1
  )
  assert [c.text for c in again.choices] == [c.text for c in response.choices]  # seeded
  with pytest.raises(openai.BadRequestError, match='"explain" is for a dsbs-jax student'):
    client.completions.create(model='tiny', prompt='x', extra_body={'explain': True})


def test_a_causal_lm_counts_tokens_while_it_generates(lm_dir):
  """A server counts each request's tokens in the request's thread while its batcher
  generates: the shared tokenizer must keep a padded batch padded."""
  lm = teachers.CausalLM(lm_dir)
  stop = threading.Event()

  def count():
    while not stop.is_set():
      assert lm.count_tokens('x' * 300) == 300

  counters = [threading.Thread(target=count) for _ in range(3)]
  for thread in counters:
    thread.start()
  try:
    for _ in range(200):
      answers = lm.generate(['a' * 100, 'b' * 120], teachers.Sampling(max_tokens=1))
      assert [a.prompt_tokens for a in answers] == [100, 120]
  finally:
    stop.set()
    for thread in counters:
      thread.join()


@pytest.mark.parametrize(
    'extra, message',
    [
        (['--model_dir=/x'], '--model_dir: only read with --backend=transformers'),
        (['--metric=equation_accuracy'], '--metric: only read with --input_file'),
        (['--backend=transformers'], '--base_url: only read with --backend=openai'),
        (['--exemplars=e.jsonl', '--zero_shot'], '--exemplars and --zero_shot'),
        (['--limit=0'], '--limit 0: must be at least 1'),
        (['--base_url=http://u:secret@127.0.0.1:9/v1'], 'carries credentials'),
        (['--split=test', '--filter_gold_match'], 'filters would bias evaluation'),
        (['--top_p=0'], '--top_p 0.0: must be in (0, 1]'),
        (['--timeout=0'], '--timeout 0.0 must be > 0'),
    ],
)
def test_settings_nothing_reads_or_that_cannot_work_are_refused(tmp_path, capsys, extra, message):
  args = ['--task=demo', f'--out={tmp_path}', '--base_url=http://127.0.0.1:9/v1', '--model=m']
  assert teacher_cli.main([*args, *extra]) == 2
  assert message in _one_error_line(capsys)
  assert not (tmp_path / 'demo').exists()  # refused before anything is asked or written


def test_a_prompt_file_is_refused_for_the_authors_layout(tmp_path, capsys, data_root):
  args = ['--task=svamp', f'--data_root={data_root}', f'--out={tmp_path}', '--prompt_file=p.json']
  assert teacher_cli.main([*args, '--base_url=http://127.0.0.1:9/v1', '--model=m']) == 2
  assert "read with the authors' parser" in _one_error_line(capsys)


def test_the_batcher_survives_requests_cancelled_by_their_clients():
  started = threading.Event()

  def run(payloads, key):
    started.wait(5)
    return [p * 2 for p in payloads]

  batcher = serving.Batcher(run, max_batch=1, wait_ms=0)
  first = batcher.submit(1)  # the batcher holds it until `started`
  gone = batcher.submit(2)
  assert gone.cancel()  # its client disconnected while it queued
  started.set()
  assert first.result(5) == 2
  assert batcher.submit(3).result(5) == 6 and batcher.items == 2


def test_answers_are_cached_per_server():
  """Two servers may serve different weights under one model name: their answers
  never share a cache key. The key never appears in what identifies a teacher."""
  sampling = teachers.Sampling()
  ids = [
      teachers.OpenAITeacher(url, 'teacher').describe()
      for url in ('http://127.0.0.1:8100/v1', 'http://127.0.0.1:8101/v1')
  ]
  assert extraction.cache_key('p', ids[0], sampling) != extraction.cache_key('p', ids[1], sampling)
  assert ids[0] == {
      'backend': 'openai-completions',
      'url': 'http://127.0.0.1:8100/v1',
      'model': 'teacher',
  }
