"""The Airflow DAGs in dags/: they parse cleanly without heavy imports, and `recaption_corpus` runs end to end.

Airflow runs in subprocesses with its own AIRFLOW_HOME (SQLite): importing airflow here would configure
logging and settings for the whole test session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
AIRFLOW = str(VENV_BIN / "airflow")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("airflow") is None, reason="the dags extra is not installed: pip install -e '.[dags]'"
)

# The same filter decisions as configs/smoke.yaml, minus the work that does not change them here: no CLIP
# model or dedup, one actor per CPU stage.
FAST_OVERRIDES = [
    "filter.clip.model=null",
    "filter.dedup.enabled=false",
    "ingest.resources.concurrency=1",
    "split.resources.concurrency=1",
    "filter.resources.concurrency=1",
]

DAGBAG_PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({
    "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "tasks": {d.dag_id: [t.task_id for t in d.topological_sort()] for d in bag.dags.values()},
    "upstream": {d.dag_id: {t.task_id: sorted(t.upstream_task_ids) for t in d.tasks} for d in bag.dags.values()},
    "params": {d.dag_id: sorted(d.params.keys()) for d in bag.dags.values()},
    "heavy_modules": sorted(m for m in ("ray", "torch", "pipeline", "pipeline.jobs", "av") if m in sys.modules),
}))
"""


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k != "RAY_ADDRESS"}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(PROJECT_ROOT / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PYTHONPATH=str(PROJECT_ROOT),
    )
    return env


def _airflow(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AIRFLOW, *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_dagbag_loads_both_dags_in_order_without_heavy_imports(airflow_env):
    proc = subprocess.run(
        [sys.executable, "-c", DAGBAG_PROBE, str(PROJECT_ROOT / "dags")],
        env=airflow_env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    bag = json.loads(proc.stdout.strip().splitlines()[-1])
    assert bag["import_errors"] == {}
    assert bag["tasks"] == {
        "recaption_corpus": [
            "ingest", "split", "filter", "caption", "encode", "validate", "training_conf", "trigger_training",
        ],
        "train_on_shards": ["train"],
    }  # fmt: skip
    # A strict chain: every task waits for exactly the one before it.
    order = bag["tasks"]["recaption_corpus"]
    assert bag["upstream"]["recaption_corpus"] == {t: ([order[i - 1]] if i else []) for i, t in enumerate(order)}
    assert {"input", "output", "config", "ray_address", "trigger_training", "train_config"} <= set(
        bag["params"]["recaption_corpus"]
    )
    assert {"shards", "train_config", "output", "ray_address"} <= set(bag["params"]["train_on_shards"])
    # Parsing a DAG file must not import Ray, torch or recap itself (they load inside tasks).
    assert bag["heavy_modules"] == []


@pytest.mark.slow
def test_recaption_corpus_runs_end_to_end_locally(airflow_env, sample_videos, tmp_path):
    sample_dir, truth = sample_videos
    output = tmp_path / "corpus"
    for args in (["db", "migrate"], ["dags", "reserialize"]):
        proc = _airflow(args, airflow_env, timeout=180)
        assert proc.returncode == 0, f"airflow {' '.join(args)}:\n{proc.stderr[-3000:]}"
    conf = {
        "input": [str(sample_dir / "sample-three-shots.mp4")],
        "output": str(output),
        "config": "configs/smoke.yaml",
        "overrides": FAST_OVERRIDES,
    }
    proc = _airflow(["dags", "test", "recaption_corpus", "-c", json.dumps(conf)], airflow_env, timeout=480)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    # Each stage ran as its own `recap` command and printed its summary.
    for stage in ("ingest", "split", "filter", "caption", "encode"):
        assert f"\n  {stage} " in log, f"no {stage} summary in the DAG's log"

    with sqlite3.connect(Path(airflow_env["AIRFLOW_HOME"]) / "airflow.db") as db:
        states = dict(db.execute("select task_id, state from task_instance where dag_id = 'recaption_corpus'"))
    assert states == {
        **{t: "success" for t in ("ingest", "split", "filter", "caption", "encode", "validate", "training_conf")},
        "trigger_training": "skipped",  # trigger_training defaults to off
    }

    validate = subprocess.run(
        [str(VENV_BIN / "recap"), "manifest", "validate", str(output)], capture_output=True, text=True, check=False
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    from pipeline import manifest

    clips = manifest.read_table(str(output), "clips").to_pylist()
    # The split task found the sample's known cuts, and every passing clip became exactly one sample.
    assert sorted(c["scene_start_frame"] for c in clips)[1:] == truth["sample-three-shots.mp4"]
    passed = {c["clip_id"] for c in clips if c["passed"]}
    assert passed
    assert sorted(s["key"] for s in manifest.read_table(str(output), "samples").to_pylist()) == sorted(passed)
