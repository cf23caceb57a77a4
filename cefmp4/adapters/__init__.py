"""Adapters: the only code that talks to Redis, S3, the file system or Prometheus.

Each one is narrow (``storage.ObjectStore`` lists only the S3 calls the service
makes; ``eventlog.EventLog`` only the stream operations) and translates its
library's exceptions into ``cefmp4.domain.errors`` at the boundary: transient
(retried here), permanent (one recording fails), or the deployment is blocked
(waited out here). Nothing above an adapter catches a botocore or redis-py
exception.

May import: ``cefmp4.domain``, this package, and the pure fold
``projections.streams``. Not projections' runtime parts, consumers, runtime,
ops or dev.
"""
