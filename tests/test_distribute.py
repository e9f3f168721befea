"""trainer/distribute.py: strategy selection and batch checks (multi-replica runs: test_end_to_end.py)."""

import pytest
import tensorflow as tf

from trainer import distribute


def test_default_strategy_has_one_replica():
    assert distribute.make_strategy("default").num_replicas_in_sync == 1


def test_mirrored_strategy_on_cpu_uses_the_cpu_devices():
    strategy = distribute.make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))


def test_unknown_strategy():
    with pytest.raises(ValueError, match="Unknown strategy: 'horovod'"):
        distribute.make_strategy("horovod")


def test_multi_worker_is_refused_clearly_for_now():
    with pytest.raises(ValueError, match="--strategy=multi_worker is not supported yet"):
        distribute.make_strategy("multi_worker")


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
