"""trainer/fit/distribute.py: strategy selection and batch checks (multi-replica runs: test_end_to_end.py)."""

import os
import types

import pytest
import tensorflow as tf

from trainer.fit import distribute


def test_default_strategy_has_one_replica():
    assert distribute.make_strategy("default").num_replicas_in_sync == 1


def test_mirrored_strategy_on_cpu_uses_the_cpu_devices():
    strategy = distribute.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))


def test_unknown_strategy():
    with pytest.raises(ValueError, match="Unknown strategy: 'horovod'"):
        distribute.make_strategy("horovod")


def strategy_with(task_type, task_id, jobs):
    """A stand-in with the one attribute is_chief reads: a real cluster resolver."""
    cluster = tf.train.ClusterSpec({job: [f"127.0.0.1:{2000 + i}" for i in range(count)] for job, count in jobs.items()})
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(cluster, task_type=task_type, task_id=task_id)
    return types.SimpleNamespace(cluster_resolver=resolver)


def test_chief_is_worker_zero_unless_there_is_a_chief_job():
    assert distribute.is_chief(distribute.make_strategy("default"))
    assert distribute.is_chief(strategy_with("worker", 0, {"worker": 2}))
    assert not distribute.is_chief(strategy_with("worker", 1, {"worker": 2}))
    assert distribute.is_chief(strategy_with("chief", 0, {"chief": 1, "worker": 2}))
    assert not distribute.is_chief(strategy_with("worker", 0, {"chief": 1, "worker": 2}))


def test_only_the_chief_writes_to_the_real_directory(tmp_path):
    chief, other = strategy_with("worker", 0, {"worker": 2}), strategy_with("worker", 1, {"worker": 2})
    assert distribute.write_dir(str(tmp_path / "out"), chief) == str(tmp_path / "out")
    temporary = distribute.write_dir(str(tmp_path / "out"), other)
    assert temporary != str(tmp_path / "out")
    distribute.remove_write_dir(temporary, other)
    assert not os.path.exists(temporary)


@pytest.mark.parametrize("tpu", ["", "local"])
def test_tpu_without_a_tpu_is_a_clear_error(tpu):
    with pytest.raises(ValueError, match=f"--strategy=tpu found no TPU for --tpu '{tpu}'"):
        distribute.make_strategy("tpu", tpu=tpu)


def test_batch_size_must_divide_across_replicas():
    distribute.check_batch_size(32, 2)
    with pytest.raises(ValueError, match="--batch_size 33 must be a positive multiple of the 2 replicas"):
        distribute.check_batch_size(33, 2)
    with pytest.raises(ValueError, match="--batch_size 0"):
        distribute.check_batch_size(0, 1)
