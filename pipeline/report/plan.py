"""Projection: how long a corpus of a given size would take on a given cluster, from this run's measured throughput.

Each stage's cost is measured as CPU- and GPU-seconds per hour of source video (wall seconds x the resources its
actor pools held); a target corpus scales those linearly and spreads them over the cluster's CPUs and GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STAGES = ("ingest", "split", "filter", "caption", "encode")

# config path of every actor pool a stage runs (filter's CLIP pool only when a CLIP model is set)
_POOLS: dict[str, tuple[tuple[str, ...], ...]] = {
    "ingest": (("ingest", "resources"),),
    "split": (("split", "resources"),),
    "filter": (("filter", "resources"), ("filter", "clip", "resources")),
    "caption": (("caption", "preprocess_resources"), ("caption", "resources")),
    "encode": (("encode", "prep_resources"), ("encode", "resources")),
}


def _dig(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = config
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def stage_resources(config: dict[str, Any], stage: str) -> tuple[float, float]:
    """(CPUs, GPUs) a stage's actor pools held, per its config; CPUs capped by `ray.num_cpus` when set."""
    cpus = gpus = 0.0
    for path in _POOLS[stage]:
        if path[:2] == ("filter", "clip") and not _dig(config, ("filter", "clip", "model")):
            continue
        pool = _dig(config, path) or {}
        concurrency = float(pool.get("concurrency") or 1)
        cpus += concurrency * float(pool.get("num_cpus") or 0)
        gpus += concurrency * float(pool.get("num_gpus") or 0)
    ray_cpus = _dig(config, ("ray", "num_cpus"))
    if ray_cpus:
        cpus = min(cpus, float(ray_cpus))
    if not cpus and not gpus:  # a pool that declares nothing still runs somewhere
        cpus = 1.0
    return cpus, gpus


@dataclass
class StageCost:
    """One stage's measured cost, per hour of source video."""

    stage: str
    seconds: float
    cpus: float
    gpus: float
    cpu_s_per_video_hour: float
    gpu_s_per_video_hour: float


@dataclass
class StagePlan:
    stage: str
    wall_s: float
    cpu_hours: float
    gpu_hours: float
    bound_by: str  # "cpu" or "gpu"


