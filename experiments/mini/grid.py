"""The reproduction in miniature (docs/reproduction.md): every run, for `launch.sweep`.

  python -m launch.reproduce --root=workdirs/mini     # this grid, then the evaluations and report

Runs are named NET_S<scale>_s<seed>. Three seeds of each net at S = 36 (Table 3's depth and LRN
rows), and of D at S = 54 and D and E at S in [36, 72] (Tables 3-6: scale jittering, test
protocols, fusion), all from Glorot initialisation with the same budget (10 epochs), so that a
difference is the net's or the scale's, not the training's. Sec. 3.1's initialisation runs
(`init_*`, one seed: a stall is not subtle) use N(0, std^2) with each layer's gain as in the
full-size net, and the deeper net seeded from net A. `B_0to4` is trained on digits 0-4 only,
for Appendix B's transfer to the digits it never saw.
"""

from typing import Optional

from experiments.table3 import Run

CONFIG = 'experiments/mini/config.py'
SEEDS = (0, 1)
DEPTH_NETS = ('A', 'A-LRN', 'B', 'C', 'D', 'E')
# The plateau rule off (lr_max_decreases=0): a net still at chance would otherwise have its
# rate divided by 1,000 before it could start, and the comparison would be of schedules.
CONSTANT_LR = '--config.lr_max_decreases=0'
PAPER = ('--config.init=paper', CONSTANT_LR)
# The paper's "variance 1e-2" taken literally: std 0.1. Such nets blow up; the steps whose loss
# is not finite are skipped and counted instead of stopping the sweep.
VARIANCE_READING = (*PAPER, '--config.init_std=0.1',
                    '--config.skip_nonfinite_steps=True')
# The same std at width 1/8 without matching the full-size gains: a far weaker init.
PLAIN_STD = (*PAPER, '--config.init_std_as_full_size=False')


def name(net: str, scale: str, seed: int) -> str:
  return f'{net}_S{scale}_s{seed}'


def get_runs(arg: Optional[str] = None) -> list[Run]:
  """Every run; 'quick' (`grid.py:quick`): Appendix B's net and one fully tested net, for the
  test suite's end-to-end check."""
  if arg not in (None, 'quick'):
    raise ValueError(f'Grid argument {arg!r}: expected none or quick.')
  quick = arg == 'quick'
  seeds = SEEDS[:1] if quick else SEEDS
  runs = []
  if not quick:
    runs += [
        Run('init_A_paper', f'{CONFIG}:A,S=36', overrides=PAPER),
        Run('init_E_from_A', f'{CONFIG}:E,S=36', 'init_A_paper', 'net_a', PAPER),
        Run('init_E_paper', f'{CONFIG}:E,S=36', overrides=PAPER),
        Run('init_E_glorot', f'{CONFIG}:E,S=36', overrides=('--config.init=glorot', CONSTANT_LR)),
        # Net A as trained by the depth runs (Glorot), in case init_A_paper has not trained.
        Run('init_E_from_trained_A', f'{CONFIG}:E,S=36', name('A', '36', 0), 'net_a', PAPER),
        Run('init_A_variance', f'{CONFIG}:A,S=36', overrides=VARIANCE_READING),
        Run('init_E_variance', f'{CONFIG}:E,S=36', overrides=VARIANCE_READING),
        Run('init_A_plain_std', f'{CONFIG}:A,S=36', overrides=PLAIN_STD),
        Run('init_E_plain_std', f'{CONFIG}:E,S=36', overrides=PLAIN_STD),
    ]
  runs.append(Run('B_0to4', f'{CONFIG}:B,S=36',
                  overrides=('--config.dataset=scaled_digits/0to4', '--config.num_classes=5')))
  for seed in seeds:
    for net in ('A', 'A-LRN', 'B', 'C') if not quick else ():
      runs.append(Run(name(net, '36', seed), f'{CONFIG}:{net},S=36',
                      overrides=(f'--config.seed={seed}',)))
    for net, scale in (('D', '36'), ('D', '54'), ('D', '36-72'), ('E', '36'), ('E', '36-72')):
      if quick and (net, scale) != ('D', '36-72'):
        continue
      runs.append(Run(name(net, scale, seed), f'{CONFIG}:{net},S={scale}',
                      overrides=(f'--config.seed={seed}',)))
  return runs
