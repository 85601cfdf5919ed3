"""The cluster's nouns, as the store keeps them (store/cluster.sql); views.py shows them (``relaywatch nodes``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NodeState(enum.StrEnum):
    RUNNING = "running"      # as stored: beating (alive or dead is the heartbeat's age, decisions.py)
    DRAINING = "draining"    # stopping cleanly (node drain, SIGTERM): accepts nothing, finishes its deliveries
    STOPPED = "stopped"      # stopped cleanly: no incident, its leases were returned


@dataclass(frozen=True)
class NodeBeat:
    """What a node writes with each heartbeat."""
    name: str                # server.node_name
    instance: str            # this start: the owner of its leases (name:pid:random, the scheduler's)
    address: str             # where it listens, for people
    role: str                # all | deliver
    version: str
    started_at: float
    at: float                # the heartbeat's time, by the node's clock
    leases: int = 0          # entries it is delivering now
    received: int = 0        # queue entries it accepted since it started (one per message and route)
    delivered: int = 0       # recipients it delivered since it started
    state: NodeState = NodeState.RUNNING


@dataclass(frozen=True)
class LeaderLease:
    holder: str | None       # the instance holding it
    term: int                # grows whenever another instance takes it
    until: float

