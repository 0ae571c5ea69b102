"""Typed configuration tree for a recap run, loaded from one YAML file.

Defaults live here; a wrong key or value fails at load time with a message naming the key,
the value given and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the key, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(_Section):
    """What one worker of a stage asks Ray for, and how many workers run at once."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    concurrency: int = Field(2, ge=1, description="number of actors in the stage's pool")
    batch_size: int = Field(1, ge=1, description="rows handed to one actor call")


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray (or uses RAY_ADDRESS)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray; None means all")
    streaming: bool = Field(
        True,
        description="run caption -> encode as one streaming pipeline (each pool works while the one before it "
        "still produces); false: one stage at a time",
    )
    progress: Literal["auto", "bar", "log", "off"] = "auto"
    log_interval_s: float = Field(
        10.0, gt=0, description="seconds between progress lines when output is not a terminal"
    )
    system_log_level: Literal["debug", "info", "warning", "error"] = Field(
        "warning",
        description="level of Ray's own system logs (this process's core worker; on a local Ray also the raylet, "
        "GCS and workers), under /tmp/ray/session_*/logs: info adds Ray's periodic event statistics and actor "
        "notices, for debugging Ray itself. RAY_BACKEND_LOG_LEVEL, when set, wins",
    )

    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML reads a bare `off` as False and `on` as True.
        if value is False:
            return "off"
        if value is True:
            return "auto"
        return value


class LeaseConfig(_Section):
    """The writer lease on OUT (manifest/_lease.json): one writing command per corpus at a time."""

    timeout_s: float = Field(
        120.0, gt=0, description="a lease whose heartbeat is older than this is stale: the next writer takes it over"
    )
    heartbeat_s: float = Field(10.0, gt=0, description="seconds between heartbeats of the lease's holder")

    @model_validator(mode="after")
    def _beats_within_timeout(self) -> LeaseConfig:
        if self.heartbeat_s * 2 > self.timeout_s:
            raise ValueError(
                f"lease.heartbeat_s={self.heartbeat_s:g} must be at most half of lease.timeout_s={self.timeout_s:g}, "
                "or a live writer's lease looks stale between two heartbeats"
            )
        return self


class IsolationConfig(_Section):
    """Decoding runs in a child process per worker so a crashing or hanging decoder costs one file."""

    stall_timeout_s: float = Field(120.0, gt=0, description="no decode progress for this long: the file is rejected")
    max_jobs_per_child: int = Field(200, ge=1, description="restart the child after this many files (bounds leaks)")
    max_attempts: int = Field(
        1, ge=1, description="attempts per file before a hang becomes a reject (a crash always gets a second)"
    )
    start_timeout_s: float = Field(
        120.0, gt=0, description="a decoding process not ready after this long is a worker failure, not a reject"
    )
    start_attempts: int = Field(2, ge=1, description="tries to start a decoding process before the worker gives up")
    infrastructure_retries: int = Field(
        1, ge=0, description="times Ray re-runs a batch whose worker could not start a decoding process"
    )
    max_decoder_failure_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="more than this share of the inputs rejected decoder_crash/decode_timeout: the run fails",
    )
    decoder_failure_exit_code: int = Field(
        5, ge=0, le=255, description="exit code of a run over max_decoder_failure_share (0: only warn)"
    )


class VideoConfig(_Section):
    """How stages read frames of a video (inside the isolated child, which contains decoder crashes and leaks)."""

    backend: Literal["pyav", "decord"] = Field(
        "decord",
        description="sparse frame access by index (encode): decord's VideoReader.get_batch, PyAV as the fallback",
    )


class IngestConfig(_Section):
    extensions: list[str] = Field(default_factory=lambda: list(VIDEO_EXTENSIONS))
    min_frames: int = Field(2, ge=1, description="videos with fewer frames are rejected as too_few_frames")
    resources: Resources = Field(default_factory=lambda: Resources(concurrency=2, batch_size=4))

    @model_validator(mode="after")
    def _normalise_extensions(self) -> IngestConfig:
        normalised = [e.lower() if e.startswith(".") else "." + e.lower() for e in self.extensions]
        if normalised != self.extensions:
            self.extensions = normalised
        return self


class ContentDetectorConfig(_Section):
    threshold: float = Field(27.0, gt=0)
    min_scene_len: int = Field(15, ge=1, description="frames")
    luma_only: bool = False


