"""The network-types table: types matched to the course LoRA's file size, and conclusions only beyond the spread."""

import pytest

from lora_nb import network_comparison as nc
from lora_nb.config import preset
from lora_nb.models import load_model_for


def test_each_type_is_matched_to_the_course_loras_file_size_at_the_courses_alpha_over_rank():
    course = preset("toy")
    model = load_model_for(course)
    matched = nc.matched_networks(model, course)
    assert [m[0] for m in matched] == ["lora", "locon", "loha", "lokr", "lora-dora"]
    target = matched[0][2]
    assert target == nc.file_size_for(model, course, {})
    assert matched[-1][1] == {"network.dora": True} and target < matched[-1][2] < 1.15 * target
    for network_type, overrides, size in matched[1:-1]:
        assert overrides["network.type"] == network_type
        assert abs(size - target) / target < 0.15, (network_type, size, target)  # the nearest the ranks allow
        assert overrides["network.alpha"] / overrides["network.rank"] == course.network.alpha / course.network.rank
        assert size == nc.file_size_for(model, course, overrides)


def _row(name, fidelity, spread):
    measures = ("fidelity", "generalisation", "memorization", "leakage")
    return {"name": name, "what": name, "bytes": 1000, "mean": {m: fidelity for m in measures},
            "spread": {m: spread for m in measures}, "n": 3}


def test_a_difference_counts_only_beyond_the_spread_between_seeds():
    rows = [_row("lora", 0.80, 0.05), _row("locon", 0.83, 0.04), _row("loha", 0.60, 0.05)]
    got = {(c["row"], c["measure"]): c["conclusion"] for c in nc.conclude(rows)}
    assert got[("locon", "fidelity")] == "no difference this experiment can resolve"
    assert got[("loha", "fidelity")] == "lower" and got[("loha", "leakage")] == "lower"
    text = nc.format_comparison({"rows": rows, "conclusions": nc.conclude(rows), "seeds": [0, 1, 2],
                                 "sample_seeds": [0, 1], "steps": 20}, "lora-nb compare-networks --seeds 3", "today")
    assert "| locon | fidelity | 0.80 | 0.83 | +0.03 | 0.05 | no difference this experiment can resolve |" in text
    assert "Reproduce: `lora-nb compare-networks --seeds 3`" in text


def test_the_command_refuses_fewer_than_one_seed(tmp_path):
    from lora_nb import LoraNbError

    with pytest.raises(LoraNbError, match="seeds"):
        nc.run_comparison(tmp_path, seeds=0)


def test_only_names_rows_of_the_table(tmp_path):
    from lora_nb import LoraNbError

    with pytest.raises(LoraNbError, match="lora-dorra: no such row; the rows are lora, locon, loha, lokr, lora-dora"):
        nc.run_comparison(tmp_path, seeds=1, only=["lora-dorra"])


def test_two_sweeps_in_one_folder_are_refused_naming_the_first(tmp_path):
    """The remedies table and the network comparison hold their ``--out`` folder: a second sweep there is
    refused with the holder's pid and the way out, before it trains or writes anything."""
    import json
    import socket
    import subprocess

    from lora_nb.remedies import run_table
    from lora_nb.runstate import WorkspaceBusy

    holder = subprocess.Popen(["sleep", "60"])
    try:
        for sweep, out in ((run_table, tmp_path / "table"), (nc.run_comparison, tmp_path / "networks")):
            out.mkdir()
            (out / ".lora-nb.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                           "what": "experiments", "started": "now",
                                                           "command": "lora-nb experiments"}))
            with pytest.raises(WorkspaceBusy, match=rf"in use: experiments by process {holder.pid} .*another --out"):
                sweep(out, seeds=1)
            assert [p.name for p in out.iterdir()] == [".lora-nb.lock"]
    finally:
        holder.kill()
