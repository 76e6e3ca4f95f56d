"""Teacher LLM backends behind one small interface: prompts in, completions out.

`OpenAITeacher` talks to any OpenAI-compatible server (vLLM, llama.cpp's
server, TGI, hosted APIs, `dsbs-serve`) through the official `openai` client;
`TransformersTeacher` generates with a local causal LM directory. Both take a
`Sampling` and return, per prompt, `n` completions with token counts.

The API key is read from an environment variable and handed to the client
only: it is never logged, put in an error message, or recorded (`describe`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Protocol

from dsbs_jax.errors import ConfigError

log = logging.getLogger('dsbs_jax')
API_KEY_ENV = 'OPENAI_API_KEY'
APIS = ('completions', 'chat')


class TeacherError(ConfigError):
  """The teacher cannot answer (unreachable, refused, malformed); one line for the user.
  `index`: the prompt it could not answer, where known."""

  def __init__(self, message: str, index: Optional[int] = None):
    super().__init__(message)
    self.index = index


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How completions are drawn. temperature 0 is greedy; `seed` makes sampling
  repeatable on servers that honour it."""

  temperature: float = 0.0
  n: int = 1
  max_tokens: int = 256
  stop: tuple[str, ...] = ()
  top_p: float = 1.0
  seed: Optional[int] = 0

  def __post_init__(self):
    if self.n < 1:
      raise ConfigError(f'--num_samples {self.n}: must be at least 1')
    if self.temperature < 0:
      raise ConfigError(f'--temperature {self.temperature}: must be >= 0')
    if not 0 < self.top_p <= 1:
      raise ConfigError(f'--top_p {self.top_p}: must be in (0, 1]')
    if self.n > 1 and self.temperature == 0:
      raise ConfigError(
          f'--num_samples {self.n} with --temperature 0 would repeat one greedy '
          'completion; set --temperature > 0'
      )
    if self.max_tokens < 1:
      raise ConfigError(f'--max_tokens {self.max_tokens}: must be at least 1')


@dataclasses.dataclass(frozen=True)
class Completions:
  """A prompt's `n` completions and the tokens they cost."""

  texts: tuple[str, ...]
  prompt_tokens: int
  completion_tokens: int