class AdaptiveDetectorConfig(_Section):
    adaptive_threshold: float = Field(3.0, gt=0)
    # 20, not PySceneDetect's 15: at 15 a slow fade-in and a camera tilt in the shared Big Buck Bunny clip
    # come out as cuts (content values 15-20); every real cut there scores well above 20.
    min_content_val: float = Field(20.0, ge=0)
    window_width: int = Field(2, ge=1)
    min_scene_len: int = Field(15, ge=1, description="frames")


class TransNetV2Config(_Section):
    threshold: float = Field(0.5, gt=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TranscodeConfig(_Section):
    enabled: bool = False
    codec: Literal["libx264", "h264", "mpeg4"] = "libx264"
    crf: int = Field(20, ge=0, le=51)
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = "veryfast"


class SplitConfig(_Section):
    detector: Literal["content", "adaptive", "transnetv2"] = "content"
    content: ContentDetectorConfig = Field(default_factory=ContentDetectorConfig)
    adaptive: AdaptiveDetectorConfig = Field(default_factory=AdaptiveDetectorConfig)
    transnetv2: TransNetV2Config = Field(default_factory=TransNetV2Config)
    # 128 wide, not PySceneDetect's ~256: the same cuts on every shared test video for the content and
    # adaptive detectors (and its goldens), at about 1.3x the throughput (bench/split.py).
    analysis_width: int = Field(128, ge=32, description="frames are downscaled to at most this width for detection")
    decode_threads: int = Field(1, ge=0, description="decoder threads per worker (0 = FFmpeg's choice)")
    min_clip_s: float = Field(2.0, ge=0, description="scenes shorter than this stay in clips, rejected too_short")
    min_clip_frames: int = Field(
        8, ge=1, description="scenes with fewer frames than this stay in clips, rejected too_short (sparse timestamps)"
    )
    max_clip_s: float | None = Field(10.0, gt=0, description="longer scenes are cut into equal chunks; null: no limit")
    trim_frames: int = Field(0, ge=0, description="frames dropped on each side of every detected cut")
    max_missing_frames_frac: float = Field(
        0.02, ge=0, le=1, description="decoding fewer frames than the container lists, by more than this: truncated"
    )
    max_damaged_frac: float = Field(
        0.25,
        ge=0,
        le=1,
        description="a video whose decoder concealed errors in more than this share of frames is rejected "
        "decode_damaged; below it, clips touching a damaged span are rejected decode_damaged",
    )
    keep_decodable: bool = Field(
        True,
        description="a video cut off part-way keeps clips from the frames that decoded before the cut (noted in "
        "videos.reject_detail); false: it is rejected truncated. Damage mid-file always rejects (decode_error)",
    )
    transcode: TranscodeConfig = Field(default_factory=TranscodeConfig)
    resources: Resources = Field(default_factory=lambda: Resources(concurrency=2, batch_size=1))

    @model_validator(mode="after")
    def _check_lengths(self) -> SplitConfig:
        if self.max_clip_s is not None and self.max_clip_s < self.min_clip_s:
            raise ValueError(f"max_clip_s ({self.max_clip_s}) must be >= min_clip_s ({self.min_clip_s})")
        return self


class Threshold(_Section):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Threshold:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


def _default_thresholds() -> dict[str, Threshold]:
    return {
        "motion": Threshold(min=0.5),  # percent of frame width per second
        "frozen": Threshold(max=0.5),
        "sharpness": Threshold(min=20.0),  # variance of the Laplacian at the analysis width
        "brightness": Threshold(min=25.0, max=235.0),  # mean luma 0-255
        "black": Threshold(max=0.5),
        "text": Threshold(max=0.15),  # share of the frame in PP-OCRv6 text boxes (filter.text)
        "nsfw": Threshold(max=0.5),  # NudeNet confidence of exposed content (filter.nsfw)
    }


class ClipModelConfig(_Section):
    """Optional CLIP scorer: embedding, aesthetic head, zero-shot safety. Off when `model` is null."""

    model: str | None = Field(None, description="open_clip model name, e.g. ViT-B-32")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or a local checkpoint path")
    model_config_path: str | None = Field(None, description="JSON model config to register (custom architectures)")
    aesthetic_head: str | None = Field(None, description="linear/MLP head file (.pt state dict or .npz)")
    aesthetic_head_activation: Literal["auto", "relu", "none"] = Field(
        "auto",
        description="what sits between the head's linears; auto: known layouts only (one linear, LAION's linear "
        "chain and its ReLU variant), anything else is refused until this says relu or none",
    )
    safety: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, ge=1)
    resources: Resources = Field(default_factory=lambda: Resources(concurrency=1, batch_size=16))


