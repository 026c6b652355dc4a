"""Turns the raw results of run.py into a markdown table and a PNG plot.

    python3 bench/data-plane/report.py bench/data-plane/results/STAMP.json

re-renders both from a saved run without measuring again.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PATHS = ("direct", "remora", "envoy")
# The tests whose peak RSS counts as "under load" (1 MiB responses are
# reported apart: their buffers are bounded by flow-control windows).
UNDER_LOAD = ("h1", "h2", "grpc", "churn", "lat")
PCTS = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "n/a"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def by(runs, test, path, key, label=None):
    return med(
        r.get(key)
        for r in runs
        if r["test"] == test and r["path"] == path and (label is None or r.get("rate_label") == label)
    )


def errors(r):
    """wrk and oha: socket errors + non-2xx/3xx. h2load: failed + errored + timed
    out. (h2load's "status codes" line can count a few fewer 2xx than its
    "succeeded" count at the end of a timed run, for direct runs too; that
    gap is kept as status_2xx_gap, not counted here: docs/benchmarks.md.)"""
    if "failed" in r:
        return r["failed"] + r.get("errored", 0) + r.get("timeout", 0)
    return r.get("errors") or 0


def total(runs, test, path, key, label=None):
    return sum(
        (errors(r) if key == "errors" else r.get(key) or 0)
        for r in runs
        if r["test"] == test and r["path"] == path and (label is None or r.get("rate_label") == label)
    )


def rate_labels(runs):
    seen = []
    for r in runs:
        if r["test"] == "lat" and r["rate_label"] not in seen:
            seen.append(r["rate_label"])
    return seen


def label_text(label):
    if isinstance(label, str) and label.startswith("f"):
        return f"{float(label[1:]) * 100:.0f}% of max"
    return f"{float(label):,.0f} req/s"


def set_table(name: str, s: dict) -> str:
    runs = s["runs"]
    reps = 1 + max(r["rep"] for r in runs)
    lines = [
        f"### Set `{name}`: "
        + ("one worker per proxy (`--workers 1`, Envoy `--concurrency 1`)" if name == "one"
           else "each proxy's default threads (Remora one per core, Envoy one per core)")
        + f", median of {reps} rounds",
        "",
        "| measurement | direct | Remora | Envoy | Remora/Envoy | Remora/direct |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def row(title, vals, digits=0, better="", ratios=True):
        d, r, e = vals
        lines.append(
            f"| {title} | {fmt(d, digits)} | {fmt(r, digits)} | {fmt(e, digits)} | "
            f"{ratio(r, e) if ratios else ''} | {ratio(r, d) if ratios and d is not None else ''} |"
        )

    tp = {t: [by(runs, t, p, "rps") for p in PATHS] for t in ("h1", "h2", "grpc", "churn")}
    row("HTTP/1.1 keep-alive, wrk 32 conns: req/s", tp["h1"])
    row("HTTP/2, h2load 4 conns x 32 streams: req/s", tp["h2"])
    if any(tp["grpc"]):
        row("gRPC unary, h2load 4 conns x 32 streams: req/s", tp["grpc"])
    mib = [by(runs, "1m", p, "bytes_per_s") for p in PATHS]
    row("1 MiB responses, wrk 4 conns: MiB/s", [v / 2**20 if v else v for v in mib], 1)
    row("connection churn (`Connection: close`), wrk 8 conns: req/s", tp["churn"])
    for label in rate_labels(runs):
        got = [by(runs, "lat", p, "rps", label) for p in PATHS]
        row(f"latency at {label_text(label)}: achieved req/s", got)
        for key, pname in PCTS:
            vals = [by(runs, "lat", p, key, label) for p in PATHS]
            row(f"latency at {label_text(label)}: {pname} ms", vals, 3)
        errs = [total(runs, "lat", p, "errors", label) for p in PATHS]
        if any(errs):
            row(f"latency at {label_text(label)}: non-2xx or failed, all rounds", errs, ratios=False)
    for test, what in (("h1", "HTTP/1.1"), ("h2", "HTTP/2"), ("grpc", "gRPC unary"), ("churn", "churn")):
        cpu = [None] + [by(runs, test, p, "cpu_s_per_10k") for p in PATHS[1:]]
        if not any(cpu):
            continue
        row(f"CPU s per 10,000 requests, both sidecars, {what}", cpu, 3)
    idle = s["idle_rss_kib"]
    for side in ("client", "server"):
        vals = [None] + [idle[p][side] / 1024 for p in PATHS[1:]]
        row(f"RSS idle, {side} sidecar: MiB", vals, 1)

    def peak(path, side, tests):
        v = [r["rss_peak_kib"][side] for r in runs if r["path"] == path and r["test"] in tests]
        return max(v) / 1024 if v else None

    for side in ("client", "server"):
        row(f"RSS peak under load (HTTP/1.1, HTTP/2, gRPC, churn, latency), {side}: MiB",
            [None] + [peak(p, side, UNDER_LOAD) for p in PATHS[1:]], 1)
    for side in ("client", "server"):
        row(f"RSS peak during 1 MiB responses, {side}: MiB",
            [None] + [peak(p, side, ("1m",)) for p in PATHS[1:]], 1)
    share = [med(r.get("other_cpu_share") for r in runs if r["path"] == p) for p in PATHS]
    row("CPU used by other processes during these runs: % of machine (median)",
        [v * 100 if v is not None else None for v in share], ratios=False)
    errs = {t: [total(runs, t, p, "errors") for p in PATHS] for t in ("h1", "h2", "grpc", "1m", "churn")}
    for t, vals in errs.items():
        if any(vals):
            row(f"{t}: non-2xx responses or socket errors, all rounds", vals, ratios=False)
    lines.append("")
    lines.append(targets(name, s))
    return "\n".join(lines)


def targets(name: str, s: dict) -> str:
    runs = s["runs"]
    out = [f"Targets of issue 6, set `{name}`:", ""]
    for t, what in (("h1", "HTTP/1.1"), ("h2", "HTTP/2"), ("grpc", "gRPC unary")):
        r, e = by(runs, t, "remora", "rps"), by(runs, t, "envoy", "rps")
        if r and e:
            out.append(f"- throughput {what} at least 2x Envoy's: {r / e:.2f}x, "
                       f"{'met' if r >= 2 * e else 'NOT met'}")
    for label in rate_labels(runs):
        if isinstance(label, str):
            continue
        d = by(runs, "lat", "direct", "p99_ms", label)
        r = by(runs, "lat", "remora", "p99_ms", label)
        e = by(runs, "lat", "envoy", "p99_ms", label)
        if None in (d, r, e):
            continue
        ra, ea = r - d, e - d
        ok = ra <= 0.5 * ea
        out.append(f"- added p99 at {label_text(label)} at most half of Envoy's: Remora +{ra:.3f} ms, "
                   f"Envoy +{ea:.3f} ms, {'met' if ok else 'NOT met'}")
    for side in ("client", "server"):
        v = [r["rss_peak_kib"][side] for r in runs
             if r["path"] == "remora" and r["test"] in UNDER_LOAD]
        if v:
            m = max(v) / 1024
            out.append(f"- RSS under load at most 15 MiB, Remora {side} sidecar: {m:.1f} MiB, "
                       f"{'met' if m <= 15 else 'NOT met'}")
    return "\n".join(out) + "\n"


def markdown(results: dict) -> str:
    meta = results["meta"]
    m = meta["machine"]
    parts = [
        f"Run {meta['date_utc']}, commit `{meta['git']}`, `{meta['command']}`, "
        f"{meta.get('elapsed_s', '?')} s.",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['meminfo'].get('MemTotal')}, "
        f"kernel {m['kernel']}. Load average before: `{meta['loadavg_before']}`, "
        f"after: `{meta.get('loadavg_after', '?')}`.",
        "",
        "Versions: " + "; ".join(f"{k} `{v}`" for k, v in meta["versions"].items()),
        "",
    ]
    shares = [r["other_cpu_share"] for s in results["sets"].values() for r in s["runs"] if "other_cpu_share" in r]
    if shares:
        parts += [
            "CPU used by processes this run did not start, as a share of the machine's "
            f"{m['nproc']} CPUs during each measurement: median {statistics.median(shares):.0%}, "
            f"max {max(shares):.0%} (0% is a quiet machine).",
            "",
        ]
    if meta.get("binaries_built"):
        parts += ["Binaries built (mtime): " + ", ".join(f"{k} {v}" for k, v in meta["binaries_built"].items()), ""]
    if meta.get("git_dirty"):
        files = ", ".join(f"`{line[3:]}`" for line in meta["git_dirty"])
        parts += [f"At the start of the run the shared working tree had uncommitted changes in: {files}.", ""]
    for name, s in results["sets"].items():
        parts.append(set_table(name, s))
    return "\n".join(parts)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    sets = list(results["sets"].items())
    if not sets:
        return
    fig, axes = plt.subplots(len(sets), 4, figsize=(16, 4 * len(sets)), squeeze=False)
    colors = {"direct": "tab:gray", "remora": "tab:blue", "envoy": "tab:red"}
    for row, (name, s) in enumerate(sets):
        runs = s["runs"]
        for col, (key, pname) in enumerate(PCTS):
            ax = axes[row][col]
            for p in PATHS:
                pts = []
                for label in rate_labels(runs):
                    x = by(runs, "lat", p, "rps", label)
                    y = by(runs, "lat", p, key, label)
                    if x is not None and y is not None:
                        pts.append((x, y))
                pts.sort()
                if pts:
                    ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", color=colors[p], label=p)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.set_xlabel("request rate (req/s, achieved)")
            ax.set_ylabel(f"{pname} latency (ms)")
            ax.set_title(f"{pname}, set '{name}'")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    generator = "oha --latency-correction" if results["meta"]["versions"].get("oha") else "h2load --rps"
    fig.suptitle(f"HTTP/1.1 latency vs rate ({generator}), {results['meta']['date_utc']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    res = json.loads(Path(sys.argv[1]).read_text())
    print(markdown(res))
    if len(sys.argv) > 2:
        plot(res, Path(sys.argv[2]))
