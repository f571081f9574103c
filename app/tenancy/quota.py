"""Leased quota: limits decided inside each ingress replica, from shares of every active
subject's budget that the TenantLedger leases to it. No round trip per request while quota
lasts. Pure: every time is passed in (each side uses its own clock; no time crosses between
them except as a duration).

**Ceilings.** For each subject it uses, a replica keeps cumulative counters: requests admitted,
real tokens of finished requests, token estimates held by requests in flight, requests in
flight, admission attempts. The ledger grants it *ceilings* on them:

- requests: `admitted + 1 <= ceil_requests`;
- tokens: `real + held + estimate <= ceil_tokens` (a request in flight holds its estimate,
  replaced by its real count when it ends, as in `app.tenancy.limits`);
- concurrent streams: `in_flight + 1 <= ceil_streams`.

So an admission is a dictionary look-up and three comparisons per subject (`LocalLimits.admit`).

**Sync** (`LocalLimits.sync_request` -> `QuotaBook.sync` -> `LocalLimits.apply_grant`), every
~0.5 s per replica and at once when a request needs more quota than the replica holds: the
replica reports the subjects that changed (cumulative counters, the counters the ledger last
acknowledged, the ceilings in force); the ledger adds what was admitted and used since to the
subject's sliding window and answers new ceilings. For each subject (limit L, used U in the
window, the outstanding quota of the other replicas O, and a *starter* reserve S for each live
replica that holds no share of it yet):

    free     = L - U - O - S x (replicas without a share)
    fair     = (L - U - S x (replicas without a share)) x (1 - HOLD_BACK) x demand / all demand
    granted  = min(free, max(fair, S, what the replica's waiting requests asked for))

A replica's demand is its decayed rate of admission attempts (refusals included). HOLD_BACK
leaves part of the budget unallocated at each round, so a replica whose demand grows gets
quota at its next sync without waiting for the others to shrink. Shrinking takes effect when
the replica applies it: until then the ledger counts the larger of the ceiling in force and
the one it sent. Invariant, per subject and limit kind: `U + held + outstanding <= L`; the only
excess is the bucketing of the window (admissions are stamped when reported, up to one sync
late: conservative) and a replica that joined between two syncs of another (one starter).

**Cold subjects.** A subject a replica holds no share of (first use, or dropped while idle)
starts with the starter ceilings, `floor(limit x STARTER_FRACTION / (replicas + 1))` (the +1:
a replica that just started), reserved for it by the ledger, so most first requests are not a
round trip either. A subject idle for IDLE_SECONDS is shrunk back to its starter, then
dropped on both sides: an idle subject costs nothing.

**Leases.** A grant is valid `lease_s` from when its report was *sent* (so the replica's lease
ends before the ledger's, whatever the delay). A replica that stops syncing (it died) has its
shares and its requests in flight reclaimed by the ledger `lease_s + RECLAIM_GRACE_SECONDS`
after its last sync.

**Ledger unavailable** (`LocalLimits`, see `mode`): the replica keeps deciding from its last
grants until their lease ends, and meanwhile counts nothing else differently. Then, and when
the ledger was never reached, it falls back to deciding alone with each limit divided by the
number of ingress replicas it last knew (`app.tenancy.limits.LimitBook` over its own
admissions): limits still hold about service-wide when the load balancer spreads requests
evenly, and the service stays up. Failing open would let a tenant burst without bound during a
ledger restart; failing closed would turn a ledger restart into an outage of every limited
tenant. Admissions decided so are counted (`fallback_admissions`) and reported to the ledger
once it answers again, so its windows include them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from app.config import Limits
from app.errors import (
    ConcurrencyLimited,
    InvalidRequest,
    LimitsUnavailable,
    RateLimited,
    ServiceError,
    TokenRateLimited,
)
from app.tenancy.limits import (
    BUCKETS_PER_WINDOW,
    LimitBook,
    SlidingWindow,
    Subject,
    Ticket,
    describe,
)

STARTER_FRACTION = 0.05
"""Of each limit, kept for the replicas that hold no share of a subject (their first
requests), split among them."""
HOLD_BACK = 0.1
"""Of what is left of each budget, not handed out at a sync (for a replica whose demand
grows)."""
DEMAND_TAU_SECONDS = 2.0
IDLE_DEMAND = 0.5
"""Attempts per second under which a share is granted its starter (at least) rather than its
share of the demand."""
"""Decay of a replica's demand rate."""
IDLE_SECONDS = 30.0
"""A subject a replica made no admission attempt for this long goes back to its starter and is
dropped (while nothing is in flight)."""
LEASE_SECONDS = 5.0
"""How long a grant is valid without a sync (10 missed syncs at the default interval)."""
RECLAIM_GRACE_SECONDS = 1.0
CONTENDED_SECONDS = 5.0
"""A subject whose replica asked for more than was free is rebalanced at every replica's sync
this long (not only at the syncs that report it)."""
SYNC_INTERVAL_SECONDS = 0.5
CENTRAL_BELOW = 8
"""A limit under this many per live replica is not leased: each request the replica cannot
admit from what it holds asks the ledger (a sync), and the ledger grants exactly what the
waiting requests need; a stream or token reservation that ends goes back at once. Leased
shares of a few requests or streams would refuse what the ledger has free (another replica
holding a share it does not use), or wait a rebalance for it."""
PRUNE_SECONDS = 5.0
MAX_REPORT_SUBJECTS = 20_000
"""Subjects per sync (the rest go in the next): well under Serve's 4 MiB gRPC message limit."""

