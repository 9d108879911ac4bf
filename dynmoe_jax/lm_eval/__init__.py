"""lm-evaluation-harness for dynmoe_jax models: importing this package registers the model
``dynmoe_jax`` in lm-eval's registry (``model.py``); ``python -m dynmoe_jax.lm_eval`` is
lm-eval's command line with that model chosen (``cli.py``)."""

from dynmoe_jax.lm_eval.figures import table, with_task_figures
from dynmoe_jax.lm_eval.model import NAME, DynMoELM

__all__ = ["NAME", "DynMoELM", "table", "with_task_figures"]
