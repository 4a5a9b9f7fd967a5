"""Files written so that an interruption never leaves a half-written one."""
import os
import tempfile
from typing import Callable, IO


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then rename it over ``path``: an
    interruption leaves either the old file or the whole new one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a result file gets the usual permissions
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def _torch_save(obj, f) -> None:
    import torch

    torch.save(obj, f)


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: _torch_save(obj, f), binary=True)
