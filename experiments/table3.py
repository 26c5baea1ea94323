"""The training grid of Table 3, in the order the paper's initialisation chain needs it (Sec. 3.1).

Net A is trained from random N(0, 0.01^2) weights; the deeper nets at S = 256 start from it
(conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8; the rest random); each S = 384 net starts
from its S = 256 net, all layers, at learning rate 1e-3; each jittered S in [256, 512] net from
its S = 384 net, all layers. The paper does not give the fine-tuning rate of the jittered
nets; we keep the S = 384 one.

  python -m launch.sweep experiments/table3.py --target=local --root=workdirs/table3
"""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: its config (file:argument), the run it starts from and how."""
  name: str
  config: str
  depends_on: Optional[str] = None
  init_mode: Optional[str] = None  # 'net_a' or 'all' (config.init_mode).
  overrides: tuple[str, ...] = ()


FINE_TUNE = ('--config.learning_rate=0.001',)
# The seeded layers get net A's weights; the others the paper's N(0, 0.01^2).
FROM_NET_A = ('--config.init=paper',)


def get_runs() -> list[Run]:
  runs = [Run('A_S256', 'experiments/configA.py:S=256'),
          Run('A-LRN_S256', 'experiments/configA_LRN.py:S=256'),
          Run('B_S256', 'experiments/configB.py:S=256', 'A_S256', 'net_a', FROM_NET_A)]
  for net in ('C', 'D', 'E'):
    runs += [
        Run(f'{net}_S256', f'experiments/config{net}.py:S=256', 'A_S256', 'net_a', FROM_NET_A),
        Run(f'{net}_S384', f'experiments/config{net}.py:S=384', f'{net}_S256', 'all',
            FINE_TUNE),
        Run(f'{net}_S256-512', f'experiments/config{net}.py:S=256-512', f'{net}_S384', 'all',
            FINE_TUNE),
    ]
  return runs
