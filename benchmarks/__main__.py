"""``python -m anp_fast_bench``: the benchmark harness (anp_fast_bench.bench), also ``anp-fast-bench``."""
import sys

from .bench import main

sys.exit(main())
