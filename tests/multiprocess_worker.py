"""One process of the 2-process test: 4 CPU devices here, 8 on the global mesh.

Usage: python tests/multiprocess_worker.py PROCESS_ID PORT DATA_DIR OUT_JSON
"""

import json
import os
import sys


def main(process_id: int, port: int, data_dir: str, out: str) -> None:
    os.environ["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=4 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=600"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

    from tests.sharding_steps import run_steps

    reads = {}
    losses = run_steps("data=2,expert=4", data_dir, num_steps=3, reads=reads)
    with open(out, "w") as f:
        json.dump({"losses": losses, "devices": jax.device_count(),
                   "local_devices": jax.local_device_count(), **reads}, f)  # fmt: skip
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
