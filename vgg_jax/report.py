"""Evaluation results laid out like the paper's Tables 3-6, with its numbers beside ours.

`write` merges a run's results into WORKDIR/eval/results.json and redraws
WORKDIR/eval/results.md, one table per split and checkpoint step: each entry records its
dataset, split, test scales and checkpoint step, and no table mixes splits or steps. A paper
number is shown only where our run is the paper's experiment: ImageNet ILSVRC-2012
validation, full width, 224 crops, the paper's training scale and its test scales for that
protocol.
"""

import json
from typing import Optional

from etils import epath

from vgg_jax import default_config
from vgg_jax import protocol


JITTERED = (256, 512)
# ILSVRC-2012 validation top-1 / top-5 error (%), keyed by (net, training scale S).
TABLE3 = {  # Single test scale, Q = S, or 384 for S in [256, 512].
    ('A', 256): (29.6, 10.4), ('A-LRN', 256): (29.7, 10.5), ('B', 256): (28.7, 9.9),
    ('C', 256): (28.1, 9.4), ('C', 384): (28.1, 9.3), ('C', JITTERED): (27.3, 8.8),
    ('D', 256): (27.0, 8.8), ('D', 384): (26.8, 8.7), ('D', JITTERED): (25.6, 8.1),
    ('E', 256): (27.3, 9.0), ('E', 384): (26.9, 8.7), ('E', JITTERED): (25.5, 8.0),
}
TABLE4 = {  # Three test scales, dense evaluation.
    ('B', 256): (28.2, 9.6),
    ('C', 256): (27.7, 9.2), ('C', 384): (27.8, 9.2), ('C', JITTERED): (26.3, 8.2),
    ('D', 256): (26.6, 8.6), ('D', 384): (26.5, 8.6), ('D', JITTERED): (24.8, 7.5),
    ('E', 256): (26.9, 8.7), ('E', 384): (26.7, 8.6), ('E', JITTERED): (24.8, 7.5),
}
TABLE5 = {  # Jittered S, three test scales, by evaluation method.
    ('D', JITTERED): {'dense': (24.8, 7.5), 'multicrop': (24.6, 7.5),
                      'dense+multicrop': (24.4, 7.2)},
    ('E', JITTERED): {'dense': (24.8, 7.5), 'multicrop': (24.6, 7.4),
                      'dense+multicrop': (24.4, 7.1)},
}
TABLE6 = {  # Fusion of D and E (jittered S, three test scales).
    'dense': (24.0, 7.1), 'multicrop': (23.9, 7.2), 'dense+multicrop': (23.7, 6.8),
}
_TABLE_OF = {'single': 'Table 3', 'dense': 'Tables 4, 5', 'multicrop': 'Table 5',
             'dense+multicrop': 'Table 5'}


def _train_scale(config):
  smin, smax = protocol.scale_bounds(config.train_scale)
  return smin if smin == smax else (smin, smax)


def _is_paper_setting(config, split: str) -> bool:
  return (default_config.dataset_name(config.dataset) == 'imagenet2012'
          and split == 'validation' and config.width == 1.0 and config.image_size == 224
          and config.num_classes == 1000)


def paper_result(config, name: str, scales, split: str) -> Optional[tuple[float, float]]:
  """The paper's (top-1, top-5) error for this net and protocol, if it reports one."""
  if not _is_paper_setting(config, split):
    return None
  key = (config.variant, _train_scale(config))
  if name == 'single':
    return TABLE3.get(key) if list(scales) == [protocol.single_test_scale(config)] else None
  if list(scales) != sorted(protocol.test_scales(config)):
    return None
  if name == 'dense' and key in TABLE4:
    return TABLE4[key]
  return TABLE5.get(key, {}).get(name)


def paper_fusion_result(configs, name: str, scales_per_net, split: str):
  """Table 6, when the fused nets are the paper's D and E at jittered S and 3 test scales."""
  if sorted(c.variant for c in configs) != ['D', 'E']:
    return None
  if not all(_is_paper_setting(c, split) and _train_scale(c) == JITTERED and
             list(s) == sorted(protocol.test_scales(c))
             for c, s in zip(configs, scales_per_net)):
    return None
  return TABLE6.get(name)


def _scale_text(scale) -> str:
  return f'[{scale[0]}, {scale[1]}]' if isinstance(scale, tuple) else str(scale)


def percent(value: float) -> str:
  """An error rate as the paper's tables print it: percent, two decimals."""
  return f'{100 * value:.2f}'


def markdown_table(header, rows) -> list[str]:
  """A markdown table's lines."""
  return [f'| {" | ".join(header)} |', '|' + '---|' * len(header),
          *(f'| {" | ".join(map(str, row))} |' for row in rows)]


