"""Images per second and time left, for the console logs of training and evaluation.

Not clu's `periodic_actions.ReportProgress`, which the flax examples use: its steps/s runs
from one report to the next, so it takes in the first step's compilation and every evaluation
in between, and it counts steps; here the rate is images/s over the work since `restart`,
which the loop calls after compiling and after each evaluation.
"""

import time


class Progress:
  """Rate and ETA of `total` units of work (steps or images), `size` images per unit."""

  def __init__(self, total: int, size: int = 1):
    self.total, self.size = total, size
    self.restart(0)

  def restart(self, done: int) -> None:
    """Times from here, with `done` units behind (after compiling, after an evaluation)."""
    self.last_done, self.last_time = done, time.perf_counter()

  def seconds_since_restart(self) -> float:
    return time.perf_counter() - self.last_time

  def rate(self, done: int) -> tuple[float, float]:
    """(images per second, seconds left) since the last restart, then restarts at `done`."""
    units, seconds = done - self.last_done, self.seconds_since_restart()
    self.restart(done)
    if units <= 0:  # Nothing done since the restart (a log right after compiling): no rate.
      return float('nan'), float('nan')
    units_per_s = units / max(seconds, 1e-9)
    return units_per_s * self.size, (self.total - done) / units_per_s


def duration(seconds: float) -> str:
  """'1h02m03s', or '2m03s' under an hour; '?' when unknown."""
  if seconds != seconds:  # NaN
    return '?'
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'


def rate(per_second: float) -> str:
  """'635.2', or '?' when unknown."""
  return '?' if per_second != per_second else f'{per_second:.1f}'
