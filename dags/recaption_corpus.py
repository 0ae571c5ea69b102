"""Airflow DAG `recaption_corpus`: raw videos -> captioned, latent-encoded shards, one task per recap stage.

With `ray_address` (a Ray dashboard, e.g. http://head:8265) every task is a Ray job on that cluster, followed to
its end; without, each task runs `recap STAGE` in a local subprocess. Only airflow is imported at parse time.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, get_current_context, task

STAGES = ("ingest", "split", "filter", "caption", "encode")


def _run_recap(argv: list[str]) -> None:
    """Run a recap command the way this run's params say: as a Ray job, or locally."""
    from pipeline import jobs

    context = get_current_context()
    params, ti = context["params"], context["ti"]
    # One submission id per try; a retry stops its earlier tries' jobs if they still run (a lost Airflow
    # worker leaves its Ray job behind), then re-runs the command, which recap's resume makes safe.
    ids = jobs.submission_ids(ti.dag_id, ti.run_id, ti.task_id, tries=ti.try_number)
    jobs.run_command(
        argv,
        address=params["ray_address"] or None,
        submission_id=ids[-1],
        supersedes=ids[:-1],
        runtime_env=params["runtime_env"] or None,
    )


@task
def run_stage(stage: str, corpus: str | None = None) -> str:
    """Run one recap stage on the corpus; returns the corpus path for the next task (paths, not data)."""
    from pipeline.jobs import recap_stage_argv

    params = get_current_context()["params"]
    inputs = [params["input"]] if isinstance(params["input"], str) else list(params["input"])
    argv = recap_stage_argv(
        stage,
        corpus or params["output"],
        inputs=inputs if stage == "ingest" else (),
        config=params["config"] or None,
        overrides=params["overrides"],
        recap=params["recap_command"],
    )
    _run_recap(argv)
    return corpus or params["output"]


@task
def validate(corpus: str) -> str:
    """`recap manifest validate`: fails the run if any shard disagrees with the manifest."""
    _run_recap([get_current_context()["params"]["recap_command"], "manifest", "validate", corpus])
    return corpus


@task.short_circuit
def training_conf(corpus: str) -> dict | bool:
    """The conf for `train_on_shards`, or False (which skips the trigger) when trigger_training is off."""
    params = get_current_context()["params"]
    if not params["trigger_training"]:
        return False
    if not params["train_output"]:
        raise ValueError("trigger_training needs train_output (the training run directory)")
    return {
        "shards": corpus,
        "train_config": params["train_config"],
        "output": params["train_output"],
        "ray_address": params["ray_address"],
        "recap_command": params["recap_command"],
        "runtime_env": params["runtime_env"],
    }


@dag(
    dag_id="recaption_corpus",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["recap"],
    doc_md=__doc__,
    params={
        "input": Param([], type=["array", "string"], description="video files, directories, globs or fsspec URIs"),
        "output": Param("", type="string", minLength=1, description="corpus directory or URI"),
        "config": Param("", type="string", description="recap YAML config (empty: built-in defaults)"),
        "overrides": Param([], type="array", items={"type": "string"}, description="--set KEY=VALUE overrides"),
        "ray_address": Param("", type="string", description="Ray dashboard, e.g. http://head:8265; empty: local"),
        "recap_command": Param("recap", type="string", description="the recap executable where commands run"),
        "runtime_env": Param({}, type="object", description="Ray job runtime_env (env_vars, ...)"),
        "trigger_training": Param(False, type="boolean", description="trigger train_on_shards on the new corpus"),
        "train_config": Param("", type="string", description="trainer YAML for train_on_shards"),
        "train_output": Param("", type="string", description="training run directory for train_on_shards"),
    },
)
def recaption_corpus() -> None:
    corpus = None
    for stage in STAGES:
        corpus = run_stage.override(task_id=stage)(stage, corpus)
    conf = training_conf(validate(corpus))
    TriggerDagRunOperator(task_id="trigger_training", trigger_dag_id="train_on_shards", conf=conf)


recaption_corpus()
