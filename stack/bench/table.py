"""The benchmark's printed table: the report's figures as text, nothing computed anew."""

from __future__ import annotations

from typing import Any

from stack.bench.report import NOISE_NOTE, as_number


def _f(value: Any, spec: str = ",.2f") -> str:
    number = as_number(value)
    return "-" if number is None else format(number, spec)


def _latency_row(label: str, count: Any, lat: dict[str, Any] | None, extra: str = "") -> str:
    lat = lat or {}
    return (
        f"  {label:<46}{_f(count, ',.0f'):>8}{_f(lat.get('p50_ms')):>10}"
        f"{_f(lat.get('p95_ms')):>10}{_f(lat.get('p99_ms')):>10}  {extra}"
    )


def _cpu(part: dict[str, Any]) -> str:
    cpu, seconds = as_number(part.get("producer_cpu_s")), as_number(part.get("seconds"))
    return f" (producer CPU {cpu / seconds:.0%})" if cpu is not None and seconds else ""


def _unavailable(label: str, reason: Any) -> str:
    return f"  {label:<46}  unavailable: {reason}"


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    model = report.get("model") or {}
    worker = report.get("worker") or {}
    lines = [
        f"queue-inference bench ({report['mode']}{', quick' if report['config']['quick'] else ''})",
        f"machine: {m['cores']} cores, {m['cpu_model']}, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime'] or 'absent'}, celery {m['celery']}, "
        f"redis-server {report.get('redis', {}).get('server_version') or '?'}",
        f"model {model.get('name')}/{model.get('version')} ({model.get('n_features')} features); "
        f"queue {report['config']['queue']}; worker(s) {', '.join(worker.get('hostnames', []))} "
        f"({worker.get('processes')} process(es))",
        f"note: {NOISE_NOTE}",
        "",
        f"  {'measurement':<46}{'n':>8}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}  throughput",
    ]
    single = report.get("single_row", {})
    for task in ("predict", "noop"):
        part = single.get(task) or {}
        label = f"single-row {task}, sequential round trip"
        if part.get("available", True):
            in_worker = (part.get("worker_task") or {}).get("p50_ms")
            extra = (
                f"(task in worker: p50 {_f(in_worker, ',.3f')} ms)" if in_worker is not None else ""
            )
            lines.append(_latency_row(label, part.get("count"), part, extra))
        else:
            lines.append(_unavailable(label, part.get("reason")))
    sustained = report.get("sustained", {})
    for task in ("predict", "plain_celery", "noop"):
        part = sustained.get(task) or {}
        label = f"single-row {task}, {_f(part.get('window'), ',.0f')} in flight"
        if not part:
            continue
        if part.get("available", True):
            lines.append(
                _latency_row(
                    label,
                    part.get("jobs"),
                    part.get("latency"),
                    f"{_f(part.get('jobs_per_s'), ',.0f')} jobs/s{_cpu(part)}",
                )
            )
        else:
            lines.append(_unavailable(label, part.get("reason")))
    histogram = (sustained.get("predict") or {}).get("batch_sizes")
    if histogram:
        text = ", ".join(f"{size}: {count}" for size, count in histogram.items())
        lines.append(f"  {'':<46}  row-lane batches by size: {text}")
    mon = report.get("monitoring") or {}
    for side in ("off", "on") if mon.get("available") else ():
        part = mon[side]
        label = f"single-row, worker monitoring {side}"
        cpu = part.get("worker_cpu_us_per_job")
        lines.append(
            _latency_row(
                label,
                part.get("jobs"),
                part.get("latency"),
                f"{_f(part.get('jobs_per_s'), ',.0f')} jobs/s, worker CPU {_f(cpu, ',.0f')} us/job",
            )
        )
    if mon.get("round_ratios"):
        text = ", ".join(_f(r, ".3f") for r in mon["round_ratios"])
        lines.append(f"  {'':<46}  on/off by round: {text}")
    gw = report.get("gateway") or {}
    if gw.get("available"):
        seq, sus = gw["sequential"], gw["sustained"]
        direct = f"(direct client p50 {_f(seq['direct_client']['p50_ms'])} ms)"
        label = "gateway POST /api/v1/predict, sequential"
        lines.append(_latency_row(label, seq["gateway"]["count"], seq["gateway"], direct))
        lines.append(
            _latency_row(
                f"gateway, {gw['connections']} connections",
                sus["jobs"],
                sus["latency"],
                f"{_f(sus['jobs_per_s'], ',.0f')} jobs/s",
            )
        )
    elif gw:
        lines.append(_unavailable("HTTP gateway", gw.get("reason")))
    clients = report.get("clients") or {}
    for arm in ("sync", "async"):
        part = clients.get(arm) or {}
        if part:
            label = f"single-row, {'asyncio' if arm == 'async' else 'sync'} client send_many"
            lines.append(
                f"  {label:<46}{_f(clients.get('jobs'), ',.0f'):>8}{'':>30}  "
                f"{_f(part.get('jobs_per_s'), ',.0f')} jobs/s"
            )
    if clients.get("loop_lag"):
        lag = clients["loop_lag"]
        lines.append(
            f"  {'':<46}  1 ms ticker on the asyncio loop: late by p50 {_f(lag['p50_ms'])}, "
            f"p99 {_f(lag['p99_ms'])}, max {_f(lag['max_ms'])} ms; of which the loop was "
            f"held p99 {_f(lag.get('held_p99_ms'))}, max {_f(lag.get('held_max_ms'))} ms"
        )
    batch = report.get("batch") or {}
    if batch:
        shape = f"{_f(batch.get('jobs'), ',.0f')} x {_f(batch.get('rows_per_job'), ',.0f')} rows"
        seq = batch.get("sequential") or {}
        lines.append(
            _latency_row(
                f"batch {shape}, sequential",
                batch.get("jobs"),
                seq.get("latency"),
                f"{_f(seq.get('rows_per_s'), ',.0f')} rows/s",
            )
        )
        conc = batch.get("concurrent") or {}
        lines.append(
            _latency_row(
                f"batch {shape}, {_f(conc.get('in_flight'), ',.0f')} in flight",
                batch.get("jobs"),
                conc.get("latency"),
                f"{_f(conc.get('rows_per_s'), ',.0f')} rows/s{_cpu(conc)}",
            )
        )
    bulk = report.get("bulk") or {}
    if bulk:
        label = (
            f"bulk CSV, chunks of {_f(bulk.get('chunk_rows'), ',.0f')}, "
            f"{_f(bulk.get('in_flight'), ',.0f')} in flight"
        )
        lines.append(
            f"  {label:<46}{_f(bulk.get('rows_in'), ',.0f'):>8}{'':>30}  "
            f"{_f(bulk.get('rows_per_s'), ',.0f')} rows/s ({_f(bulk.get('seconds'))} s end to end)"
        )
    inproc = report.get("inprocess") or {}
    if inproc.get("available"):
        one = inproc.get("one_row") or {}
        lines.append(
            f"  {'in-process onnxruntime, 1 row, 1 thread (us)':<46}"
            f"{_f(one.get('calls'), ',.0f'):>8}"
            f"{_f(one.get('p50_us'), ',.1f'):>10}{_f(one.get('p95_us'), ',.1f'):>10}"
        )
        for key in ("batch_all_cores", "batch_one_thread"):
            part = inproc.get(key) or {}
            label = (
                f"in-process onnxruntime, {_f(part.get('rows'), ',.0f')} rows, "
                f"{_f(part.get('threads'), ',.0f')} thread(s)"
            )
            lines.append(f"  {label:<46}{'':>38}  {_f(part.get('rows_per_s'), ',.0f')} rows/s")
        if inproc.get("warning"):
            lines.append(f"  {'':<46}  warning: {inproc['warning']}")
    else:
        lines.append(_unavailable("in-process onnxruntime", inproc.get("reason")))
    if worker.get("start_to_ready_s") is not None:
        lines.append(f"  {'worker start -> ready':<46}{'':>38}  {_f(worker['start_to_ready_s'])} s")

    lines += ["", "goals (ratios from this run)"]
    for key, r in report.get("ratios", {}).items():
        if r["value"] is None:
            lines.append(f"  {key:<8}{r['label']}: {r['unavailable']}")
            continue
        verdict = "" if r["met"] is None else ("  met" if r["met"] else "  NOT met")
        goal = f"  goal {r['goal']}" if r["goal"] else "  (information)"
        lines.append(f"  {key:<8}{r['value']:>8.3f}  {r['label']}{goal}{verdict}")
        if r["note"]:
            lines.append(f"  {'':<18}({r['note']})")
    for key, g in report.get("goals", {}).items():
        if g["value"] is None:
            lines.append(f"  {key:<8}{g['label']}: {g['unavailable']}")
            continue
        verdict = "  met" if g["met"] else "  NOT met"
        lines.append(f"  {key:<8}{g['value']:>8.2f}  {g['label']}  goal {g['goal']}{verdict}")
        if g.get("detail"):
            lines.append(f"  {'':<18}({g['detail']})")

    checks = report.get("checks") or {}
    lines += ["", f"checks: {'passed' if checks.get('passed') else 'FAILED'}"]
    for item in checks.get("items", []):
        lines.append(f"  [{item['status']}] {item['name']}: {item['detail']}")
    return "\n".join(lines)
