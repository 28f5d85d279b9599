"""Several processes: ``--trainer.devices 2 --trainer.strategy ddp`` on CPU (gloo) equals one process.

Lightning's ``ddp`` relaunches the running script for rank 1, so the DDP runs happen in a
subprocess running a small script; the single-process references run in this process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kelight.cli.main import run
from kelight.methods.distributed import EditDDPStrategy, gather_objects, interleave
from kelight.runs.outputs import append_partial, partial_path, write_results
from tests.cli.test_main import COMMON, ROOT, _case_file

BATCH = ["--model.regime", "batch", "--data.batch_size", "2"]  # joint groups {0, 1}, {2, 3}, {4}
DDP_SCRIPT = textwrap.dedent('''
    """Rank 0 is started by test_ddp; Lightning starts rank 1 with the same arguments."""
    import json, sys
    import torch
    from kelight.cli.main import run
    from kelight.models.tiny import tiny_model

    base, out, BATCH = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    run(["fit", *base, *ddp, "--trainer.default_root_dir", f"{out}/fit"])
    run(["validate", *base, *ddp, "--trainer.default_root_dir", f"{out}/validate"])
    run(["fit", *base, *ddp, *BATCH, "--trainer.default_root_dir", f"{out}/batch"])
    run(["fit", *base, *ddp, "--model.resume", "true", "--trainer.default_root_dir", f"{out}/resumed"])
    cli = run(["fit", *base, *ddp, "--model.regime", "sequential", "--trainer.default_root_dir", f"{out}/sequential"])
    fresh, _ = tiny_model("llama")
    pairs = zip(cli.model.lm.state_dict().values(), fresh.state_dict().values(), strict=True)
    report = {"restored": all(torch.equal(a, b) for a, b in pairs), "world": cli.trainer.world_size}
    (open(f"{out}/rank{cli.trainer.global_rank}.json", "w")).write(json.dumps(report))
''')


def test_interleave_restores_dataset_order() -> None:
    assert interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]
    assert interleave([[0, 3], [1, 4], [2]]) == [0, 1, 2, 3, 4]
    assert interleave([]) == []
    assert gather_objects({"a": 1}) == [{"a": 1}]  # no process group: this process only
    assert EditDDPStrategy().strategy_name == "ddp_edit"


def test_partial_log_per_rank(tmp_path: Path) -> None:
    append_partial(tmp_path, {"id": 0}, rank=0)
    append_partial(tmp_path, {"id": 1}, rank=1)
    assert partial_path(tmp_path).name == "cases.partial.jsonl"
    assert partial_path(tmp_path, 1).read_text() == '{"id": 1}\n'
    write_results(tmp_path, {"n_cases": 2.0}, [{"id": 0}, {"id": 1}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.jsonl", "metrics.json"]


def _five_distinct_cases(tmp_path: Path) -> Path:
    """5 cases (odd: shards of 3 and 2), alternating sources, so rank 0 sees only "counterfact"."""
    pair = json.loads(_case_file(tmp_path).read_text())
    records = []
    for i, word in enumerate(["Rome", "Peru", "Oslo", "Chile", "Lima"]):
        record = json.loads(json.dumps(pair[i % 2]))
        record["requested_rewrite"]["target_new"] = word
        record["rewrite"]["targets"] = [word]
        if "p-paraphrase" in record:
            record["p-paraphrase"]["targets"] = [word]
        records.append(record)
    path = tmp_path / "five.json"
    path.write_text(json.dumps(records))
    return path


def _results(out: Path) -> tuple[dict, list[dict]]:
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text()), rows


def _assert_same(ddp: dict, single: dict) -> None:
    assert ddp.keys() == single.keys()
    for key, value in single.items():
        if isinstance(value, float) and key not in ("seconds_per_edit", "edit_seconds"):
            assert math.isclose(ddp[key], value, rel_tol=1e-9, abs_tol=1e-9), key
        elif not isinstance(value, float):
            assert ddp[key] == value, key


def test_ddp_equals_single_process(tmp_path: Path) -> None:
    base = [
        "--config",
        str(ROOT / "configs/smollm2/rome.yaml"),
        *COMMON,
        "--model.editor.layer",
        "1",
        "--data.path",
        str(_five_distinct_cases(tmp_path)),
    ]
    for stage in ("fit", "validate"):  # references; also fills the covariance cache the ranks share
        run([stage, *base, "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / stage)])
    run(["fit", *base, *BATCH, "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "batch")])
    kept = tmp_path / "ddp" / "resumed"  # a run stopped with case 0 done by rank 0 and case 3 by rank 1
    kept.mkdir(parents=True)
    fit_rows = _results(tmp_path / "fit")[1]
    (kept / "cases.partial.jsonl").write_text(json.dumps(fit_rows[0]) + "\n")
    (kept / "cases.partial.rank1.jsonl").write_text(json.dumps(fit_rows[3]) + "\n")
    script = tmp_path / "ddp_runs.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(base), str(tmp_path / "ddp"), json.dumps(BATCH)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("fit", "validate", "batch", "resumed"):  # batch: each process makes the one-process joint edits
        reference = tmp_path / ("fit" if stage == "resumed" else stage)
        (ddp, ddp_rows), (single, single_rows) = _results(tmp_path / "ddp" / stage), _results(reference)
        assert ddp["n_cases"] == 5 and "counterfact/ES" in ddp and "wikidata/RS" in ddp
        _assert_same(ddp, single)
        assert [r["id"] for r in ddp_rows] == [0, 1, 2, 3, 4]  # each case once, dataset order
        for a, b in zip(ddp_rows, single_rows, strict=True):
            _assert_same(a, b)
        assert not list((tmp_path / "ddp" / stage).glob("cases.partial*"))
    sequential, rows = _results(tmp_path / "ddp" / "sequential")  # per-shard sequences: counts only
    assert sequential["n_cases"] == 5 and sorted(r["id"] for r in rows) == [0, 1, 2, 3, 4]
    for rank in (0, 1):  # both processes end with the unedited weights, bit for bit
        assert json.loads((tmp_path / "ddp" / f"rank{rank}.json").read_text()) == {"restored": True, "world": 2}
