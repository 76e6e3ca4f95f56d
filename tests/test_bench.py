"""The benchmarks compare like with like: from the same weights and examples, our fused
packed step and the reference's two-pass step compute the same loss, step after step."""

import itertools

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from bench import harness, reference_torch  # noqa: E402
from bench.train_throughput import Ours  # noqa: E402

LENGTHS = {'inputs': 384, 'targets': 384}


def test_both_sides_train_the_same_objective(data_root, monkeypatch):
  monkeypatch.setenv('DSBS_DATA_ROOT', data_root)
  config = harness.CONFIGS['mini']
  rows = harness.examples(['svamp', 'cqa'], 'train', LENGTHS, limit=6)
  torch_model, params = harness.same_weights(config)
  packed = list(harness.packed_batches(rows, LENGTHS, 1))
  assert sum(n for _, n in packed) == len(rows)  # every example, both tasks, once
  batch = {k: np.concatenate([b[k] for b, _ in packed]) for k in packed[0][0]}
  ours = Ours(config, params, rows, LENGTHS, len(packed), rationale=True)
  ours.batches = itertools.repeat((batch, len(rows)))
  reference = reference_torch.ReferenceTrainer(torch_model, alpha=0.5)
  label = reference_torch.half([r['predict'] for r in rows], [r['label'] for r in rows])
  rationale = reference_torch.half([r['explain'] for r in rows], [r['rationale'] for r in rows])
  for step in range(3):
    ours_loss = ours.step()[-1]
    reference_loss = reference.step([(label, rationale)])
    assert ours_loss == pytest.approx(reference_loss, rel=2e-4), step
  # After three AdamW updates (lr 5e-5 each) the weights still agree.
  ids = harness.encode('a</s>b', 8)
  assert ids == harness.VOCAB.encode('a') + [1] + harness.VOCAB.encode('b') + [1]
  theirs = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  from dsbs_jax import hf_checkpoint
  expected = hf_checkpoint.params_from_hf_state_dict(theirs, config)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1.5e-4),
                         jax.device_get(ours.state.params), expected)
