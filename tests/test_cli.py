"""Every stage script: a Usage docstring, help on every flag, main(args) -> dict, clean errors."""

import argparse
import ast
import sys

import pytest

import collect_rewards
import evaluate_policy
import pretrain_policy
import reward_finetuning
import run_pipeline
import train_reward
from tests.helpers import script_parser

SCRIPTS = [pretrain_policy, collect_rewards, train_reward, reward_finetuning, evaluate_policy, run_pipeline]


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_every_flag_has_help_and_the_docstring_has_usage(module, monkeypatch):
    parser, args = script_parser(module, monkeypatch)
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) >= 8
    assert [a.dest for a in actions if not (a.help and a.help.strip())] == []
    formatter = parser.formatter_class(prog=module.__name__)
    assert [a.dest for a in actions  # --help shows every flag's default (store_true flags default to off)
            if a.default is not False and "default" not in formatter._get_help_string(a)] == []
    assert "Usage:" in module.__doc__ and callable(module.main)
    assert args.device == "auto" and args.seed == 0 and args.wandb == "off"


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_the_command_line_entry_goes_through_run_cli(module):
    """Run as a script, each stage calls run_cli(main, parse_args, ...): one line for a user error,
    exit 2, Ctrl-C in one line (test_bad_input runs the table through run_cli in-process, and two
    rows of it through a real process)."""
    tree = ast.parse(open(module.__file__).read())
    guards = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert len(guards) == 1
    calls = [n for n in ast.walk(guards[0]) if isinstance(n, ast.Call)]
    assert [ast.unparse(c.func) for c in calls] == ["run_cli"]
    assert [ast.unparse(a) for a in calls[0].args] == ["main", "parse_args"]


def test_wandb_online_without_credentials_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch, capsys):
    import argparse

    from diffusion_policy.common.runlog import RunLog

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no 'wandb login'
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLog(str(tmp_path / "run"), argparse.Namespace(lr=1e-3), "online", job="test")
    try:
        log.log({"loss": 1.0}, 1)
        assert log.wandb is not None and log.wandb.settings.mode == "offline"
    finally:
        log.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "logging offline" in warnings[0]
    assert (tmp_path / "run" / "wandb").is_dir() and (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_online_that_cannot_reach_its_server_waits_a_bounded_time_then_logs_offline(tmp_path, monkeypatch,
                                                                                          capsys):
    """A key but no network: wandb.init is given a bounded init_timeout, and when the online init fails
    the run goes on offline with one warning (the online attempt is simulated: no network is used)."""
    import argparse

    import wandb

    from diffusion_policy.common import runlog

    calls = []
    real_init = wandb.init

    def init(**kwargs):
        calls.append((kwargs["mode"], kwargs["settings"].init_timeout))
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("timed out")  # what an unreachable server gives after init_timeout
        return real_init(**kwargs)

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(wandb, "init", init)
    log = runlog.RunLog(str(tmp_path / "run"), argparse.Namespace(lr=1e-3), "online", job="test")
    try:
        assert log.wandb is not None and log.wandb.settings.mode == "offline"
    finally:
        log.close()
    assert calls == [("online", runlog.WANDB_INIT_TIMEOUT_S), ("offline", runlog.WANDB_INIT_TIMEOUT_S)]
    assert runlog.WANDB_INIT_TIMEOUT_S <= 30
    assert "wandb online failed" in capsys.readouterr().err


@pytest.mark.parametrize("resume,want", [
    ("--resume", "interrupted: continue with: python reward_finetuning.py --lr 1e-4 --resume"),
    ("", "interrupted: continue with: python reward_finetuning.py --lr 1e-4"),
    (None, "interrupted: stopped before its results were written; run it again"),
])
def test_ctrl_c_prints_one_line_with_the_command_that_continues(monkeypatch, capsys, resume, want):
    from diffusion_policy.common.cli import run_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["reward_finetuning.py", "--lr", "1e-4"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted, lambda: None, resume=resume)
    err = capsys.readouterr().err
    assert exit_info.value.code == 130 and err.strip() == want and "Traceback" not in err
