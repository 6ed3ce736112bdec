"""The cluster: one topology, rendered for docker compose and started by a local launcher.

::

    client ──wss──▶ HAProxy :public ──/?workspace=W (consistent hash)──▶ flannel0..M-1
                         │                                                 │ ws /service
                         │ /chat (leastconn)        HAProxy :internal ◀────┘ (service key)
                         ▼                                 │ (leastconn, slowstart)
                    chat0..N-1 ◀───────────────────────────┘
                      │    │
        (SCRAM) postgres   redis (ACL user)

* ``topology.py``: THE description: services, roles, who talks to whom; the endpoints
  (compose or local) and secrets; :func:`~chat.cluster.topology.environment`, the settings
  every chat and Flannel node gets (compose and the launcher).
* ``haproxy.py``: haproxy.cfg from topology + endpoints (TLS, hashing, health checks,
  websocket timeouts, rate limits, queueing, stats, gentle reloads).
* ``tls.py``: a self-signed certificate for the launcher.
* ``processes.py``: processes we start and stop by PID, with bounded waits and a reaper.
* ``launcher.py``: ``chat cluster up`` and :class:`~chat.cluster.launcher.LocalCluster`:
  the whole topology as local processes. The one harness: ``chat loadtest``, the
  integration tests and tests/cluster.py (its options: an external database, no HAProxy,
  nodes added at run time) all run through it.
* ``render.py``: ``python -m chat.cluster.render``: deploy/haproxy.cfg, docker-compose.yml
  (a test fails when they drift from the topology).
"""
