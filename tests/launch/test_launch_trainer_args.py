"""launch/trainer_args.py: finding, adding and refusing the trainer flags a launcher decides."""

import sys

import pytest

from launch import trainer_args


@pytest.mark.parametrize("args, expected", [
    ([], None),
    (["--data_dir=d"], None),
    (["--strategy=mirrored"], "mirrored"),
    (["-strategy=mirrored"], "mirrored"),
    (["--strategy", "tpu", "--data_dir=d"], "tpu"),
    (["--strategy=tpu", "--strategy=mirrored"], "mirrored"),  # absl: the last one wins
    (["--strategy_other=x"], None),
    (["--", "--strategy=x"], None),
])
def test_flag_value(args, expected):
    assert trainer_args.flag_value(args, "strategy") == expected


def test_with_flag_adds_keeps_or_refuses():
    assert trainer_args.with_flag(["--data_dir=d"], "strategy", "tpu") == ["--data_dir=d", "--strategy=tpu"]
    assert trainer_args.with_flag(["--strategy=tpu"], "strategy", "tpu") == ["--strategy=tpu"]
    with pytest.raises(ValueError, match="trainer flag --strategy=mirrored conflicts .* runs --strategy=tpu"):
        trainer_args.with_flag(["--strategy", "mirrored"], "strategy", "tpu")


def test_with_default_flag_keeps_the_users_value():
    assert trainer_args.with_default_flag([], "precision", "mixed_bfloat16") == ["--precision=mixed_bfloat16"]
    assert trainer_args.with_default_flag(["--precision=float32"], "precision", "mixed_bfloat16") == ["--precision=float32"]


def test_run_tool_returns_the_exit_code_or_reports_a_missing_tool(capsys):
    assert trainer_args.run_tool([sys.executable, "-c", "import sys; sys.exit(3)"], install_hint="unused") == 3
    assert trainer_args.run_tool(
        [sys.executable, "-c", "import sys; sys.exit(sys.stdin.read() != 'spec')"], install_hint="unused",
        input_text="spec",
    ) == 0
    assert trainer_args.run_tool(["no-such-cloud-cli-xyz", "apply"], install_hint="install it") == 1
    assert capsys.readouterr().err == "error: no-such-cloud-cli-xyz not found; install it or use --dry_run\n"
