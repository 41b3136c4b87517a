"""Load and validate ``config/llm_config.yaml`` once, into typed structs.

Validation is msgspec's: unknown keys are errors, and every error names the key path (``$.models.x.n_ctx``)
and the problem. Per-model fields left out take the ``defaults`` section's value, so the rest of the manager
sees one fully resolved ``ModelSpec`` per model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from daemonkit.binding import Security
from daemonkit.settings import ConfigError, Section, convert, read_sections, resolve_path, sections_from_text
from model_client.endpoints import resolve_endpoint
from model_client.protocol import DEFAULT_MAX_MESSAGE_BYTES, MIB

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
# A pulled Hugging Face model keeps the name it was pulled by (``hf.co/ORG/REPO:QUANT``, as Ollama names it).
ModelName = Annotated[str, msgspec.Meta(pattern=r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]


__all__ = ["MIB", "Config", "ConfigError", "ModelSpec", "load_config", "parse_config"]


class Endpoints(Section):
    requests: str = "ipc://../run/manager.sock"
    events: str = "ipc://../run/events.sock"
    workers: str = "ipc://../run/workers.sock"


class Defaults(Section):
    n_ctx: PositiveInt = 2048
    n_gpu_layers: int = 0
    n_threads: PositiveInt | None = None
    n_batch: PositiveInt = 512
    idle_ttl_s: float = 300.0
    priority: int = 50
    max_queue: PositiveInt = 64
    context_overflow: Literal["error", "truncate"] = "error"
    parallel: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4


class Limits(Section):
    max_message_bytes: PositiveInt = DEFAULT_MAX_MESSAGE_BYTES
    max_tokens: PositiveInt = 4096
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    max_audio_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0  # longest clip `transcribe` accepts
    max_text_chars: PositiveInt = 10_000  # longest text `synthesize` accepts
    max_prompt_tokens: PositiveInt = 32_768  # longest prompt (after the chat template) a model evaluates
    max_prompt_bytes: PositiveInt = MIB  # longest prompt text (UTF-8), checked before tokenizing
    max_messages: PositiveInt = 512  # messages in one chat request
    requests_per_second: Annotated[float, msgspec.Meta(gt=0)] = 100.0  # per client connection; more: busy
    burst: PositiveInt = 200  # requests a client may send at once before the rate applies
    rate_limit_local: bool = False  # the rate applies to CURVE (remote) clients; true: to local ones too


class ManagerSettings(Section):
    spare_workers: Annotated[int, msgspec.Meta(ge=0, le=4)] = 1
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    load_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    unload_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    state_dir: str = "../run/state"  # measured model sizes and cached GGUF facts survive restarts here


class SimulatedGpu(Section, kw_only=True):
    name: str = "simulated GPU"
    total_mib: PositiveInt
    used_by_others_mib: Annotated[int, msgspec.Meta(ge=0)] = 0


class GpuBudget(Section, kw_only=True):
    """One GPU's share for the manager: a ceiling on what its models book there in all (room left for a game or a
    desktop; on a big card, the behaviour of a small one), and its own headroom."""

    index: Annotated[int, msgspec.Meta(ge=0)]  # as NVML numbers the GPUs (for simulated GPUs: their order)
    max_mib: PositiveInt | None = None  # the most the manager's models book on this GPU together
    headroom_mib: Annotated[int, msgspec.Meta(ge=0)] | None = None  # instead of gpu_headroom_mib


class DeviceSettings(Section):
    """Where models may go. ``simulated`` GPUs drive placement on a machine without them (never implicitly)."""

    mode: Literal["auto", "cpu-only", "simulated"] = "auto"
    simulated: list[SimulatedGpu] = []
    simulated_host_mib: PositiveInt | None = None  # simulated mode only: pretend the host has this much RAM
    gpu_headroom_mib: Annotated[int, msgspec.Meta(ge=0)] = 256  # left free on every GPU
    gpus: list[GpuBudget] = []  # per-GPU ceilings and headrooms (GPUs not listed: the whole card, less headroom)
    host_headroom_mib: Annotated[int, msgspec.Meta(ge=0)] = 1024  # left to the OS and other programs
    cuda_context_mib: Annotated[int, msgspec.Meta(ge=0)] = 300  # each GPU worker's CUDA context, until measured
    allow_cpu_fallback: bool = True  # a GPU model that fits no GPU runs on the CPU rather than failing
    allow_split: bool = False  # split a model over several GPUs (tensor_split) when no single one holds it
    max_loaded_models: Annotated[int, msgspec.Meta(ge=0)] = 0  # per device; 0 = no limit
    memory_release_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    # CPU threads handed out to the models computing at once (see model_manager/threads.py): `auto` = the cores
    # this process may use, a number = that many, 0 = none handed out (each engine takes its own default).
    cpu_threads: Annotated[int, msgspec.Meta(ge=0, le=1024)] | Literal["auto"] = "auto"


class KvCacheSettings(Section):
    """Saved KV-cache states of conversations (``conversation_id``), per model, in its worker's RAM."""

    enabled: bool = True
    budget_mib: Annotated[int, msgspec.Meta(ge=0)] = 512  # per model; least recently used states go first
    ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0  # unused this long: out of RAM (to disk if spilling)
    spill_dir: str | None = "../run/kv"  # null: no disk; else evicted states are kept here, across restarts
    disk_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 7 * 86400.0


