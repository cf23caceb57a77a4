"""Reusable contract suites: a base class of tests per extension point, run
against every implementation by subclassing it and providing its fixtures
(after eventsourcing's and litestream's per-backend test classes)."""
