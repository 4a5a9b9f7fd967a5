"""``python -m anp_fast ...``: the ``anp-fast`` command line (for launchers that start a module, e.g. torchrun)."""
import sys

from .cli import main

sys.exit(main())
