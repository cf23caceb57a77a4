"""Pure rules: the facts (events), the config, and every decision made on them.

Part planning, MP4 box walking, which files are recordings, object keys, path
wire forms, archive segment format, durations. Nothing here does I/O, reads
the clock or the environment; everything is tested with plain values and
hypothesis properties.

May import: the standard library, msgspec, this package, and the pure fold
``projections.streams``. Nothing from adapters, runtime, ops, dev or consumers
(``tests/test_layers.py`` enforces it).
"""