@dataclass
class Plan:
    """A projection for `video_hours` of source video on `gpus` GPUs and `cpus` CPUs."""

    video_hours: float
    gpus: int
    cpus: int
    measured_video_hours: float
    stages: list[StagePlan]
    missing_stages: list[str]
    storage: list[dict[str, Any]] = field(default_factory=list)
    expected_samples: float | None = None
    notes: list[str] = field(default_factory=list)
    infeasible: list[str] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.stages)

    @property
    def bounding_stage(self) -> str | None:
        return max(self.stages, key=lambda s: s.wall_s).stage if self.stages else None

    @property
    def storage_bytes(self) -> float:
        return sum(b["bytes"] for b in self.storage)

    def to_dict(self) -> dict[str, Any]:
        return {
            "video_hours": self.video_hours,
            "gpus": self.gpus,
            "cpus": self.cpus,
            "measured_video_hours": self.measured_video_hours,
            "wall_s": self.wall_s,
            "bounding_stage": self.bounding_stage,
            "stages": [vars(s) for s in self.stages],
            "missing_stages": self.missing_stages,
            "infeasible": self.infeasible,
            "expected_samples": self.expected_samples,
            "storage": self.storage,
            "storage_bytes": self.storage_bytes,
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        """A plain-text summary (what `recap report --plan` prints)."""
        out = [
            f"plan: {self.video_hours:,.1f} h of video on {self.gpus} GPU(s) and {self.cpus} CPU(s), "
            f"from {self.measured_video_hours * 60:.1f} min measured"
        ]
        for s in self.stages:
            out.append(
                f"  {s.stage:<8} {format_duration(s.wall_s):>10}  {s.cpu_hours:10,.1f} CPU-h  {s.gpu_hours:9,.1f} GPU-h"
                f"  ({s.bound_by}-bound)"
            )
        out.append(f"  total    {format_duration(self.wall_s):>10}  bounded by {self.bounding_stage or '-'}")
        out.extend(f"  cannot run: {text}" for text in self.infeasible)
        if self.missing_stages:
            out.append(f"  not measured (did not run): {', '.join(self.missing_stages)}")
        if self.storage:
            out.append(
                f"  latent shards: {format_bytes(self.storage_bytes)} for {self.expected_samples or 0:,.0f} samples"
            )
            for b in self.storage:
                out.append(f"    bucket {b['bucket']:<16} {b['samples']:14,.0f} samples  {format_bytes(b['bytes'])}")
        elif self.expected_samples is not None:
            out.append(
                f"  expected samples: {self.expected_samples:,.0f} (latent sizes not measured: encode did not run)"
            )
        out.extend(f"  note: {n}" for n in self.notes)
        return out


def measure_costs(run: dict[str, Any], video_hours: float) -> list[StageCost]:
    """Per-stage cost per hour of source video, for the stages that finished in this run."""
    config = run.get("config") or {}
    costs = []
    for stage in STAGES:
        info = (run.get("stages") or {}).get(stage) or {}
        seconds = info.get("seconds")
        if seconds is None or info.get("status") not in (None, "done") or video_hours <= 0:
            continue
        cpus, gpus = stage_resources(config, stage)
        costs.append(
            StageCost(
                stage=stage,
                seconds=float(seconds),
                cpus=cpus,
                gpus=gpus,
                cpu_s_per_video_hour=float(seconds) * cpus / video_hours,
                gpu_s_per_video_hour=float(seconds) * gpus / video_hours,
            )
        )
    return costs


def project(
    costs: list[StageCost],
    measured_video_hours: float,
    video_hours: float,
    gpus: int,
    cpus: int,
    samples_by_bucket: dict[str, tuple[int, float]] | None = None,
    units_per_video_hour: float | None = None,
) -> Plan:
    """Scale measured stage costs to `video_hours` on a cluster of `gpus` GPUs and `cpus` CPUs.

    A stage's work spreads over all the cluster's CPUs (and GPUs, for a stage that held GPUs): its wall time is
    the larger of CPU-seconds / CPUs and GPU-seconds / GPUs; stages run one after another, as `recap run` does.
    `samples_by_bucket`: bucket -> (samples, mean bytes per sample) measured in this corpus; `units_per_video_hour`:
    expected samples (or passing clips, before encode ran) per hour of video.
    """
    if not video_hours > 0:
        raise ValueError(f"--plan must be a positive number of hours of video (got {video_hours})")
    if cpus < 1:
        raise ValueError(f"--cpus must be at least 1 (got {cpus})")
    if gpus < 0:
        raise ValueError(f"--gpus must not be negative (got {gpus})")
    measured = {c.stage for c in costs}
    plan = Plan(
        video_hours=video_hours,
        gpus=gpus,
        cpus=cpus,
        measured_video_hours=measured_video_hours,
        stages=[],
        missing_stages=[s for s in STAGES if s not in measured],
    )
    for cost in costs:
        cpu_s = cost.cpu_s_per_video_hour * video_hours
        gpu_s = cost.gpu_s_per_video_hour * video_hours
        cpu_wall = cpu_s / cpus
        if gpu_s and not gpus:
            plan.infeasible.append(f"{cost.stage} held {cost.gpus:g} GPU(s) in the measured run and --gpus is 0")
            gpu_wall = 0.0
        else:
            gpu_wall = gpu_s / gpus if gpus else 0.0
        plan.stages.append(
            StagePlan(
                stage=cost.stage,
                wall_s=max(cpu_wall, gpu_wall),
                cpu_hours=cpu_s / 3600,
                gpu_hours=gpu_s / 3600,
                bound_by="gpu" if gpu_wall > cpu_wall else "cpu",
            )
        )
    if units_per_video_hour is not None:
        plan.expected_samples = units_per_video_hour * video_hours
    if samples_by_bucket:
        total = sum(n for n, _ in samples_by_bucket.values())
        for bucket, (n, mean_bytes) in sorted(samples_by_bucket.items(), key=lambda kv: -kv[1][0]):
            samples = (plan.expected_samples or 0) * n / total
            plan.storage.append(
                {"bucket": bucket, "samples": samples, "bytes_per_sample": mean_bytes, "bytes": samples * mean_bytes}
            )
    if costs and not any(c.gpus for c in costs) and gpus:
        plan.notes.append(
            "the measured run held no GPUs, so GPU stages are projected at its CPU speed: "
            "measure with the target config for GPU figures"
        )
    if measured_video_hours < 1 / 6:
        plan.notes.append(
            f"measured on {measured_video_hours * 60:.1f} min of video: model loading and start-up count as per-video "
            "cost, so a small run overestimates"
        )
    return plan


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"
