"""Progress bars (tqdm on stderr), silenced when not wanted and sparse when stderr is not a terminal."""
import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str = "it", disable: bool = False, initial: int = 0):
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=True,
                mininterval=0.5 if interactive else 15.0)
