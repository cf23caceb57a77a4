"""Run the CefMP4 benchmarks and print a summary table.

    .venv/bin/python -m tests.bench.run                        # all, defaults
    .venv/bin/python -m tests.bench.run --only latency
    .venv/bin/python -m tests.bench.run --throughput="--size-mib 256 --chunk-mib 16" \\
        --latency="--runs 3 --s3 juicefs" --replay="--events 200000 --streams 2000"

Options inside ``--throughput`` / ``--latency`` / ``--cameras`` / ``--replay`` /
``--failover`` are those of ``python -m tests.bench.bench_throughput --help`` /
``bench_latency --help`` / ``bench_cameras --help`` / ``bench_replay --help`` (and
``--soak``: ``bench_soak --help``; ``--backlog``: ``bench_backlog --help``, e.g.
``--backlog="--recordings 300 --profile"``). Each bench
starts its own throwaway Redis (and, where it needs one, S3 server) under a
temp dir and takes three minutes or less on 2 cores, except the soak bench
at its default (year-scale) size: about ten. The JSON of everything goes to
``.cefmp4/bench/results.json`` (relative to the repo root).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from tests.bench import (
    bench_backlog,
    bench_cameras,
    bench_failover,
    bench_latency,
    bench_replay,
    bench_soak,
    bench_throughput,
)
from tests.bench.common import BenchError, command_line, machine, now_iso, write_json

Bench = tuple[
    Callable[[list[str] | None], argparse.Namespace],
    Callable[[argparse.Namespace], dict[str, Any]],
    Callable[[dict[str, Any]], str],
]
BENCHES: dict[str, Bench] = {
    "throughput": (bench_throughput.parse_args, bench_throughput.run, bench_throughput.report),
    "latency": (bench_latency.parse_args, bench_latency.run, bench_latency.report),
    "cameras": (bench_cameras.parse_args, bench_cameras.run, bench_cameras.report),
    "replay": (bench_replay.parse_args, bench_replay.run, bench_replay.report),
    "failover": (bench_failover.parse_args, bench_failover.run, bench_failover.report),
    "soak": (bench_soak.parse_args, bench_soak.run, bench_soak.report),
    "backlog": (bench_backlog.parse_args, bench_backlog.run, bench_backlog.report),
}
# One JSON line of the headline figures, where a bench defines them.
HEADLINES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "throughput": bench_throughput.headline,
    "latency": bench_latency.headline,
    "cameras": bench_cameras.headline,
}


def summary(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(figure, value, what it means) rows."""
    rows: list[tuple[str, str, str]] = []
    tp = results.get("throughput")
    if tp is not None and "error" not in tp:
        svc, st, q = tp["service"], tp["settings"], tp["ratios"]
        rows.append(
            (
                "throughput: service",
                f"{svc['mib_per_s']:.1f} MiB/s",
                f"{st['size_mib']} MiB, FileSeen -> sidecar written; "
                f"{svc['cpu_seconds_per_gib']:.2f} CPU-s/GiB, gateway "
                f"{svc['gateway_cpu_seconds_per_gib']:.2f}",
            )
        )
        ceiling = tp.get("ceiling")
        if ceiling is not None:
            unknown = ceiling["env_unknown_to_service"]
            rows.append(
                (
                    "throughput: ceiling (no hashing)",
                    f"{ceiling['mib_per_s']:.1f} MiB/s",
                    f"{ceiling['cpu_seconds_per_gib']:.2f} CPU-s/GiB"
                    + (f"; service ignores {unknown}" if unknown else ""),
                )
            )
        for peer in tp["peers"].values():
            rows.append(
                (
                    f"throughput: {peer['label']}",
                    f"{peer['mib_per_s']:.1f} MiB/s",
                    f"{peer['cpu_seconds_per_gib']:.2f} CPU-s/GiB, gateway "
                    f"{peer['gateway_cpu_seconds_per_gib']:.2f}; start-up "
                    f"{peer['startup_seconds']:.2f} s included",
                )
            )
        if "speed_vs_best_peer" in q:
            rows.append(
                (
                    "throughput: service / best peer",
                    f"{q['speed_vs_best_peer']:.2f}",
                    f"MiB/s vs {q['best_peer']}; target >= {q['speed_target']}: "
                    f"{'met' if q['speed_met'] else 'MISSED'}",
                )
            )
        if "cpu_vs_aws" in q:
            rows.append(
                (
                    "throughput: service / aws CPU",
                    f"{q['cpu_vs_aws']:.2f}",
                    f"CPU-s per GiB; target <= {q['cpu_target']}: "
                    f"{'met' if q['cpu_met'] else 'MISSED'}",
                )
            )
        # The largest part of the plan the service recorded (older results: the chunk).
        part = max(svc.get("plan", {"rest": st["CHUNK_SIZE_BYTES"]}).values())
        rows.append(
            (
                "service peak RSS (VmHWM)",
                f"{svc['peak_rss_mib']:.0f} MiB",
                f"{svc['baseline_rss_mib']:.0f} MiB idle; target <= 100 MiB + parts in flight "
                f"{st['PART_CONCURRENCY']} x {part // 2**20} MiB = "
                f"{q['rss_limit_mib']} MiB: {'met' if q['rss_met'] else 'MISSED'}",
            )
        )
        rows.append(("throughput: verified", "yes" if tp["ok"] else "NO", "HEAD size + ETag"))
    lat = results.get("latency")
    if lat is not None and "error" not in lat:
        s = lat["settings"]
        for kind, k in lat["kinds"].items():
            rows.append(
                (
                    f"latency {kind}: p50",
                    f"{k['p50_s']:.3f} s",
                    f"{s['runs']} x {k['size_mib']} MiB, close -> sidecar HEAD 200, "
                    f"{lat['server']}, SETTLE_SECONDS={s['SETTLE_SECONDS']:g} "
                    f"STREAM_TIMEOUT_SECONDS={s['STREAM_TIMEOUT_SECONDS']:g}; target <= "
                    f"{k['target_p50_s']:g} s: {'met' if k['target_met'] else 'MISSED'}",
                )
            )
            rows.append((f"latency {kind}: max", f"{k['max_s']:.3f} s", ""))
        rows.append(("latency: verified", "yes" if lat["ok"] else "NO", "sidecar size + sha256"))
    cam = results.get("cameras")
    if cam is not None and "error" not in cam:
        s = cam["settings"]
        rows += [
            (
                "cameras: service CPU",
                f"{cam['service_cpu_percent_of_core']:.1f} %",
                f"of a core, {s['cameras']} x {s['mbit_per_s']:g} Mbit/s steady recording; "
                f"target <= {cam['cpu_target_percent']:g} %: "
                f"{'met' if cam['cpu_met'] else 'MISSED'}",
            ),
            (
                "cameras: close -> sidecar max",
                f"{cam['close_to_sidecar_max_s']:.3f} s",
                f"p50 {cam['close_to_sidecar_p50_s']:.3f} s, all {s['cameras']} closing within "
                f"{s['close_spread_s']:g} s; target <= {cam['delay_target_max_s']:g} s: "
                f"{'met' if cam['delay_met'] else 'MISSED'}",
            ),
            ("cameras: verified", "yes" if cam["ok"] else "NO", "sidecar size + sha256"),
        ]
    rp = results.get("replay")
    if rp is not None and "error" not in rp:
        cu, t = rp["catch_up"], rp["targets"]
        rows.append(
            (
                "replay: catch_up from the log",
                f"{cu['events_per_s']:,} ev/s",
                f"{cu['events']:,} events, no snapshot; target >= "
                f"{t['replay_events_per_s']:,}: {'met' if t['replay_met'] else 'MISSED'}",
            )
        )
        for x in rp["restarts"]:
            target = ""
            if x["tail_events"] == 10_000 and t["restart_met"] is not None:
                met = "met" if t["restart_met"] else "MISSED"
                target = f"; target <= {t['restart_seconds']:g} s: {met}"
            rows.append(
                (
                    f"replay: restart, snapshot + {x['tail_events']:,} tail",
                    f"{x['restart']['seconds']:.3f} s",
                    f"snapshot {x['snapshot_bytes'] / 2**20:.0f} MiB: encode "
                    f"{x['snapshot_encode_seconds']:.2f} s (blocks a catch_up), SET "
                    f"{x['snapshot_set_seconds']:.2f} s (background){target}",
                )
            )
        rows.append(("replay: verified", "yes" if rp["ok"] else "NO", "== in-memory replay"))
    fo = results.get("failover")
    if fo is not None and "error" not in fo:
        rows.append(
            (
                "failover: kill -9 -> next part",
                f"{fo['p50_s']:.3f} s",
                f"p50 of {fo['settings']['runs']}, LEASE_TTL_SECONDS="
                f"{fo['settings']['LEASE_TTL_SECONDS']:g}, max {fo['max_s']:.3f} s",
            )
        )
    bl = results.get("backlog")
    if bl is not None and "error" not in bl:
        rows.append(
            (
                "backlog: small recordings drained",
                f"{bl['recordings_per_s']:.1f}/s",
                f"{bl['settings']['recordings']} x {bl['settings']['recording_bytes']} B, target "
                f">= {bl['target_per_s']:g}/s, {bl['cpu_seconds']['per_recording_ms']:.1f} "
                "CPU-ms each",
            )
        )
    sk = results.get("soak")
    if sk is not None and "error" not in sk:
        for name, met in sk["targets"].items():
            rows.append((f"soak: {name}", "met" if met else "MISSED", ""))
    for name, result in results.items():
        if "error" in result:
            rows.append((f"{name}: FAILED", "-", result["error"].splitlines()[0][:80]))
    return rows


