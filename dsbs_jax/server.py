"""`dsbs-serve`: a trained student (or a causal LM) behind an OpenAI-compatible API.

    dsbs-serve --model=MODEL_DIR [--port=8000] [--max_batch=16] [--overlong=refuse]

FastAPI on uvicorn. `POST /v1/chat/completions` and `POST /v1/completions`
answer with the student's `predict:` label; `"explain": true` in the body (the
openai client's `extra_body`) adds the `explain:` rationale as the message's
`reasoning_content`. `GET /health` and `GET /v1/models` describe the server.
Concurrent requests are decoded together (`serving.Batcher`). A bad request
gets a 4xx with an OpenAI-style JSON error. With $DSBS_SERVE_API_KEY set
(`--api_key_env`), requests must carry it as a bearer token.
"""

import argparse
import asyncio
import hmac
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, Optional, Union, cast

import pydantic

from dsbs_jax import cli, serving, teachers
from dsbs_jax.errors import ConfigError

log = logging.getLogger('dsbs_jax')
API_KEY_ENV = 'DSBS_SERVE_API_KEY'


def _error(status: int, message: str, kind: str = 'invalid_request_error') -> Any:
  from fastapi.responses import JSONResponse

  return JSONResponse(
      status_code=status, content={'error': {'message': message, 'type': kind, 'code': status}}
  )


class _Common(pydantic.BaseModel):
  """The OpenAI request fields dsbs-serve reads; any other field is refused (400)."""

  model_config = pydantic.ConfigDict(extra='forbid')
  model: str
  max_tokens: Optional[int] = pydantic.Field(default=None, ge=1)
  max_completion_tokens: Optional[int] = pydantic.Field(default=None, ge=1)
  temperature: float = pydantic.Field(default=0.0, ge=0.0, le=2.0)
  top_p: float = pydantic.Field(default=1.0, gt=0.0, le=1.0)
  n: int = pydantic.Field(default=1, ge=1, le=16)
  stop: Union[str, list[str], None] = None
  seed: Optional[int] = None
  stream: pydantic.StrictBool = False
  explain: pydantic.StrictBool = False


class _Message(pydantic.BaseModel):
  role: str
  content: str


class ChatRequest(_Common):
  messages: list[_Message] = pydantic.Field(min_length=1)


class CompletionRequest(_Common):
  prompt: str


class App:
  """The HTTP layer over one model: validation, batching, OpenAI-shaped answers."""

  def __init__(
      self,
      model: Union[serving.Student, serving.CausalLM],
      name: str,
      max_batch: int = 16,
      wait_ms: float = 5.0,
      api_key: Optional[str] = None,
  ):
    self.model, self.name, self._api_key = model, name, api_key
    self.batcher = serving.Batcher(self._run, max_batch, wait_ms)
    self.started = time.time()

  def _run(self, payloads: list[Any], key: Any) -> list[Any]:
    if isinstance(self.model, serving.Student):
      return self.model.answer(payloads)
    return self.model.answer(payloads, key)

  def _sampling(self, request: Any) -> teachers.Sampling:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    max_tokens = request.max_completion_tokens or request.max_tokens or 256
    if isinstance(self.model, serving.Student):
      if request.temperature > 0 or request.n > 1 or request.top_p < 1 or stop:
        raise serving.RequestError(
            'this student decodes greedily: temperature 0, top_p 1, n 1 and no stop only'
        )
    elif request.explain:
      raise serving.RequestError('"explain" is for a dsbs-jax student; this serves a causal LM')
    try:
      return teachers.Sampling(
          request.temperature, request.n, max_tokens, tuple(stop), request.top_p, request.seed
      )
    except ConfigError as e:
      raise serving.RequestError(str(e).replace('--num_samples', 'n')) from None

  async def answer(self, request: Any, text: str) -> tuple[list[dict[str, Any]], tuple[int, int]]:
    """Choices for one request, the label (and rationale) or the LM's samples, and
    the (prompt, completion) tokens they took."""
    if not text.strip():
      raise serving.RequestError('the input is empty')
    sampling = self._sampling(request)
    if isinstance(self.model, serving.CausalLM):
      self.model.check(text, sampling)
      out = await asyncio.wrap_future(self.batcher.submit(text, sampling))
      choices = [{'text': t, 'finish_reason': 'stop'} for t in out.texts]
      return choices, (out.prompt_tokens, out.completion_tokens)
    limit = request.max_completion_tokens or request.max_tokens
    rows = [self.model.prepare(text, False, limit)]
    if request.explain:
      rows.append(self.model.prepare(text, True, limit))
    # Labels and rationales batch apart: a label's few tokens would wait on a rationale's many.
    answers = await asyncio.gather(
        *(asyncio.wrap_future(self.batcher.submit(r, explain)) for explain, r in enumerate(rows))
    )
    label = answers[0]
    choice = {'text': label.text, 'finish_reason': label.finish_reason}
    if request.explain:
      choice['reasoning_content'] = answers[1].text
    if label.truncated_from is not None:
      choice['warning'] = (
          f'input truncated from {label.truncated_from} to {self.model.max_input_length} tokens'
      )
    return [choice], (label.prompt_tokens, sum(a.completion_tokens for a in answers))

  def authorized(self, header: Optional[str]) -> bool:
    if not self._api_key:
      return True
    return hmac.compare_digest(header or '', f'Bearer {self._api_key}')

  def health(self) -> dict[str, Any]:
    compiled = sorted(getattr(self.model, 'compiled', set()))
    return {
        'status': 'ok',
        'model': self.name,
        'uptime_s': round(time.time() - self.started, 1),
        'batches': self.batcher.batches,
        'requests': self.batcher.items,
        'compiled_shapes': [list(s) for s in compiled],
    }