class Teacher(Protocol):

  def describe(self) -> dict[str, Any]:
    """What identifies the teacher's answers (backend, server, model); no secrets."""
    ...

  def complete(
      self, prompts: Sequence[str], sampling: Sampling
  ) -> Iterator[tuple[int, Completions]]:
    """(index, completions) of each prompt as they arrive, in any order, so that a
    failure later loses none of the answers before it."""
    ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to its first stop sequence (servers do this; local generation too)."""
  for s in stop:
    text = text.split(s)[0]
  return text


def redact_url(url: str) -> str:
  """`url` without user info or query (where keys sometimes ride)."""
  parts = urllib.parse.urlsplit(url)
  host = parts.hostname or ''
  if parts.port:
    host = f'{host}:{parts.port}'
  return urllib.parse.urlunsplit((parts.scheme, host, parts.path, '', ''))


class OpenAITeacher:
  """An OpenAI-compatible server, `concurrency` requests in flight.

  The client retries 429s, 5xx, timeouts and dropped connections with
  exponential backoff (`max_retries`); what still fails stops the run with one
  line naming the server and the status, never the key.
  """

  def __init__(
      self,
      base_url: str,
      model: str,
      api: str = 'completions',
      api_key_env: str = API_KEY_ENV,
      concurrency: int = 32,
      timeout: float = 120.0,
      max_retries: int = 5,
  ):
    import openai

    if api not in APIS:
      raise ConfigError(f'--api {api}: choose {" or ".join(APIS)}')
    if concurrency < 1:
      raise ConfigError(f'--concurrency {concurrency}: must be at least 1')
    if timeout <= 0 or max_retries < 0:
      raise ConfigError(f'--timeout {timeout} must be > 0 and --max_retries {max_retries} >= 0')
    if urllib.parse.urlsplit(base_url).username is not None:
      raise ConfigError(
          f'--base_url {redact_url(base_url)}: carries credentials, which the client would send '
          f'in place of the key; give the key in ${api_key_env}'
      )
    self.model, self.api, self.concurrency, self.api_key_env = model, api, concurrency, api_key_env
    self.url = redact_url(base_url)
    self._client = openai.OpenAI(
        base_url=base_url,
        api_key=os.environ.get(api_key_env) or 'none',
        timeout=timeout,
        max_retries=max_retries,
    )

  def describe(self) -> dict[str, Any]:
    # The server's URL too: two servers may give one name to different weights.
    return {'backend': f'openai-{self.api}', 'url': self.url, 'model': self.model}

  def complete(
      self, prompts: Sequence[str], sampling: Sampling
  ) -> Iterator[tuple[int, Completions]]:
    pool = concurrent.futures.ThreadPoolExecutor(self.concurrency)
    try:
      futures = {pool.submit(self._one, p, sampling): i for i, p in enumerate(prompts)}
      for future in concurrent.futures.as_completed(futures):
        try:
          yield futures[future], future.result()
        except TeacherError as e:
          raise TeacherError(str(e), futures[future]) from None
    finally:  # on an error or Ctrl-C, what is queued is dropped, not sent
      pool.shutdown(wait=False, cancel_futures=True)

  def _one(self, prompt: str, sampling: Sampling) -> Completions:
    import openai

    common: dict[str, Any] = {
        'model': self.model,
        'n': sampling.n,
        'temperature': sampling.temperature,
        'top_p': sampling.top_p,
        'max_tokens': sampling.max_tokens,
        'stop': list(sampling.stop) or None,
        'seed': sampling.seed,
    }
    try:
      if self.api == 'chat':
        response = self._client.chat.completions.create(
            messages=[{'role': 'user', 'content': prompt}], **common
        )
        texts = [choice.message.content for choice in response.choices]
      else:
        response = self._client.completions.create(prompt=prompt, **common)
        texts = [choice.text for choice in response.choices]
    except openai.AuthenticationError:
      raise TeacherError(
          f'{self.url}: the server refused the API key (401); check the key in ${self.api_key_env}'
      ) from None
    except openai.APIStatusError as e:
      raise TeacherError(f'{self.url}: HTTP {e.status_code}: {_message(e)}') from None
    except openai.APITimeoutError:
      raise TeacherError(f'{self.url}: no answer within the timeout, after retries') from None
    except openai.APIConnectionError:
      raise TeacherError(f'{self.url}: cannot connect (is the server running?)') from None
    except (openai.APIResponseValidationError, AttributeError, TypeError, ValueError) as e:
      raise TeacherError(f'{self.url}: malformed response ({type(e).__name__})') from None
    if len(texts) != sampling.n or not all(isinstance(t, str) for t in texts):
      raise TeacherError(
          f'{self.url}: malformed response ({len(texts)} completions for n={sampling.n})'
      )
    usage = getattr(response, 'usage', None)
    return Completions(
        tuple(cut_at_stop(t, sampling.stop) for t in texts),
        getattr(usage, 'prompt_tokens', 0) or 0,
        getattr(usage, 'completion_tokens', 0) or 0,
    )


def _message(error: Any) -> str:
  """The server's own error message, on one line."""
  body = getattr(error, 'body', None)
  if isinstance(body, dict):
    inner = body.get('error', body)
    message = inner.get('message') if isinstance(inner, dict) else inner
  else:
    message = getattr(error, 'message', '') or str(error)
  return ' '.join(str(message).split())[:300]