class SchedulerSettings(Section):
    hold_after_use_s: Annotated[float, msgspec.Meta(ge=0)] = 2.0  # a model that just served is not evicted yet...
    max_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0  # ...unless a request has waited this long
    wait_for_memory_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0  # then `insufficient_memory`
    demand_half_life_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0  # how fast past requests stop counting


class Variant(Section, kw_only=True):
    quantization: str  # as the GGUF header reports it (general.file_type)
    path: str


class ModelSpec(Section):
    """One catalogue entry. ``None`` fields take the ``defaults`` value when the config is loaded.

    ``llm``: a GGUF file (llama-cpp-python). ``stt``: a faster-whisper (CTranslate2) model directory. ``tts``: a
    Piper voice, the ``.onnx`` file with its ``.onnx.json`` beside it; the model's name is the voice's name.
    """

    kind: Literal["llm", "stt", "tts"]
    path: str = ""  # required, unless `variants` lists the files
    quantization: str | None = None  # llm: required, as the GGUF header reports it
    # llm: the same model in several GGUF files, best first: each load takes the best that fits its device without
    # evicting a model of higher priority, else the next (path and quantization then default to the first).
    variants: list[Variant] = []
    variant: str | None = None  # a variant's quantization label: always that one
    n_ctx: PositiveInt | None = None
    n_gpu_layers: int | None = None
    gpu: Annotated[int, msgspec.Meta(ge=0)] | None = None
    n_threads: PositiveInt | None = None
    n_batch: PositiveInt | None = None
    idle_ttl_s: float | None = None
    priority: int | None = None
    max_queue: PositiveInt | None = None
    chat_format: str | None = None
    # A conversation longer than n_ctx: `error` (context_overflow) or `truncate` (drop the oldest turns, keep
    # the system prompt).
    context_overflow: Literal["error", "truncate"] | None = None
    tensor_split: list[float] | None = None  # set by the scheduler when a model is split over GPUs
    # CPU scheduling priority of the model's worker (os.nice, 0-19): a higher value yields the CPU to the others
    # when they compete, e.g. an LLM finishing its reply while Piper speaks its first sentence.
    nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 0
    # llm: requests served at once (continuous batching; each sequence holds n_ctx, the KV memory is n_ctx x parallel);
    # 1 serves one at a time, bit-exact with and without conversation reuse
    parallel: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    # llm with parallel > 1: sequences kept beyond `parallel` for voice requests (priority 80 and up), so that a
    # spoken question never waits for a chat stream to end; each holds n_ctx of KV memory too. 0: none kept.
    voice_sequences: Annotated[int, msgspec.Meta(ge=0, le=8)] = 1
    # llm: llama.cpp's flash attention: auto and on turn it on (see backends/llm/backend.py, flash_attention), off
    # off; exact mode (parallel 1) is always without it. YAML reads a bare on / off as true / false: taken alike.
    flash_attn: Literal["auto", "on", "off"] | bool = "auto"
    pinned: bool = False  # never evicted
    preload: bool = False  # loaded and warmed up when the manager starts
    description: str = ""
    # Speech models (stt, tts): where they run and how.
    device: Literal["cpu", "cuda"] = "cpu"  # cuda: on a GPU when one has room (else the CPU, if allowed)
    compute_type: str = "default"  # stt: CTranslate2's int8, int8_float16, float16, float32, default
    batch_size: PositiveInt = 1  # stt: concurrent transcriptions run together, at most this many...
    batch_wait_ms: Annotated[float, msgspec.Meta(ge=0)] = 10.0  # ...collected for at most this long
    speaker: Annotated[int, msgspec.Meta(ge=0)] | None = None  # tts: the speaker of a multi-speaker voice

    @property
    def wants_gpu(self) -> bool:
        return self.n_gpu_layers != 0 if self.kind == "llm" else self.device == "cuda"


