"""training.calibrate: a decision threshold chosen by leave-one-fold-out selection over a sweep."""

import csv
import json

import pytest

from training.calibrate import leave_one_fold_out, main, sweep_table

# slice DSC of the patients per fold (0-3) at three mask thresholds: session 8's ensemble (docs/results.md)
SESSION8 = {0.4: (0.6260, 0.5895, 0.6105, 0.6043), 0.5: (0.6397, 0.5661, 0.6068, 0.5741),
            0.6: (0.6175, 0.5211, 0.5652, 0.5407)}


def _rows(table: dict, group: str = "cv_s0_x2", shift: str = "clean") -> list:
    return [{"label": f"{group}_f{f}", "fold": str(f), "shift": shift, "mask_threshold": str(v), "dsc_real": str(d),
             "box_dsc_real": "0.7"} for v, per_fold in table.items() for f, d in enumerate(per_fold)]


def test_each_fold_is_scored_at_the_value_chosen_on_the_other_folds():
    res = leave_one_fold_out(sweep_table(_rows(SESSION8), "cv_s0_x2", "mask_threshold"), "dsc_real", 0.5)
    assert {f: v for f, (v, _) in res["folds"].items()} == {0: 0.4, 1: 0.4, 2: 0.4, 3: 0.4}
    assert res["folds"][0][1] == pytest.approx(0.6260)  # fold 0 alone prefers 0.5, but the others choose
    assert res["nested"][0] == pytest.approx(sum(SESSION8[0.4]) / 4)
    assert res["all_folds_choice"] == 0.4
    # a value that one fold likes far more than the others: best over all folds, not credited to that fold
    lucky = {**SESSION8, 0.3: (0.99, 0.60, 0.60, 0.60)}
    res = leave_one_fold_out(sweep_table(_rows(lucky), "cv_s0_x2", "mask_threshold"), "dsc_real", 0.5)
    assert res["all_folds_choice"] == 0.3 and res["per_value"][0.3][0] == pytest.approx(0.6975)
    assert res["folds"][0] == (0.4, pytest.approx(0.6260))  # folds 1-3 alone prefer 0.4
    assert [res["folds"][f][0] for f in (1, 2, 3)] == [0.3, 0.3, 0.3]
    assert res["nested"][0] == pytest.approx((0.6260 + 3 * 0.60) / 4)


def test_ties_go_to_the_default_and_incomplete_values_do_not_compete():
    flat = {0.4: (0.5, 0.5), 0.5: (0.5, 0.5), 0.6: (0.5, 0.5)}
    rows = _rows(flat) + [r for r in _rows({0.45: (0.99, 0.99)}) if r["fold"] == "0"]
    res = leave_one_fold_out(sweep_table(rows, "cv_s0_x2", "mask_threshold"), "dsc_real", 0.5)
    assert res["all_folds_choice"] == 0.5 and all(v == 0.5 for v, _ in res["folds"].values())
    assert 0.45 not in res["per_value"]


def test_other_groups_and_shifts_are_ignored_and_conflicts_refused():
    rows = _rows(SESSION8) + _rows({0.4: (0.1,) * 4}, group="cv_s1") + _rows({0.4: (0.2,) * 4}, shift="lowdose3mm")
    table = sweep_table(rows, "cv_s0_x2", "mask_threshold")
    assert sorted(table) == [0.4, 0.5, 0.6] and table[0.4][2]["dsc_real"] == "0.6105"
    again = _rows(SESSION8) + [dict(_rows(SESSION8)[0], seconds="12.5")]  # the same setting evaluated twice
    assert sweep_table(again, "cv_s0_x2", "mask_threshold")[0.4][0]["dsc_real"] == "0.626"
    bad = _rows(SESSION8) + [dict(_rows(SESSION8)[0], dsc_real="0.1")]
    with pytest.raises(ValueError, match="two different results"):
        sweep_table(bad, "cv_s0_x2", "mask_threshold")
    with pytest.raises(ValueError, match="at least one value"):
        leave_one_fold_out(sweep_table(_rows({0.5: (0.5,)}), "cv_s0_x2", "mask_threshold"), "dsc_real", 0.5)


def test_command_line_writes_the_choice_and_refuses_a_missing_group(tmp_path, capsys):
    path = tmp_path / "results.csv"
    rows = _rows(SESSION8)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "choice.json"
    assert main([str(path), "--group", "cv_s0_x2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 0.4 | 60.76 +- 1.51 (4)" in text and "chosen on all folds (for a model trained on all data): **0.4**" in text
    choice = json.loads(out.read_text())
    assert choice["chosen_on_all_folds"] == 0.4 and choice["leave_one_fold_out"]["mean_pct"] == 60.76
    assert main([str(path), "--group", "nope"]) == 2
    assert "need one dsc_real per fold" in capsys.readouterr().err
