"""The results as ratios against targets and as markdown tables (the README's numbers)."""

from __future__ import annotations

import math
from typing import Any

from bench.machine import header

PEER_NAMES = {"litserve": "LitServe", "triton": "Triton"}


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each headline ratio with its target and whether it was met (None: no target)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, met: bool | None, unit: str = "") -> None:
        rows.append({"measure": name, "value": value, "unit": unit, "target": target, "met": met})

    cases = _get(results, "serving", "cases") or {}
    naive = _get(results, "serving", "naive") or {}
    if "sample_c32" in cases and "floor_c32" in cases:
        share = _ratio(cases["sample_c32"]["req_s"], cases["floor_c32"]["req_s"])
        add("/sample throughput / floor, c=32", share, ">= 0.7", _at_least(share, 0.7), "x")
        spread = _ratio(cases["sample_c32"]["p99_ms"], cases["sample_c32"]["p50_ms"])
        add("/sample p99 / p50, c=32", spread, "<= 3", _at_most(spread, 3.0), "x")
    if "anomaly_1_c8" in cases and "upload_floor_1_c8" in cases:
        share = _ratio(cases["anomaly_1_c8"]["req_s"], cases["upload_floor_1_c8"]["req_s"])
        add("/anomaly-score (1 PNG) throughput / upload floor, c=8", share, "-", None, "x")
    for concurrency in (32, 64):
        key = f"sample_c{concurrency}"
        if key in cases and key in naive:
            gain = _ratio(cases[key]["req_s"], naive[key]["req_s"])
            add(f"batching gain (req/s vs naive), c={concurrency}", gain, "> 1", _above(gain), "x")
    if "sample_c1" in cases and "sample_c1" in naive:
        cost = cases["sample_c1"]["p50_ms"] - naive["sample_c1"]["p50_ms"]
        add("batching latency cost at c=1 (p50)", cost, "<= +1 ms", _at_most(cost, 1.0), "ms")
    for row in (_get(results, "peers", "cases") or {}).values():
        add(
            f"{row['what']}, c={row['concurrency']}: project / {PEER_NAMES[row['peer']]}",
            row["ratio"],
            f">= {row['goal']:g}",
            _at_least(row["ratio"], row["goal"]),
            "x",
        )
    soak = _get(results, "startup", "soak")
    if soak:
        growth = soak["rss_growth_mb"]
        add(
            "soak RSS growth (after a warm-up of the mix)",
            growth,
            "< 50 MB",
            _below(growth, 50.0),
            "MB",
        )
        errors = soak["server_errors"] + soak.get("warmup_server_errors", 0)
        add("soak 5xx", errors, "0", errors == 0)
    cpu = _get(results, "training", "cpu")
    if cpu:
        add("training epoch speedup vs seed-style loop (CPU)", cpu["speedup"], "-", None, "x")
    gpu = _get(results, "training", "gpu")
    if gpu is not None:
        if gpu.get("measured"):
            best = min(row["epoch_s"] for row in gpu["epochs"])
            is_h100 = "H100" in gpu["device"]
            add(
                "60k-image epoch, best variant (GPU)",
                best,
                "< 1 s on an H100",
                (best < 1.0) if is_h100 else None,
                "s",
            )
        else:
            add("60k-image epoch (GPU)", None, "< 1 s on an H100", None, gpu["reason"])
    return rows


def _at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None else value >= bound


