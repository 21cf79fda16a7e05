"""Golden outputs (scripts/maintainers/golden_outputs.py): hashes of tiny runs that a refactor must leave
bitwise unchanged, and a checkpoint written before the Program/actions redesign that must still resume.

- tests/fixtures/golden_pre_redesign.json: the trainer at 8b3a93c, before the redesign; the redesign
  reproduced every case bitwise (commit 7fa5add). The fixture's resume still does.
- tests/fixtures/golden.json: since the model's initialisers are compiled as one program (d7145b8:
  initial weights within float32 rounding of the op-by-op ones, so every case that initialises a model
  moved); the fixture's resume, which restores its weights, kept the pre-redesign hashes. The
  `seeds_2` case was recorded again when a k-seed run's oneDNN convolutions became one batched call
  that runs each seed's convolution on one thread (issue 17; before, each seed's ran over both
  threads, which sum a kernel gradient in another order): its losses moved in the 7th digit.

Float bits depend on the CPU's instruction set (it picks the kernels), so bitwise comparisons run where
the machine matches the one that recorded them (each file names it); elsewhere the fixture still has to
resume, to a state close to a fresh uninterrupted run.
"""

import json
import os
import sys

import numpy as np
import pytest

from cifar_jax import metrics_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts', 'maintainers'))
import golden_outputs  # noqa: E402

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
with open(os.path.join(FIXTURES, 'golden_pre_redesign.json')) as f:
  PRE_REDESIGN = json.load(f)
with open(os.path.join(FIXTURES, 'golden.json')) as f:
  GOLDEN = json.load(f)
SAME_MACHINE = GOLDEN['machine'] == golden_outputs.machine_fingerprint()
HASHED = ('step', 'params', 'batch_stats', 'opt_state', 'swa_params', 'swa_batch_stats', 'swa_count',
          'metrics')


def test_pre_redesign_checkpoint_resumes(tmp_path):
  """The checkpoint at step 6 written by the old code (mid epoch 2) resumes to the end of the run."""
  fixture = os.path.join(FIXTURES, 'pre_redesign_checkpoint')
  resumed = golden_outputs.run_case('fixture_resume', str(tmp_path / 'resumed'), fixture)
  records = metrics_writer.read_metrics(str(tmp_path / 'resumed'))
  assert [r['step'] for r in records] == [4, 8]  # epoch 1's record kept, epoch 2's written again
  assert records[0] == metrics_writer.read_metrics(fixture)[0]
  if SAME_MACHINE:  # the old code's uninterrupted run, to the bit
    assert {k: resumed[k] for k in HASHED} == {k: PRE_REDESIGN['default'][k] for k in HASHED}
  else:  # other float bits: the same run up to rounding
    fresh = golden_outputs.run_case('default', str(tmp_path / 'fresh'), None)
    for a, b in zip(resumed['metrics_records'], fresh['metrics_records']):
      assert a.keys() == b.keys()
      for key in ('train_loss', 'eval_loss', 'learning_rate'):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not SAME_MACHINE, reason=f"golden hashes were recorded on {GOLDEN['machine']}")
def test_golden_outputs_are_bitwise_unchanged(tmp_path):
  """Every recorded case (default, SWA per epoch and per step, plateau, 2 seeds, 4 devices under jit
  and under pmap, the fixture's resume) ends with the bits recorded in tests/fixtures/golden.json."""
  out = tmp_path / 'now.json'
  result = golden_outputs.subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'maintainers', 'golden_outputs.py'), f'--out={out}',
       f"--fixture={os.path.join(FIXTURES, 'pre_redesign_checkpoint')}",
       f"--compare={os.path.join(FIXTURES, 'golden.json')}"],
      capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert 'bitwise equal' in result.stdout
  now = json.loads(out.read_text())
  assert now['fixture_resume'] == {k: v for k, v in PRE_REDESIGN['fixture_resume'].items()}
