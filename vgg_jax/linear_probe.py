"""Appendix B: a trained net's image descriptors and a linear SVM on classes it never saw.

  python -m vgg_jax.linear_probe --workdir=DIR --dataset=scaled_digits/5to9 \
      [--scales=36,54,72] [--aggregate=average|stack] [--features=net|random|pixels]

The descriptor is the paper's (Appendix B.1): the net applied densely to the image rescaled to
each scale Q, the last hidden layer's (fc7) output averaged over locations and over the image
and its mirror (`config.test_flip`), aggregated over the scales (averaged, or stacked so the
classifier weighs them) and L2-normalised (`evaluation.dense_descriptors`,
`evaluation.aggregate_descriptors`). A linear SVM (scikit-learn's LinearSVC, C chosen by 3-fold
cross-validation on the training split) is fitted on the training split's descriptors and
scored on the test split. Baselines under the same classifier: `--features=random`, the same
net freshly initialised (what the training added); `--features=pixels`, the image at the first
scale itself (its central Q x Q square). Results are merged into DIR/linear_probe.json.
"""

import json
import os
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import numpy as np

from vgg_jax import checkpoints
from vgg_jax import cli
from vgg_jax import errors
from vgg_jax import evaluation
from vgg_jax import input_pipeline
from vgg_jax import models
from vgg_jax import preprocess
from vgg_jax import protocol
from vgg_jax import steps

FEATURES = ('net', 'random', 'pixels')
SVM_C = (0.01, 0.1, 1.0, 10.0, 100.0)
RESULTS = 'linear_probe.json'

FLAGS = flags.FLAGS



def result_key(dataset: str, features: str, layer: str, aggregate: str) -> str:
  """The entry of linear_probe.json a probe writes."""
  return f'{dataset}:{features}' + ('' if features == 'pixels' else f':{layer}:{aggregate}')


def _pixels(batch: dict, q: int) -> np.ndarray:
  """The central q x q square of each (padded) image at scale q, flattened; zeros for the
  batch's padding examples."""
  out = np.zeros((batch['size'].reshape(-1, 2).shape[0], q * q * 3), np.float32)
  for i, (image, (height, width)) in enumerate(zip(
      batch['image'].reshape(-1, *batch['image'].shape[-3:]), batch['size'].reshape(-1, 2))):
    if min(height, width) >= q:
      top, left = (height - q) // 2, (width - q) // 2
      out[i] = image[top:top + q, left:left + q].reshape(-1)
  return out


def split_descriptors(params, config, builder, split: str, scales: Sequence[int],
                      aggregate: str, features: str = 'net',
                      layer: str = 'fc7') -> tuple[np.ndarray, np.ndarray]:
  """(descriptors (n, d), labels (n,)) of every example of `split`, in split order."""
  num_examples = evaluation.per_process(builder.info.splits[split].num_examples)
  model = models.create_model(config)
  if features == 'pixels':
    p_step = lambda _, batch: _pixels(batch, scales[0])
  else:
    fn = lambda params, batch: evaluation.dense_descriptors(
        params, batch['image'], batch['size'], model=model,
        normalization=preprocess.Normalization.from_config(config), flip=config.test_flip,
        layer=layer)
    p_step = jax.pmap(fn, in_axes=(None, 0), devices=jax.local_devices())
  per_scale, labels = [], None
  for q in scales[:1] if features == 'pixels' else scales:
    batches = input_pipeline.test_batch_iterator(builder, config, protocol.DENSE, q, split)
    post = evaluation.posteriors(p_step, params, batches, f'{split} descriptors Q={q}',
                                 num_examples)
    per_scale.append(post.probs)
    labels = post.labels
  return evaluation.aggregate_descriptors(per_scale, aggregate), labels


def fit_svm(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
            c_values: Sequence[float] = SVM_C, seed: int = 0) -> dict:
  """A linear SVM on `train` (C by 3-fold cross-validation), scored on `test`."""
  from sklearn import model_selection, svm  # pylint: disable=g-import-not-at-top
  search = model_selection.GridSearchCV(
      svm.LinearSVC(dual=False, random_state=seed, max_iter=5_000), {'C': list(c_values)}, cv=3)
  search.fit(*train)
  x, y = test
  error = float(np.mean(search.predict(x) != y))
  return {'top1_error': error, 'num_test': int(len(y)), 'num_train': int(len(train[1])),
          'svm_c': float(search.best_params_['C']), 'dimensions': int(x.shape[1])}