class CausalLM:
  """A transformers causal LM directory, generating batches with left padding.

  Safe to share between threads (a server counts tokens in request threads while its
  batcher generates): an HF fast tokenizer sets its padding on every call, so one
  call without padding, racing a padded batch, leaves the batch ragged.
  """

  def __init__(self, model_dir: str, device: str = 'cpu'):
    try:
      import torch
      import transformers
    except ImportError as e:
      raise ConfigError(
          f'{model_dir}: a local transformers model needs PyTorch ({e}); pip install torch'
      ) from None
    self._torch = torch
    if not os.path.isfile(os.path.join(model_dir, 'config.json')):
      raise ConfigError(f'{model_dir}: not a transformers model directory (no config.json)')
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    self.tokenizer.padding_side = 'left'
    if self.tokenizer.pad_token is None:
      self.tokenizer.pad_token = self.tokenizer.eos_token
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    self.model = model.to(device).eval()
    self.device = device
    self.context = int(getattr(self.model.config, 'max_position_embeddings', 0) or 0)
    self._tokenizing = threading.Lock()

  def count_tokens(self, text: str) -> int:
    with self._tokenizing:
      return len(self.tokenizer(text)['input_ids'])

  def generate(self, prompts: Sequence[str], sampling: Sampling) -> list[Completions]:
    """Each prompt's `sampling.n` completions; a prompt too long for the model's
    context raises, naming its length."""
    torch = self._torch
    with self._tokenizing:
      encoded = self.tokenizer(list(prompts), return_tensors='pt', padding=True)
    lengths = encoded['attention_mask'].sum(-1).tolist()
    if self.context:
      for i, length in enumerate(lengths):
        if length + sampling.max_tokens > self.context:
          raise TeacherError(
              f'the prompt is {length} tokens; with max_tokens={sampling.max_tokens} it exceeds '
              f'the model context of {self.context} (use fewer exemplars or --max_tokens)',
              i,
          )
    sample = sampling.temperature > 0
    if sampling.seed is not None:
      torch.manual_seed(sampling.seed)
    with torch.no_grad():
      out = self.model.generate(
          **encoded.to(self.device),
          do_sample=sample,
          temperature=sampling.temperature if sample else None,
          top_p=sampling.top_p if sample else None,
          top_k=None,
          num_return_sequences=sampling.n,
          max_new_tokens=sampling.max_tokens,
          pad_token_id=self.tokenizer.pad_token_id,
      )
    eos, n = self.tokenizer.eos_token_id, sampling.n
    new = out[:, encoded['input_ids'].shape[1] :].tolist()
    new = [ids[: ids.index(eos)] if eos in ids else ids for ids in new]
    with self._tokenizing:
      texts = [str(self.tokenizer.decode(ids, skip_special_tokens=True)) for ids in new]
    return [
        Completions(
            tuple(cut_at_stop(text, sampling.stop) for text in texts[i * n : (i + 1) * n]),
            int(length),
            sum(len(ids) for ids in new[i * n : (i + 1) * n]),
        )
        for i, length in enumerate(lengths)
    ]


class TransformersTeacher:
  """A local causal LM, `batch_size` prompts per generate call."""

  def __init__(self, model_dir: str, batch_size: int = 8, device: str = 'cpu'):
    if batch_size < 1:
      raise ConfigError(f'--batch_size {batch_size}: must be at least 1')
    self.model_dir, self.batch_size = model_dir, batch_size
    self.lm = CausalLM(model_dir, device)

  def describe(self) -> dict[str, Any]:
    return {'backend': 'transformers', 'model': os.path.abspath(self.model_dir)}

  def complete(
      self, prompts: Sequence[str], sampling: Sampling
  ) -> Iterator[tuple[int, Completions]]:
    for start in range(0, len(prompts), self.batch_size):
      try:
        answers = self.lm.generate(prompts[start : start + self.batch_size], sampling)
      except TeacherError as e:
        raise TeacherError(str(e), start + (e.index or 0)) from None
      yield from enumerate(answers, start)
