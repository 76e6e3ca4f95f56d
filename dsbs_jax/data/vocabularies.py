"""Vocabularies: bytes (no download), a SentencePiece model by path, or one trained here.

T5 checkpoints need T5's own SentencePiece model
(`gs://t5-data/vocabs/cc_all.32000/sentencepiece.model`, 32000 pieces + 100
extra ids). A student trained from scratch may instead use bytes, or a model
trained on its task's text:

    python -m dsbs_jax.data.vocabularies --task=cqa_llm_step_by_step \
        --data_root=/path/to/datasets --output=/tmp/cqa_spm --vocab_size=8000
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

import sentencepiece as spm
import seqio
from google.protobuf import message

from dsbs_jax import storage
from dsbs_jax.errors import ConfigError, DataError


def sentencepiece(path: str, extra_ids: int = 100) -> seqio.SentencePieceVocabulary:
  """The SentencePiece model at `path` (local or a URL such as gs://), checked up front.

  SeqIO opens the model with TensorFlow's gfile; a URL is first copied to a local
  cache through `storage`, so every path dsbs-jax takes is read the same way.
  """
  try:
    local = storage.local_copy(path)
  except DataError:
    raise ConfigError(f'SENTENCEPIECE_MODEL {path!r} not found') from None
  except OSError as e:
    raise ConfigError(f'SENTENCEPIECE_MODEL {path!r} cannot be read: {e}') from None
  vocabulary = seqio.SentencePieceVocabulary(local, extra_ids=extra_ids)
  try:
    _ = vocabulary.vocab_size  # parses the model
  except (message.DecodeError, RuntimeError, OSError) as e:
    raise ConfigError(
        f'SENTENCEPIECE_MODEL {path!r} is not a SentencePiece model: {str(e).splitlines()[0]}'
    ) from None
  return vocabulary


def describe(vocabulary: seqio.Vocabulary) -> Optional[dict[str, Any]]:
  """What rebuilds `vocabulary` (`from_description`), for a checkpoint to record so
  that serving needs no gin; None for a kind it cannot record."""
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return {'kind': 'bytes', 'extra_ids': vocabulary.extra_ids}
  if isinstance(vocabulary, seqio.SentencePieceVocabulary):
    return {
        'kind': 'sentencepiece',
        'path': vocabulary.sentencepiece_model_file,
        'extra_ids': vocabulary.extra_ids,
    }
  return None


def from_description(description: Mapping[str, Any]) -> seqio.Vocabulary:
  """The vocabulary `describe` recorded."""
  kind = description.get('kind')
  if kind == 'bytes':
    return seqio.ByteVocabulary(extra_ids=int(description.get('extra_ids', 0)))
  if kind == 'sentencepiece':
    return sentencepiece(str(description['path']), int(description.get('extra_ids', 0)))
  raise ConfigError(f'unknown vocabulary {dict(description)!r}; expected bytes or sentencepiece')


def task_texts(mixture_or_task_name: str, split: str = 'train') -> Iterator[str]:
  """Every text field of the raw (untokenized) examples of a task or mixture."""
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  task_list = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  seen = set()
  for task in task_list:
    if id(task.source) in seen:
      continue
    seen.add(id(task.source))
    for example in task.source.get_dataset(split, shuffle=False).as_numpy_iterator():
      for value in example.values():
        if isinstance(value, bytes):
          yield value.decode('utf-8')


def train_sentencepiece(texts: Iterator[str], output_prefix: str, vocab_size: int = 8000) -> str:
  """Trains a unigram model with T5's special ids (pad 0, eos 1, unk 2); returns its path."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=(t.replace('\n', ' ') for t in texts),
      model_writer=model,
      vocab_size=vocab_size,
      model_type='unigram',
      character_coverage=1.0,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      hard_vocab_limit=False,
  )
  path = output_prefix + '.model'
  storage.write_atomic(path, model.getvalue())
  return path


def main(argv: Sequence[str]) -> None:
  """Trains a SentencePiece model on a registered task's training text."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('--task', required=True)
  parser.add_argument('--output', required=True, help='path prefix; writes <output>.model')
  parser.add_argument('--vocab_size', type=int, default=8000)
  parser.add_argument(
      '--data_root',
      default=None,
      help="the released datasets (default: $DSBS_DATA_ROOT), for the paper's tasks",
  )
  args = parser.parse_args(argv)
  from dsbs_jax.data import catalog

  catalog.register_for(args.task, args.data_root)
  path = train_sentencepiece(task_texts(args.task), args.output, args.vocab_size)
  vocab = seqio.SentencePieceVocabulary(path)
  print(
      f'wrote {path}: {vocab.vocab_size} ids; set VOCABULARY = '
      f'@vocabularies.sentencepiece() and vocabularies.sentencepiece.path = {path!r}'
  )


if __name__ == '__main__':
  import sys

  main(sys.argv[1:])
