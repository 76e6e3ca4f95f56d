"""The benchmarks compare like with like: from the same weights and examples, our fused
packed step and the reference's two-pass step compute the same loss, step after step."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from bench import decode_throughput, examples, harness, reference_torch, train_throughput  # noqa: E402
from bench.train_throughput import Ours  # noqa: E402

LENGTHS = {'inputs': 384, 'targets': 384}
TINY_TRAIN = ['--batch_size=4', '--steps=1', '--warmup=0', '--inputs=128', '--targets=128']


def _one_step_inputs(rows):
  """`rows` as our one packed batch and as the reference's label and rationale halves."""
  packed = list(examples.packed_batches(rows, LENGTHS, 1))
  assert sum(n for _, n in packed) == len(rows)  # every example, both tasks, once
  batch = {k: np.concatenate([b[k] for b, _ in packed]) for k in packed[0][0]}
  label = reference_torch.half([r['predict'] for r in rows], [r['label'] for r in rows])
  rationale = reference_torch.half([r['explain'] for r in rows], [r['rationale'] for r in rows])
  return batch, label, rationale


@pytest.mark.parametrize('vocab_size,chunk', [(384, None), (2048, 48)])
def test_both_sides_train_the_same_objective(data_root, monkeypatch, vocab_size, chunk):
  """Also with a larger head on both sides (`--vocab_size`), our loss taking 48
  positions at a time (`--loss_chunk_length`)."""
  monkeypatch.setenv('DSBS_DATA_ROOT', data_root)
  config = dataclasses.replace(harness.CONFIGS['mini'], vocab_size=vocab_size)
  rows = examples.examples(['svamp', 'cqa'], 'train', LENGTHS, limit=6)
  torch_model, params = harness.same_weights(config)
  batch, label, rationale = _one_step_inputs(rows)
  ours = Ours(
      config,
      params,
      examples.vocab_shape(),
      [(batch, len(rows))],
      rationale=True,
      loss_chunk_length=chunk,
  )
  reference = reference_torch.ReferenceTrainer(torch_model, alpha=0.5)
  for step in range(3):
    ours_loss = ours.step()[-1]
    reference_loss = reference.step([(label, rationale)])
    assert ours_loss == pytest.approx(reference_loss, rel=2e-4), step
  # After three AdamW updates (lr 5e-5 each) the weights still agree.
  ids = examples.encode('a</s>b', 8)
  assert ids == [*examples.VOCAB.encode('a'), 1, *examples.VOCAB.encode('b'), 1]
  theirs = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  from dsbs_jax import hf_checkpoint

  expected = hf_checkpoint.params_from_hf_state_dict(theirs, config)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1.5e-4),
      jax.device_get(ours.state.params),
      expected,
  )


def test_bf16_on_both_sides_trains_the_same_objective(data_root, monkeypatch):
  """`--dtype=bfloat16`: our bf16 activations over float32 params against HF's autocast."""
  monkeypatch.setenv('DSBS_DATA_ROOT', data_root)
  config = dataclasses.replace(harness.CONFIGS['mini'], dtype='bfloat16')
  rows = examples.examples(['svamp', 'cqa'], 'train', LENGTHS, limit=4)
  torch_model, params = harness.same_weights(config)
  batch, label, rationale = _one_step_inputs(rows)
  ours = Ours(config, params, examples.vocab_shape(), [(batch, len(rows))], rationale=True)
  reference = reference_torch.ReferenceTrainer(
      torch_model, alpha=0.5, autocast_dtype=torch.bfloat16
  )
  float32_loss = reference_torch.step_by_step_loss(torch_model, label, rationale).item()
  ours_loss, reference_loss = ours.step()[-1], reference.step([(label, rationale)])
  assert all(p.dtype == torch.float32 for p in torch_model.parameters())
  assert ours_loss == pytest.approx(reference_loss, rel=1e-2)
  assert ours_loss == pytest.approx(float32_loss, rel=1e-2)
  assert ours_loss != float32_loss  # bf16 did run


