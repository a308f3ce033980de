"""Where a train step's time goes: a ``jax.profiler`` trace of the JAX step, a ``torch.profiler`` table of the
PyTorch one, and a short summary of each (``train_step --profile=DIR``).

The JAX summary joins the trace's per-op events (XLA's CPU runtime records one event per executed HLO
instruction, thunk or fusion, with its ``hlo_op`` name) with the compiled program's HLO text, which says what each
instruction is: a fusion that contains a ``dot`` or ``convolution`` is matmul work, one that only moves data
(transpose, copy, slice, concatenate, pad) is data movement, one with a ``reduce`` a reduction, the rest
elementwise. The time per category and the top ops are written to ``DIR/jax_summary.txt`` and returned; the raw
trace (``DIR/plugins/profile/*/``: ``.xplane.pb`` for TensorBoard/XProf, ``perfetto_trace.json.gz`` for
ui.perfetto.dev) stays in ``DIR``. On an accelerator the device events carry the same ``hlo_op`` names.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path
from typing import Any

# An HLO instruction line: ``[ROOT] %name = SHAPE opcode(operands), attributes``.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][a-z0-9\-_]*)\(")
# A computation header: ``[ENTRY] %name (params...) -> shape {`` (or ``name {``).
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[^\s(]+)\s*(?:\(.*\))?\s*(?:->.*)?\{\s*$")
_CALLS = re.compile(r"calls=%?(?P<callee>[^\s,}]+)")
_CUSTOM_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]+)"')
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]+)"')

_MATMUL_OPS = {"dot", "convolution"}
_MOVE_OPS = {"transpose", "copy", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice", "dynamic-update-slice",
             "concatenate", "pad", "reverse", "gather", "scatter", "parameter", "constant", "tuple",
             "get-tuple-element", "iota", "bitcast-convert"}
_COLLECTIVE_OPS = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                   "all-reduce-start", "all-gather-start", "collective-permute-start"}
_CONTROL_OPS = {"while", "conditional", "call"}  # their bodies' ops have events of their own


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """``{instruction name: the JAX operation it came from}``, from the instructions' ``op_name`` metadata with
    the jit name dropped, e.g. ``transpose(jvp())/dot_general`` (a backward matmul)."""
    named: dict[str, str] = {}
    first_in: dict[str, str] = {}  # computation -> the first op_name in it (for fusions without metadata)
    calls: dict[str, str] = {}
    current = None
    for line in hlo_text.splitlines():
        if (m := _INSTRUCTION.match(line)) is not None:
            if (o := _OP_NAME.search(line)) is not None:
                named[m["name"]] = o["op_name"].split("/", 1)[-1]
                first_in.setdefault(current, named[m["name"]])
            if (c := _CALLS.search(line)) is not None:
                calls[m["name"]] = c["callee"]
        elif (c := _COMPUTATION.match(line)) is not None:
            current = c["name"]
    for name, callee in calls.items():
        if name not in named and callee in first_in:
            named[name] = first_in[callee]
    return named


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """``{instruction name: category}`` for every instruction of a compiled HLO module's text; categories:
    matmul, reduction, data movement, elementwise, collective, control, custom-call:TARGET."""
    ops_in: dict[str, set[str]] = collections.defaultdict(set)
    instructions: list[tuple[str, str, str]] = []  # (name, opcode, line)
    current = None
    for line in hlo_text.splitlines():
        if (m := _INSTRUCTION.match(line)) is not None:
            ops_in[current].add(m["op"])
            instructions.append((m["name"], m["op"], line))
        elif (c := _COMPUTATION.match(line)) is not None:
            current = c["name"]

    categories = {}
    for name, op, line in instructions:
        if op == "fusion" and (m := _CALLS.search(line)) is not None:
            categories[name] = _category(ops_in.get(m["callee"], set()))
        elif op == "custom-call":
            t = _CUSTOM_TARGET.search(line)
            categories[name] = "matmul" if t and "matmul" in t["target"].lower() else \
                f"custom-call:{t['target'] if t else '?'}"
        elif op in _CONTROL_OPS:
            categories[name] = "control"
        else:
            categories[name] = _category({op})
    return categories


def _category(ops: set[str]) -> str:
    if ops & _MATMUL_OPS:
        return "matmul"
    if ops & _COLLECTIVE_OPS:
        return "collective"
    if ops & {"reduce", "reduce-window", "select-and-scatter", "sort"}:
        return "reduction"
    if ops <= _MOVE_OPS:
        return "data movement"
    return "elementwise"


def _trace_events(trace_dir: Path) -> list[dict]:
    files = sorted(trace_dir.glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no perfetto trace under {trace_dir}/plugins/profile/")
    data = json.loads(gzip.open(files[-1]).read())
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize_jax_trace(trace_dir: Path, hlo_text: str, steps: int, *, top: int = 15) -> dict:
    """Per-category and top-op time of the HLO ops in the trace, per step (`steps` steps were traced)."""
    categories, sources = hlo_categories(hlo_text), hlo_sources(hlo_text)
    per_op: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for e in _trace_events(trace_dir):
        args = e.get("args") or {}
        op = args.get("hlo_op")
        if e.get("ph") != "X" or op is None or op not in categories or categories[op] == "control":
            continue
        per_op[op] += float(e.get("dur", 0.0)) * 1e-6 / steps
        counts[op] += 1
    total = sum(per_op.values())
    by_category: collections.Counter = collections.Counter()
    by_source: collections.Counter = collections.Counter()
    for op, seconds in per_op.items():
        by_category[categories[op]] += seconds
        by_source[(categories[op], sources.get(op, "?"))] += seconds
    return {
        "op_seconds_per_step": total,
        "ops_executed_per_step": sum(counts.values()) / steps,
        "by_category": {k: {"seconds": v, "share": v / total if total else 0.0}
                        for k, v in by_category.most_common()},
        "top_sources": [{"source": src, "category": cat, "seconds": s, "share": s / total if total else 0.0}
                        for (cat, src), s in by_source.most_common(top)],
        "top_ops": [{"op": op, "category": categories[op], "source": sources.get(op, "?"), "seconds": s,
                     "share": s / total if total else 0.0} for op, s in per_op.most_common(top)],
    }


def profile_jax(js, out_dir: str, *, steps: int = 2) -> dict:
    """Traces `steps` steps of a compiled ``bench.jax_step.JaxStep`` into `out_dir` and summarises them (also
    written to ``out_dir/jax_summary.txt``; the compiled HLO to ``out_dir/jax_step.hlo.txt``)."""
    import jax

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compiled = js.compile()
    hlo_text = compiled.as_text()
    (out / "jax_step.hlo.txt").write_text(hlo_text)
    js.sync(js.run())  # warm: the trace holds steady-state steps only
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        for _ in range(steps):
            metrics = js.run()
        js.sync(metrics)
    summary = summarize_jax_trace(out, hlo_text, steps)
    (out / "jax_summary.txt").write_text(format_summary(summary, "JAX (XLA ops, per step)"))
    return {"dir": str(out), **summary}


def profile_torch(ts, batch: dict, out_dir: str, *, steps: int = 2, top: int = 15) -> dict:
    """``torch.profiler`` over `steps` steps of a ``torch_baseline.BaselineStep``: the op table (self CPU time) is
    written to ``out_dir/torch_ops.txt`` and its top ops returned."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ts.step(batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            ts.step(batch)
    averages = prof.key_averages()
    (out / "torch_ops.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=40))
    rows = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)
    total = sum(a.self_cpu_time_total for a in rows) * 1e-6 / steps
    return {"dir": str(out), "self_cpu_seconds_per_step": total,
            "top_ops": [{"op": a.key, "seconds": a.self_cpu_time_total * 1e-6 / steps,
                         "share": a.self_cpu_time_total * 1e-6 / steps / total if total else 0.0,
                         "calls_per_step": a.count / steps} for a in rows[:top]]}


def format_summary(summary: dict[str, Any], title: str) -> str:
    """The summary as a short text table."""
    lines = [title, f"  op time per step {summary['op_seconds_per_step'] * 1e3:.1f} ms over "
             f"{summary['ops_executed_per_step']:.0f} executed ops", "  by category:"]
    for name, row in summary["by_category"].items():
        lines.append(f"    {name:<24} {row['seconds'] * 1e3:9.1f} ms  {100 * row['share']:5.1f}%")
    lines.append("  by the JAX operation the ops came from (jvp: forward, transpose: backward):")
    for row in summary["top_sources"]:
        lines.append(f"    {row['source'][:56]:<56} {row['category']:<14} {row['seconds'] * 1e3:8.1f} ms  "
                     f"{100 * row['share']:5.1f}%")
    lines.append("  top ops:")
    for row in summary["top_ops"]:
        lines.append(f"    {row['op'][:32]:<32} {row['category']:<14} {row['source'][:40]:<40} "
                     f"{row['seconds'] * 1e3:8.1f} ms  {100 * row['share']:5.1f}%")
    return "\n".join(lines) + "\n"
