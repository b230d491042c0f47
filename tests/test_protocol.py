"""benchmarks/finetune_protocol.py: paired differences, the JSON it writes, and resuming."""

import contextlib
import hashlib
import importlib
import json
import os
import traceback
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import reward_finetuning
from benchmarks import file_digest, finetune_protocol, plot_protocol
from diffusion_policy.common.runtime import UserError


def test_start_changes_on_hand_made_outcomes():
    from diffusion_policy.common.stats import start_changes

    base_success, base_score = [1, 1, 0, 0, 0, 1], [1.0, 1.0, 0.93, 0.95, 0.4, 1.0]
    success, score = [1, 0, 1, 0, 1, 0], [1.0, 0.3, 1.0, 0.2, 1.0, 0.7]
    c = start_changes(success, score, base_success, base_score)
    assert (c["won"], c["lost"], c["base_successes"]) == (2, 2, 3)
    assert c["ruined"] == 2  # 1.0 -> 0.3 and 0.95 -> 0.2; 1.0 -> 0.7 is lost, not ruined
    assert (c["base_near_misses"], c["near_misses_converted"]) == (2, 1)  # 0.93 converted, 0.95 not


def test_the_start_changes_script_pairs_by_start(tmp_path):
    from benchmarks import start_changes

    def write(name, outcomes):
        path = tmp_path / name
        path.write_text(json.dumps({"episodes": [{"seed": s, "success": a, "score": b} for s, (a, b) in outcomes]}))
        return str(path)

    base = write("base.json", [(7, (1, 1.0)), (8, (0, 0.92)), (9, (0, 0.5))])
    ft = write("ft.json", [(9, (1, 1.0)), (7, (0, 0.1)), (8, (1, 1.0))])  # another order: paired by seed
    row = start_changes.main(start_changes.parse_args([base, ft]))["rows"][0]
    assert row["success_diff"] == pytest.approx(1 / 3) and (row["won"], row["lost"], row["ruined"]) == (2, 1, 1)
    assert row["near_misses_converted"] == 1
    with pytest.raises(SystemExit, match="different starts"):
        start_changes.main(start_changes.parse_args([base, write("other.json", [(7, (1, 1.0))])]))
    with pytest.raises(UserError, match="missing.json does not exist"):  # a run that has not ended: no traceback
        start_changes.main(start_changes.parse_args([base, str(tmp_path / "missing.json")]))


def test_paired_interval():
    ft, pre = np.array([1, 1, 0, 1, 0, 1]), np.array([0, 1, 0, 0, 0, 1])
    mean, (low, high) = finetune_protocol.paired(ft, pre)
    d = ft - pre
    assert mean == pytest.approx(d.mean())
    assert high - mean == pytest.approx(1.959964 * d.std(ddof=1) / np.sqrt(len(d)))
    assert mean - low == pytest.approx(high - mean)


@pytest.fixture(scope="module", autouse=True)
def jobs_in_process():
    """The protocol's jobs run as calls of the scripts' main in this process (one at a time:
    --parallel 1), not as subprocesses: the same code paths, without an interpreter start each."""
    def in_process(cmd, env, log):
        assert cmd[1].endswith(".py"), cmd
        module = importlib.import_module(os.path.splitext(os.path.basename(cmd[1]))[0])
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                module.main(module.parse_args(cmd[2:]))
            except BaseException:  # noqa: BLE001 -- a failed job, as a subprocess's exit status
                traceback.print_exc()
                return 1
        return 0

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_protocol, "run_job", in_process)
        yield


@pytest.fixture(scope="module")
def tiny_protocol(tiny_models, tmp_path_factory):
    """One tiny protocol run (two seeds, two iterations) that the tests below read and extend."""
    root, tmp = tiny_models, tmp_path_factory.mktemp("protocol")
    ft = ["--reward_model_path", str(root / "reward.ckpt"), "--num_ft_iters", "2", "--num_eps", "1",
          "--max_steps", "16", "--lr", "1e-2"]
    own = ["--name", "tiny", "--model_path", str(root / "policy.ckpt"), "--seeds", "0", "1", "--num_eval", "2",
           "--out_dir", str(tmp / "work"), "--results_dir", str(tmp / "results"), "--parallel", "1",
           "--beside", "1", "--tilt_every", "1"]
    result = finetune_protocol.main(finetune_protocol.parse_args(own + ["--"] + ft))
    return SimpleNamespace(root=root, tmp=tmp, ft=ft, own=own, result=result)


