"""benchmarks/outcome_flips.py: won and lost starts, near and far misses, from evaluation files."""

import json

import pytest

from benchmarks import outcome_flips


def write_eval(path, rows):
    eps = [{"seed": 100000 + i, "success": s, "score": c, "max_coverage": c, "steps_to_success": -1}
           for i, (s, c) in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"episodes": eps}))


def test_flips_count_won_lost_and_misses(tmp_path):
    pre = [(True, 0.96), (False, 0.93), (False, 0.5), (True, 0.97), (False, 0.92)]
    ft = [(True, 0.96), (True, 0.96), (False, 0.95), (False, 0.80), (False, 0.91)]
    write_eval(tmp_path / "pretrained_eval_5.json", pre)
    write_eval(tmp_path / "run" / "seed0_eval.json", ft)
    out = outcome_flips.main(outcome_flips.parse_args(
        ["--name", "run", "--out_dir", str(tmp_path), "--num_eval", "5", "--json", str(tmp_path / "o.json")]))
    row = out["settings"]["run"]["0"]
    assert (row["won"], row["lost"], row["starts"]) == (1, 1, 5)
    assert row["success_diff"] == pytest.approx(0.0)
    assert row["fine_tuned"] == {"near_misses": 2, "far_misses": 1}  # 0.95 and 0.91 near, 0.80 far
    assert row["pretrained"] == {"near_misses": 2, "far_misses": 1}
    assert json.loads((tmp_path / "o.json").read_text())["settings"]["run"]["0"] == row
    write_eval(tmp_path / "other" / "seed0_eval.json", ft[:4] + [(True, 0.96)])
    (tmp_path / "other" / "seed0_eval.json").write_text(
        (tmp_path / "other" / "seed0_eval.json").read_text().replace("100004", "100009"))
    with pytest.raises(SystemExit, match="different starts"):
        outcome_flips.main(outcome_flips.parse_args(["--name", "other", "--out_dir", str(tmp_path), "--num_eval", "5"]))
