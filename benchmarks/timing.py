"""What the framework comparisons share: timing candidates in turns, and torchvision's twins."""

import statistics
import time

# torchvision's twins of the nets of Table 1 (C and A-LRN have none).
TORCHVISION = {'A': 'vgg11', 'B': 'vgg13', 'D': 'vgg16', 'E': 'vgg19'}


def in_turns(candidates: dict, num_steps: int, warmup: int, block: int) -> dict:
  """Times each candidate's `step()` (which blocks until done): its first call (compilation
  included) and `warmup` untimed calls, then `num_steps` timed calls taken in turns of
  `block` steps per candidate, so a drift in the machine's load hits all of them alike. Each
  turn starts with one untimed step: the other framework's worker threads (OpenMP's spin
  waits on CPU) must settle first, or they slow this one's first step down."""
  out = {}
  for name, step in candidates.items():
    start = time.perf_counter()
    step()
    out[name] = {'first_step_s': time.perf_counter() - start, 'step_times_s': []}
    for _ in range(warmup):
      step()
  while any(len(r['step_times_s']) < num_steps for r in out.values()):
    for name, step in candidates.items():
      times = out[name]['step_times_s']
      step()
      for _ in range(min(block, num_steps - len(times))):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
  for r in out.values():
    r['median_step_s'] = statistics.median(r['step_times_s'])
  return out


def torchvision_twin(variant: str, image_size: int, num_classes: int = 1000):
  """torchvision's net of `variant` with vgg_jax's head: no adaptive average pool, so fc6 takes
  the (image_size / 32)^2 x 512 map as it is (Sec. 3.2's fc6 at 224: 7 x 7 x 512),
  channels_last. Seeded, so both frameworks' runs start from fixed weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from vgg_jax import models  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = getattr(torchvision.models, TORCHVISION[variant])(num_classes=num_classes)
  grid = image_size // models.DOWNSAMPLING
  model.avgpool = torch.nn.Identity()
  if grid != 7:
    model.classifier[0] = torch.nn.Linear(512 * grid * grid, models.FC_WIDTH)
  return model.to(memory_format=torch.channels_last)


def torch_versions() -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  return {'torch': torch.__version__, 'torchvision': torchvision.__version__,
          'device': (torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')}