def test_protocol_writes_paired_results_and_resumes(tiny_protocol):
    tmp, result = tiny_protocol.tmp, tiny_protocol.result
    argv = tiny_protocol.own + ["--"] + tiny_protocol.ft
    saved = json.load(open(tmp / "results" / "finetune_tiny.json"))
    assert saved["method"] == "adjoint" and saved["reward_source"] == "model" and set(saved["runs"]) == {"0", "1"}
    # what reruns it: the protocol's flags, the runs' resolved config (every default filled in), commit, machine
    assert saved["config"]["finetune"]["params"] == {**asdict(reward_finetuning.METHODS["adjoint"].config_class()), "num_ft_iters": 2,
                                                     "num_eps": 1, "lr": 1e-2}
    assert saved["config"]["finetune"]["seed"] == "S" and saved["config"]["protocol"]["num_eval"] == 2
    assert saved["git_commit"]
    m = saved["machine"]  # the machine, precisely: results of other CPUs are told apart
    assert m["cores"] == os.cpu_count() and m["torch"] == torch.__version__ and m["threads_per_job"] == 1
    assert m["jobs_side_by_side"] == 2  # its one job and the one beside it (--beside 1)
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and m["cpu_model"] and "gpu" in m
    digest = file_digest(str(tiny_protocol.root / "policy.ckpt"))
    full = hashlib.sha256(open(tiny_protocol.root / "policy.ckpt", "rb").read()).hexdigest()
    assert saved["pretrained"]["sha256_full"] == full and saved["pretrained"]["sha256"] == full[:16]
    pre = json.load(open(tmp / "work" / f"pretrained_eval_2_{digest}.json"))["episodes"]
    for seed, run in saved["runs"].items():
        ft = json.load(open(tmp / "work" / "tiny" / f"seed{seed}_eval.json"))["episodes"]
        assert [e["seed"] for e in ft] == [100000, 100001]
        assert run["success_diff"] == pytest.approx(np.mean([a["success"] - b["success"] for a, b in zip(ft, pre)]))
        assert run["score_diff"] == pytest.approx(np.mean([a["score"] - b["score"] for a, b in zip(ft, pre)]))
        for key in ("success", "score", "success_diff_ci95", "tilt_realised", "tilt_predicted", "wall_s"):
            assert key in run
        assert run["machine"] == saved["machine"]["summary"]  # each seed says where it ran (sessions differ)
        assert run["starts"]["won"] == sum(a["success"] > b["success"] for a, b in zip(ft, pre))
        assert run["starts"]["ruined"] == sum(b["score"] - a["score"] > 0.5 for a, b in zip(ft, pre))
    assert saved["mean_success_diff"] == pytest.approx(np.mean([r["success_diff"] for r in saved["runs"].values()]))
    # ruin on the base's own scale: each run against the base under another draw of its noise (sampling seed 1)
    other = json.load(open(tmp / "work" / f"pretrained_eval_2_{digest}_noise1.json"))
    assert other["summary"]["model_path"] == str(tiny_protocol.root / "policy.ckpt")
    other = other["episodes"]
    assert saved["pretrained"]["other_noise"]["ruined_vs_itself"] == sum(
        b["score"] - a["score"] > 0.5 for a, b in zip(other, pre))
    for seed, run in saved["runs"].items():
        ft = json.load(open(tmp / "work" / "tiny" / f"seed{seed}_eval.json"))["episodes"]
        assert run["ruined_vs_other_noise"] == sum(b["score"] - a["score"] > 0.5 for a, b in zip(ft, other))
    assert result["wall_s_per_run"] > 0 and "--seed S" in saved["command"]

    png = plot_protocol.plot(str(tmp / "fig.png"), [str(tmp / "results" / "finetune_tiny.json")])
    assert os.path.getsize(png) > 1000

    stamp = os.path.getmtime(tmp / "work" / "tiny" / "seed0.ckpt")
    finetune_protocol.main(finetune_protocol.parse_args(argv))  # everything exists: nothing is redone
    assert os.path.getmtime(tmp / "work" / "tiny" / "seed0.ckpt") == stamp

    # one seed at a time, as separate processes of the same --name do: neither drops the other's
    seed1 = argv.index("1", argv.index("--seeds"))
    alone = finetune_protocol.main(finetune_protocol.parse_args(argv[:seed1] + argv[seed1 + 1:]))
    assert set(alone["runs"]) == {"0", "1"} and alone["runs"]["1"] == saved["runs"]["1"]
    assert alone["mean_success_diff"] == pytest.approx(saved["mean_success_diff"])
    assert set(json.load(open(tmp / "work" / "tiny" / "wall_s.json"))) == {"0", "1"}