def _at_most(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def _below(value: float | None, bound: float) -> bool | None:
    return None if value is None else value < bound


def _above(value: float | None) -> bool | None:
    return None if value is None else value > 1.0


def choose_workers(results: dict[str, Any]) -> dict[str, Any] | None:
    """Per configuration, the geometric mean over its cases of req/s relative to 1 worker with
    torch's default threads, and the fastest configuration."""
    configs = _get(results, "workers", "configs")
    if not configs or "w1_tdefault" not in configs:
        return None
    base = configs["w1_tdefault"]["cases"]
    relative: dict[str, float] = {}
    for label, config in configs.items():
        logs = [
            math.log(row["req_s"] / base[name]["req_s"])
            for name, row in config["cases"].items()
            if base[name]["req_s"] > 0 and row["req_s"] > 0
        ]
        relative[label] = math.exp(sum(logs) / len(logs)) if logs else math.nan
    best = max(relative, key=lambda label: relative[label])
    return {
        "relative_throughput": relative,
        "fastest": best,
        "fastest_workers": configs[best]["workers"],
        "default": "one worker per usable core, each with torch's own threads",
    }


def _config_table(configs: dict[str, Any], first: list[str]) -> list[str]:
    """One row per configuration, one `req/s (p50 / p99 ms)` column per case."""
    some = next(iter(configs.values()))["cases"]
    columns = [
        *first,
        *(
            f"`{row['endpoint']}` c={row['concurrency']}: req/s (p50 / p99 ms)"
            for row in some.values()
        ),
    ]
    rows = []
    for label, config in configs.items():
        cells = [label] + [
            f"{_fmt(row['req_s'])} ({_fmt(row['p50_ms'], 1)} / {_fmt(row['p99_ms'], 1)})"
            for row in config["cases"].values()
        ]
        rows.append(cells)
    return _table(columns, rows)


def _peers_lines(peers: dict[str, Any] | None) -> list[str]:
    if not peers:
        return []
    if "skipped" in peers:
        return ["**Peers**: not measured, " + peers["skipped"] + ".", ""]
    lines = [
        "**Peers** (the same checkpoint and work on the same cores, rounds interleaved; "
        f"LitServe with batch_timeout {peers['litserve_batch_timeout_s']:g}, "
        f"each peer's model on {peers.get('peer_torch_threads', 'default')} torch thread(s), "
        f"{peers['idle_litserve']}; the project with its default settings)",
        "",
    ]
    rows = []
    for name, row in peers["cases"].items():
        mine, theirs = row["project"], row["peer_result"]
        rows.append(
            [
                name,
                row["what"],
                str(row["concurrency"]),
                PEER_NAMES[row["peer"]],
                f"{_fmt(theirs['req_s'])} ({_fmt(theirs['p50_ms'], 1)} / "
                f"{_fmt(theirs['p99_ms'], 1)})",
                f"{_fmt(mine['req_s'])} ({_fmt(mine['p50_ms'], 1)} / {_fmt(mine['p99_ms'], 1)})",
                f"{_fmt(row['ratio'], 2)}x",
                f">= {row['goal']:g}x",
                f"{_fmt(theirs['errors'])} / {_fmt(mine['errors'])}",
            ]
        )
    columns = [
        "case",
        "work",
        "concurrency",
        "peer",
        "peer req/s (p50 / p99 ms)",
        "project req/s (p50 / p99 ms)",
        "project / peer",
        "goal",
        "errors peer / project",
    ]
    return [*lines, *_table(columns, rows), ""]


def _batching_lines(batching: dict[str, Any] | None) -> list[str]:
    if not batching:
        return []
    lines = ["**Batching settings** (the same server, one setting changed)", ""]
    lines += _config_table(batching["configs"], ["configuration"])
    cost = batching.get("model_cost", {}).get("us_per_image", {})
    if cost:
        sizes = list(next(iter(cost.values())))
        lines += [
            "",
            "Decoder cost per image by batch size (in-process, no HTTP), microseconds:",
            "",
        ]
        lines += _table(
            ["torch threads", *sizes],
            [
                [key.removeprefix("threads_"), *(_fmt(v, 0) for v in row.values())]
                for key, row in cost.items()
            ],
        )
        lines += [
            "",
            "With more torch threads than idle cores, OpenMP's barriers wait for descheduled "
            "threads: the multi-thread row then times the other work on the machine.",
        ]
    return [*lines, ""]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _serving_rows(cases: dict[str, Any], floors: dict[str, Any] | None) -> list[list[str]]:
    rows = []
    for name, row in cases.items():
        floor_row = None
        if floors is not None and name.startswith("sample_c"):
            floor_row = floors.get(name.replace("sample", "floor"))
        elif floors is not None and name == "anomaly_1_c8":
            floor_row = floors.get("upload_floor_1_c8")
        share = _ratio(row["req_s"], floor_row["req_s"]) if floor_row else None
        concurrency = (
            f"rate {row['rate']:.0f}/s" if row["mode"] == "rate" else str(row["concurrency"])
        )
        rows.append(
            [
                name,
                f"`{row['endpoint']}`",
                concurrency,
                _fmt(row["req_s"]),
                _fmt(row["images_s"]),
                _fmt(row["p50_ms"], 2),
                _fmt(row["p90_ms"], 2),
                _fmt(row["p99_ms"], 2),
                _fmt(row["errors"]),
                _fmt(share, 2),
                _fmt(row.get("server_cpu_us_per_req"), 0),
                _fmt(row["client_cpu_us_per_req"], 0),
            ]
        )
    return rows


SERVING_COLUMNS = [
    "case",
    "endpoint",
    "concurrency",
    "req/s",
    "images/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "errors",
    "of floor",
    "server CPU us/req",
    "client CPU us/req",
]


def markdown(results: dict[str, Any]) -> str:
    """The README's benchmark section: header, targets, then one table per part."""
    lines = [
        f"Measured with `{results['command']}` on {results['date']}: {header(results['machine'])}.",
        "",
        "These machines are shared and noisy (other jobs run on the same cores; the load average "
        "is in the header), and the load generator runs on the same cores as the server it "
        "measures (its CPU per request is the last column): compare the ratios, which are "
        "measured side by side in one run, more than the absolute numbers.",
        "",
    ]
    target_rows = [
        [
            row["measure"],
            f"{_fmt(row['value'], 2)} {row['unit']}".strip()
            if row["value"] is not None
            else row["unit"] or "-",
            row["target"],
            _fmt(row["met"]),
        ]
        for row in results.get("targets", [])
    ]
    if target_rows:
        lines += ["**Targets**", ""]
        lines += [*_table(["measure", "value", "target", "met"], target_rows), ""]
    serving = results.get("serving")
    if serving:
        lines += ["**Serving** (default settings; `of floor` = req/s over the floor's)", ""]
        lines += _table(SERVING_COLUMNS, _serving_rows(serving["cases"], serving["cases"]))
        lines.append("")
        for name, reason in serving.get("skipped", {}).items():
            lines += [f"{name}: not measured, {reason}.", ""]
        if serving.get("naive"):
            lines += [
                "**Naive baseline**: the same server with `VAE_MAX_BATCH_IMAGES=1`, one forward "
                "pass per request",
                "",
            ]
            lines += [*_table(SERVING_COLUMNS, _serving_rows(serving["naive"], None)), ""]
    lines += _peers_lines(results.get("peers"))
    lines += _batching_lines(results.get("batching"))
    workers = results.get("workers")
    if workers:
        choice = results.get("workers_choice") or {}
        configs = {
            f"{c['workers']} x {c['torch_threads'] or 'default'}": c
            for c in workers["configs"].values()
        }
        lines += ["**Workers** (uvicorn workers x torch threads per worker)", ""]
        lines += _config_table(configs, ["workers x threads"])
        if choice:
            relative = ", ".join(
                f"{label} {_fmt(value, 2)}x"
                for label, value in choice["relative_throughput"].items()
            )
            lines += [
                "",
                f"Throughput relative to 1 worker with torch's default threads (geometric mean "
                f"over the cases): {relative}. Fastest: {choice['fastest']}; the service's "
                f"default: {choice['default']}.",
            ]
        lines.append("")
    startup = results.get("startup")
    if startup:
        soak = startup["soak"]
        lines += ["**Startup and memory**", ""]
        lines += _table(
            ["measure", "value"],
            [
                ["process start to `/readyz` 200", f"{startup['startup_s']:.2f} s"],
                ["RSS when ready", f"{startup['rss_ready_mb']:.0f} MB"],
                [
                    f"RSS after {startup['requests_before_rss']:,} requests",
                    f"{startup['rss_after_requests_mb']:.0f} MB",
                ],
                [
                    f"soak: {soak['warmup_requests']:,} warm-up + {soak['requests']:,} mixed "
                    f"requests, c={soak['concurrency']} ({len(soak['endpoints'])} kinds, "
                    "in turn)",
                    f"{soak['req_s']:.0f} req/s, "
                    f"{soak['server_errors'] + soak['warmup_server_errors']} 5xx, "
                    f"{soak['errors']} non-2xx",
                ],
                [
                    "RSS over the soak: after the warm-up, halfway, at the end",
                    f"{soak['rss_before_mb']:.0f} / {soak['rss_mid_mb']:.0f} / "
                    f"{soak['rss_after_mb']:.0f} MB",
                ],
                [
                    "RSS growth over the soak (second half)",
                    f"{soak['rss_growth_mb']:+.1f} MB "
                    f"({soak['rss_growth_second_half_mb']:+.1f} MB)",
                ],
                [
                    "RSS growth including the warm-up of the mix",
                    f"{soak['rss_growth_with_warmup_mb']:+.1f} MB",
                ],
            ],
        )
        lines.append("")
    training = results.get("training")
    if training:
        lines += ["**Training**", ""]
        cpu = training.get("cpu")
        if cpu:
            lines += _table(
                [
                    f"loop (CPU, default preset, {cpu['torch_threads']} torch thread(s) each, "
                    "epochs alternating)",
                    "seconds per epoch",
                    "data",
                ],
                [
                    [
                        "project: device-resident `Batches` + `Trainer`",
                        f"{cpu['project_epoch_s']:.2f}",
                        cpu["dataset"],
                    ],
                    [
                        "seed-style: `Dataset` (PIL + ToTensor) + `DataLoader`",
                        f"{cpu['seed_style_epoch_s']:.2f}",
                        cpu["dataset"],
                    ],
                    ["speedup", f"{cpu['speedup']:.2f}x", ""],
                ],
            )
            lines.append("")
        gpu = training.get("gpu") or {}
        if gpu.get("measured"):
            lines += [f"GPU: {gpu['device']}; {gpu['data']}.", ""]
            lines += _table(
                ["variant", "batch", "seconds per 60k epoch", "images/s"],
                [
                    [
                        row["variant"],
                        str(row["batch_size"]),
                        f"{row['epoch_s']:.3f}",
                        _fmt(row["images_s"], 0),
                    ]
                    for row in gpu["epochs"]
                ],
            )
            iwae = ", ".join(f"{k} {_fmt(v, 0)} images/s" for k, v in gpu["iwae_images_s"].items())
            lines += ["", f"IWAE evaluation (k={gpu['iwae_k']}, label-marginalised): {iwae}.", ""]
        elif gpu:
            lines += [
                f"GPU rows (60k-image epochs, bf16, torch.compile, IWAE): {gpu['reason']}.",
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"
