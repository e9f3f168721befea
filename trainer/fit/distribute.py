"""tf.distribute strategy selection, one branch per supported strategy."""

import tempfile

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def split_cpu(num_devices: int) -> None:
    """Splits the host CPU into `num_devices` logical devices.

    This lets MirroredStrategy run several replicas on a machine without GPUs, the way the tests
    exercise multi-replica code. Must run before TensorFlow initialises its devices.
    """
    if num_devices <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)


def make_strategy(name: str, *, tpu: str = "", num_gpus: int = 0) -> tf.distribute.Strategy:
    """Returns the tf.distribute strategy called `name`.

    Args:
        name: "default" (one device), "mirrored" (all local GPUs, else all logical CPUs),
            "multi_worker" (hosts listed in TF_CONFIG) or "tpu".
        tpu: TPU name or grpc address for "tpu" ("local" on a TPU VM).
        num_gpus: for "mirrored", use only the first this many GPUs; 0 = all.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if num_gpus > len(gpus):
            raise ValueError(f"--num_gpus {num_gpus} is more than the {len(gpus)} GPUs this machine has")
        devices = gpus[:num_gpus or None] or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[device.name for device in devices])
    if name == "multi_worker":
        # Reads the cluster from TF_CONFIG (set by Vertex AI, Kubernetes TFJob and launch.local);
        # without TF_CONFIG it is a single worker.
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"--strategy=tpu found no TPU for --tpu {tpu!r}: {first_line}") from None
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy: {name!r}")


def check_batch_size(batch_size: int, num_replicas: int) -> None:
    """Raises ValueError unless the global batch divides evenly across replicas."""
    if batch_size <= 0 or batch_size % num_replicas:
        raise ValueError(
            f"--batch_size {batch_size} must be a positive multiple of the {num_replicas} replicas "
            f"of the strategy (e.g. {num_replicas * max(1, round(max(batch_size, 1) / num_replicas))})"
        )


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the one process that writes shared outputs: logs, metrics, best weights, exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def worker_name(strategy: tf.distribute.Strategy) -> str:
    """This process's task in a cluster ("worker:1"); "" outside one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return ""
    return f"{resolver.task_type}:{resolver.task_id}"


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Processes that train together, each reading its own share of the data: the hosts of a multi_worker
    cluster; 1 for every other strategy (a TPU's hosts feed one program, which sees every replica's results)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def write_dir(directory: str, strategy: tf.distribute.Strategy) -> str:
    """Where this process writes a checkpoint or export of `directory`.

    Under MultiWorkerMirroredStrategy every worker must take part in saving, but only the chief's
    copy is kept: the others write into a local temporary folder that remove_write_dir deletes.
    """
    if is_chief(strategy):
        return directory
    return tempfile.mkdtemp(prefix="non_chief_worker_")


def remove_write_dir(directory: str, strategy: tf.distribute.Strategy) -> None:
    """Deletes a non-chief worker's temporary copy (see write_dir)."""
    if not is_chief(strategy) and tf.io.gfile.exists(directory):
        tf.io.gfile.rmtree(directory)
