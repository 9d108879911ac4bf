"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""

import os

# Only two real cores back the 8 devices, so a collective can wait long on its peers; raise
# XLA's rendezvous time-out so a slow step is not mistaken for a deadlock.
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_collective_call_terminate_timeout_seconds=600",
)
_existing = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_existing, *(f for f in _FLAGS if f not in _existing)])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
