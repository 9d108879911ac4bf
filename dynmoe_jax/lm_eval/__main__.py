"""``python -m dynmoe_jax.lm_eval``: see ``cli.py``."""

from dynmoe_jax.lm_eval.cli import main

main()
