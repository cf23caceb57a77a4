"""Runtime: the process and its tasks — wiring, the watcher, the group loops.

``service`` builds the adapters from the config and supervises one task per
job; ``consumerloop`` runs one consumer group's handler (ack after the effect,
claim the dead's messages, the one place a failure is recorded); ``watcher``
turns file-system facts into events; ``health``/``httpserver``/``sampler``/
``heartbeat`` serve probes, metrics and ``cefmp4 status``.

May import: domain, adapters, projections and consumers. Not ops or dev.
"""