class CatalogueSettings(Section):
    """Models added while the manager runs: pulled (``mm pull``, ``/api/pull``) or written by hand, one YAML
    fragment per model in ``dir``, taken on ``mm reload``, SIGHUP, or when the directory changes."""

    dir: str = "models.d"  # relative to this YAML's directory
    models_dir: str = "../models/pulled"  # where pulls put their files, one folder per model
    watch_s: Annotated[float, msgspec.Meta(ge=0)] = 2.0  # look for changed fragments this often; 0: only when told
    keep_free_mib: Annotated[int, msgspec.Meta(ge=0)] = 1024  # a pull that would leave less disk free is refused
    max_pulls: Annotated[int, msgspec.Meta(ge=1, le=16)] = 2  # pulls running at once; more get `busy`


class Metrics(Section):
    """A Prometheus endpoint (HTTP), on loopback unless ``allow_remote``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9464  # 0: any free port (said in the log and status)
    allow_remote: bool = False


class Config(Section, rename={"enable_legacy_models": "ENABLE_LEGACY_MODELS"}):
    enable_legacy_models: bool = False
    endpoints: Endpoints = msgspec.field(default_factory=Endpoints)
    defaults: Defaults = msgspec.field(default_factory=Defaults)
    limits: Limits = msgspec.field(default_factory=Limits)
    manager: ManagerSettings = msgspec.field(default_factory=ManagerSettings)
    devices: DeviceSettings = msgspec.field(default_factory=DeviceSettings)
    scheduler: SchedulerSettings = msgspec.field(default_factory=SchedulerSettings)
    kv_cache: KvCacheSettings = msgspec.field(default_factory=KvCacheSettings)
    security: Security = msgspec.field(default_factory=Security)
    metrics: Metrics = msgspec.field(default_factory=Metrics)
    catalogue: CatalogueSettings = msgspec.field(default_factory=CatalogueSettings)
    models: dict[ModelName, ModelSpec] = {}
    # Sections read by the other daemons (services, agents); each validates its own.
    services: dict[str, Any] = {}
    gateway: dict[str, Any] = {}
    wyoming: dict[str, Any] = {}
    agents: dict[str, Any] = {}
    personas: dict[str, Any] = {}
    routing: dict[str, Any] = {}


def sequences(spec: ModelSpec) -> int:
    """An LLM's sequences: ``parallel``, and the voice sequences beside them (none in exact mode, ``parallel: 1``)."""
    parallel = spec.parallel or 1
    return parallel + (spec.voice_sequences if parallel > 1 else 0)


def _resolve_model(spec: ModelSpec, defaults: Defaults, base_dir: Path) -> ModelSpec:
    filled = {
        name: getattr(defaults, name) if getattr(spec, name) is None else getattr(spec, name)
        for name in (
            "n_ctx",
            "n_gpu_layers",
            "n_threads",
            "n_batch",
            "idle_ttl_s",
            "priority",
            "max_queue",
            "context_overflow",
            "parallel",
        )
    }
    variants = [msgspec.structs.replace(v, path=str(resolve_path(v.path, base_dir))) for v in spec.variants]
    path, quantization = spec.path, spec.quantization
    if variants and not path:
        path, quantization = variants[0].path, quantization or variants[0].quantization
    return msgspec.structs.replace(
        spec,
        path=str(resolve_path(path, base_dir)) if path else "",
        quantization=quantization,
        variants=variants,
        **filled,
    )