def _response(
    kind: str, name: str, choices: list[dict[str, Any]], usage: tuple[int, int]
) -> dict[str, Any]:
  prompt_tokens, completion_tokens = usage
  out_choices = []
  for i, c in enumerate(choices):
    if kind == 'chat':
      message = {'role': 'assistant', 'content': c['text']}
      if 'reasoning_content' in c:
        message['reasoning_content'] = c['reasoning_content']
      entry: dict[str, Any] = {'index': i, 'message': message, 'finish_reason': c['finish_reason']}
    else:
      entry = {'index': i, 'text': c['text'], 'finish_reason': c['finish_reason']}
      if 'reasoning_content' in c:
        entry['reasoning_content'] = c['reasoning_content']
    if 'warning' in c:
      entry['warning'] = c['warning']
    out_choices.append(entry)
  return {
      'id': f'{"chatcmpl" if kind == "chat" else "cmpl"}-{uuid.uuid4().hex[:16]}',
      'object': 'chat.completion' if kind == 'chat' else 'text_completion',
      'created': int(time.time()),
      'model': name,
      'choices': out_choices,
      'usage': {
          'prompt_tokens': prompt_tokens,
          'completion_tokens': completion_tokens,
          'total_tokens': prompt_tokens + completion_tokens,
      },
  }


def create_app(app: App) -> Any:
  """The FastAPI application serving `app`."""
  from fastapi import FastAPI, Request
  from fastapi.exceptions import RequestValidationError
  from starlette.exceptions import HTTPException

  api = FastAPI(title='dsbs-serve', docs_url=None, redoc_url=None)

  @api.exception_handler(RequestValidationError)
  async def invalid(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    if first.get('type') == 'json_invalid':
      return _error(400, f'the body is not valid JSON ({first.get("ctx", {}).get("error", "")})')
    where = '.'.join(str(p) for p in first.get('loc', ()) if p != 'body')
    return _error(400, f'{where}: {first.get("msg", "invalid")}' if where else first['msg'])

  @api.exception_handler(HTTPException)
  async def http_error(request: Request, exc: HTTPException):
    return _error(
        exc.status_code, str(exc.detail), 'not_found' if exc.status_code == 404 else 'error'
    )

  @api.exception_handler(Exception)
  async def failed(request: Request, exc: Exception):
    log.exception('dsbs-serve: a request failed')
    return _error(500, f'the model failed: {type(exc).__name__}', 'server_error')

  @api.middleware('http')
  async def authorize(request: Request, call_next):
    if request.url.path.startswith('/v1/') and not app.authorized(
        request.headers.get('authorization')
    ):
      return _error(401, 'missing or wrong API key', 'authentication_error')
    return await call_next(request)

  async def complete(kind: str, request: Any, text: str):
    if request.model != app.name:
      return _error(
          404, f'model {request.model!r} is not served here; this serves {app.name!r}', 'not_found'
      )
    if request.stream:
      return _error(400, 'stream: streaming is not supported; set stream=false')
    try:
      choices, usage = await app.answer(request, text)
    except serving.RequestError as e:
      return _error(400, str(e))
    return _response(kind, app.name, choices, usage)

  @api.post('/v1/chat/completions')
  async def chat(request: ChatRequest):
    if len(request.messages) != 1 or request.messages[0].role != 'user':
      return _error(400, 'messages: send one user message (the input); no system or history')
    return await complete('chat', request, request.messages[-1].content)

  @api.post('/v1/completions')
  async def completions(request: CompletionRequest):
    return await complete('completion', request, request.prompt)

  @api.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{'id': app.name, 'object': 'model', 'owned_by': 'dsbs-jax'}]}

  @api.get('/health')
  async def health():
    return app.health()

  return api


