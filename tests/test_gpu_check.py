"""scripts/gpu/gpu_check.sh and gpu_stages.py on the CPU: the smoke run of every stage (GPU_CHECK_SMOKE=1),
the stop on a wrong backend, the deadline, and the rows kept when a stage is killed."""

import argparse
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts', 'gpu'))
import gpu_stages  # pylint: disable=g-import-not-at-top,wrong-import-position

SCRIPT = os.path.join(ROOT, 'scripts', 'gpu', 'gpu_check.sh')


def _run(tmp_path, timeout=900, **env):
  """gpu_check.sh in smoke mode with its files under tmp_path; returns (process, seconds, rows)."""
  out = tmp_path / 'out'
  env = dict(os.environ, GPU_CHECK_SMOKE='1', OUT=str(out), GPU_CHECK_WORK=str(tmp_path / 'work'),
             PYTHON=sys.executable, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'), **env)
  start = time.time()
  proc = subprocess.run(['bash', SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False)
  return proc, time.time() - start, gpu_stages.read_rows(str(out))


def _ends(rows):
  return {r['stage']: r for r in rows if r.get('end')}


def test_a_backend_other_than_the_one_asked_for_stops_with_one_line(tmp_path):
  proc, _, rows = _run(tmp_path, timeout=120, GPU_CHECK_BACKEND='gpu')  # JAX runs on the CPU here
  assert proc.returncode == 3, proc.stdout + proc.stderr
  errors = proc.stderr.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith('gpu_check: JAX runs on cpu'), proc.stderr
  assert 'stopping before measuring anything' in errors[0] and 'Traceback' not in proc.stdout
  assert rows == []  # nothing measured, nothing recorded
  assert errors[0] in (tmp_path / 'out' / 'summary.md').read_text()


def test_a_backend_that_cannot_start_stops_with_one_line(tmp_path):
  pytest.importorskip('jax')
  proc, _, rows = _run(tmp_path, timeout=120, GPU_CHECK_BACKEND='gpu', GPU_CHECK_JAX_PLATFORMS='cuda')
  assert proc.returncode == 3, proc.stdout + proc.stderr
  errors = proc.stderr.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith('gpu_check: JAX could not start a backend'), proc.stderr
  assert rows == []


def test_a_stage_killed_at_its_deadline_keeps_the_rows_it_measured(tmp_path):
  child = 'import time\nfor i in range(100):\n  print(f"row {i}", flush=True)\n  time.sleep(0.2)\n'
  seen = []
  on_line = lambda line: line.startswith('row') and gpu_stages.append(
      str(tmp_path), {'stage': 'test', 'status': 'measured', 'row': int(line.split()[1])})
  start = time.time()
  status, seconds, tail = gpu_stages.run_logged([sys.executable, '-c', child], time.time() + 2,
                                                on_line=lambda line: seen.append(on_line(line)))
  assert status == 'timeout' and seconds < 10 and time.time() - start < 10
  rows = gpu_stages.read_rows(str(tmp_path))
  assert 5 <= len(rows) <= 15 and [r['row'] for r in rows] == list(range(len(rows)))
  assert tail[-1] == f'row {len(rows) - 1}'


def test_the_summary_reads_every_kind_of_row(tmp_path):
  out = str(tmp_path)
  rows = [
      {'stage': 'preflight', 'status': 'measured', 'device_kind': 'NVIDIA H200', 'device_count': 1,
       'jax_backend': 'gpu', 'versions': {'jax': '0.11.2'}, 'torch_device': 'NVIDIA H200'},
      {'stage': 'preflight', 'status': 'ok', 'end': True, 'seconds': 9},
      {'stage': 'correctness', 'status': 'measured', 'precision': 'highest', 'max_rel_diff': 3e-7,
       'rtol': 1e-4, 'passed': True},
      {'stage': 'jax_step', 'status': 'measured', 'dtype': 'float32', 'batch': 512, 'compile_s': 30.0,
       'train_ips': 20000.0, 'eval_ips': 60000.0, 'peak_mb': 9000.0,
       'precision': gpu_stages.precision_label('float32', 'gpu', 'jax')},
      {'stage': 'jax_step', 'status': 'timeout', 'dtype': 'bfloat16', 'batch': 512, 'note': 'killed'},
      {'stage': 'torch_eager', 'status': 'measured', 'dtype': 'float32', 'batch': 512, 'compile_s': 3.0,
       'train_ips': 10000.0, 'eval_ips': 30000.0, 'peak_mb': 5000.0,
       'precision': gpu_stages.precision_label('float32', 'gpu', 'torch')},
      {'stage': 'train', 'status': 'planned', 'epochs': 2, 'train_images': 33152, 'eval_images': 5028,
       'source': 'cifar10_train.npz', 'estimate': {'basis': 'the jax_step cell float32 batch 128'}},
      {'stage': 'train', 'status': 'measured', 'epoch': 1, 'eval_accuracy': 0.5, 'images_per_second': 9e3},
      {'stage': 'train', 'status': 'measured', 'epoch': 1, 'eval_accuracy': 0.49, 'images_per_second': 2e4,
       'dtype': 'bfloat16'},
      {'stage': 'seeds', 'status': 'skipped', 'k': 4, 'note': 'no time'},
  ]
  for row in rows:
    gpu_stages.append(out, row)
  text = gpu_stages.summarize(out)
  assert '| preflight | ok | 9 | 1 |' in text and '| torch_compile | not run |' in text
  assert '| jax | jit | float32/TF32' in text and '| 2.00x |' in text  # JAX over torch, same cell
  assert '- jax_step bfloat16 batch 512: timeout (killed)' in text and '- seeds k = 4: skipped' in text
  assert 'on real CIFAR-10 images' in text and '33152 training images' in text
  assert '| float32 | 1 |  | 0.5000 |' in text and '| bfloat16 | 1 |  | 0.4900 |' in text
  assert '| highest | 3.00e-07 | 1e-04 | passed |' in text


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage_within_its_deadline(tmp_path):
  pytest.importorskip('torch')
  proc, seconds, rows = _run(tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  ends = _ends(rows)
  assert set(ends) == set(gpu_stages.STAGES), ends
  for stage in gpu_stages.STAGES[:-1]:
    assert ends[stage]['status'] == 'ok', (stage, ends[stage])
  # torch.compile runs if time remains (cold, it compiles for about a minute on 2 cores)
  assert ends['torch_compile']['status'] in ('ok', 'skipped', 'timeout'), ends['torch_compile']
  measured = [r for r in rows if r.get('status') == 'measured']
  for stage in gpu_stages.STAGES[:-1]:
    assert any(r['stage'] == stage for r in measured), stage
  assert {(r['dtype'], r['batch']) for r in measured if r['stage'] == 'jax_step'} == {
      ('float32', 16), ('bfloat16', 16)}
  assert [r['k'] for r in measured if r['stage'] == 'seeds'] == [1, 2]
  # float32 for the planned epochs, then bfloat16 for as many when the deadline leaves room for both
  plan = next(r for r in rows if r['stage'] == 'train' and r['status'] == 'planned')
  trained = [(r['dtype'], r['epoch']) for r in measured if r['stage'] == 'train']
  assert trained == [(d, e + 1) for d in plan['dtypes'] for e in range(plan['epochs'])], (plan, trained)
  assert plan['dtypes'][0] == 'float32' and plan['epochs'] >= 1
  assert next(r for r in measured if r['stage'] == 'correctness')['passed']
  deadline_s = 330
  assert seconds < deadline_s + 10, seconds
  summary = (tmp_path / 'out' / 'summary.md').read_text()
  for stage in gpu_stages.STAGES:
    assert f'| {stage} | {ends[stage]["status"]} |' in summary
  assert '| jax | jit | float32 | 16 |' in summary
  assert '| torch | eager, channels_last | float32 | 16 |' in summary
  assert sorted(os.listdir(tmp_path / 'out')) == ['gpu_check.log', 'results.jsonl', 'summary.md']
  assert not os.path.exists(tmp_path / 'out' / 'train')  # workdirs stay out of OUT


@pytest.mark.slow
def test_gpu_check_with_too_little_time_skips_stages_and_keeps_its_deadline(tmp_path):
  proc, seconds, rows = _run(tmp_path, GPU_CHECK_DEADLINE_S='40')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  ends = _ends(rows)
  assert set(ends) == set(gpu_stages.STAGES), ends
  assert ends['preflight']['status'] == 'ok'
  assert ends['correctness']['status'] in ('ok', 'timeout')
  assert all(ends[s]['status'] == 'skipped' for s in gpu_stages.STAGES[2:]), ends
  assert seconds < 40 + 10, seconds
  assert 'skipped' in (tmp_path / 'out' / 'summary.md').read_text()


def test_a_stage_ended_by_sigterm_ends_its_children(tmp_path):
  pid_file = tmp_path / 'child.pid'
  child = f'import os, time\nopen({str(pid_file)!r}, "w").write(str(os.getpid()))\ntime.sleep(60)\n'
  stage = (f'import signal, sys\nsys.path.insert(0, {os.path.dirname(gpu_stages.__file__)!r})\n'
           'import gpu_stages\n'
           'signal.signal(signal.SIGTERM, gpu_stages._end_children)\n'
           f'gpu_stages.run_logged([sys.executable, "-c", {child!r}], float("inf"))\n')
  proc = subprocess.Popen([sys.executable, '-c', stage])
  for _ in range(100):
    if pid_file.exists() and pid_file.read_text():
      break
    time.sleep(0.1)
  child_pid = int(pid_file.read_text())
  proc.terminate()
  assert proc.wait(timeout=10) == 128 + 15
  for _ in range(50):
    try:
      os.kill(child_pid, 0)
    except ProcessLookupError:
      break
    time.sleep(0.1)
  else:
    pytest.fail(f'the child {child_pid} outlived its stage')


def test_the_train_stage_plans_bfloat16_beside_float32_when_both_fit(tmp_path):
  """Both dtypes get the same epochs when both fit (each from its own jax_step cell); else float32 alone
  gets what fits."""
  out = str(tmp_path)
  for dtype, ips in (('float32', 1000.0), ('bfloat16', 2000.0)):
    gpu_stages.append(out, {'stage': 'jax_step', 'status': 'measured', 'dtype': dtype, 'batch': 128,
                            'compile_s': 10.0, 'train_ips': ips, 'eval_ips': 10 * ips})
  args = argparse.Namespace(out=out, batch=128, dtypes='bfloat16,float32', max_epochs=20, guess_ips=1.0,
                            guess_start_s=1.0)
  # an epoch of 10,000 + 1,000 images: float32 10000/1000*1.25 + 0.1 + 1 = 13.6 s, bfloat16 7.3 s; 30 s
  # to start each
  dtypes, epochs, estimates = gpu_stages.train_plan(args, 10_000, 1_000, 60.0 + 3 * 20.9 + 1.0)
  assert (dtypes, epochs) == (['float32', 'bfloat16'], 3) and 'bfloat16 batch 128' in estimates[1][2]
  dtypes, epochs, _ = gpu_stages.train_plan(args, 10_000, 1_000, 60.0 + 20.0)
  assert (dtypes, epochs) == (['float32'], 3)  # (80 - 30) / 13.6
  args.max_epochs = 2
  assert gpu_stages.train_plan(args, 10_000, 1_000, 1000.0)[1] == 2