INF = math.inf
LimitsTuple = tuple[int | None, int | None, int | None]
"""requests per window, tokens per window, concurrent streams (None: no limit of that kind)."""
ReportEntry = tuple[
    str,  # subject kind
    str,  # subject name
    int,  # generation of the replica's state for it (a dropped subject starts a new one)
    int | None,  # requests per window
    int | None,  # tokens per window
    int | None,  # concurrent streams
    int,  # admitted requests (cumulative)
    int,  # real tokens of finished requests (cumulative)
    int,  # token estimates held by requests in flight
    int,  # requests in flight
    int,  # admission attempts (cumulative)
    int,  # admitted, as the ledger last acknowledged
    int,  # real tokens, as the ledger last acknowledged
    int,  # attempts, as the ledger last acknowledged
    float,  # requests ceiling in force
    float,  # tokens ceiling in force
    float,  # streams ceiling in force
    int,  # requests waiting for more quota
    int,  # tokens those waiting requests need
]
GrantEntry = tuple[
    str,  # subject kind
    str,  # subject name
    int,  # generation
    float,  # requests ceiling
    float,  # tokens ceiling
    float,  # streams ceiling
    float,  # requests left unallocated at the ledger (worth asking for)
    float,  # tokens left unallocated
    float,  # streams left unallocated
    float,  # seconds until the window frees a request (0: not exhausted)
    float,  # seconds until the window frees tokens (0: not exhausted)
    int,  # kinds decided at the ledger (bit 0 requests, 1 tokens, 2 streams): see CENTRAL_BELOW
]
Dropped = tuple[str, str, int]  # subject kind, name, generation


@dataclass(frozen=True, slots=True)
class SyncReport:
    epoch: str
    """The reporting LocalLimits instance (a replica id reused by a new instance starts over)."""
    entries: tuple[ReportEntry, ...]


@dataclass(frozen=True, slots=True)
class Grant:
    lease_s: float
    share: float
    """A cold subject's starter: `floor(limit x share)` of each limit."""
    replicas: int
    """Ingress replicas the ledger knows alive (the fallback divides limits by it)."""
    entries: tuple[GrantEntry, ...]
    dropped: tuple[Dropped, ...] = ()


class NeedGrant:
    """`LocalLimits.admit`'s answer when the request needs more quota than the replica holds
    and the ledger said it has some left: sync now, then admit again with `may_wait=False`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_GRANT"


NEED_GRANT: Final = NeedGrant()
Mode = Literal["starting", "leased", "fallback"]
Fallback = Literal["divide", "open", "closed"]


def _starter(limit: int | None, share: float) -> float:
    return INF if limit is None else float(math.floor(limit * share))


# --- the ledger's side ---------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Counters:
    """One subject's counters at one replica (the replica's own, or as the ledger last heard
    of them): requests admitted, real tokens of finished requests and admission attempts
    (cumulative), token estimates held and requests in flight (now)."""

    admitted: int = 0
    real: int = 0
    held: int = 0
    in_flight: int = 0
    attempts: int = 0


@dataclass(slots=True, eq=False, kw_only=True)
class _Share(_Counters):
    """One replica's share of one subject, as the ledger last heard of it."""

    replica: str
    subject: Subject
    gen: int
    in_force: list[float] = field(default_factory=lambda: [INF, INF, INF])
    sent: list[float] = field(default_factory=lambda: [-INF, -INF, -INF])
    demand: float = 0.0
    demand_at: float = 0.0
    active_at: float = 0.0
    """Last admission attempt or request in flight (idle after `idle_s` without)."""
    scanned_at: float = 0.0
    """The order of `_Replica.shares`: last activity, or last shrink to the starter."""

    def demand_now(self, now: float) -> float:
        return self.demand * math.exp(-(now - self.demand_at) / DEMAND_TAU_SECONDS)

    def fold_sent(self) -> None:
        """Before sending it a grant the replica did not report on: the last one sent may be
        in force there now (a replica applies each grant before its next report), so the
        ceilings in force are the larger of both until it reports again."""
        self.in_force = [max(a, b) for a, b in zip(self.in_force, self.sent, strict=True)]

    def outstanding(self) -> tuple[float, float, float]:
        """What it may still admit: the larger ceiling (in force, or sent and maybe applied)
        above its counters."""
        return (
            max(self.in_force[0], self.sent[0]) - self.admitted,
            max(self.in_force[1], self.sent[1]) - self.real - self.held,
            max(self.in_force[2], self.sent[2]) - self.in_flight,
        )


