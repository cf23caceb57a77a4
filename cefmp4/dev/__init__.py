"""Development infrastructure: throwaway local servers and the schema generator.

``localservers`` starts private Redis, SeaweedFS and JuiceFS processes for
``cefmp4 local``, the tests and the benchmarks; ``schema`` writes
docs/events.schema.json. The service itself never imports this package: only
the command line's ``local`` command (``cefmp4.cli``) and the tests do.

May import: anything.
"""