def table(rows: list[tuple[str, str, str]]) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"  {a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--only", choices=sorted(BENCHES), action="append")
    parser.add_argument("--throughput", default="", metavar="ARGS", help="bench_throughput args")
    parser.add_argument("--latency", default="", metavar="ARGS", help="bench_latency args")
    parser.add_argument("--cameras", default="", metavar="ARGS", help="bench_cameras args")
    parser.add_argument("--replay", default="", metavar="ARGS", help="bench_replay args")
    parser.add_argument("--failover", default="", metavar="ARGS", help="bench_failover args")
    parser.add_argument("--soak", default="", metavar="ARGS", help="bench_soak args")
    parser.add_argument("--backlog", default="", metavar="ARGS", help="bench_backlog args")
    args = parser.parse_args(argv)
    selected = args.only or list(BENCHES)
    options = {
        "throughput": args.throughput,
        "latency": args.latency,
        "cameras": args.cameras,
        "replay": args.replay,
        "failover": args.failover,
        "soak": args.soak,
        "backlog": args.backlog,
    }
    # Parse everything first: a typo should fail before minutes of benchmarking.
    parsed = {name: BENCHES[name][0](shlex.split(options[name])) for name in selected}
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    for name in selected:
        _, run, report = BENCHES[name]
        print(f"== {name} ...", flush=True)
        bench_start = time.monotonic()
        try:
            results[name] = run(parsed[name])
        except BenchError as exc:
            results[name] = {"ok": False, "error": str(exc)}
            print(f"{name} FAILED: {exc}", file=sys.stderr, flush=True)
            continue
        results[name]["bench_seconds"] = round(time.monotonic() - bench_start, 1)
        print(report(results[name]), flush=True)
    info = machine()
    payload = {
        "command": command_line(),
        "finished_at": now_iso(),
        "total_seconds": round(time.monotonic() - started, 1),
        "machine": info,
        "benches": results,
    }
    path = write_json("results.json", payload)
    print()
    print("== CefMP4 benchmark summary")
    print(f"  command: {payload['command']}")
    print(f"  machine: {info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']}")
    loads = {n: r["load_average_1m_before"] for n, r in results.items() if "error" not in r}
    busy = any(v > 0.5 * (info["cpus"] or 1) for v in loads.values())
    print(
        f"  1-min load average before each bench: {loads}"
        + ("  <- other work was running: figures are noisy, compare runs" if busy else "")
    )
    print(table(summary(results)))
    line = {
        name: {"ok": r["ok"], **HEADLINES[name](r)}
        for name, r in results.items()
        if name in HEADLINES and "error" not in r
    }
    print("  RESULT " + json.dumps(line, separators=(",", ":")))
    print(f"  JSON: {path}")
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