# The section of an old results.json, written before entries recorded their split.
UNRECORDED_SPLIT = '(split not recorded)'


def step_text(step) -> str:
  """A checkpoint step, or the steps of fused nets, as a table prints it."""
  return ', '.join(map(str, step)) if isinstance(step, list) else str(step)


def _rows(entries: dict) -> list[list]:
  order = {p: i for i, p in enumerate(protocol.PROTOCOLS)}
  rows = []
  for name in sorted(entries, key=lambda n: (n.startswith('fused:'),
                                             order.get(n.split(':')[-1], 99), n)):
    r = entries[name]
    base = name.split(':')[-1]
    method = f'{base} ({"Table 6" if name.startswith("fused:") else _TABLE_OF[base]})'
    paper = '—' if r.get('paper') is None else f'{r["paper"][0]} / {r["paper"][1]}'
    rows.append([method, r['net'], r['train_scale'], ', '.join(map(str, r['scales'])),
                 r['crops_per_image'], percent(r['top1_error']), percent(r['top5_error']),
                 paper, f'{r["img_per_s"]:.1f}'])
  return rows


def _newest(step) -> int:
  return max(step) if isinstance(step, list) else step


def sections(merged: dict) -> list[tuple[str, dict]]:
  """results.json's entries grouped so that no group mixes splits or checkpoints: (split,
  {name: entry}) per split and checkpoint step (a list of steps for fused nets), each
  split's newest first."""
  groups = []
  for split in sorted(merged):
    by_step = {}
    for name, r in merged[split].items():
      by_step.setdefault(step_text(r['step']), {})[name] = r
    steps = lambda entries: next(iter(entries.values()))['step']
    groups += [(split, entries) for entries in sorted(
        by_step.values(), key=lambda e: (-_newest(steps(e)), isinstance(steps(e), list)))]
  return groups


def markdown(merged: dict, title: str) -> str:
  """results.json as tables with the paper's columns (Tables 3-6), one per split and checkpoint
  step: a table never mixes them."""
  header = ['method', 'ConvNet', 'train S', 'test Q', 'crops / image', 'top-1 err. (%)',
            'top-5 err. (%)', 'paper top-1 / top-5 (%)', 'img/s']
  lines = [f'# {title}']
  for split, entries in sections(merged):
    first = next(iter(entries.values()))
    lines += ['', f'## Split {split!r}, checkpoint step {step_text(first["step"])}: '
              f'{max(r["num_examples"] for r in entries.values())} examples', '',
              *markdown_table(header, _rows(entries))]
  lines += ['', 'Errors over every example of the split (exact counts). Views per image: dense, '
            'the whole image per scale; multi-crop, a 5x5 grid of crops per scale; each also '
            'flipped when config.test_flip (Sec. 3.2). img/s: steady state, compilation '
            'excluded.']
  return '\n'.join(lines) + '\n'


def describe(config) -> dict:
  return {'net': config.variant if config.width == 1.0 else f'{config.variant} x{config.width:g}',
          'train_scale': _scale_text(_train_scale(config))}


def annotate(results: dict, config, step: int, split: str) -> dict:
  """Adds to each protocol's results what says which experiment it is: the net, its training
  scale, the dataset, split and checkpoint step, and the paper's figure for the same
  experiment (None where the paper has none). The test scales are already there."""
  return {name: {**r, **describe(config), 'dataset': config.dataset, 'split': split,
                 'step': step, 'paper': paper_result(config, name, r['scales'], split)}
          for name, r in results.items()}


def read(workdir: str) -> dict:
  """WORKDIR/eval/results.json: {split: {protocol or 'fused:PROTOCOL': entry}}; {} if absent.
  An older file's flat entries come under UNRECORDED_SPLIT."""
  path = epath.Path(workdir) / 'eval' / 'results.json'
  if not path.exists():
    return {}
  merged = json.loads(path.read_text())
  if any('top1_error' in entry for entry in merged.values()):
    return {UNRECORDED_SPLIT: merged}
  return merged


def write(workdir: str, results: dict, title: str) -> str:
  """Merges `results`, the annotated entries of one split, into WORKDIR/eval/results.json
  (entries of other splits and protocols are kept; a protocol evaluated again replaces its
  entry) and rewrites WORKDIR/eval/results.md; returns the eval directory. Local or gs://."""
  splits = {r['split'] for r in results.values()}
  if len(splits) != 1:
    raise ValueError(f'Results of one split at a time, not of {sorted(splits)}.')
  directory = epath.Path(workdir) / 'eval'
  directory.mkdir(parents=True, exist_ok=True)
  merged = read(workdir)
  merged.setdefault(splits.pop(), {}).update(results)
  (directory / 'results.json').write_text(json.dumps(merged, indent=2))
  (directory / 'results.md').write_text(markdown(merged, title))
  return str(directory)
