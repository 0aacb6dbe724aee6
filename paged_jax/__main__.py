"""python -m paged_jax serve|generate ... (see paged_jax/cli.py)."""
from paged_jax.cli import main

main()