def parse_config(text: str, base_dir: Path, source: str = "<string>") -> Config:
    return config_from_sections(sections_from_text(text, source), base_dir, source)


def config_from_sections(data: dict[str, Any], base_dir: Path, source: str) -> Config:
    models = data.pop("models", None) or {}
    if not isinstance(models, dict):
        raise ConfigError(f"{source}: Expected `object`, got `{type(models).__name__}` - at `$.models`")
    config = convert(data, Config, source, "$")
    config.models = {
        convert(name, ModelName, source, f"$.models, the name {name!r}"): convert(
            spec, ModelSpec, source, f"$.models.{name}"
        )
        for name, spec in models.items()
    }
    if config.devices.mode == "simulated" and not config.devices.simulated:
        raise ConfigError(f"{source}: devices.mode is simulated but devices.simulated lists no GPU - at `$.devices`")
    indexes = [gpu.index for gpu in config.devices.gpus]
    if len(indexes) != len(set(indexes)):
        raise ConfigError(f"{source}: devices.gpus names GPU {indexes} more than once - at `$.devices.gpus`")
    manager = msgspec.structs.replace(config.manager, state_dir=str(resolve_path(config.manager.state_dir, base_dir)))
    security = config.security.resolved(base_dir)
    kv_cache = config.kv_cache
    if kv_cache.spill_dir:
        kv_cache = msgspec.structs.replace(kv_cache, spill_dir=str(resolve_path(kv_cache.spill_dir, base_dir)))
    endpoints = Endpoints(
        **{name: resolve_endpoint(getattr(config.endpoints, name), base_dir) for name in Endpoints.__struct_fields__}
    )
    models = {name: _resolve_model(spec, config.defaults, base_dir) for name, spec in config.models.items()}
    for name, spec in models.items():
        check_model(spec, source, f"$.models.{name}")
    catalogue = msgspec.structs.replace(
        config.catalogue,
        dir=str(resolve_path(config.catalogue.dir, base_dir)),
        models_dir=str(resolve_path(config.catalogue.models_dir, base_dir)),
    )
    return msgspec.structs.replace(
        config,
        endpoints=endpoints,
        models=models,
        manager=manager,
        kv_cache=kv_cache,
        security=security,
        catalogue=catalogue,
    )


def resolve_model(spec: ModelSpec, defaults: Defaults, base_dir: Path, source: str, at: str) -> ModelSpec:
    """One catalogue entry with the defaults filled in and its paths made absolute, checked as the YAML's are."""
    spec = _resolve_model(spec, defaults, base_dir)
    check_model(spec, source, at)
    return spec


def check_model(spec: ModelSpec, source: str, at: str) -> None:
    """What the struct alone cannot say of an entry: its path, an llm's quantization, its variants."""
    if not spec.path:
        raise ConfigError(f"{source}: a model needs `path` (or, an llm, `variants`) - at `{at}`")
    if spec.kind == "llm" and not spec.quantization:
        raise ConfigError(f"{source}: an llm needs `quantization` (as its GGUF header says) - at `{at}`")
    labels = [v.quantization for v in spec.variants]
    if spec.variants and spec.kind != "llm":
        raise ConfigError(f"{source}: only an llm has `variants` - at `{at}.variants`")
    if len(labels) != len(set(labels)):
        raise ConfigError(f"{source}: two variants share a quantization label - at `{at}.variants`")
    if spec.variant is not None and spec.variant not in labels:
        raise ConfigError(f"{source}: variant {spec.variant!r} is not one of the variants {labels} - at `{at}.variant`")


def load_config(path: str | Path) -> Config:
    data, base_dir = read_sections(Path(path))
    return config_from_sections(data, base_dir, str(path))
