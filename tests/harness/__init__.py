"""The black-box test harness of dispatched, shared by every suite in tests/.

* Cluster: a throwaway PostgreSQL 15 cluster with dispatched preloaded (scripts/cluster.sh).
* HttpService, Reply, Request: a programmable HTTP service that records what it is sent.
* free_port: a TCP port that is free now.

The pytest fixtures built on these are in tests/conftest.py.
"""

from .cluster import Cluster
from .http_service import Headers, HttpService, Reply, Request, WaitTimeout
from .net import free_port

__all__ = ["Cluster", "Headers", "HttpService", "Reply", "Request", "WaitTimeout", "free_port"]
