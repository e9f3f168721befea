"""tf.distribute strategy selection, one branch per supported strategy."""

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


def make_strategy(name: str, *, tpu: str = "") -> tf.distribute.Strategy:
    """Returns the tf.distribute strategy called `name`.

    Args:
        name: "default" (one device), "mirrored" (all local GPUs, else all logical CPUs),
            "multi_worker" (hosts listed in TF_CONFIG) or "tpu".
        tpu: TPU name or grpc address for "tpu" ("local" on a TPU VM).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[device.name for device in devices])
    if name == "multi_worker":
        # Keras 3 fit() breaks under MultiWorkerMirroredStrategy (keras-team/keras#20585, and
        # ../shared/FINDINGS.md): refuse clearly instead of failing deep inside fit().
        raise ValueError(
            "--strategy=multi_worker is not supported yet: Keras 3 fit() fails under "
            "MultiWorkerMirroredStrategy (keras-team/keras#20585); use mirrored on one host for now"
        )
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
