"""Several processes (hosts) as one run: `jax.distributed` set up from the config or the cluster.

Every process runs the same command; JAX joins their devices into one mesh (arrays are global,
zoo/training/step.py), each process reads its rows of every global batch
(zoo/data/pipeline.py), and process 0 writes the logs, metrics and plots. `initialize` must
run before anything touches a device; train.py calls it first, from the config's `parallel`:

  * `num_processes > 0`: this is process `process_id` of `num_processes`, and process 0 serves
    at `coordinator` ("host:port", reachable from every process);
  * `num_processes == 0`: a SLURM job step (`srun`), an Open MPI launch (`mpirun`) or a Cloud
    TPU pod slice says all three, found as `jax.distributed.initialize()` finds them; anywhere
    else (or when that environment has one process) the run is one process.

    python train.py --config.parallel.coordinator=10.0.0.1:1234 \\
        --config.parallel.num_processes=2 --config.parallel.process_id=0   # =1 on the other
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import jax

# jax's cluster environments that zoo follows when num_processes is 0 (jax/_src/clusters/);
# the others (Kubernetes, mpi4py) are opt-in there or need extra packages.
CLUSTERS = {
    "SlurmCluster": "SLURM job step",
    "OmpiCluster": "Open MPI launch",
    "GceTpuCluster": "Cloud TPU pod slice",
    "GkeTpuCluster": "Cloud TPU pod slice (GKE)",
}


class Cluster(NamedTuple):
    """What a cluster's environment says about this process."""

    name: str  # jax's cluster_detection_method
    description: str
    num_processes: int
    process_id: int


def detect_cluster() -> Cluster | None:
    """The SLURM / Open MPI / Cloud TPU environment this process runs in, as
    `jax.distributed.initialize()` would detect it (None elsewhere)."""
    try:
        from jax._src import clusters
    except ImportError:  # jax moved its private module: explicit settings still work
        logging.warning("zoo cannot detect cluster environments with this jax version")
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if env.__name__ in CLUSTERS and env.is_env_present():
            return Cluster(
                env.name, CLUSTERS[env.__name__], env.get_process_count(), env.get_process_id()
            )
    return None


def check_parallel_config(parallel: Any, cluster: Cluster | None) -> None:
    """ValueError (one line: the values and the fix) for `parallel`'s bad combinations and
    for explicit settings that disagree with the cluster's environment."""
    count, index, coordinator = parallel.num_processes, parallel.process_id, parallel.coordinator
    if count < 0:
        raise ValueError(
            f"parallel.num_processes={count} must be >= 0 (0 = one process, or what a SLURM, "
            "Open MPI or TPU pod environment says)"
        )
    if count == 0:
        if coordinator or index != -1:
            given = f"parallel.coordinator='{coordinator}'" if coordinator else ""
            given = given or f"parallel.process_id={index}"
            raise ValueError(
                f"{given} is set but parallel.num_processes=0: give all three of "
                "parallel.coordinator (host:port of process 0), parallel.num_processes and "
                "parallel.process_id (0 to num_processes - 1), or none to use the cluster's"
            )
        return
    if not coordinator:
        raise ValueError(
            f"parallel.num_processes={count} needs parallel.coordinator, the host:port where "
            "process 0 listens (e.g. --config.parallel.coordinator=10.0.0.1:1234)"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"parallel.coordinator='{coordinator}' is not host:port (e.g. 10.0.0.1:1234, "
            "a port in 1-65535 that process 0 can open)"
        )
    if not 0 <= index < count:
        raise ValueError(
            f"parallel.process_id={index} is out of range for parallel.num_processes={count}: "
            f"give each process its own id, 0 to {count - 1}"
        )
    # A cluster of one process (an interactive `srun`) does not bind processes started by hand.
    if cluster is not None and cluster.num_processes > 1 and (count, index) != cluster[2:]:
        raise ValueError(
            f"parallel.num_processes={count}, parallel.process_id={index} disagree with the "
            f"{cluster.description} ({cluster.num_processes} processes, this one "
            f"{cluster.process_id}): set parallel.num_processes=0, parallel.process_id=-1 and "
            "no coordinator to use the cluster's, or launch as many as you set"
        )


def initialize(parallel: Any) -> int:
    """Starts `jax.distributed` as `parallel` (the config's section) or the cluster's
    environment asks, before anything touches a device; returns this process's index.

    Raises:
      ValueError: a bad or contradictory setting (`check_parallel_config`).
    """
    cluster = detect_cluster()
    check_parallel_config(parallel, cluster)
    if jax.distributed.is_initialized():  # e.g. a second run in one Python process
        return jax.process_index()
    if parallel.num_processes > 0:
        arguments = dict(
            coordinator_address=parallel.coordinator,
            num_processes=parallel.num_processes,
            process_id=parallel.process_id,
        )
    elif cluster is not None and cluster.num_processes > 1:
        arguments = dict(cluster_detection_method=cluster.name)
    else:
        return 0
    # Cross-process collectives of the CPU backend (jax's default in recent versions).
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)
    return jax.process_index()