def test_a_changed_flag_or_policy_is_never_reused_under_the_new_command(tiny_protocol, tmp_path):
    """The same --name with other fine-tuning flags is refused, naming the difference, and nothing of
    the earlier runs changes; another pre-trained policy file gets an evaluation of its own."""
    tmp, own, ft = tiny_protocol.tmp, tiny_protocol.own, tiny_protocol.ft
    before = {p: p.stat().st_mtime_ns for p in (tmp / "work").rglob("*") if p.is_file()}
    changed = ft[:ft.index("--lr")] + ["--lr", "2e-2"]
    with pytest.raises(UserError, match=r"seed0.ckpt was made from other inputs or flags \(flags: .*1e-2.*2e-2"):
        finetune_protocol.main(finetune_protocol.parse_args(own + ["--"] + changed))
    assert {p: p.stat().st_mtime_ns for p in (tmp / "work").rglob("*") if p.is_file()} == before

    other = tmp_path / "other_policy.ckpt"  # the same policy, one byte of provenance different
    ckpt = torch.load(tiny_protocol.root / "policy.ckpt", weights_only=True)
    ckpt["provenance"] = {**ckpt["provenance"], "note": "another file"}
    torch.save(ckpt, other)
    argv = [*own[:own.index("--model_path")], "--model_path", str(other), *own[own.index("--model_path") + 2:]]
    argv[argv.index("tiny")] = "tiny_other"
    argv = argv[:argv.index("--tilt_every")]  # the evaluations are what this checks: no tilt meter, one iteration
    one_iter = ft[:ft.index("--num_ft_iters")] + ["--num_ft_iters", "1"] + ft[ft.index("--num_ft_iters") + 2:]
    finetune_protocol.main(finetune_protocol.parse_args(argv + ["--seeds", "0", "--"] + one_iter))
    evals = sorted(p.name for p in (tmp / "work").glob("pretrained_eval_2_*.json")
                   if not p.name.endswith(".key.json") and not p.name.endswith("_noise1.json"))
    assert evals == sorted([f"pretrained_eval_2_{file_digest(str(tiny_protocol.root / 'policy.ckpt'))}.json",
                            f"pretrained_eval_2_{file_digest(str(other))}.json"])


def test_seeds_of_another_start_policy_are_not_merged(tiny_protocol, tmp_path):
    """A later protocol of the same --name and command whose start file differs (a rebuilt data/: the same
    path, other bytes) does not keep the earlier seeds: they were paired against another policy."""
    own, ft = tiny_protocol.own, tiny_protocol.ft
    policy = tmp_path / "policy.ckpt"
    ckpt = torch.load(tiny_protocol.root / "policy.ckpt", weights_only=True)
    torch.save(ckpt, policy)
    one_iter = ft[:ft.index("--num_ft_iters")] + ["--num_ft_iters", "1"] + ft[ft.index("--num_ft_iters") + 2:]

    def run(seed, out_dir):
        argv = ["--name", "merge", "--model_path", str(policy), "--seeds", seed, "--num_eval", "2",
                "--out_dir", str(out_dir), "--results_dir", str(tmp_path / "results"), "--parallel", "1",
                "--tilt_every", "0"]
        return finetune_protocol.main(finetune_protocol.parse_args(argv + ["--"] + one_iter))

    assert set(run("0", tmp_path / "a")["runs"]) == {"0"}
    assert set(run("1", tmp_path / "b")["runs"]) == {"0", "1"}  # the same file: seed 0 is kept
    ckpt["provenance"] = {**ckpt["provenance"], "note": "rebuilt"}
    torch.save(ckpt, policy)
    later = run("2", tmp_path / "c")
    assert set(later["runs"]) == {"2"} and later["pretrained"]["sha256"] == file_digest(str(policy))