def test_matmuls_counts_each_dot_as_often_as_it_runs():
  """A scan's dots count `length` times; a gradient adds a dot per differentiated operand
  of each dot, and a rematerialised block its recomputation."""
  jnp = jax.numpy

  def f(x, w, q, k):
    _, scores = jax.lax.scan(
        jax.checkpoint(lambda c, qi: (c, jnp.tanh(jnp.einsum('bqd,bkd->bqk', qi, k)))), 0.0, q
    )
    return jnp.sum(x @ w @ w.T) + jnp.sum(scores)

  x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
  q, k = jnp.ones((5, 2, 3, 6)), jnp.ones((2, 7, 6))
  xw, xw_wt, qk = ('float32', 1, 4, 8, 16), ('float32', 1, 4, 16, 8), ('float32', 2, 3, 6, 7)
  assert harness.matmuls(f, x, w, q, k) == {xw: 1, xw_wt: 1, qk: 5}
  # d/dq through the rematerialised scan: the forward dot, its recomputation for tanh's
  # derivative, and dq = d_scores @ k; the x @ w path runs once, undifferentiated.
  assert harness.matmuls(jax.grad(lambda q: f(x, w, q, k)), q) == {
      xw: 1,
      xw_wt: 1,
      qk: 5 + 5,
      ('float32', 2, 3, 7, 6): 5,
  }
  with pytest.raises(ValueError, match='a while runs its dots a data-dependent number'):
    harness.matmuls(
        lambda x: jax.lax.while_loop(lambda y: y.sum() < 9, lambda y: y @ w.T @ w, x @ w), x
    )


def test_matmuls_of_our_forward_pass_are_the_model_flops():
  """The FLOP model behind the benches' utilisation agrees with the dots the network runs
  (equal encoder and decoder lengths, where the model charges cross-attention's key and
  value projections per decoder token)."""
  config = harness.CONFIGS['mini']
  model = harness.student(config, {'vocab_size': 384, 'eos_id': 1})
  params = model.get_initial_variables(
      jax.random.key(0), {'encoder_input_tokens': (2, 64), 'decoder_input_tokens': (2, 64)}
  )
  tokens = np.ones((2, 64), np.int32)
  found = harness.matmuls(
      lambda p: model.module.apply(p, tokens, tokens, tokens, enable_dropout=False), params
  )
  enc, dec = harness.forward_flops_per_token(config, 64, 64)
  assert harness.matmul_flops(found) == 2 * 64 * (enc + dec)


def test_a_memory_child_reports_growth_since_its_reset_never_below_zero(capsys):
  """Memory grown after the reset is counted; a reset taken above the kernel's later
  high-water reading (its RSS counters are approximate) yields 0 growth, not less."""
  if harness.on_gpu():
    pytest.skip('the RSS counters are only read on a CPU host')
  setup = harness.reset_peak_memory('ours')
  grown = np.ones(64 << 20, np.uint8)  # touches 64 MiB
  harness.print_child_memory('ours', setup)
  report = json.loads(capsys.readouterr().out)
  assert report['peak_bytes'] - report['setup_bytes'] >= grown.nbytes * 0.9
  harness.print_child_memory('ours', report['peak_bytes'] + 4096.0)
  above = json.loads(capsys.readouterr().out)
  assert above['peak_bytes'] == above['setup_bytes'] == report['peak_bytes'] + 4096.0


def test_a_failed_child_shows_why():
  """A memory child's traceback reaches the bench's own error, not only its exit status."""
  with pytest.raises(subprocess.CalledProcessError) as error:
    harness.run_child(['-c', 'import sys; print("out"); sys.exit("the device is full")'])
  assert 'the device is full' in ''.join(error.value.__notes__)


def test_our_step_alone_trains_its_own_initialisation(data_root, monkeypatch):
  """`--sides=ours`, how the largest model is found: no reference model is built, and our
  step trains its own initialisation, here with Adafactor."""
  monkeypatch.setenv('DSBS_DATA_ROOT', data_root)
  flags = ['--config=mini', *TINY_TRAIN, '--sides=ours', '--optimizer=adafactor']
  flags += ['--vocab_size=512', '--loss_chunk_length=50']  # a chunk not dividing 128
  args = train_throughput.parse_args(flags)
  config, _, inputs, rationale, torch_model, params = train_throughput.build(args)
  assert torch_model is None and params is None
  made = train_throughput.sides(args, config, inputs, rationale, torch_model, params)
  built = {name: make() for name, make in made.items()}
  assert list(built) == ['ours']
  model = built['ours'].trainer.model
  assert model.module.config.vocab_size == 512 and model.loss_chunk_length == 50
  results, dots_alone = train_throughput.timed_steps(built, None, 0, 2)
  assert len(results['ours']) == 2 and dots_alone == []
  assert all(np.isfinite(result[-1]) for result in results['ours'])
  opt_paths = jax.tree_util.tree_flatten_with_path(built['ours'].state.opt_state)[0]
  assert any('v_row' in jax.tree_util.keystr(path) for path, _ in opt_paths)  # factored


def test_adafactor_is_refused_beside_the_reference():
  """The reference trains with AdamW: another optimizer is only timed on our side."""
  with pytest.raises(SystemExit) as error:
    train_throughput.parse_args(['--optimizer=adafactor'])
  assert error.value.code == 2
  assert train_throughput.parse_args(['--optimizer=adafactor', '--sides=ours']).sides == 'ours'


