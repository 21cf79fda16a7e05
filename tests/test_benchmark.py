"""scripts/benchmark.py: the harness every family shares (scripts/bench/harness.py), and the step family
end to end at a tiny size: the JSON it writes and its throughputs."""

import argparse
import json
import math
import os
import re
import subprocess
import sys

import pytest

from cifar_jax import cpu_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(ROOT, 'scripts', 'benchmark.py')
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
from bench import harness  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: I001

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx512f avx512_bf16 amx_tile
"""


def test_alternate_rotates_the_turn_order_and_keeps_each_kind_together():
  calls = []
  samples = harness.alternate(['a', 'b', 'c'], 4, lambda name, kind: calls.append((name, kind)) or len(calls),
                              kinds=('train', 'eval'))
  assert calls[:6] == [('a', 'train'), ('b', 'train'), ('c', 'train'), ('a', 'eval'), ('b', 'eval'),
                       ('c', 'eval')]
  assert [name for name, kind in calls[6:9]] == ['b', 'c', 'a']  # window 2 starts with the next one
  assert [name for name, kind in calls[12:15]] == ['c', 'a', 'b']
  assert [name for name, kind in calls[18:21]] == ['a', 'b', 'c']  # window 4: round again
  assert samples['a'] == {'train': [1, 9, 14, 19], 'eval': [4, 12, 17, 22]}


def test_alternate_in_a_fixed_order_and_without_kinds():
  calls, seen = [], []
  copy = lambda samples: {k: list(v) for k, v in samples.items()}
  samples = harness.alternate(['x', 'y'], 3, lambda name: calls.append(name) or 10 * len(calls), rotate=False,
                              on_window=lambda index, s: seen.append((index, copy(s))))
  assert calls == ['x', 'y'] * 3
  assert samples == {'x': [10, 30, 50], 'y': [20, 40, 60]}
  assert seen[0] == (0, {'x': [10], 'y': [20]}) and seen[-1][0] == 2


def test_rotation_and_medians():
  assert harness.rotation(['a', 'b', 'c'], 4) == ['b', 'c', 'a']
  assert harness.median([5.0, 1.0, 3.0, 100.0]) == 4.0
  assert harness.spread([2.0, 9.0, 4.0]) == {'median': 4.0, 'min': 2.0, 'max': 9.0, 'n': 3}


def test_markdown_table_rows():
  table = harness.markdown_table(['variant', 'img/s', 'note'], [['jax', 123.456, None], ['torch', 7, 'x']])
  assert table.splitlines() == ['| variant | img/s | note |', '| --- | --- | --- |', '| jax | 123.5 |  |',
                                '| torch | 7 | x |']


def test_fingerprint_reads_the_cpu_model_flags_and_memory():
  assert harness.cpu_info(CPUINFO) == {'cpu_model': 'Intel(R) Xeon(R) Platinum 8480+',
                                       'cpu_flags': {'avx512f': True, 'avx512_bf16': True, 'amx_bf16': False}}
  assert harness.memory_gib('MemTotal:       24683772 kB\nMemFree: 1 kB\n') == 24683772 / 2**20
  fp = harness.fingerprint()
  assert fp['cores'] == os.cpu_count() and fp['jax'] and set(fp['cpu_flags']) == set(harness.CPU_FLAGS)
  assert fp['date'].startswith('20') and fp['date'].endswith('+00:00')
  if fp['torch']:  # read from the header torch's wheel ships, without importing torch
    assert re.fullmatch(r'\d+\.\d+\.\d+', fp['torch_onednn']), fp['torch_onednn']
  assert fp['cpu_model'] in harness.describe(fp)


def test_write_json_adds_the_fingerprint(tmp_path, monkeypatch):
  monkeypatch.setattr(harness, 'fingerprint', lambda: {'cpu_model': 'test'})
  path = tmp_path / 'out.json'
  harness.write_json(str(path), {'rows': [{'variant': 'jax', 'images_per_second': 1.5}]})
  assert json.loads(path.read_text()) == {'rows': [{'variant': 'jax', 'images_per_second': 1.5}],
                                          'fingerprint': {'cpu_model': 'test'}}


def test_a_worker_answers_in_turn_and_reports_its_peak_memory():
  """A worker process speaking the harness's protocol: ready, one answer a command, its peak RSS at the end
  (ru_maxrss of the worker, not the parent: 200 MiB touched there)."""
  child = (f'import sys; sys.path.insert(0, {os.path.join(ROOT, "scripts")!r})\n'
           'from bench import harness\n'
           'n = {"calls": 0}\n'
           'def train():\n'
           '  n["calls"] += 1\n'
           '  return {"seconds": n["calls"]}\n'
           'def touch():\n'
           '  global block\n'
           '  block = bytearray(200 * 2**20)\n'
           '  return {}\n'
           'harness.serve({"label": "tiny"}, {"train": train, "touch": touch}, done=lambda: {"extra": 1})\n')
  with harness.workers({'tiny': [sys.executable, '-c', child]}) as procs:
    worker = procs['tiny']
    assert worker.ready == {'ready': True, 'label': 'tiny'}
    assert [worker.ask('train')['seconds'] for _ in range(3)] == [1, 2, 3]
    worker.ask('touch')
    last = worker.finish()
  assert last['extra'] == 1 and last['peak_rss_mb'] > 200
  assert harness.peak_rss_mb() > 0


def test_unknown_variants_and_families_are_usage_errors():
  for argv in (['finetune', '--variants=jax,nope'], ['nope'], ['step', '--torch_modes=nope']):
    proc = subprocess.run([sys.executable, BENCHMARK, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2, (argv, proc.stderr)
    assert 'nope' in proc.stderr, proc.stderr


def _bench_config():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.batch_size = 16
  return config


@pytest.mark.slow  # 48 s: a development tool's smoke test, kept out of the default run's ~10 minutes
def test_benchmark_writes_finite_positive_throughputs(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'bench.json'
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  proc = subprocess.run(
      [sys.executable, BENCHMARK, 'step', '--model=resnet9', '--width=0.125', '--batch=16', '--windows=2',
       '--steps=2', '--torch_modes=eager', '--jax_settings=default,plain,ema', '--end_to_end=2',
       '--end_to_end_steps=4', f'--json={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'train img/s' in proc.stdout
  result = json.loads(out.read_text())
  assert {'jax', 'torch', 'torch_channels_last', 'torch_compile', 'machine', 'config',
          'jax_over_torch_eager_train'} <= set(result)
  assert result['torch_channels_last'] is None and result['torch_compile'] is None  # not asked for
  for variant in ('jax', 'jax_plain', 'jax_ema', 'torch'):
    r = result[variant]
    for key in ('train_images_per_second', 'eval_images_per_second', 'compile_seconds', 'peak_memory_mb'):
      assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (variant, key, r[key])
    assert len(r['eval_windows']) == 2
    assert len(r['train_windows']) == (4 if variant == 'jax' else 2)  # jax: again after the end-to-end run
    assert all(math.isfinite(x) and x > 0 for x in r['train_windows'] + r['eval_windows'])
  # the trainer's default splits the CPU into one device per core (batch 16 divides); plain XLA keeps one
  assert len(result['jax']['devices']) == cpu_backend.auto_device_count(_bench_config(), os.cpu_count())
  assert len(result['jax_plain']['devices']) == 1
  e2e = result['end_to_end']
  assert e2e['epochs'] == 2 and len(e2e['epoch_images_per_second']) == 2
  assert e2e['train_images_per_second'] > 0 and math.isfinite(e2e['over_bare_step'])
  assert 'cifar_jax.main' in e2e['command']
  ratio = result['jax_over_torch_eager_train']
  assert math.isfinite(ratio) and ratio > 0
  assert result['machine']['cpu_count'] == os.cpu_count()
  assert result['config'] == {**result['config'], 'model': 'resnet9', 'batch': 16, 'windows': 2, 'steps': 2,
                              'torch_modes': ['eager'],
                              'jax_settings': ['default', 'plain', 'ema']}
  assert set(result['step_cost_over_plain']) == {'ema'}
  ema_ratio = result['step_cost_over_plain']['ema']
  assert math.isfinite(ema_ratio) and ema_ratio > 0


@pytest.mark.slow  # ~80 s on 2 cores: four workers compile
def test_benchmark_runs_both_dtypes_in_the_same_windows(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'bench.json'
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  proc = subprocess.run(
      [sys.executable, BENCHMARK, 'step', '--model=resnet9', '--width=0.125', '--batch=16', '--windows=2',
       '--steps=1', '--torch_modes=eager', '--dtype=float32,bfloat16', f'--json={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(out.read_text())
  for variant in ('jax_float32', 'jax_bfloat16', 'torch_float32', 'torch_bfloat16'):
    assert len(result[variant]['train_windows']) == 2 and result[variant]['train_images_per_second'] > 0
  assert set(result['bfloat16_over_float32_train']) == {'jax', 'torch'}
  assert result['jax'] is None and result['jax_over_torch_eager_train'] is None
  bad = subprocess.run([sys.executable, BENCHMARK, 'step', '--dtype=float16'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
  assert bad.returncode == 2 and '--dtype' in bad.stderr


def test_the_regularizer_variants_switch_one_field_each_and_report_their_cost():
  """`step --jax_settings=default,cutout,cutmix,label_smoothing`: each variant is the default config with
  one regulariser on (a valid config the step reads), and its cost is its time per step over the plain one."""
  from bench import step  # pylint: disable=g-import-not-at-top
  from cifar_jax import augmentations  # pylint: disable=g-import-not-at-top
  from cifar_jax import config_lib  # pylint: disable=g-import-not-at-top

  plain = _bench_config()
  assert augmentations.batch_options(plain) == {'cutout': None, 'cutmix': None}
  changed = {}
  for name in ('cutout', 'cutmix', 'label_smoothing'):
    config = step.regularized(_bench_config(), name)
    config_lib.validate(config)
    options = augmentations.batch_options(config)
    changed[name] = ({k for k, v in options.items() if v is not None},
                     augmentations.label_smoothing(config))
  assert changed == {'cutout': ({'cutout'}, 0.0), 'cutmix': ({'cutmix'}, 0.0),
                     'label_smoothing': (set(), 0.1)}
  args = argparse.Namespace(dtype='float32', torch_modes='', no_jax=False,
                            jax_settings='default,cutout,cutmix,label_smoothing')
  assert step._variants(args)[0] == ['jax:default', 'jax:cutout', 'jax:cutmix', 'jax:label_smoothing']
  rates = lambda ips: {'train_images_per_second': ips}
  results = {'jax': rates(100.0), 'jax_cutout': rates(98.0), 'jax_cutmix': rates(80.0)}
  costs = step.step_cost_over_plain(results)
  assert costs == pytest.approx({'cutout': 100 / 98, 'cutmix': 1.25})  # label_smoothing did not run
  assert step.step_cost_over_plain({'jax': None, 'jax_cutout': rates(98.0)}) == {}


def test_conv_layers_reads_dense_and_depthwise_layer_specs():
  from bench import conv_layers  # pylint: disable=g-import-not-at-top

  dense = conv_layers._layers(argparse.Namespace(kind='dense', layers='16x32,64x8'))  # pylint: disable=protected-access
  assert dense == [('16x32', 16, 32, 3, 1), ('64x8', 64, 8, 3, 1)]
  lite0 = conv_layers._layers(argparse.Namespace(kind='depthwise', layers=''))  # pylint: disable=protected-access
  assert ('144x32k5s2', 144, 32, 5, 2) in lite0 and len(lite0) == 9
  # Lite0's padding is TensorFlow's 'SAME': (k - 1) / 2 each side at stride 1, k / 2 - 1 before and k / 2
  # after at stride 2; the dense 3x3 layers keep torch's padding 1.
  assert conv_layers._padding('depthwise', 5, 2) == ((1, 2), (1, 2))  # pylint: disable=protected-access
  assert conv_layers._padding('depthwise', 3, 1) == ((1, 1), (1, 1))  # pylint: disable=protected-access
  assert conv_layers._padding('dense', 3, 1) == ((1, 1), (1, 1))  # pylint: disable=protected-access
  with pytest.raises(harness.UsageError, match='CHANNELSxSIZE'):
    conv_layers._layers(argparse.Namespace(kind='depthwise', layers='32x64x3'))  # pylint: disable=protected-access


def test_profile_counts_depthwise_convolutions_apart():
  from bench import profile  # pylint: disable=g-import-not-at-top

  line = 'onednn_verbose,v1,primitive,exec,cpu,convolution,{impl},{direction},src:f32,,alg,{desc},{ms}'
  lines = [profile.START,
           line.format(impl='jit_dw:avx512_core', direction='backward_data', ms=2.0,
                       desc='g96mb4_ic96oc96_ih64oh32kh3sh2dh0ph0_iw64ow32kw3sw2dw0pw0'),
           line.format(impl='jit:avx512_core', direction='backward_weights', ms=3.0,
                       desc='g240mb4_ic240oc240_ih16oh16kh5sh1dh0ph2_iw16ow16kw5sw1dw0pw2'),
           line.format(impl='jit:avx512_core', direction='backward_weights', ms=5.0,
                       desc='mb4_ic16oc32_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1'),
           profile.END]
  total, calls = profile.summarize(lines, steps=1)
  assert calls == 3
  assert total[('convolution (depthwise)', 'backward_data', 'jit_dw:avx512_core')] == 2.0
  assert total[('convolution (depthwise)', 'backward_weights', 'jit:avx512_core')] == 3.0
  assert total[('convolution', 'backward_weights', 'jit:avx512_core')] == 5.0


def test_the_ema_variant_and_its_cost_over_the_plain_step():
  """`step --jax_settings=default,ema`: the default config with config.ema on (valid), and its cost."""
  from bench import step  # pylint: disable=g-import-not-at-top
  from cifar_jax import config_lib  # pylint: disable=g-import-not-at-top
  from cifar_jax import ema  # pylint: disable=g-import-not-at-top

  config = step.regularized(_bench_config(), 'ema')
  config_lib.validate(config)
  assert ema.from_config(config) == ema.Ema(decay=0.999) and ema.from_config(_bench_config()) is None
  args = argparse.Namespace(dtype='float32', torch_modes='', no_jax=False, jax_settings='default,ema')
  assert step._variants(args)[0] == ['jax:default', 'jax:ema']
  assert step._variant_key('jax:ema') == 'jax_ema'
  results = {'jax': {'train_images_per_second': 100.0}, 'jax_ema': {'train_images_per_second': 80.0}}
  assert step.step_cost_over_plain(results) == pytest.approx({'ema': 1.25})


@pytest.mark.slow  # a compile of the trainer's Program
def test_the_ema_variant_steps_with_the_average():
  """The ema variant's step is the trainer's own Program with config.ema on: its step updates the
  average."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from bench import step  # pylint: disable=g-import-not-at-top
  from cifar_jax import parallel  # pylint: disable=g-import-not-at-top

  config = step.regularized(_bench_config(), 'ema')
  config.model.name, config.model.width_multiplier = 'resnet9', 0.125
  assert config.ema.enabled
  run, state, acc, _ = step.synthetic_step(config, parallel.create('jit'), 16, 16)
  before = np.array(state.ema_params['fc']['kernel'])  # a copy: the step donates the state
  state, acc = run(state, acc, 2)
  params, average = jax.device_get((state.params['fc']['kernel'], state.ema_params['fc']['kernel']))
  assert not np.allclose(average, before) and not np.allclose(average, params)  # two updates: it moved