# Flags only one kind of model reads, with their defaults: given for the other
# kind, they are refused before it loads.
_STUDENT, _CAUSAL_LM = 'a dsbs-jax student', 'a causal LM'
_SCOPED: dict[str, dict[str, Any]] = {
    _STUDENT: {
        'overlong': 'refuse',
        'max_input_length': None,
        'max_decode_length': None,
        'vocabulary': None,
        'precompile': False,
    },
    _CAUSAL_LM: {'device': 'cpu'},
}


def load(args: argparse.Namespace) -> Union[serving.Student, serving.CausalLM]:
  kind = _CAUSAL_LM if serving.is_causal_lm(args.model) else _STUDENT
  cli.scoped_flags(args, _SCOPED, lambda scope: scope == kind)
  if kind == _CAUSAL_LM:
    return serving.CausalLM(args.model, args.device)
  return serving.load_student(
      args.model,
      args.vocabulary,
      args.max_input_length,
      args.max_decode_length,
      max_batch=args.max_batch,
      overlong=args.overlong,
  )


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='dsbs-serve', description=__doc__.split('\n')[0])
  add = p.add_argument
  add('--model', required=True, help='MODEL_DIR, its best/ or checkpoints/, or an HF directory')
  add('--name', default=None, help='the model name clients ask for (default: the directory name)')
  add('--host', default='127.0.0.1')
  add('--port', type=int, default=8000)
  add('--max_batch', type=int, default=16, help='requests decoded together; 1 turns batching off')
  add('--batch_wait_ms', type=float, default=5.0, help='how long a batch waits to fill')
  add('--overlong', default=None, choices=serving.OVERLONG, help='an input over the length')
  add('--max_input_length', type=int, default=None, help="the checkpoint's if not given")
  add('--max_decode_length', type=int, default=None, help="the checkpoint's if not given")
  add('--vocabulary', default=None, help="'bytes' or a SentencePiece .model; else recorded")
  add('--api_key_env', default=API_KEY_ENV, help='the variable holding the key clients must send')
  add('--device', default=None, help='torch device')
  add('--precompile', action='store_true', default=None, help='every shape bucket, before serving')
  cli.scoped_help(p, _SCOPED)
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  cli.set_process_defaults()
  cli.configure_logging()
  args = _parser().parse_args(argv)

  def body() -> int:
    import uvicorn

    if args.max_batch < 1:
      raise ConfigError(f'--max_batch {args.max_batch}: must be at least 1')
    name = args.name or os.path.basename(os.path.normpath(args.model))
    model = load(args)
    if args.precompile:
      cast(serving.Student, model).precompile()
    app = App(model, name, args.max_batch, args.batch_wait_ms, os.environ.get(args.api_key_env))
    log.info('dsbs-serve: %s on http://%s:%d/v1', name, args.host, args.port)
    # log_config=None: uvicorn's loggers go to dsbs-jax's handlers, which it would replace.
    uvicorn.run(create_app(app), host=args.host, port=args.port, log_config=None)
    return 0

  return cli.run('dsbs-serve', body)


if __name__ == '__main__':
  sys.exit(main())