def test_bfloat16_attention_logits_need_bfloat16_activations(capsys):
  with pytest.raises(SystemExit) as error:
    train_throughput.parse_args(['--bfloat16_attention_logits'])
  assert error.value.code == 2
  assert '--bfloat16_attention_logits needs --dtype=bfloat16' in capsys.readouterr().err
  args = train_throughput.parse_args(['--dtype=bfloat16', '--bfloat16_attention_logits'])
  assert args.bfloat16_attention_logits


def test_the_decode_bench_refuses_fewer_than_one_width(capsys):
  with pytest.raises(SystemExit) as error:
    decode_throughput.parse_args(['--max_input_widths=0'])
  assert error.value.code == 2
  assert '--max_input_widths=0: must be >= 1' in capsys.readouterr().err
  assert decode_throughput.parse_args(['--max_input_widths=1']).max_input_widths == 1


def test_the_decode_bench_refuses_devices_it_cannot_split_over(capsys):
  count = jax.device_count()
  for flags, message in [
      (['--devices=3'], '--devices=3: must be >= 1 and divide --batch_size=64'),
      (['--devices=0'], '--devices=0: must be >= 1 and divide --batch_size=64'),
      (
          [f'--devices={2 * count}', f'--batch_size={2 * count}'],
          f'--devices={2 * count}: JAX sees {count} device(s)',
      ),
  ]:
    with pytest.raises(SystemExit) as error:
      decode_throughput.parse_args(flags)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_the_decode_bench_over_two_devices_predicts_as_over_one(data_root, monkeypatch, tmp_path):
  """Split over devices (as the Evaluator over its mesh), every prediction is the same."""
  monkeypatch.setenv('DSBS_DATA_ROOT', data_root)
  flags = ['--config=mini', '--batch_size=4', '--batches=2', '--inputs=128', '--max_new_tokens=8']
  flags += [f'--prepared={tmp_path / "inputs.npz"}']  # built by the first pass, read by the second
  predictions = []
  for devices in (1, 2):
    sides, rows = decode_throughput.build(
        decode_throughput.parse_args([*flags, f'--devices={devices}'])
    )
    predictions.append(sides['ours'](rows))
  assert len(predictions[0]) == 8 and predictions[0] == predictions[1]


def _blocking(tmp_path) -> str:
  """A PYTHONPATH entry under which `import tensorflow` and `import seqio` fail."""
  blocker = tmp_path / 'no_tensorflow'
  blocker.mkdir()
  for name in ('tensorflow', 'seqio'):
    (blocker / f'{name}.py').write_text(f"raise ImportError('{name} is blocked in this test')\n")
  return str(blocker)


@pytest.mark.parametrize(
    'bench, flags',
    [
        (train_throughput, TINY_TRAIN),
        (
            decode_throughput,
            ['--batch_size=4', '--batches=1', '--inputs=128', '--max_new_tokens=8', '--devices=2'],
        ),
    ],
)
def test_a_prepared_file_runs_the_bench_without_tensorflow(
    data_root, monkeypatch, tmp_path, bench, flags
):
  """What a GPU host without TensorFlow does: it runs from inputs prepared elsewhere."""
  monkeypatch.setenv('DSBS_DATA_ROOT', data_root)
  prepared = tmp_path / 'inputs.npz'
  flags = ['--config=mini', f'--prepared={prepared}', *flags]
  bench.build(bench.parse_args(flags))  # writes the file, with TensorFlow
  monkeypatch.setenv('DSBS_DATA_ROOT', str(tmp_path / 'absent'))
  monkeypatch.setenv('PYTHONPATH', _blocking(tmp_path))
  script = os.path.relpath(bench.__file__, harness.REPO)
  report = json.loads(harness.run_child([script, *flags]))
  for side in ('ours', 'reference'):
    assert report[side]['peak_memory_bytes'] > report[side]['step_memory_bytes'] >= 0
    assert report[side]['examples_per_s'] > 0
  assert report['ratio_ours_over_reference']['examples_per_s'] > 0  # a zero step memory is left out
  if bench is decode_throughput:
    assert report['ours_equals_ours_in_order'] is True
  if bench is train_throughput:
    alone = report['ours_matmuls_alone']
    assert alone['examples_per_s_over_reference'] == pytest.approx(
        alone['examples_per_s'] / report['reference']['examples_per_s']
    )
    assert np.isfinite(alone['examples_per_s']) and alone['examples_per_s'] > 0
  with pytest.raises(subprocess.CalledProcessError) as error:
    subprocess.run(
        [sys.executable, script, *flags, '--batch_size=8'],
        cwd=harness.REPO,
        check=True,
        capture_output=True,
        text=True,
    )
  assert f'{prepared} was prepared for' in error.value.stderr