@dataclass(slots=True, eq=False)
class _Budget:
    """One subject at the ledger: its window and the replicas' shares."""

    limits: LimitsTuple
    window: SlidingWindow = field(default_factory=SlidingWindow)
    shares: dict[str, _Share] = field(default_factory=dict)  # replica id -> its share
    contended_until: float = 0.0


@dataclass(slots=True, eq=False)
class _Replica:
    epoch: str
    synced_at: float
    shares: OrderedDict[Subject, _Share] = field(default_factory=OrderedDict)
    """Least recently active first."""


class QuotaBook:
    """The ledger's side: every subject's sliding window and the shares leased to each ingress
    replica (see the module docstring)."""

    def __init__(
        self,
        window_s: float = 60.0,
        lease_s: float = LEASE_SECONDS,
        idle_s: float = IDLE_SECONDS,
    ) -> None:
        self.window_s = window_s
        self.bucket_s = window_s / BUCKETS_PER_WINDOW
        self.lease_s = lease_s
        self.idle_s = idle_s
        self._budgets: dict[Subject, _Budget] = {}
        self._replicas: dict[str, _Replica] = {}
        self._contended: set[Subject] = set()
        self._prune_at = 0.0
        self.syncs = 0

    # reading

    def subjects(self) -> int:
        return len(self._budgets)

    def live_replicas(self, now: float) -> int:
        return sum(1 for r in self._replicas.values() if now - r.synced_at <= self.lease_s)

    def used(self, subject: Subject, now: float) -> tuple[float, float]:
        """Requests and tokens in the subject's window (tokens: finished requests only)."""
        budget = self._budgets.get(subject)
        if budget is None:
            return 0.0, 0.0
        budget.window.trim(now, self.window_s, self.bucket_s)
        return budget.window.requests, budget.window.tokens

    def status(self, now: float) -> dict[str, Any]:
        return {
            "subjects": len(self._budgets),
            "replicas": self.live_replicas(now),
            "shares": sum(len(r.shares) for r in self._replicas.values()),
            "contended": len(self._contended),
            "syncs": self.syncs,
        }

    # the sync

    def sync(self, replica_id: str, report: SyncReport, now: float) -> Grant:
        self.syncs += 1
        self.expire(now)
        replica = self._replicas.get(replica_id)
        if replica is None or replica.epoch != report.epoch:
            if replica is not None:
                self._drop_replica(replica_id, replica)
            replica = self._replicas[replica_id] = _Replica(report.epoch, now)
        replica.synced_at = now
        live = self.live_replicas(now)
        share_of = STARTER_FRACTION / (live + 1)
        grants: list[GrantEntry] = []
        dropped: list[Dropped] = []
        reported: set[Subject] = set()
        for entry in report.entries:
            subject: Subject = (entry[0], entry[1])
            reported.add(subject)
            budget = self._budgets.get(subject)
            if budget is None:
                budget = self._budgets[subject] = _Budget((entry[3], entry[4], entry[5]))
            else:
                budget.limits = (entry[3], entry[4], entry[5])
            share = self._count(replica_id, replica, budget, subject, entry, now)
            if self._idle(share, budget, share_of, now):
                self._drop_share(replica, budget, subject)
                dropped.append((subject[0], subject[1], share.gen))
                continue
            grants.append(self._grant(budget, share, live, share_of, now, entry[17], entry[18]))
        # rebalance contended subjects this replica holds but did not report
        for subject in list(self._contended):
            budget = self._budgets.get(subject)
            if budget is None or budget.contended_until <= now:
                self._contended.discard(subject)
                continue
            held = budget.shares.get(replica_id)
            if held is not None and subject not in reported:
                held.fold_sent()
                grants.append(self._grant(budget, held, live, share_of, now, 0, 0))
        # shrink this replica's idle shares back to their starter (dropped at their next report)
        cutoff = now - self.idle_s
        shares = replica.shares
        while shares:
            subject, share = next(iter(shares.items()))
            if share.scanned_at > cutoff:
                break
            shares.move_to_end(subject)
            share.scanned_at = now  # looked at once per idle period
            if subject not in reported and share.in_flight == 0:
                share.fold_sent()
                grants.append(self._starter_grant(self._budgets[subject], share, share_of))
        if now >= self._prune_at:
            self.prune(now)
            self._prune_at = now + PRUNE_SECONDS
        return Grant(self.lease_s, share_of, live, tuple(grants), tuple(dropped))

    def _count(
        self,
        replica_id: str,
        replica: _Replica,
        budget: _Budget,
        subject: Subject,
        entry: ReportEntry,
        now: float,
    ) -> _Share:
        """Adds what the replica admitted and used since it was last heard of to the window."""
        share = budget.shares.get(replica_id)
        if share is None or share.gen != entry[2]:
            if share is not None:
                self._drop_share(replica, budget, subject)
            # not heard of in this generation (new, dropped, or this ledger restarted): count
            # from what the replica says was acknowledged
            share = _Share(
                replica=replica_id,
                subject=subject,
                gen=entry[2],
                admitted=entry[11],
                real=entry[12],
                attempts=entry[13],
            )
            share.demand_at = share.active_at = share.scanned_at = now
            budget.shares[replica_id] = share
            replica.shares[subject] = share
        admitted, real, held, in_flight, attempts = entry[6:11]
        new_requests = max(0, admitted - share.admitted)
        new_tokens = max(0, real - share.real)
        new_attempts = max(0, attempts - share.attempts)
        window = budget.window
        window.trim(now, self.window_s, self.bucket_s)
        if new_requests or new_tokens:
            window.add(now, self.bucket_s, new_requests, new_tokens)
        share.demand = share.demand_now(now) + new_attempts / DEMAND_TAU_SECONDS
        share.demand_at = now
        if new_attempts or in_flight or entry[17]:
            share.active_at = share.scanned_at = now
            replica.shares.move_to_end(subject)
        share.admitted, share.real, share.held = admitted, real, held
        share.in_flight, share.attempts = in_flight, attempts
        share.in_force = [entry[14], entry[15], entry[16]]
        # the replica applied every grant sent before this report (one sync at a time), or
        # never will: what it reports is in force
        share.sent = [-INF, -INF, -INF]
        return share

    def _idle(self, share: _Share, budget: _Budget, share_of: float, now: float) -> bool:
        """Idle, nothing in flight, and back to its starter on both sides: drop it."""
        if now - share.active_at < self.idle_s or share.in_flight or share.held:
            return False
        rpm, tpm, streams = budget.limits
        starter = (
            share.admitted + _starter(rpm, share_of),
            share.real + _starter(tpm, share_of),
            _starter(streams, share_of),
        )
        return all(
            share.in_force[kind] <= starter[kind] and share.sent[kind] <= starter[kind]
            for kind in range(3)
        )

    def _starter_grant(self, budget: _Budget, share: _Share, share_of: float) -> GrantEntry:
        rpm, tpm, streams = budget.limits
        ceilings = (
            share.admitted + _starter(rpm, share_of),
            share.real + share.held + _starter(tpm, share_of),
            share.in_flight + _starter(streams, share_of),
        )
        share.sent = list(ceilings)
        return _grant_entry(share, ceilings, (0.0, 0.0, 0.0), (0.0, 0.0), 0)

    def _grant(
        self,
        budget: _Budget,
        share: _Share,
        live: int,
        share_of: float,
        now: float,
        asked: int,
        asked_tokens: int,
    ) -> GrantEntry:
        rpm, tpm, streams = budget.limits
        window = budget.window
        window.trim(now, self.window_s, self.bucket_s)
        shares = budget.shares
        mine = share.demand_now(now)
        total_demand, held, in_flight = mine, share.held, share.in_flight
        others = [0.0, 0.0, 0.0]  # the other replicas' outstanding quota, per kind
        if len(shares) > 1:
            for other in shares.values():
                if other is share:
                    continue
                total_demand += other.demand_now(now)
                held += other.held
                in_flight += other.in_flight
                for kind, outstanding in enumerate(other.outstanding()):
                    if outstanding > 0:
                        others[kind] += outstanding
        fraction = mine / total_demand if total_demand > 0 else 0.0
        idle = mine < IDLE_DEMAND
        cold = max(0, live - len(shares))
        ceilings = list(share.sent)
        spare = [INF, INF, INF]
        retry = [0.0, 0.0]
        contended = False
        central = 0
        for kind, limit, used, base, need in (
            (0, rpm, window.requests, share.admitted, asked),
            (1, tpm, window.tokens + held, share.real + share.held, asked_tokens),
            (2, streams, float(in_flight), share.in_flight, asked),
        ):
            if limit is None:
                ceilings[kind] = spare[kind] = INF
                continue
            starter = _starter(limit, share_of)
            left = limit - used - cold * starter
            free = max(0.0, left - others[kind])
            if limit < CENTRAL_BELOW * live:
                central |= 1 << kind
                wanted = float(need)  # exactly what waits: nothing held unused
            else:
                fair = max(0.0, left) * (1 - HOLD_BACK) * fraction
                wanted = max(fair, need, starter if idle else 0.0)
            granted = math.floor(min(free, wanted))
            ceilings[kind] = base + granted
            spare[kind] = free - granted
            contended = contended or wanted > free
            lacking = max(1.0, need) - free
            if kind < 2 and lacking > 0:
                # exhausted for this replica: when does the window free what it lacks?
                column = kind + 1
                if lacking <= window.total(column):
                    retry[kind] = window.wait_until_below(
                        column, lacking, now, self.window_s, self.bucket_s
                    )
                else:  # held by requests in flight or other replicas' shares
                    retry[kind] = 1.0
        if contended:
            budget.contended_until = now + CONTENDED_SECONDS
            self._contended.add(share.subject)
        share.sent = ceilings
        return _grant_entry(
            share,
            (ceilings[0], ceilings[1], ceilings[2]),
            (spare[0], spare[1], spare[2]),
            (retry[0], retry[1]),
            central,
        )

    # leases of replicas that stopped syncing, idle subjects

    def expire(self, now: float) -> list[str]:
        """Reclaim the shares and the requests in flight of replicas silent past their lease
        (they died, or lost the ledger: they decide alone meanwhile); drop subjects with
        nothing left in their window and no share."""
        gone = [
            rid
            for rid, replica in self._replicas.items()
            if now - replica.synced_at > self.lease_s + RECLAIM_GRACE_SECONDS
        ]
        for replica_id in gone:
            self._drop_replica(replica_id, self._replicas[replica_id])
        return gone

    def prune(self, now: float) -> int:
        """Drop subjects with no share and an empty window (call every few seconds)."""
        empty = []
        for subject, budget in self._budgets.items():
            if budget.shares:
                continue
            budget.window.trim(now, self.window_s, self.bucket_s)
            if not budget.window.buckets:
                empty.append(subject)
        for subject in empty:
            del self._budgets[subject]
            self._contended.discard(subject)
        return len(empty)

    def _drop_replica(self, replica_id: str, replica: _Replica) -> None:
        for subject in list(replica.shares):
            self._drop_share(replica, self._budgets[subject], subject)
        del self._replicas[replica_id]

    def _drop_share(self, replica: _Replica, budget: _Budget, subject: Subject) -> None:
        share = replica.shares.pop(subject, None)
        if share is not None:
            budget.shares.pop(share.replica, None)


