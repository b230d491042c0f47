"""The run's trail: a resumed run keeps the rows up to where it resumes, even after a crash mid-row."""

import argparse
import json

from diffusion_policy.common.runlog import RunLog


def test_resume_drops_a_row_cut_short_and_the_rows_it_redoes(tmp_path):
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}, {"step": 3, "loss": 0.3}]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 4, "lo')  # the process died while writing
    log = RunLog(str(tmp_path), argparse.Namespace(lr=1.0), resume=True, resume_at=2)
    log.log({"loss": 0.35}, 3)
    kept = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in kept] == [1, 2, 3] and kept[-1]["loss"] == 0.35
