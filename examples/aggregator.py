"""A leader-elected aggregator: run it on several nodes, one of them does the work.

Every copy joins the election of the group ``aggregator``; the copy that
leads counts the programs of the fleet in the code database (``db``) and
logs a summary, the others wait.  When the leader's node dies, another copy
takes over once the lease expires (``ttl`` seconds), and carries on from the
``state`` the old leader saved: ``state`` follows the program, not the node.

Push a copy to each of several nodes (``--node``), or push it once as a
placed program with ``--placed --replicas 2``.
"""

import time

GROUP = "aggregator"
#: Seconds a leadership outlives its last renewal when the leader's node dies.
TTL = 15
#: Seconds between two summaries.
INTERVAL = 5.0


def count_programs():
    """Programs per node, from the code database."""
    per_node = {}
    for row in db.view("_all_docs", include_docs=True):
        doc = row.doc or {}
        owner = doc.get("type")
        if "code" in doc or "modules" in doc or "git" in doc:
            key = str(owner)
            per_node[key] = per_node.get(key, 0) + 1
    return per_node


def summarise():
    per_node = count_programs()
    state["summaries"] = state.get("summaries", 0) + 1
    state["last"] = per_node
    log(f"summary {state['summaries']}: {sum(per_node.values())} programs "
        f"on {len(per_node)} nodes")


def main():
    on_leadership(GROUP, gained=lambda: log(f"leading {GROUP} on node {node}"),
                  lost=lambda: log(f"no longer leading {GROUP}"), ttl=TTL)
    while not should_quit():
        # Ask before each piece of work: a leadership can end at any time.
        if leader(GROUP):
            summarise()
        deadline = time.monotonic() + INTERVAL
        while not should_quit() and time.monotonic() < deadline:
            time.sleep(0.1)