def test_a_deployment_setting_is_judged_on_the_same_runs_without_training_them_again(tiny_models, tmp_path):
    """--eval_args scores the runs of --name with evaluate_policy.py flags of its own: the checkpoints are
    reused, never retrained, and a residual gated to act nowhere (--act_within 0.001 px) plays the base's
    episodes exactly, start by start (the same starts and sampling noise)."""
    root = tiny_models
    ft = ["--method", "residual_step", "--reward_source", "simulator", "--num_ft_iters", "2", "--num_eps", "1",
          "--grad_steps_per_iter", "4", "--batch_size", "8", "--buffer_size", "64", "--warmup_iters", "0",
          "--explore_horizon", "2", "--max_steps", "16"]
    own = ["--name", "dep", "--model_path", str(root / "policy.ckpt"), "--seeds", "0", "--num_eval", "3",
           "--out_dir", str(tmp_path / "work"), "--results_dir", str(tmp_path / "results"), "--parallel", "1",
           "--tilt_every", "0"]
    finetune_protocol.main(finetune_protocol.parse_args(own + ["--"] + ft))
    ckpt = tmp_path / "work" / "dep" / "seed0.ckpt"
    stamp = ckpt.stat().st_mtime_ns
    gated = finetune_protocol.main(finetune_protocol.parse_args(
        own + ["--eval_name", "nowhere", "--eval_args=--act_within 0.001", "--"] + ft))
    assert ckpt.stat().st_mtime_ns == stamp  # the same run, not trained again
    saved = json.load(open(tmp_path / "results" / "finetune_dep_nowhere.json"))
    assert saved["name"] == "dep_nowhere" and saved["command"].endswith("; evaluated with --act_within 0.001")
    assert (tmp_path / "results" / "finetune_dep.json").exists()  # the ungated judgement stays as it was
    pre = json.load(open(tmp_path / "work" / f"pretrained_eval_3_{file_digest(str(root / 'policy.ckpt'))}.json"))
    got = json.load(open(tmp_path / "work" / "dep" / "seed0_eval_nowhere.json"))
    assert [(e["seed"], e["score"], e["success"]) for e in got["episodes"]] == [
        (e["seed"], e["score"], e["success"]) for e in pre["episodes"]]
    assert gated["runs"]["0"]["success_diff"] == 0 and gated["runs"]["0"]["score_diff"] == 0
    acting = json.load(open(tmp_path / "work" / "dep" / "seed0_eval.json"))  # ungated, it plays other episodes
    assert [e["score"] for e in acting["episodes"]] != [e["score"] for e in pre["episodes"]]
    for bad in (["--eval_name", "x"], ["--eval_args=--act_within 30"], ["--eval_name", "a/b", "--eval_args=--act_within 3"]):
        with pytest.raises(SystemExit):
            finetune_protocol.parse_args(own + bad + ["--"] + ft)


def cut(path):
    """The file cut short as a full disk or a killed process leaves it: about its first half of bytes, ending
    inside a value (a cut that happened to fall after a whole line or object would leave a shorter whole file)."""
    data = path.read_bytes()
    n = len(data) // 2
    while data[n - 1:n] in (b"\n", b"}", b"]"):
        n -= 1
    path.write_bytes(data[:n])