def _grant_entry(
    share: _Share,
    ceilings: tuple[float, float, float],
    spare: tuple[float, float, float],
    retry: tuple[float, float],
    central: int,
) -> GrantEntry:
    kind, name = share.subject
    return (kind, name, share.gen, *ceilings, *spare, *retry, central)


# --- the replica's side --------------------------------------------------------------------------


@dataclass(slots=True, eq=False, kw_only=True)
class _Local(_Counters):
    """One subject at one replica."""

    subject: Subject
    gen: int
    limits: LimitsTuple
    source: Limits
    acked: tuple[int, int, int] = (0, 0, 0)  # admitted, real, attempts
    ceil_requests: float = 0.0
    ceil_tokens: float = 0.0
    ceil_streams: float = 0.0
    spare: tuple[float, float, float] = (INF, INF, INF)
    retry: tuple[float, float] = (0.0, 0.0)
    central: int = 0  # kinds decided at the ledger (GrantEntry)
    granted_at: float = 0.0
    active_at: float = 0.0
    asked: int = 0
    asked_tokens: int = 0


@dataclass(slots=True)
class _Pending:
    sent_at: float
    snapshot: list[tuple[_Local, int, int, int]]  # state, admitted, real, attempts as sent


class LocalLimits:
    """The replica's side: `admit` decides from the ceilings held (see the module docstring);
    `finish` when the request ended; `sync_request` / `apply_grant` (or `sync_failed`) for
    the background sync. One instance per ingress replica, used from its event loop."""

    def __init__(
        self,
        window_s: float = 60.0,
        fallback_replicas: int = 1,
        epoch: str | None = None,
        fallback: Fallback = "divide",
    ) -> None:
        self.window_s = window_s
        self.fallback = fallback  # what to do without valid grants (module docstring)
        self.epoch = epoch or uuid.uuid4().hex
        self._subjects: dict[Subject, _Local] = {}
        self._flights: dict[str, tuple[tuple[_Local, ...], int]] = {}
        self._dirty: dict[_Local, None] = {}
        self._gen = 0
        self._pending: _Pending | None = None
        self._share: float | None = None  # starter share (None: never synced)
        self._expires_at = -INF
        self.frees_at = INF
        """When the ledger said the window of an exhausted subject frees some of it: worth
        syncing then rather than at the next interval."""
        self.replicas = max(1, fallback_replicas)
        """Ingress replicas the ledger last knew alive (the fallback divides limits by it)."""
        self._fallback: LimitBook | None = None
        self._fallback_limits: dict[tuple[int | None, int | None, int | None, int], Limits] = {}
        # counters for metrics and /health
        self.ledger_unavailable_since: float | None = None
        self.sync_failures = 0
        self.syncs = 0
        self.local_admissions = 0
        self.local_refusals = 0
        self.fallback_admissions = 0
        self.fallback_refusals = 0
        self.grant_waits = 0

    # reading

    def mode(self, now: float) -> Mode:
        if now < self._expires_at:
            return "leased"
        if self._share is None and self.ledger_unavailable_since is None:
            return "starting"
        return "fallback"

    def subjects(self) -> int:
        return len(self._subjects)

    def in_flight(self) -> int:
        return len(self._flights)

    def health(self, now: float) -> dict[str, Any]:
        """For /health: how limits are decided here now, and since when the ledger is out."""
        return {
            "mode": self.mode(now),
            "ledger_unavailable_seconds": None
            if self.ledger_unavailable_since is None
            else round(now - self.ledger_unavailable_since, 3),
            "fallback": self.fallback,
            "replicas": self.replicas,
            "subjects": len(self._subjects),
            "in_flight": len(self._flights),
            "local_admissions": self.local_admissions,
            "local_refusals": self.local_refusals,
            "fallback_admissions": self.fallback_admissions,
            "fallback_refusals": self.fallback_refusals,
            "grant_waits": self.grant_waits,
            "syncs": self.syncs,
            "sync_failures": self.sync_failures,
        }

    # the request path

    def admit(
        self, ticket: Ticket, now: float, *, may_wait: bool = True
    ) -> ServiceError | NeedGrant | None:
        """None: admitted (call `finish` when it ends); a refusal (429, or 400 when one request
        alone exceeds a tokens-per-window limit); or NEED_GRANT (only with `may_wait`): more
        quota than held is needed and the ledger has some: sync, then admit again with
        `may_wait=False`."""
        if not ticket.subjects or ticket.request_id in self._flights:
            return None
        if now >= self._expires_at and not (
            may_wait and self._share is None and self.ledger_unavailable_since is None
        ):  # (before the first sync: cold subjects hold nothing and wait for it)
            return self._admit_alone(ticket, now)
        estimate = ticket.estimated_tokens
        states = []
        refusal: ServiceError | NeedGrant | None = None
        for subject, limits in ticket.subjects:
            state = self._subjects.get(subject)
            if state is None:
                state = self._new_state(subject, limits, now)
            elif state.source is not limits:
                self._limits_changed(state, limits)
            state.attempts += 1
            state.active_at = now
            self._dirty[state] = None
            states.append(state)
            if refusal is None:
                refusal = self._check(state, estimate, now, may_wait)
        if refusal is not None:
            if refusal is NEED_GRANT:
                self.grant_waits += 1
                for state in states:
                    state.asked += 1
                    state.asked_tokens += estimate
            else:
                self.local_refusals += 1
            return refusal
        for state in states:
            state.admitted += 1
            state.held += estimate
            state.in_flight += 1
        self._flights[ticket.request_id] = (tuple(states), estimate)
        self.local_admissions += 1
        return None

    def _new_state(self, subject: Subject, limits: Limits, now: float) -> _Local:
        self._gen += 1
        state = _Local(subject=subject, gen=self._gen, limits=_as_tuple(limits), source=limits)
        share = self._share or 0.0
        rpm, tpm, streams = state.limits
        state.ceil_requests = _starter(rpm, share)
        state.ceil_tokens = _starter(tpm, share)
        state.ceil_streams = _starter(streams, share)
        state.granted_at = state.active_at = now
        self._subjects[subject] = state
        return state

    def _limits_changed(self, state: _Local, limits: Limits) -> None:
        """Same values (a new copy of the pool record), or changed limits: a limit that appears
        or shrinks starts from its starter until the ledger grants from the new value."""
        state.source = limits
        values = _as_tuple(limits)
        if values == state.limits:
            return
        old, state.limits = state.limits, values
        share = self._share or 0.0
        counters = (state.admitted, state.real + state.held, state.in_flight)
        ceilings = [state.ceil_requests, state.ceil_tokens, state.ceil_streams]
        for kind in range(3):
            new = values[kind]
            if new is None:
                ceilings[kind] = INF
            elif old[kind] is None or new < (old[kind] or 0):
                ceilings[kind] = min(ceilings[kind], counters[kind] + _starter(new, share))
        state.ceil_requests, state.ceil_tokens, state.ceil_streams = ceilings
        self._dirty[state] = None

    def _check(
        self, state: _Local, estimate: int, now: float, may_wait: bool
    ) -> ServiceError | NeedGrant | None:
        rpm, tpm, streams = state.limits
        central = state.central
        if streams is not None and state.in_flight + 1 > state.ceil_streams:
            if may_wait and (state.spare[2] >= 1 or central & 4):
                return NEED_GRANT
            return ConcurrencyLimited(
                f"{describe(state.subject)} has as many requests in flight as its "
                f"concurrent_streams={streams} allow",
                retry_after_s=1.0,
                extra=_extra(state.subject, "concurrent_streams"),
            )
        if rpm is not None and state.admitted + 1 > state.ceil_requests:
            if may_wait and (state.spare[0] >= 1 or central & 1):
                return NEED_GRANT
            return RateLimited(
                f"{describe(state.subject)} made as many requests {self._per()} as its "
                f"requests_per_minute={rpm} allow",
                retry_after_s=self._retry(state, 0, now),
                extra=_extra(state.subject, "requests_per_minute"),
            )
        if tpm is not None:
            if estimate > tpm:
                return InvalidRequest(
                    f"this request may use {estimate} tokens (prompt + max tokens), more than "
                    f"the tokens_per_minute={tpm} of {describe(state.subject)}",
                    param="max_tokens",
                )
            if state.real + state.held + estimate > state.ceil_tokens:
                if may_wait and (state.spare[1] >= estimate or central & 2):
                    return NEED_GRANT
                return TokenRateLimited(
                    f"{describe(state.subject)} used or holds for requests in flight as many "
                    f"tokens {self._per()} as its tokens_per_minute={tpm} allow; this one may "
                    f"use {estimate}",
                    retry_after_s=self._retry(state, 1, now),
                    extra=_extra(state.subject, "tokens_per_minute"),
                )
        return None

    def _retry(self, state: _Local, kind: int, now: float) -> float:
        """When the window frees enough (as the ledger last saw it), else the next sync."""
        wait = state.retry[kind] - (now - state.granted_at)
        return float(max(1, math.ceil(wait)))

    def _per(self) -> str:
        return f"per {self.window_s:g} s" if self.window_s != 60 else "per minute"

    def finish(self, request_id: str, tokens: int | None, now: float) -> bool:
        """The request ended: its estimate is replaced by its real token count (None: it
        produced nothing to count). True: it gave back a stream or tokens of a subject decided
        at the ledger (`CENTRAL_BELOW`): sync now, so that another replica may have them."""
        flight = self._flights.pop(request_id, None)
        if flight is None:
            return False
        states, estimate = flight
        give_back = False
        for state in states:
            state.in_flight -= 1
            state.held -= estimate
            if tokens:
                state.real += tokens
            if state.central & 4 and state.ceil_streams > state.in_flight:
                state.ceil_streams = float(state.in_flight)
                give_back = True
            if state.central & 2 and state.ceil_tokens > state.real + state.held:
                state.ceil_tokens = float(state.real + state.held)
                give_back = True
            self._dirty[state] = None
        if self._fallback is not None:
            self._fallback.finish(request_id, tokens, now)
        return give_back and now < self._expires_at

    # the fallback (no valid grant)

    def _admit_alone(self, ticket: Ticket, now: float) -> ServiceError | None:
        """Without valid grants, as `fallback` says: each limit divided by the replicas last
        known, over this replica's own admissions ('divide'); no limit ('open'); or refused
        ('closed')."""
        refusal: ServiceError | None = None
        if self.fallback == "closed":
            refusal = LimitsUnavailable(
                "limits cannot be decided while the tenant ledger is unavailable; retry"
            )
        elif self.fallback == "divide":
            if self._fallback is None:
                self._fallback = LimitBook(self.window_s, lease_s=INF)
            scaled = tuple((subject, self._scaled(limits)) for subject, limits in ticket.subjects)
            refusal = self._fallback.admit(
                Ticket(ticket.request_id, scaled, ticket.estimated_tokens), now
            )
        states = []
        for subject, limits in ticket.subjects:
            state = self._subjects.get(subject) or self._new_state(subject, limits, now)
            state.attempts += 1
            state.active_at = now
            self._dirty[state] = None
            states.append(state)
        if refusal is not None:
            self.fallback_refusals += 1
            return refusal
        for state in states:  # counted as leased admissions are: the ledger hears of them
            state.admitted += 1
            state.held += ticket.estimated_tokens
            state.in_flight += 1
        self._flights[ticket.request_id] = (tuple(states), ticket.estimated_tokens)
        self.fallback_admissions += 1
        return None

    def _scaled(self, limits: Limits) -> Limits:
        key = (*_as_tuple(limits), self.replicas)
        scaled = self._fallback_limits.get(key)
        if scaled is None:
            if len(self._fallback_limits) > 10_000:
                self._fallback_limits.clear()

            def part(limit: int | None) -> int | None:
                return None if limit is None else max(1, limit // self.replicas)

            scaled = self._fallback_limits[key] = Limits(
                requests_per_minute=part(limits.requests_per_minute),
                tokens_per_minute=part(limits.tokens_per_minute),
                concurrent_streams=part(limits.concurrent_streams),
            )
        return scaled

    # the sync

    def sync_request(self, now: float) -> SyncReport:
        """What to send the ledger now (`QuotaBook.sync`); one sync at a time: answer with
        `apply_grant` or `sync_failed` before the next."""
        snapshot: list[tuple[_Local, int, int, int]] = []
        entries: list[ReportEntry] = []
        if len(self._dirty) <= MAX_REPORT_SUBJECTS:
            taken, self._dirty = list(self._dirty), {}
        else:  # the rest in the next sync
            taken = list(itertools.islice(self._dirty, MAX_REPORT_SUBJECTS))
            for state in taken:
                del self._dirty[state]
        for state in taken:
            if self._subjects.get(state.subject) is not state:
                continue  # dropped since
            snapshot.append((state, state.admitted, state.real, state.attempts))
            rpm, tpm, streams = state.limits
            entries.append(
                (
                    state.subject[0],
                    state.subject[1],
                    state.gen,
                    rpm,
                    tpm,
                    streams,
                    state.admitted,
                    state.real,
                    state.held,
                    state.in_flight,
                    state.attempts,
                    *state.acked,
                    state.ceil_requests,
                    state.ceil_tokens,
                    state.ceil_streams,
                    state.asked,
                    state.asked_tokens,
                )
            )
            state.asked = state.asked_tokens = 0
        self._pending = _Pending(now, snapshot)
        return SyncReport(self.epoch, tuple(entries))

    def apply_grant(self, grant: Grant, now: float) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self.syncs += 1
        for sent_state, admitted, real, attempts in pending.snapshot:
            sent_state.acked = (admitted, real, attempts)
        self._share = grant.share
        self.replicas = max(1, grant.replicas)
        self._expires_at = pending.sent_at + grant.lease_s
        self.ledger_unavailable_since = None
        self._fallback = None  # its windows restart if the ledger is lost again
        subjects = self._subjects
        self.frees_at = INF
        for entry in grant.entries:
            state = subjects.get((entry[0], entry[1]))
            if state is None or state.gen != entry[2]:
                continue
            if (
                entry[3] < state.ceil_requests
                or entry[4] < state.ceil_tokens
                or entry[5] < state.ceil_streams
            ):
                self._dirty[state] = None  # a smaller ceiling: the ledger frees the rest once told
            state.ceil_requests, state.ceil_tokens, state.ceil_streams = (
                entry[3],
                entry[4],
                entry[5],
            )
            state.spare = (entry[6], entry[7], entry[8])
            state.retry = (entry[9], entry[10])
            state.central = entry[11]
            state.granted_at = pending.sent_at
            for wait in state.retry:
                if wait > 0:
                    self.frees_at = min(self.frees_at, pending.sent_at + wait)
        sent = (
            {each.subject: (each, admitted) for each, admitted, _, _ in pending.snapshot}
            if grant.dropped
            else {}
        )
        for kind, name, gen in grant.dropped:
            found = sent.get((kind, name))
            if found is None or found[0].gen != gen:
                continue
            state, admitted = found
            if state.admitted == admitted and not state.in_flight and state not in self._dirty:
                del subjects[state.subject]
            # else it was used meanwhile, within its starter ceilings: the ledger hears of it
            # at the next sync as a share it does not know, counted from what it acknowledged

    def sync_failed(self, now: float) -> None:
        """The ledger did not answer: what was in the report goes in the next one."""
        pending, self._pending = self._pending, None
        self.sync_failures += 1
        if self.ledger_unavailable_since is None:
            self.ledger_unavailable_since = now
        if pending is not None:
            for state, *_ in pending.snapshot:
                self._dirty[state] = None


def _as_tuple(limits: Limits) -> LimitsTuple:
    return (limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent_streams)


def _extra(subject: Subject, limit: str) -> dict[str, Any]:
    return {"limit_subject": subject[0], "limit_name": subject[1], "limit": limit}


# --- the background sync, for an asyncio replica -------------------------------------------------


class QuotaClient:
    """A replica's LocalLimits and its sync loop: `admit` per request (raises the refusal; no
    await while quota lasts), `finish` when it ends; the loop syncs every `interval_s`, and at
    once when a request waits for quota (at most one sync in flight; requests that need one
    meanwhile share the next)."""

    def __init__(
        self,
        send: Callable[[SyncReport], Awaitable[Grant]],
        limits: LocalLimits | None = None,
        interval_s: float = SYNC_INTERVAL_SECONDS,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or LocalLimits()
        self._send = send
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._waiters: list[asyncio.Future[None]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def admit(self, ticket: Ticket) -> None:
        """Returns once admitted (then call `finish`); raises the refusal."""
        if self._task is None:
            self.start()
        result = self.limits.admit(ticket, self._clock())
        if result is None:
            return
        if isinstance(result, NeedGrant):
            await self._next_sync()
            result = self.limits.admit(ticket, self._clock(), may_wait=False)
            assert not isinstance(result, NeedGrant)
            if result is None:
                return
        raise result

    def finish(self, request_id: str, tokens: int | None) -> None:
        """The request ended (what it gave back goes to the ledger at the next sync, at once
        when another replica may be waiting for it)."""
        if self.limits.finish(request_id, tokens, self._clock()) and self._wake is not None:
            self._wake.set()

    async def release(self, request_id: str, tokens: int | None) -> None:
        """`finish`, and when it gave back what another replica may be waiting for, return
        once the ledger has it (bounded by the sync timeout): call before a reply's last
        bytes, so that the client's next request finds it free wherever it lands."""
        if self.limits.finish(request_id, tokens, self._clock()):
            await self._next_sync()

    def start(self) -> None:
        """Start the sync loop (on the running event loop) if it is not running."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _next_sync(self) -> None:
        """Wait for a sync whose report is taken after now (or the timeout: the second
        admission then decides from what is held, or alone)."""
        self.start()
        assert self._wake is not None
        done = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), self._timeout_s)

    async def sync_once(self) -> None:
        waiters, self._waiters = self._waiters, []
        report = self.limits.sync_request(self._clock())
        try:
            grant = await asyncio.wait_for(self._send(report), self._timeout_s)
        except Exception:  # noqa: BLE001 (any failure: the ledger is unavailable)
            self.limits.sync_failed(self._clock())
        else:
            self.limits.apply_grant(grant, self._clock())
        finally:
            for done in waiters:
                if not done.done():
                    done.set_result(None)

    async def _sync_forever(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            await self.sync_once()
            # the next interval, or sooner when an exhausted subject's window frees some
            wait = min(self._interval_s, self.limits.frees_at - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wait))


__all__: Sequence[str] = (
    "NEED_GRANT",
    "Grant",
    "LocalLimits",
    "NeedGrant",
    "QuotaBook",
    "QuotaClient",
    "SyncReport",
)
