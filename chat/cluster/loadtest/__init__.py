"""``chat loadtest``: load tests over the launcher's cluster (:class:`LocalCluster`).

One run = one scenario on a fresh cluster (PostgreSQL, Redis, chat and Flannel nodes,
HAProxy, all on loopback)::

    wsblast x --procs --ws--> haproxy :plain --/?workspace=W--> flannel-i --> chat-j
                                              --/chat---------> chat-j     (--no-flannel)
    poster  (users p0 of each workspace) --ws /chat--> chat tier  (t=<monotonic ns>; in text)
    observers (o0.. per workspace, Python) --same path as the clients--> latency samples

Scenarios (``--scenario``):

* ``chatter``: every client live (paced), then the posters post ``--rate`` messages/s
  round-robin over ``--channels`` channels for ``--post-before`` + ``--post-after`` s;
* ``hot``: the same into one channel (fan-out to everyone in it);
* ``storm``: clients live, posting, then every client is dropped at once by ``--cut``:
  ``flannel`` (SIGKILL the Flannel node holding most clients), ``chat`` (SIGKILL the chat
  node holding most connections), ``haproxy`` (stop and start HAProxy: every connection
  through it is cut), ``client`` (every client connection is shut at the edge with
  HAProxy's ``shutdown sessions``: wsblast has no client-side drop command); clients come
  back after uniform(0, ``--jitter-ms``) and resume, failures back off from
  ``--backoff-ms`` with full jitter (wsblast's storm mode, as ``chat.client``);
* ``monday``: a cold start: every client connects at once (no pacing, no resume) to
  caches that never saw the workspace, then a short posting period.

Measured: time to live (p50/p99/last) and the peak connect rate of the measured round
(the storm, or the cold start), bytes from HAProxy to the clients per client in it
(HAProxy's backend counters), Flannel workspace loads (``flannel_workspace_loads_total``)
and PostgreSQL work in it (``pg_stat_statements`` when the server preloads it, else
transactions from ``pg_stat_database``), delivery latency p50/p99 during and after the
storm (observers), and the delivery check: each live client's count of ``message.posted``
against the posters' messages in PostgreSQL (lost) and durable seqs seen twice
(duplicated). Reported live (rich), then as a table, JSON
(``bench/results/loadtest-<date>.json``) and a PNG (matplotlib).

HAProxy's public listener is TLS only and wsblast speaks no TLS: the cluster is started
with ``LocalCluster(plain=True)``, which renders a plaintext loopback ``bind`` into the
``public`` frontend (same routing, limits and counters). Everything started here is
stopped by PID; every wait is bounded.

Files:

* ``options.py``: :class:`Options` (what a run is asked to do), the scenario and cut
  names, :class:`LoadTestError`;
* ``edge.py``: HAProxy as the harness sees it: the stats page, per-socket bytes (``ss``);
* ``wsblast.py``: the wsblast processes (build, start, line protocol, stop by PID) and
  their STORM/COUNTS reports merged;
* ``traffic.py``: the Python posters and observers;
* ``counters.py``: PostgreSQL work and stored messages, Flannel's workspace loads;
* ``run.py``: :class:`Run`, one scenario from start to teardown, into one result dict;
* ``report.py``: the live view, the table, the JSON and the PNG;
* ``cli.py``: the command line (``chat loadtest``, ``python -m chat.cluster.loadtest``).
"""

from chat.cluster.loadtest.cli import main, parse_args
from chat.cluster.loadtest.edge import edge_bytes
from chat.cluster.loadtest.options import CUTS, SCENARIOS, LoadTestError, Options
from chat.cluster.loadtest.report import plot, summary_rows, write
from chat.cluster.loadtest.run import Run
from chat.cluster.loadtest.wsblast import pct, peak_rate

__all__ = [
    "CUTS",
    "SCENARIOS",
    "LoadTestError",
    "Options",
    "Run",
    "edge_bytes",
    "main",
    "parse_args",
    "pct",
    "peak_rate",
    "plot",
    "summary_rows",
    "write",
]
