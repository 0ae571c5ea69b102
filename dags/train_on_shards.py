"""Airflow DAG `train_on_shards`: train the DiT on a recap corpus's shards with `recap train`.

With `ray_address` (a Ray dashboard, e.g. http://head:8265) it runs `recap train --ray` as a Ray job on that
cluster (Ray Train workers); without, `recap train` runs in a local subprocess. Only airflow is imported at
parse time. `recaption_corpus` triggers it with the new corpus as `shards`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task


@task
def train() -> str:
    """Run `recap train` to completion; returns the run directory. Re-running resumes from its checkpoints."""
    from pipeline import jobs

    context = get_current_context()
    params, ti = context["params"], context["ti"]
    address = params["ray_address"] or None
    argv = jobs.recap_train_argv(
        params["shards"],
        params["output"],
        config=params["train_config"] or None,
        steps=params["steps"],
        ray=bool(address) or params["num_workers"] > 1 or params["use_gpu"],
        num_workers=params["num_workers"],
        use_gpu=params["use_gpu"],
        recap=params["recap_command"],
    )
    ids = jobs.submission_ids(ti.dag_id, ti.run_id, ti.task_id, tries=ti.try_number)
    jobs.run_command(
        argv, address=address, submission_id=ids[-1], supersedes=ids[:-1], runtime_env=params["runtime_env"] or None
    )
    return params["output"]


@dag(
    dag_id="train_on_shards",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
    tags=["recap"],
    doc_md=__doc__,
    params={
        "shards": Param("", type="string", minLength=1, description="corpus directory (or shard URIs) to train on"),
        "train_config": Param("", type="string", description="trainer YAML (empty: built-in defaults)"),
        "output": Param("", type="string", minLength=1, description="run directory: metrics, checkpoints"),
        "steps": Param(None, type=["null", "integer"], description="optimizer steps (default: the config's)"),
        "num_workers": Param(1, type="integer", minimum=1, description="Ray Train workers"),
        "use_gpu": Param(False, type="boolean", description="one GPU per Ray Train worker"),
        "ray_address": Param("", type="string", description="Ray dashboard, e.g. http://head:8265; empty: local"),
        "recap_command": Param("recap", type="string", description="the recap executable where commands run"),
        "runtime_env": Param({}, type="object", description="Ray job runtime_env (env_vars, ...)"),
    },
)
def train_on_shards() -> None:
    train()


train_on_shards()
