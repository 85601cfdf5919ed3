"""Several nodes on one queue: who is there (heartbeats) and who leads (the leader lease).

    model.py      the nouns: a node's heartbeat, a node as listed, the leader lease
    decisions.py  pure: alive or dead, leader or not, until when (table-tested with a fake clock)
    node.py       the loop: heartbeat, take or renew the lease, return a dead node's leases
"""