@pytest.mark.parametrize("kind", ["pretrained eval", "seed eval", "eval record", "wall times"])
def test_a_damaged_evaluation_or_record_of_times_is_made_again_never_paired(tiny_protocol, tmp_path, kind, capsys):
    import shutil

    tmp = tiny_protocol.tmp
    shutil.copytree(tmp / "work", tmp_path / "work")
    shutil.copytree(tmp / "results", tmp_path / "results")
    argv = [*tiny_protocol.own, "--out_dir", str(tmp_path / "work"), "--results_dir", str(tmp_path / "results")]
    digest = file_digest(str(tiny_protocol.root / "policy.ckpt"))
    victim = {"pretrained eval": tmp_path / "work" / f"pretrained_eval_2_{digest}.json",
              "seed eval": tmp_path / "work" / "tiny" / "seed1_eval.json",
              "eval record": tmp_path / "work" / "tiny" / "seed0_eval.json.key.json",
              "wall times": tmp_path / "work" / "tiny" / "wall_s.json"}[kind]
    whole = json.loads(victim.read_text())
    cut(victim)
    result = finetune_protocol.main(finetune_protocol.parse_args(argv + ["--"] + tiny_protocol.ft))
    said = capsys.readouterr().out
    assert f"{victim.name} is damaged" in said or f"{victim.name.replace('.key.json', '')} is damaged" in said
    if kind == "wall times":  # a record of times: its seeds' times are lost, the result is not
        assert all(r["wall_s"] is None for r in result["runs"].values())
    else:  # made again, the same deterministic evaluation: the same episodes (or record), paired as before
        again = json.loads(victim.read_text())
        assert again.get("episodes", again) == whole.get("episodes", whole)
    for seed, run in tiny_protocol.result["runs"].items():
        assert result["runs"][seed]["success_diff"] == run["success_diff"]
        assert result["runs"][seed]["score_diff"] == run["score_diff"]


@pytest.mark.parametrize("kind", ["checkpoint", "checkpoint record", "run config", "run metrics", "result"])
def test_a_damaged_checkpoint_or_run_record_is_named_in_one_line_before_any_work(tiny_protocol, tmp_path, kind):
    import shutil

    tmp = tiny_protocol.tmp
    shutil.copytree(tmp / "work", tmp_path / "work")
    shutil.copytree(tmp / "results", tmp_path / "results")
    argv = [*tiny_protocol.own, "--out_dir", str(tmp_path / "work"), "--results_dir", str(tmp_path / "results")]
    victim = {"checkpoint": tmp_path / "work" / "tiny" / "seed0.ckpt",
              "checkpoint record": tmp_path / "work" / "tiny" / "seed1.ckpt.key.json",
              "run config": tmp_path / "work" / "tiny" / "seed1" / "config.json",
              "run metrics": tmp_path / "work" / "tiny" / "seed0" / "metrics.jsonl",
              "result": tmp_path / "results" / "finetune_tiny.json"}[kind]
    cut(victim)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    name = victim.name.replace(".key.json", "")
    with pytest.raises(UserError, match=rf"{name}.* is damaged|{name} is damaged") as e:
        finetune_protocol.main(finetune_protocol.parse_args(argv + ["--"] + tiny_protocol.ft))
    assert "\n" not in str(e.value)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing made or paired


def test_each_seeds_result_is_written_before_the_next_seed_trains(tiny_models, tmp_path, monkeypatch):
    """One job at a time (--parallel 1): seed 0's paired result is on disk while seed 1 trains, so a session that
    ends mid-protocol keeps every finished seed's result (before, the base's second noise draw was queued behind
    every seed, and nothing was written until the last had ended)."""
    results, seen = tmp_path / "results" / "finetune_each.json", []
    in_process = finetune_protocol.run_job

    def watch(cmd, env, log):  # what is on disk when each seed's fine-tuning has run (seed 0's evaluation came between)
        rc = in_process(cmd, env, log)
        if cmd[1].endswith("reward_finetuning.py"):
            seen.append(sorted(json.load(open(results))["runs"]) if results.exists() else [])
        return rc

    monkeypatch.setattr(finetune_protocol, "run_job", watch)
    finetune_protocol.main(finetune_protocol.parse_args([
        "--name", "each", "--model_path", str(tiny_models / "policy.ckpt"), "--seeds", "0", "1", "--num_eval", "2",
        "--out_dir", str(tmp_path / "work"), "--results_dir", str(tmp_path / "results"), "--parallel", "1", "--",
        "--reward_model_path", str(tiny_models / "reward.ckpt"), "--num_ft_iters", "1", "--num_eps", "1",
        "--max_steps", "16"]))
    assert seen == [[], ["0"]]
