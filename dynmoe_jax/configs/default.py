"""What `make train` runs: a 4-layer, 8-expert top-p model on the King James Bible, every field
at its declared default (docs/configuration.md lists them; experiments/RESULTS.md has the run's
time and figures)."""

from ml_collections import ConfigDict

from dynmoe_jax import config as config_lib


def get_config() -> ConfigDict:
    return config_lib.defaults()
