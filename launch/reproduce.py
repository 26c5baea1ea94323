"""The paper's findings in miniature, in one command (docs/reproduction.md).

  python -m launch.reproduce --root=workdirs/mini [--quick] [-- extra vgg_jax.main flags]

1. trains every run of experiments/mini/grid.py through `launch.sweep` (finished runs are
   skipped, an interrupted one resumes from its checkpoint);
2. tests each net with Sec. 3.2's protocols: dense and multi-crop at the single test scale, and
   for D and E also at three scales and combined (ROOT/NAME/eval/mini.json, and the
   posteriors in posteriors.npz, from which D and E are fused, Table 6);
3. Appendix B: linear SVMs on the descriptors of the digits 5-9, which B_0to4 never saw, from
   that net, from the same net untrained, and from the pixels (`vgg_jax.linear_probe`);
4. writes ROOT/reproduction.md and ROOT/figures/: the paper's tables with our top-1 errors, 95%
   intervals, and a verdict per claim, computed from the numbers by the rules in `verdict`.

Every step skips what is already on disk, so running the command again continues it.
`--quick` runs the grid's quick variant for a few steps: it proves the pipeline, not the
findings (the test suite runs it).
"""

import functools
import json
import os
import platform
import subprocess
import sys
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from vgg_jax import protocol

FLAGS = flags.FLAGS

GRID = 'experiments/mini/grid.py'
QUICK_FLAGS = ('--config.num_train_steps=2', '--config.log_every_steps=1',
               '--config.checkpoint_every_steps=2', '--config.train_split=train[:128]',
               '--config.eval_split=test[:40]', '--config.eval_batch_size=40',
               '--config.dense_batch_size=40')
QUICK_PROBE_SPLITS = ('train[:60]', 'test[:40]')
SEEDS = 2
PROBE_DATASET = 'scaled_digits/5to9'
PROBE_SCALES = (36, 54, 72)  # Appendix B's Q in {256, 384, 512}, divided by 7.
PROBES = (('net', 'average'), ('net', 'stack'), ('random', 'average'), ('pixels', 'average'))
Z = 1.959964  # Two-sided 95%.
# Sec. 3.1's initialisation runs (experiments/mini/grid.py), constant learning rate.
INIT_RUNS = {
    'init_A_paper': 'A: N(0, 0.01^2), each layer\'s gain as at full size',
    'init_E_paper': 'E: N(0, 0.01^2), gains as at full size',
    'init_E_glorot': 'E: Glorot',
    'init_E_from_A': 'E: 7 layers from init_A_paper, the rest N(0, 0.01^2)',
    'init_E_from_trained_A': 'E: 7 layers from A_S36_s0 (Glorot-trained), the rest N(0, 0.01^2)',
    'init_A_variance': 'A: N(0, 0.1^2) (variance 1e-2 read literally), gains as at full size',
    'init_E_variance': 'E: N(0, 0.1^2), gains as at full size',
    'init_A_plain_std': 'A: N(0, 0.01^2) at width 1/8, gains not matched',
    'init_E_plain_std': 'E: N(0, 0.01^2) at width 1/8, gains not matched',
}


# ---------------------------------------------------------------------------------------------
# 1-3: training, testing, Appendix B.


def _python(*args: str) -> None:
  command = [sys.executable, '-m', *args]
  print('+', ' '.join(command), flush=True)
  code = subprocess.run(command, check=False).returncode
  if code:
    sys.exit(f'launch.reproduce: {args[0]} failed (exit code {code}); fix it and rerun the same '
             'command to continue.')


def _grid_runs(quick: bool):
  from experiments.mini import grid  # pylint: disable=g-import-not-at-top
  return grid.get_runs('quick' if quick else None)


def _is_full(name: str) -> bool:
  """D and E are tested at three scales and both methods (Tables 4-6); the others at one."""
  return name.startswith(('D_', 'E_'))