def probe(workdir: str, dataset: str, scales: Optional[Sequence[int]] = None,
          aggregate: str = 'average', features: str = 'net', layer: str = 'fc7',
          train_split: str = 'train', test_split: str = 'test',
          data_dir: Optional[str] = None) -> dict:
  """Descriptors of `dataset` from the net in `workdir` (or a fresh one, or pixels) and a
  linear SVM's test error; merged into WORKDIR/linear_probe.json and returned."""
  if features not in FEATURES:
    raise errors.ConfigError(f'features={features!r}: expected one of '
                                        f'{", ".join(FEATURES)}.')
  if layer not in ('fc6', 'fc7'):
    raise errors.ConfigError(f'layer={layer!r}: Appendix B describes images by a '
                                        'hidden fully-connected layer, fc6 or fc7.')
  config = checkpoints.load_config(workdir)
  target = config.copy_and_resolve_references()
  with target.unlocked():
    # The probe's dataset and splits, not the training run's (a folder checks them when read).
    target.update(dataset=dataset, train_split=train_split, eval_split=test_split)
    if data_dir:
      target.data_dir = data_dir
  scales = tuple(int(q) for q in scales) if scales else protocol.test_scales(config)
  protocol.check_scales(scales, config.image_size)
  builder = input_pipeline.get_builder(target)
  for split in (train_split, test_split):
    try:
      builder.info.splits[split]  # 'train', and slices such as 'train[:100]'.
    except (KeyError, ValueError) as e:
      raise errors.ConfigError(f'split {split!r}: {dataset} has splits '
                                          f'{", ".join(builder.info.splits)}.') from e
  params = None
  if features == 'net':
    params = checkpoints.restore_params(workdir, config, checkpoints.latest_step(workdir))
  elif features == 'random':
    model = models.create_model(config)
    dummy = jax.numpy.zeros((1, config.image_size, config.image_size, 3))
    params = steps.init_params(model, jax.random.key(config.seed), dummy)
  data = {split: split_descriptors(params, target, builder, split, scales, aggregate, features,
                                   layer)
          for split in (train_split, test_split)}
  result = {**fit_svm(data[train_split], data[test_split], seed=config.seed),
            'dataset': dataset, 'features': features, 'layer': layer,
            'scales': list(scales), 'aggregate': aggregate,
            'trained_on': config.dataset, 'net': config.variant}
  logging.info('%s descriptors of %s: linear SVM test error %.2f%% over %d images.',
               features if features == 'pixels' else f'{features} {layer}', dataset, 100 * result['top1_error'], result['num_test'])
  if jax.process_index() == 0:
    path = epath.Path(workdir) / RESULTS
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged[result_key(dataset, features, layer, aggregate)] = result
    path.write_text(json.dumps(merged, indent=2))
  return result


def define_flags() -> None:
  """The CLI's flags, defined when it runs, not when the module is imported."""
  flags.DEFINE_string('workdir', None, 'Training workdir whose newest checkpoint describes images.')
  flags.DEFINE_string('dataset', None, 'tfds dataset of the new classes, e.g. scaled_digits/5to9.')
  flags.DEFINE_list('scales', None, 'Scales Q; default: the training config\'s test scales.')
  flags.DEFINE_enum('aggregate', 'average', evaluation.DESCRIPTOR_AGGREGATES,
                    'How the scales\' descriptors make one.')
  flags.DEFINE_enum('features', 'net', FEATURES, 'net: the trained net\'s descriptors; random: '
                    'the same net freshly initialised; pixels: the image itself.')
  flags.DEFINE_string('layer', 'fc7', 'The layer whose output is described (fc6 or fc7).')
  flags.DEFINE_string('train_split', 'train', 'Split the SVM is fitted on.')
  flags.DEFINE_string('test_split', 'test', 'Split the SVM is scored on.')
  flags.DEFINE_string('data_dir', None, 'tfds data_dir, if not the training config\'s.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  cli.setup()
  try:
    result = probe(FLAGS.workdir, FLAGS.dataset, cli.integers(FLAGS['scales']),
                   FLAGS.aggregate, FLAGS.features, FLAGS.layer, FLAGS.train_split,
                   FLAGS.test_split, FLAGS.data_dir)
  except (errors.ConfigError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  print(f'{result["features"]} descriptors of {result["dataset"]} (Q = '
        f'{", ".join(map(str, result["scales"]))}, {result["aggregate"]}): linear SVM test '
        f'error {100 * result["top1_error"]:.2f}% over {result["num_test"]} images; results in '
        f'{os.path.join(FLAGS.workdir, RESULTS)}.')


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['workdir', 'dataset'])
  cli.run(main)
