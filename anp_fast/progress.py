"""Progress bars (tqdm on stderr), silenced when not wanted."""
from tqdm import tqdm


def progress_bar(total: int, desc: str, unit: str = "it", disable: bool = False):
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=True)