class _DetectorConfig(_Section):
    """An ONNX detector on its own actor pool (onnxruntime; `onnxruntime-gpu` for device cuda)."""

    enabled: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per actor; 0: the pool's num_cpus")
    batch_size: int = Field(8, ge=1, description="frames per detector call")
    resources: Resources = Field(default_factory=lambda: Resources(concurrency=1, batch_size=8))


class TextDetectorConfig(_DetectorConfig):
    """PP-OCRv6 text detection (rapidocr wheel, onnxruntime) for `score_text`; its own actor pool."""

    frames: int = Field(4, ge=1, le=64, description="sampled frames (evenly chosen) the detector looks at per clip")
    max_side: int = Field(640, ge=64, description="frames are scaled so their long side is at most this")
    box_thresh: float = Field(0.5, gt=0, lt=1, description="PP-OCR box score below which a box is dropped")
    recognize: bool = Field(False, description="also recognise the text of the frame with the most text (text_ocr)")


class NsfwDetectorConfig(_DetectorConfig):
    """NudeNet 320n (nudenet wheel, onnxruntime) for `score_nsfw`; its own actor pool. Off: CLIP zero-shot."""


class DedupConfig(_Section):
    enabled: bool = True
    max_hamming: float = Field(10.0, ge=0, le=32, description="mean pHash bits apart to count as duplicates")
    mirror: bool = Field(True, description="a left-right mirrored copy is a duplicate too (compares mirrored hashes)")
    against: list[str] = Field(default_factory=list, description="earlier corpora (output dirs) to dedupe against")


class FilterConfig(_Section):
    frames_per_clip: int = Field(8, ge=1, le=64, description="frames sampled evenly from each clip")
    analysis_width: int = Field(320, ge=32, description="frames are scored at this width")
    flow_width: int = Field(160, ge=32, description="optical flow runs at this width")
    motion_gap_s: float = Field(0.1, gt=0, description="optical flow between frames this far apart")
    thresholds: dict[str, Threshold] = Field(default_factory=_default_thresholds)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    clip: ClipModelConfig = Field(default_factory=ClipModelConfig)
    text: TextDetectorConfig = Field(default_factory=TextDetectorConfig)
    nsfw: NsfwDetectorConfig = Field(default_factory=NsfwDetectorConfig)
    resources: Resources = Field(default_factory=lambda: Resources(concurrency=2, batch_size=1))

    @field_validator("thresholds", mode="before")
    @classmethod
    def _merge_defaults(cls, value: Any) -> Any:
        # Setting one threshold keeps the others' defaults; `name: null` switches one off.
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = {k: v.model_dump() for k, v in _default_thresholds().items()}
        for name, limit in value.items():
            if limit is None:
                merged.pop(name, None)
            elif isinstance(limit, dict) and isinstance(merged.get(name), dict):
                merged[name] = {**merged[name], **limit}
            else:
                merged[name] = limit
        return merged

    @field_validator("thresholds")
    @classmethod
    def _known_scores(cls, value: dict[str, Threshold]) -> dict[str, Threshold]:
        from pipeline.schema import SCORE_REJECT_REASONS

        unknown = sorted(set(value) - set(SCORE_REJECT_REASONS))
        if unknown:
            raise ValueError(f"unknown score(s) {unknown}; allowed: {', '.join(SCORE_REJECT_REASONS)}")
        return value


class CaptionQCConfig(_Section):
    min_words: int = Field(8, ge=0)
    max_words: int = Field(300, ge=1)
    max_repeat_frac: float = Field(0.3, ge=0, le=1, description="share of repeated word 4-grams that flags repetition")
    retry: bool = Field(True, description="caption flagged clips once more with sampling before rejecting them")
    retry_temperature: float = Field(0.7, gt=0)
    fail_on: list[Literal["empty", "refusal", "repetition", "too_short", "too_long", "truncated"]] = Field(
        default_factory=lambda: ["empty", "refusal", "repetition", "too_short", "too_long", "truncated"],
        description="flags that reject a clip (all flags are recorded in caption_flags either way)",
    )

    @model_validator(mode="after")
    def _word_range(self) -> CaptionQCConfig:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        return self


class VLLMConfig(_Section):
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_replicas: int = Field(1, ge=1, description="engine actors, each on tensor_parallel_size GPUs")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=256)
    packages: list[str] = Field(
        default_factory=lambda: ["vllm==0.33.0"],
        validation_alias=AliasChoices("packages", "pip"),  # `pip` was its name before the uv installer
        description="the caption actors' own Ray runtime_env packages (vLLM pins its own torch: 0.33.0 brings torch "
        "2.13.0 and a transformers in 5.16.1-5.19); installed per node by `installer`",
    )
    installer: Literal["uv", "pip"] = Field(
        "uv", description="uv installs the several GB of CUDA wheels in a fraction of pip's time; pip: pip_check on"
    )
    setup_timeout_seconds: int = Field(
        1800, ge=-1, description="how long a node may take to build that environment (Ray's default 600 s is short)"
    )
    image_uri: str | None = Field(None, description="or a container image with vLLM for the caption actors (fastest)")


