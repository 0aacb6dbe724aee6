"""python -m paged_jax serve|generate ... (see paged_jax/cli.py)."""
import sys

from paged_jax.cli import main

sys.exit(main())
