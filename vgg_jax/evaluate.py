"""Tests trained nets with the paper's protocol (Sec. 3.2, Tables 3-6).

  python -m vgg_jax.evaluate --workdir=DIR [--protocol=single|dense|multicrop|dense+multicrop|all]
      [--scales=Q1,Q2,...] [--fuse=DIR2,DIR3,...]

evaluates the newest checkpoint in DIR, with the config it was trained with, on the
validation split and writes DIR/eval/results.json and DIR/eval/results.md. `--fuse` also
evaluates the nets in DIR2, ... and averages all nets' soft-max posteriors (Table 6).
"""

import functools
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from vgg_jax import checkpoints
from vgg_jax import cli
from vgg_jax import config_validation
from vgg_jax import errors
from vgg_jax import evaluation
from vgg_jax import input_pipeline
from vgg_jax import protocol
from vgg_jax import report

FLAGS = flags.FLAGS
# Config fields this command takes as flags of the same name (`--data_dir`, not
# `--config.data_dir`).
OVERRIDES = ('data_dir', 'manual_dir', 'dense_batch_size', 'multicrop_batch_size')


def _load(workdir: str, overrides: dict):
  config = checkpoints.load_config(workdir)
  with config.unlocked():
    config.update({k: v for k, v in overrides.items() if v is not None})
  config_validation.validate(config, jax.device_count())
  return config


def evaluate_workdirs(workdir: str, protocols=protocol.PROTOCOLS, scales=None, fuse=(),
                      split=None, **overrides) -> dict:
  """Evaluates DIR (and fuses the nets of `fuse` with it); returns the results written to
  DIR/eval/results.json by this call."""
  dirs = [workdir, *fuse]
  configs = [_load(d, overrides) for d in dirs]
  if scales:
    protocol.check_scales(scales, max(c.image_size for c in configs))
  for d, config in zip(dirs[1:], configs[1:]):
    for field in ('dataset', 'num_classes'):
      if config[field] != configs[0][field]:
        raise errors.ConfigError(
            f'--fuse={d}: its config.{field}={config[field]!r} differs from {workdir}\'s '
            f'{configs[0][field]!r}; fused nets must classify the same dataset.')
  split = split or configs[0].eval_split
  builder = input_pipeline.get_builder(configs[0])
  try:
    split_info = builder.info.splits[split]  # 'test', and slices such as 'test[:120]'.
  except (KeyError, ValueError) as e:
    raise errors.ConfigError(f'--split={split!r}: {configs[0].dataset} has splits '
                             f'{", ".join(builder.info.splits)}.') from e
  num_examples = evaluation.per_process(split_info.num_examples)

  results, members = {}, []
  for d, config in zip(dirs, configs):
    step = checkpoints.latest_step(d)
    logging.info('Evaluating %s (net %s, step %d) on %s %s: %s.', d, config.variant, step,
                 config.dataset, split, ', '.join(protocols))
    params = checkpoints.restore_params(d, config, step)
    net_results, posts = evaluation.run(
        params, config, protocols,
        functools.partial(input_pipeline.test_batch_iterator, builder, config, split=split),
        num_examples, scales=scales)
    net_results = report.annotate(net_results, config, step, split)
    members.append((d, config, net_results, posts))
    del params
  results.update(members[0][2])

  if fuse:
    fused = evaluation.fuse([posts for *_, posts in members])
    for name, post in fused.items():
      per_net = [net_results[name] for _, _, net_results, _ in members]
      results[f'fused:{name}'] = {
          **evaluation.error_rates(post),
          'net': '+'.join(r['net'] for r in per_net),
          'train_scale': ', '.join(r['train_scale'] for r in per_net),
          'scales': sorted({q for r in per_net for q in r['scales']}),
          'crops_per_image': sum(r['crops_per_image'] for r in per_net),
          'img_per_s': jax.process_count() / post.seconds_per_image,
          'dataset': configs[0].dataset,
          'split': split,
          'step': [r['step'] for r in per_net],
          'nets': dirs,
          'members': {d: {k: r[k] for k in ('net', 'top1_error', 'top5_error', 'scales')}
                      for d, r in zip(dirs, per_net)},
          'paper': report.paper_fusion_result([c for _, c, _, _ in members], name,
                                              [r['scales'] for r in per_net], split),
      }
      logging.info('Fused %s (%s): top-1 error %.2f%%, top-5 error %.2f%%.', name,
                   results[f'fused:{name}']['net'],
                   100 * results[f'fused:{name}']['top1_error'],
                   100 * results[f'fused:{name}']['top5_error'])

  if jax.process_index() == 0:
    directory = report.write(workdir, results, f'Evaluation of {workdir}: {configs[0].dataset}')
    logging.info('Results in %s/results.json and results.md.', directory)
  return results


def define_flags() -> None:
  """The CLI's flags, defined when it runs, not when the module is imported."""
  flags.DEFINE_string('workdir', None, 'Training workdir whose newest checkpoint is evaluated.')
  flags.DEFINE_string('protocol', 'all', 'Comma-separated: single, dense, multicrop, '
                      'dense+multicrop; or all.')
  flags.DEFINE_list('scales', None, 'Test scales Q for the multi-scale protocols; default: '
                    'from the training scale (Sec. 3.2).')
  flags.DEFINE_list('fuse', [], 'Workdirs of further nets whose posteriors are averaged with '
                    "DIR's (Table 6).")
  flags.DEFINE_string('split', None, 'Split to evaluate; default: the config\'s eval_split.')
  flags.DEFINE_string('data_dir', None, 'tfds data_dir, if not the one used in training.')
  flags.DEFINE_string('manual_dir', None, 'Where the ILSVRC-2012 tar files are, if the '
                      'dataset is not prepared in data_dir (imported nets: imagenet2012).')
  flags.DEFINE_integer('dense_batch_size', None, 'Overrides config.dense_batch_size.')
  flags.DEFINE_integer('multicrop_batch_size', None, 'Overrides config.multicrop_batch_size.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  cli.setup()
  try:
    protocols = protocol.parse_protocols(FLAGS.protocol)
  except errors.ConfigError as e:
    raise app.UsageError(str(e)) from None
  try:
    evaluate_workdirs(FLAGS.workdir, protocols, cli.integers(FLAGS['scales']), FLAGS.fuse,
                      FLAGS.split, **{field: FLAGS[field].value for field in OVERRIDES})
  except (errors.ConfigError, FileNotFoundError) as e:  # A wrong workdir, split or --fuse.
    message = str(e)
    for field in OVERRIDES:  # Said as this command takes it.
      message = message.replace(f'--config.{field}=', f'--{field}=')
    sys.exit(f'vgg_jax.evaluate: {message}')


if __name__ == '__main__':
  define_flags()
  # Here, not at import: importing this module must not make its flags required elsewhere.
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
