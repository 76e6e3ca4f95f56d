"""Rationale extraction throughput against the teacher server's own capacity.

The server's capacity: its model (`serving.CausalLM`) generating the rendered
prompts in batches of `--max_batch`, in this process, no HTTP (the fastest of
three passes). Extraction:
`dsbs-teacher`'s job (`extraction.Extraction` with the openai backend) against
`dsbs-serve` serving the same model in a child process (batching up to
`--max_batch`), `--concurrency` requests in flight. Same prompts, same greedy
settings. Prints one JSON object; `ratio` is extraction / capacity.

    python bench/teacher_throughput.py --model_dir=/tmp/teacher
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import serve_latency


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model_dir', default=None, help='a causal LM; default: the untrained stand-in')
  p.add_argument('--inputs', type=int, default=256, help="the demo's first training inputs")
  p.add_argument('--max_tokens', type=int, default=64)
  p.add_argument('--max_batch', type=int, default=16)
  p.add_argument('--concurrency', type=int, default=32)
  p.add_argument('--zero_shot', action='store_true')
  return p.parse_args(argv)


def capacity(model_dir: str, rendered: list[str], sampling, max_batch: int) -> dict:
  from dsbs_jax import serving

  model = serving.CausalLM(model_dir)
  model.answer(rendered[:max_batch], sampling)  # warm-up
  passes = []  # the fastest of three passes: this machine's speed drifts
  for _ in range(3):
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(rendered), max_batch):
      answers = model.answer(rendered[i : i + max_batch], sampling)
      tokens += sum(c.completion_tokens for c in answers)
    passes.append(time.perf_counter() - start)
  seconds = min(passes)
  return {
      'seconds': round(seconds, 2),
      'inputs_per_s': round(len(rendered) / seconds, 2),
      'tokens_per_s': round(tokens / seconds, 1),
  }


def extraction_run(args, model_dir: str, prompt, sampling, out: str) -> dict:
  from dsbs_jax import extraction, teachers

  port = serve_latency._free_port()
  child = serve_latency.start_server(
      [f'--model={model_dir}', '--name=teacher', f'--max_batch={args.max_batch}'], port
  )
  try:
    teacher = teachers.OpenAITeacher(
        f'http://127.0.0.1:{port}/v1', 'teacher', concurrency=args.concurrency, max_retries=0
    )
    source = extraction.source_for('demo', 'train', None, None, 'input', 'label', args.inputs)
    job = extraction.Extraction(source, teacher, prompt, sampling, out)
    start = time.perf_counter()
    summary = job.run()
    seconds = time.perf_counter() - start
    served = serve_latency.health(port)
  finally:
    child.terminate()
    child.wait(timeout=30)
  return {
      'seconds': round(seconds, 2),
      'inputs_per_s': round(summary.inputs / seconds, 2),
      'tokens_per_s': round(summary.completion_tokens / seconds, 1),
      'server_mean_rows_per_batch': round(served['requests'] / max(served['batches'], 1), 2),
      'parsed': summary.parsed,
  }


def main(argv=None) -> None:
  args = parse_args(argv)
  from dsbs_jax import prompts, teachers
  from dsbs_jax.data import demo

  with tempfile.TemporaryDirectory() as tmp:
    model_dir = args.model_dir
    if model_dir is None:
      from bench import teacher_model

      model_dir = os.path.join(tmp, 'teacher')
      teacher_model.build(model_dir)
    prompt = prompts.resolve('demo', zero_shot=args.zero_shot)
    sampling = teachers.Sampling(max_tokens=args.max_tokens, stop=prompt.stop)
    rows = demo.generate()['train'][: args.inputs]
    rendered = [prompt.render(r['input']) for r in rows]
    server_alone = capacity(model_dir, rendered, sampling, args.max_batch)
    extracted = extraction_run(args, model_dir, prompt, sampling, os.path.join(tmp, 'out'))
  print(
      json.dumps(
          {
              'benchmark': 'teacher_throughput',
              'model_dir': args.model_dir or 'untrained stand-in (bench/teacher_model.py)',
              'inputs': args.inputs,
              'max_tokens': args.max_tokens,
              'max_batch': args.max_batch,
              'concurrency': args.concurrency,
              'cpus': os.cpu_count(),
              'server_capacity': server_alone,
              'extraction': extracted,
              'ratio': round(extracted['inputs_per_s'] / server_alone['inputs_per_s'], 3),
          },
          indent=2,
      )
  )


if __name__ == '__main__':
  main()