class CaptionConfig(_Section):
    backend: Literal["transformers", "vllm"] = "transformers"
    model: str | None = Field(
        None, description="hub id or local path; 'recap-tiny:qwen2_5_vl' builds a tiny random model (tests, smoke)"
    )
    trust_remote_code: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device_map: str | None = Field(
        None,
        description="transformers backend: 'auto' places the weights across the actor's GPUs as they load (a model "
        "larger than one GPU; give the actor several with resources.num_gpus); null: load, then move to device",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = Field(
        None, description="transformers backend: the attention kernel (null: the model's default)"
    )
    prompt: str = Field("dense-v1", description="a built-in prompt name or a YAML/JSON prompt file")
    num_frames: int | None = Field(
        None,
        ge=1,
        description="frames sampled evenly from each clip; null (with target_fps null): the model family's native "
        "rate (Qwen2.5-VL / Qwen3-VL: 2 fps, at least 2 frames), else 8 frames",
    )
    target_fps: float | None = Field(None, gt=0, description="instead of num_frames: sample at this rate")
    max_frames: int = Field(32, ge=1)
    max_side: int = Field(448, ge=28, description="frames are resized so their longer side is at most this")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="null: sized from the prompt (the longest length it asks for, else qc.max_words, at 1.6 tokens "
        "a word plus 64); a retry gets twice the budget, so a caption cut off the first time can finish",
    )
    temperature: float = Field(0.0, ge=0, description="0: greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.05, gt=0)
    batch_size: int = Field(8, ge=1, description="clips per generate() call")
    min_caption_match: float | None = Field(
        None, ge=-1, le=1, description="reject captions whose CLIP text-video cosine is lower (needs filter.clip)"
    )
    qc: CaptionQCConfig = Field(default_factory=CaptionQCConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    preprocess_resources: Resources = Field(default_factory=lambda: Resources(concurrency=2, batch_size=8))
    resources: Resources = Field(default_factory=lambda: Resources(concurrency=1, batch_size=8))


class EncodeConfig(_Section):
    vae: str = Field(
        "../shared/data/models/taef2",
        description=(
            "a TAESD-format directory (*_encoder.pth, *_decoder.pth), a diffusers VAE (AutoencoderKL, "
            "AutoencoderKLWan, AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo, AutoencoderKLLTXVideo) by hub id "
            "or local path, or recap-tiny:taesd|autoencoder_kl|wan|ltx"
        ),
    )
    vae_subfolder: str | None = Field(None, description="e.g. 'vae' for a whole diffusers pipeline repo")
    vae_fallback: str | None = Field(
        None, description="used when `vae` is a path that does not exist (the smoke config: recap-tiny:taesd)"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the VAE's compute dtype; auto: bfloat16 on CUDA, float32 on CPU"
    )
    latent_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="stored latents; bfloat16 is stored as uint16 bits (numpy has no bfloat16)"
    )
    store_logvar: bool = Field(
        False, description="KL VAEs: also store the posterior log-variance (KEY.logvar.npy) to sample fresh latents"
    )
    target_area: int = Field(256 * 448, ge=64 * 64, description="pixels per frame; buckets keep it per aspect ratio")
    multiple: int = Field(
        16, ge=8, description="bucket sides are multiples of this and of the VAE's spatial factor (x patch size)"
    )
    num_frames: int = Field(17, ge=1, description="frames per sample, at most (on the VAE's frame grid 1+k*t)")
    min_frames: int = Field(
        2,
        ge=1,
        description="fewer frames than this on the VAE's frame grid (never less than 1+t for a video VAE): the clip "
        "is rejected too_few_frames instead of becoming a sample of a still",
    )
    target_fps: float | None = Field(None, gt=0, description="sample frames at about this rate; null: every frame")
    frames_per_batch: int = Field(16, ge=1, description="frames per forward pass of an image VAE")
    threads: int = Field(
        0,
        ge=0,
        description="torch threads of each VAE actor on CPU; 0: its resources.num_cpus rounded up (Ray itself "
        "gives an actor num_cpus rounded down, so 1.5 CPUs would run one thread)",
    )
    vae_tiling: bool | None = Field(
        None, description="a diffusers VAE's tiled encode (less memory on large frames); null: on from 1280x720 up"
    )
    vae_slicing: bool = Field(False, description="a diffusers VAE's sliced encode: one clip of a batch at a time")
    text_encoder: str | None = Field(
        None, description="transformers text encoder (T5, CLIP text, ...) for KEY.text_emb.npy; null: none"
    )
    text_max_length: int = Field(256, ge=1)
    trust_remote_code: bool = False
    shard_max_bytes: int = Field(1 << 30, ge=1 << 16)
    shard_max_count: int = Field(10_000, ge=1)
    shard_writers_per_node: int = Field(
        1,
        ge=1,
        description="shard-writing actors on each node with CPUs or GPUs (each writes the latents its node made)",
    )
    prep_resources: Resources = Field(default_factory=lambda: Resources(concurrency=2, batch_size=1))
    resources: Resources = Field(default_factory=lambda: Resources(concurrency=1, batch_size=4))


class UpsampleConfig(_Section):
    model: str = Field("recap-tiny:text_lm", description="causal LM by hub id or local path")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    examples: int = Field(3, ge=0, description="few-shot captions drawn from the corpus")
    max_new_tokens: int = Field(200, ge=1)
    temperature: float = Field(0.0, ge=0)


class RecapConfig(_Section):
    """The whole run: one section per stage plus Ray and isolation settings."""

    ray: RayConfig = Field(default_factory=RayConfig)
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    isolation: IsolationConfig = Field(default_factory=IsolationConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    upsample: UpsampleConfig = Field(default_factory=UpsampleConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_M = TypeVar("_M", bound=BaseModel)


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The config class an annotation holds, and whether it is the value type of a mapping (`dict[str, M]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is dict and len(args) == 2:
        inner, _ = _model_in(args[1])
        return inner, inner is not None
    for arg in args:  # Optional[M], M | None
        inner, mapped = _model_in(arg)
        if inner is not None:
            return inner, mapped
    return None, False


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The config class that owns the key at `loc`, to list its allowed keys."""
    model = root
    parts = list(loc)
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return model
        inner, mapped = _model_in(field.annotation)
        if inner is None:
            return model
        if mapped:  # the next part is a mapping key (e.g. a threshold's score name), not a field
            if not parts:
                return model
            parts.pop(0)
        model = inner
    return model


def _describe(root: type[BaseModel], err: dict[str, Any], origins: dict[str, str] | None = None) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "<root>"
    value = err.get("input")
    origin = _origin_of(key, origins or {})
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(_model_at(root, loc[:-1]).model_fields))
        return f"{key}: unknown key (value {value!r}){origin}; allowed keys here: {allowed}"
    if err["type"] in ("model_type", "dict_type"):
        return f"{key}: expected a mapping of keys, got {value!r}{origin}"
    return f"{key}: {value!r} is not allowed{origin}: {err['msg']}"


def _origin_of(key: str, origins: dict[str, str]) -> str:
    """' (from --set K=V)' when an override set this key (or the section holding it)."""
    for dotted, text in origins.items():
        if key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."):
            return f" (from --set {text})"
    return ""


def validate_config(
    root: type[_M],
    data: dict[str, Any] | None,
    source: str,
    error: type[ConfigError] = ConfigError,
    origins: dict[str, str] | None = None,
) -> _M:
    """`data` as a `root` config; any problem raises `error` naming every bad key, its value and what is allowed."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"invalid config ({source}): the top level must be a mapping, got {type(data).__name__}")
    try:
        return root.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(root, e, origins) for e in exc.errors(include_url=False)]
        raise error(f"invalid config ({source}):\n  " + "\n  ".join(lines)) from None


def config_from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> RecapConfig:
    return validate_config(RecapConfig, data, source)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, error: type[ConfigError]) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise error(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_yaml_config(
    root: type[_M],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    error: type[ConfigError] = ConfigError,
) -> _M:
    """A YAML file (or the defaults when `path` is None) with `key.sub=value` overrides, as a `root` config."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise error(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise error(f"config file {path} is not valid YAML: {exc}") from None
    origins: dict[str, str] = {}
    for item in overrides or []:
        if "=" not in item:
            raise error(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw), error)
        origins[key.strip()] = item
    if origins:
        source += " with --set overrides" if path is not None else " + --set overrides"
    return validate_config(root, data, source, error, origins)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RecapConfig:
    """Load a YAML config (or the defaults when `path` is None) and apply `key.sub=value` overrides."""
    return load_yaml_config(RecapConfig, path, overrides)
