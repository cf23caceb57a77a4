"""Operator commands: ``cefmp4 events | retry | status | verify | doctor | gc``.

Each reads the log and the bucket through the same adapters the service uses
and prints for a person (or ``--json``); only ``retry`` (one event) and ``gc``
(aborting orphaned uploads) write. Exit codes are in docs/OPERATING.md.

May import: everything below it (domain, adapters, projections, consumers,
runtime). Not dev.
"""