def test_run(workdir: str, full: bool) -> None:
  """Writes WORKDIR/eval/mini.json and posteriors.npz: top-1/top-5 errors and posteriors of
  dense@Q and multicrop@Q (single scale) and, when `full`, of dense, multicrop and
  dense+multicrop at the three test scales."""
  import jax  # pylint: disable=g-import-not-at-top
  from vgg_jax import checkpoints, evaluation, input_pipeline  # pylint: disable=g-import-not-at-top
  config = checkpoints.load_config(workdir)
  builder = input_pipeline.get_builder(config)
  params = checkpoints.restore_params(workdir, config, checkpoints.latest_step(workdir))
  num_examples = builder.info.splits[config.eval_split].num_examples
  batches = functools.partial(input_pipeline.test_batch_iterator, builder, config)
  single = protocol.single_test_scale(config)
  protocols = protocol.PROTOCOLS if full else ('single',)
  results, posts = evaluation.run(params, config, protocols, batches, num_examples)
  crop_results, crop_posts = evaluation.run(params, config, ('multicrop',), batches,
                                            num_examples, scales=(single,))
  named = {'dense@Q': ('single', results, posts), 'multicrop@Q': ('multicrop', crop_results,
                                                                   crop_posts)}
  if full:
    named.update({p: (p, results, posts) for p in ('dense', 'multicrop', 'dense+multicrop')})
  summary = {key: {k: r[name][k] for k in ('top1_error', 'top5_error', 'num_examples',
                                            'scales')}
             for key, (name, r, _) in named.items()}
  os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
  np.savez_compressed(os.path.join(workdir, 'eval', 'posteriors.npz'),
                      labels=posts['single'].labels,
                      **{key: p[name].probs for key, (name, _, p) in named.items()})
  with open(os.path.join(workdir, 'eval', 'mini.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  del params
  jax.clear_caches()


def run_all(root: str, quick: bool, extra: Sequence[str]) -> None:
  grid = GRID + (':quick' if quick else '')
  extra = (*(QUICK_FLAGS if quick else ()), *extra)
  _python('launch.sweep', grid, '--target=local', f'--root={root}', '--', *extra)
  for run in _grid_runs(quick):
    workdir = os.path.join(root, run.name)
    if run.name.startswith('init_') or run.name.endswith('0to4'):
      continue
    if not os.path.exists(os.path.join(workdir, 'eval', 'mini.json')):
      print(f'+ testing {run.name}', flush=True)
      test_run(workdir, _is_full(run.name))
  from vgg_jax import linear_probe  # pylint: disable=g-import-not-at-top
  probe_dir = os.path.join(root, 'B_0to4')
  path = os.path.join(probe_dir, linear_probe.RESULTS)
  done = json.load(open(path)) if os.path.exists(path) else {}
  splits = QUICK_PROBE_SPLITS if quick else ('train', 'test')
  for features, aggregate in PROBES:
    if linear_probe.result_key(PROBE_DATASET, features, 'fc7', aggregate) not in done:
      print(f'+ Appendix B: {features} descriptors ({aggregate})', flush=True)
      linear_probe.probe(probe_dir, PROBE_DATASET, PROBE_SCALES, aggregate, features,
                         train_split=splits[0], test_split=splits[1])


# ---------------------------------------------------------------------------------------------
# 4: statistics and the report.


def wilson(errors: int, n: int) -> tuple[float, float]:
  """95% Wilson score interval of an error rate of `errors` in `n`."""
  p = errors / n
  centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
  half = Z * np.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
  return centre - half, centre + half


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
  """Mean of a - b (0/1 errors of the same test images and seeds) and its 95% interval."""
  d = a.astype(np.float64) - b.astype(np.float64)
  half = Z * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.inf
  return d.mean(), d.mean() - half, d.mean() + half


class Results:
  """Top-1 error indicators per (run group, protocol), pooled over seeds."""

  def __init__(self, root: str):
    self.root = root

  def _load(self, name: str) -> Optional[dict]:
    path = os.path.join(self.root, name, 'eval', 'posteriors.npz')
    if not os.path.exists(path):
      return None
    with np.load(path) as data:
      return {key: data[key] for key in data.files}

  def wrong(self, names: Sequence[str], key: str) -> Optional[np.ndarray]:
    """0/1 top-1 errors of every test image of every run in `names`, concatenated."""
    parts = []
    for name in names:
      data = self._load(name)
      if data is None or key not in data:
        return None
      parts.append(np.argmax(data[key], axis=1) != data['labels'])
    return np.concatenate(parts)

  def fused_wrong(self, pairs: Sequence[tuple[str, str]], key: str) -> Optional[np.ndarray]:
    """Top-1 errors of the averaged soft-max posteriors of each pair of nets (Table 6)."""
    parts = []
    for a, b in pairs:
      da, db = self._load(a), self._load(b)
      if da is None or db is None or key not in da or key not in db:
        return None
      parts.append(np.argmax((da[key] + db[key]) / 2, axis=1) != da['labels'])
    return np.concatenate(parts)

  def top5(self, names: Sequence[str], key: str) -> Optional[float]:
    wrong = []
    for name in names:
      data = self._load(name)
      if data is None or key not in data:
        return None
      probs = data[key]
      label_prob = np.take_along_axis(probs, data['labels'][:, None], axis=1)
      wrong.append(np.sum(probs >= label_prob, axis=1) > 5)
    return float(np.mean(np.concatenate(wrong)))


def _cell(wrong: Optional[np.ndarray], seeds: int = 1) -> str:
  if wrong is None:
    return 'n/a'
  low, high = wilson(int(wrong.sum()), len(wrong))
  text = f'{100 * wrong.mean():.1f} [{100 * low:.1f}, {100 * high:.1f}]'
  if seeds > 1:
    per_seed = np.array_split(wrong, seeds)
    text += f' ({min(100 * p.mean() for p in per_seed):.1f}-{max(100 * p.mean() for p in per_seed):.1f})'
  return text


def verdict(diff: Optional[tuple[float, float, float]], expected: str) -> str:
  """'reproduced' when the 95% interval of (first - second) error lies where the paper says
  ('lower': below 0, 'not lower': not below 0), 'not reproduced' when it lies on the other
  side, 'inconclusive' when it straddles 0."""
  if diff is None:
    return 'not run'
  _, low, high = diff
  if expected == 'lower':
    return 'reproduced' if high < 0 else 'not reproduced' if low > 0 else 'inconclusive'
  return 'not reproduced' if high < 0 else 'reproduced'  # 'not lower'


def _diff_text(diff) -> str:
  if diff is None:
    return 'n/a'
  mean, low, high = diff
  return f'{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]'


def _final(root: str, name: str) -> Optional[dict]:
  path = os.path.join(root, name, 'eval_metrics.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _versions() -> str:
  import jax, flax, optax, tensorflow as tf  # pylint: disable=g-import-not-at-top,multiple-imports
  return (f'Python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, '
          f'optax {optax.__version__}, tensorflow {tf.__version__}; {platform.machine()}, '
          f'{os.cpu_count()} cores')


def report(root: str, quick: bool) -> str:
  """Writes ROOT/reproduction.md and ROOT/figures/*.png; returns the markdown."""
  from vgg_jax import plots, report as paper  # pylint: disable=g-import-not-at-top
  seeds = 1 if quick else SEEDS
  r = Results(root)
  names = lambda net, scale: [f'{net}_S{scale}_s{s}' for s in range(seeds)]
  figures = os.path.join(root, 'figures')
  lines = ['# The paper\'s findings in miniature', '',
           f'Generated by `python -m launch.reproduce --root={root}{" --quick" if quick else ""}`'
           f' on {time.strftime("%Y-%m-%d")}; {_versions()}.', '',
           'Setup (experiments/mini/): nets A-E of Table 1 at 1/8 width on `scaled_digits` '
           '(scikit-learn\'s digits drawn at 50-100% of a 64x64 canvas, anywhere on it; 5,748 '
           'training and 1,080 test images); every length is the paper\'s divided by 7: crop '
           '32, S = 36 / 54 / [36, 72] for 256 / 384 / [256, 512], test scales {S - 4, S, S + 4} '
           'and {36, 54, 72}. Each run: 890 SGD steps (10 epochs) of batch 64, learning rate '
           '0.01 divided by 10 on plateaus (Sec. 3.1), Caffe\'s momentum form, Glorot '
           'initialisation unless the row says otherwise, no flips (a mirrored digit is another '
           'symbol).', '',
           f'Errors are top-1 % on the test images, pooled over {seeds} seed(s): mean [95% '
           'Wilson interval] (range over seeds). A difference is paired over the same images '
           'and seeds: mean [95% interval], in points of error; a verdict is *reproduced* when '
           'that interval lies on the paper\'s side of 0, *not reproduced* when it lies on the '
           'other, *inconclusive* when it holds 0. The paper\'s figures (ImageNet, full size) '
           'are beside ours for the direction of each effect, not its size.', '',
           'Multi-crop evaluation decides the verdicts: dense evaluation slides fc6 (here one '
           '32-pixel cell) over the image at the pool stride of 32 pixels, so it scores only the '
           'floor(Q / 32)^2 windows from the top-left corner: at Q = 36 the top-left 32 x 32 '
           '(79% of the image), at Q = 54 the same 32 x 32 (35%). The paper\'s Q = 256, 384 and '
           '512 are multiples of 32 and lose nothing; a miniature cannot be both to scale and '
           'on the grid. Dense figures are shown, and compared in Table 5, with that caveat.', '']
  verdicts = []

  # Claim 1: initialisation (Sec. 3.1).
  present = [n for n in INIT_RUNS if _final(root, n) is not None]
  lines += ['## 1. Initialisation (Sec. 3.1)', '']
  losses, rows = {}, []
  for name in present:
    scalars = plots.read_scalars(os.path.join(root, name))
    loss = scalars.get('train/loss', (None, np.array([np.nan])))[1][-1]
    skipped = scalars.get('train/nonfinite', (None, np.array([0.0])))[1]
    losses[name] = loss
    rows.append([name, INIT_RUNS[name], f'{100 * _final(root, name)["top1_error"]:.1f}',
                 f'{loss:.4f}', 'yes' if skipped.max() > 0 else 'no'])
  lines += paper.markdown_table(['run', 'initialisation', 'top-1 err. (%)',
                                  'train loss, last logged', 'non-finite steps skipped'], rows)
  if present:
    plots.compare_runs({n: [os.path.join(root, n)] for n in present}, 'train/loss',
                       os.path.join(figures, 'init_loss.png'),
                       'Training loss under each initialisation (Sec. 3.1)', 'loss', log=True)
    lines += ['', '![init](figures/init_loss.png)', '']
  # A run 'stalls' when its last logged training loss is ln 10 (chance on 10 classes) to 0.02,
  # and 'trains' when it is below 1.5.
  def init_verdict(claim, name, expect_stall):
    if name not in losses:
      return
    stalled = abs(losses[name] - np.log(10)) < 0.02
    trains = losses[name] < 1.5
    v = ('reproduced' if (stalled if expect_stall else trains) else
         'not reproduced' if (trains if expect_stall else stalled) else 'inconclusive')
    verdicts.append((claim, v, f'{name}: last training loss {losses[name]:.4f} '
                               f'(ln 10 = 2.3026), test error {100 * errors[name]:.1f}%'))

  errors = {n: _final(root, n)['top1_error'] for n in present}
  init_verdict('Sec. 3.1: N(0, 0.01^2) stalls a deep net (E)', 'init_E_paper', True)
  init_verdict('Sec. 3.1: Glorot initialisation trains E', 'init_E_glorot', False)
  init_verdict('Sec. 3.1: net A trains from N(0, 0.01^2)', 'init_A_paper', False)
  init_verdict('Sec. 3.1: E seeded from that net A (rest N(0, 0.01^2)) trains', 'init_E_from_A',
               False)
  init_verdict('Sec. 3.1: E seeded from a trained net A (Glorot-trained) trains',
               'init_E_from_trained_A', False)

  # Claims 2-3: depth and LRN (Table 3).
  table3 = [('A', '36'), ('A-LRN', '36'), ('B', '36'), ('C', '36'), ('D', '36'), ('E', '36'),
            ('D', '54'), ('D', '36-72'), ('E', '36-72')]
  paper_scale = {'36': 256, '54': 384, '36-72': paper.JITTERED}
  rows = []
  for net, scale in table3:
    n = names(net, scale)
    q = {'36': 36, '54': 54, '36-72': 54}[scale]
    ref = paper.TABLE3.get((net, paper_scale[scale]))
    top5 = r.top5(n, 'multicrop@Q')
    rows.append([net, scale, q, _cell(r.wrong(n, 'dense@Q'), seeds),
                 _cell(r.wrong(n, 'multicrop@Q'), seeds),
                 'n/a' if top5 is None else f'{100 * top5:.1f}',
                 '—' if ref is None else f'{ref[0]} / {ref[1]}'])
  lines += ['## 2-4. Single test scale (Table 3)', '', *paper.markdown_table(
      ['ConvNet', 'train S', 'test Q', 'dense top-1 err. (%)', 'multi-crop top-1 err. (%)',
       'multi-crop top-5 (%)', 'paper top-1 / top-5 (%)'], rows)]
  diff = lambda a, b, key='multicrop@Q': (None if r.wrong(a, key) is None or r.wrong(b, key)
                                          is None else paired_difference(r.wrong(a, key),
                                                                         r.wrong(b, key)))
  for (deep, shallow), text in ((('B', 'A'), 'B (13 layers) below A (11)'),
                                (('D', 'B'), 'D (16) below B (13)'),
                                (('E', 'A'), 'E (19) below A (11)'),
                                (('D', 'C'), 'D (3x3) below C (1x1)')):
    d = diff(names(deep, '36'), names(shallow, '36'))
    verdicts.append((f'Depth, Table 3: {text}', verdict(d, 'lower'),
                     f'{deep} - {shallow}, multi-crop at Q = 36: {_diff_text(d)}'))
  d = diff(names('E', '36'), names('D', '36'))
  verdicts.append(('Depth saturates at 19 layers, Table 3: E not below D', verdict(d, 'not lower'),
                   f'E - D: {_diff_text(d)}'))
  d = diff(names('A-LRN', '36'), names('A', '36'))
  verdicts.append(('LRN does not improve net A, Table 3', verdict(d, 'not lower'),
                   f'A-LRN - A: {_diff_text(d)}'))

  # Claim 4: scale jittering (Tables 3-4).
  rows = []
  for net, scale in (('D', '36'), ('D', '54'), ('D', '36-72'), ('E', '36'), ('E', '36-72')):
    n = names(net, scale)
    key = (net, paper_scale[scale])
    t5 = paper.TABLE5.get(key, {})
    ref = ' / '.join(str(x) for x in (paper.TABLE4.get(key, ('—',))[0],
                                      t5.get('multicrop', ('—',))[0],
                                      t5.get('dense+multicrop', ('—',))[0]))
    qs = {'36': '32, 36, 40', '54': '50, 54, 58', '36-72': '36, 54, 72'}[scale]
    rows.append([net, scale, qs, _cell(r.wrong(n, 'dense'), seeds),
                 _cell(r.wrong(n, 'multicrop'), seeds), _cell(r.wrong(n, 'dense+multicrop'), seeds),
                 ref])
  lines += ['', '## 4-5. Three test scales: dense, multi-crop, both (Tables 4-5)', '',
            *paper.markdown_table(['ConvNet', 'train S', 'test Q', 'dense', 'multi-crop',
                                    'dense + multi-crop',
                                    'paper dense / multi-crop / both top-1 (%)'], rows)]
  jit = names('D', '36-72')
  for fixed in ('36', '54'):
    d = diff(jit, names('D', fixed), 'multicrop')
    verdicts.append((f'Scale jittering, Table 4: D trained on S in [36, 72] below S = {fixed}, '
                     'both tested at three scales', verdict(d, 'lower'),
                     f'multi-crop, 3 scales: {_diff_text(d)}'))
  gains = {}
  for scale in ('36', '54', '36-72'):
    single, multi = r.wrong(names('D', scale), 'multicrop@Q'), r.wrong(names('D', scale),
                                                                       'multicrop')
    if single is not None and multi is not None:
      gains[scale] = (single.astype(float) - multi.astype(float))
  if len(gains) == 3:
    d_fixed = max(('36', '54'), key=lambda s: gains[s].mean())
    d = paired_difference(gains[d_fixed], gains['36-72'])
    verdicts.append(('Multi-scale testing helps the jittered net most, Tables 3-4', verdict(d, 'lower'),
                     'gain (single-scale minus 3-scale multi-crop error) of D: ' +
                     ', '.join(f'S = {s}: {100 * g.mean():+.2f}' for s, g in gains.items()) +
                     f'; best fixed minus jittered: {_diff_text(d)}'))

  # Claim 5: dense vs multi-crop (Table 5).
  for net in ('D', 'E'):
    n = names(net, '36-72')
    for other in ('dense', 'multicrop'):
      combined, alone = r.wrong(n, 'dense+multicrop'), r.wrong(n, other)
      d = None if combined is None or alone is None else paired_difference(alone, combined)
      verdicts.append((f'Table 5: {net}, dense + multi-crop not above {other}',
                       verdict(d, 'not lower'), f'{other} - (dense+multicrop): {_diff_text(d)}'))
  # Claim 6: fusion (Table 6).
  pairs = [(f'D_S36-72_s{s}', f'E_S36-72_s{s}') for s in range(seeds)]
  rows = [[key, _cell(r.wrong(names('D', '36-72'), key), seeds),
           _cell(r.wrong(names('E', '36-72'), key), seeds),
           _cell(r.fused_wrong(pairs, key), seeds), paper.TABLE6[key][0]]
          for key in ('dense', 'multicrop', 'dense+multicrop')]
  lines += ['', '## 6. Fusion of D and E, S in [36, 72], three test scales (Table 6)', '',
            *paper.markdown_table(['method', 'D', 'E', 'D + E fused', 'paper D + E top-1 (%)'],
                                   rows)]
  fused = r.fused_wrong(pairs, 'multicrop')
  for net in ('D', 'E'):
    member = r.wrong(names(net, '36-72'), 'multicrop')
    d = None if fused is None or member is None else paired_difference(fused, member)
    verdicts.append((f'Fusion, Table 6: D + E below {net} alone', verdict(d, 'lower'),
                     f'fused - {net}, multi-crop at 3 scales: {_diff_text(d)}'))

  # Claim 7: Appendix B.
  probe_path = os.path.join(root, 'B_0to4', 'linear_probe.json')
  lines += ['', '## 7. Generalisation to unseen classes (Appendix B)', '',
            'Net B trained on digits 0-4 only; a linear SVM on descriptors of digits 5-9.', '']
  rows = []
  if os.path.exists(probe_path):
    with open(probe_path) as f:
      probes = json.load(f)
    for key, p in probes.items():
      n_wrong = round(p['top1_error'] * p['num_test'])
      low, high = wilson(n_wrong, p['num_test'])
      rows.append([f'{key.split(":", 1)[1]} (Q = {", ".join(map(str, p["scales"]))})',
                   p['dimensions'], f'{p["svm_c"]:g}',
                   f'{100 * p["top1_error"]:.1f} [{100 * low:.1f}, {100 * high:.1f}]'])
    net = probes.get('scaled_digits/5to9:net:fc7:average')
    for base in ('random:fc7:average', 'pixels'):
      other = probes.get(f'scaled_digits/5to9:{base}')
      if net and other:
        # Two independent proportions on the same images: a conservative interval.
        a, b = net['top1_error'], other['top1_error']
        half = Z * np.sqrt(a * (1 - a) / net['num_test'] + b * (1 - b) / other['num_test'])
        d = (a - b, a - b - half, a - b + half)
        verdicts.append((f'Appendix B: trained-net descriptors below {base.split(":")[0]}',
                         verdict(d, 'lower'), f'difference {_diff_text(d)}'))

  lines += paper.markdown_table(['descriptor', 'dimensions', 'SVM C', 'top-1 err. (%) on 5-9'],
                                 rows)
  lines += ['', '## Verdicts', '', *paper.markdown_table(
      ['claim', 'verdict', 'numbers'], [(c, f'**{v}**', n) for c, v, n in verdicts])]
  # Curves of the depth runs, as the training loop logged them.
  depth = {net: [os.path.join(root, n) for n in names(net, '36')
                 if os.path.exists(os.path.join(root, n, 'tensorboard'))]
           for net in ('A', 'A-LRN', 'B', 'C', 'D', 'E')}
  depth = {k: v for k, v in depth.items() if v}
  if depth:
    plots.compare_runs(depth, 'eval/top1_error', os.path.join(figures, 'depth_error.png'),
                       'Held-out top-1 error during training, S = 36', 'top-1 error (%)',
                       percent=True, log=True)
    plots.compare_runs(depth, 'train/loss', os.path.join(figures, 'depth_loss.png'),
                       'Training loss, S = 36', 'loss', log=True)
    lines += ['', '![depth error](figures/depth_error.png)', '',
              '![depth loss](figures/depth_loss.png)']
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(root, 'reproduction.md'), 'w') as f:
    f.write(text)
  return text


def main(argv):
  if not FLAGS.root:
    raise app.UsageError('--root is required: each run goes to ROOT/NAME, the report to ROOT.')
  from vgg_jax import cli  # pylint: disable=g-import-not-at-top
  cli.setup()
  start = time.time()
  run_all(FLAGS.root, FLAGS.quick, argv[1:])
  report(FLAGS.root, FLAGS.quick)
  print(f'Report: {os.path.join(FLAGS.root, "reproduction.md")} ({(time.time() - start) / 60:.0f} '
        'minutes).', flush=True)


if __name__ == '__main__':
  # Here, not at import: launch.sweep, which tests import beside this, defines --root too.
  flags.DEFINE_string('root', None, 'Parent of the runs\' workdirs; the report goes there.')
  flags.DEFINE_bool('quick', False, 'The quick grid, a few steps per run: checks the pipeline.')
  from vgg_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
