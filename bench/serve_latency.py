"""dsbs-serve under concurrent load: latency (p50/p99) and throughput, batching on and off.

Starts `dsbs-serve --precompile` in a child process for each mode (`--max_batch`
16, then 1), sends the demo's test inputs from `--clients` threads through the
openai client, each thread one request at a time, once to warm up and once
timed. Prints one JSON object.

    python bench/serve_latency.py --model=model_dirs/demo
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='model_dirs/demo', help='a MODEL_DIR, best/ or HF directory')
  p.add_argument('--clients', type=int, default=16, help='concurrent clients')
  p.add_argument('--requests', type=int, default=256, help='timed requests in all')
  p.add_argument('--explain', action='store_true', help='ask for the rationale too')
  p.add_argument('--batch_sizes', default='16,1', help='--max_batch of each mode; 1 is off')
  p.add_argument('--serve_args', default='', help='more dsbs-serve flags, e.g. --vocabulary=bytes')
  p.add_argument('--model_alone', action='store_true', help='also: rows/s of the model by batch')
  return p.parse_args(argv)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(argv: list[str], port: int) -> subprocess.Popen:
  """`dsbs-serve ARGV` on `port`, once its /health answers."""
  child = subprocess.Popen(
      [sys.executable, '-m', 'dsbs_jax.server', *argv, f'--port={port}'],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
  )
  deadline = time.time() + 300
  while True:
    try:
      urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=1).read()
      return child
    except OSError:
      if child.poll() is not None or time.time() > deadline:
        log = child.stderr.read().decode()[-2000:]
        raise RuntimeError(f'dsbs-serve did not start: {log}') from None
      time.sleep(0.2)


def health(port: int) -> dict:
  return json.loads(urllib.request.urlopen(f'http://127.0.0.1:{port}/health').read())


def _load(port: int, texts: list[str], clients: int, explain: bool) -> list[float]:
  """Each text asked once, `clients` at a time; the latency of each, in seconds."""
  import openai

  client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='none', max_retries=0)
  name = health(port)['model']

  def ask(text: str) -> float:
    start = time.perf_counter()
    client.completions.create(model=name, prompt=text, extra_body={'explain': explain})
    return time.perf_counter() - start

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    return list(pool.map(ask, texts))


def _percentile(values: list[float], q: float) -> float:
  ordered = sorted(values)
  return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(args, max_batch: int, texts: list[str]) -> dict:
  port = _free_port()
  argv = [
      f'--model={args.model}',
      f'--max_batch={max_batch}',
      '--precompile',
      *args.serve_args.split(),
  ]
  child = start_server(argv, port)
  try:
    _load(port, texts, args.clients, args.explain)  # compiles the buckets this load uses
    before = health(port)
    start = time.perf_counter()
    latencies = _load(port, texts, args.clients, args.explain)
    seconds = time.perf_counter() - start
    after = health(port)
  finally:
    child.terminate()
    child.wait(timeout=30)
  rows = after['requests'] - before['requests']
  return {
      'max_batch': max_batch,
      'requests': len(texts),
      'seconds': round(seconds, 3),
      'requests_per_s': round(len(texts) / seconds, 2),
      'p50_ms': round(1000 * _percentile(latencies, 0.5), 1),
      'p99_ms': round(1000 * _percentile(latencies, 0.99), 1),
      'mean_rows_per_batch': round(rows / max(after['batches'] - before['batches'], 1), 2),
      'compiled_shapes': len(after['compiled_shapes']),
  }


def model_alone(args, texts: list[str]) -> dict[str, float]:
  """Rows/s of the student decoding the texts in batches of 1, 2, ... 16, in this
  process (no HTTP, no batcher): what batching can bring on this hardware."""
  from dsbs_jax import serving

  student = serving.load_student(args.model, max_batch=16)
  rows = [student.prepare(t, args.explain, None) for t in texts]
  rates = {}
  for size in student.batch_sizes:
    for start in range(0, len(rows), size):  # compiles this size's buckets
      student.answer(rows[start : start + size])
    begin = time.perf_counter()
    for start in range(0, len(rows), size):
      student.answer(rows[start : start + size])
    rates[str(size)] = round(len(rows) / (time.perf_counter() - begin), 1)
  return rates


def main(argv=None) -> None:
  args = parse_args(argv)
  from dsbs_jax.data import demo

  texts = [r['input'] for r in demo.generate()['test']][: args.requests]
  result = {
      'benchmark': 'serve_latency',
      'model': args.model,
      'clients': args.clients,
      'explain': args.explain,
      'cpus': os.cpu_count(),
      'modes': [measure(args, int(b), texts) for b in args.batch_sizes.split(',')],
  }
  if args.model_alone:
    result['model_alone_rows_per_s_by_batch'] = model_alone(args, texts)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
