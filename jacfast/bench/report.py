"""Plots, docs/performance.md's tables and the README's performance summary, generated from
result files (never typed by hand)."""
from __future__ import annotations

import glob
import json
import os
import re
from collections import defaultdict

BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"  # docs/performance.md
SUMMARY_BEGIN, SUMMARY_END = "<!-- performance-summary:begin -->", "<!-- performance-summary:end -->"  # README.md
SUMMARY_PLOT = "summary-normalized-float32.png"


def load_results(folder: str) -> list[dict]:
    """Every result file under ``folder`` (recursively), oldest first."""
    results = []
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
        with open(path) as handle:
            data = json.load(handle)
        if isinstance(data, dict) and "rows" in data and "environment" in data:
            data["path"] = path
            results.append(data)
    return sorted(results, key=lambda d: d["environment"]["timestamp"])


def is_complete(result: dict) -> bool:
    """Whether every configuration of the run was measured (files written before the flag
    existed were only ever written complete)."""
    return result.get("complete", True)


def latest_per_device(results: list[dict], benchmark: str, suites=("full", "quick"), *,
                      by_allocator: bool = False, having=None) -> dict:
    """device (or (device, allocator) with ``by_allocator``) -> newest result of ``benchmark``,
    preferring the first suite in ``suites`` that exists, then a complete run to one stopped
    early (a lent device's time budget); ``having(result)``, if given, must hold."""
    def key(r):
        env = r["environment"]
        return (env["device"], env.get("allocator")) if by_allocator else env["device"]

    def rank(r):
        return suites.index(r["suite"]), not is_complete(r)

    mine = [r for r in results if r.get("benchmark") == benchmark and r.get("suite") in suites and r["rows"]
            and (having is None or having(r))]
    best: dict = {}  # per device (with by_allocator too: one suite for all its allocators)
    for r in mine:
        device = r["environment"]["device"]
        best[device] = min(best.get(device, rank(r)), rank(r))
    chosen: dict = {}
    for r in mine:  # oldest first: the newest of the best rank wins
        if rank(r) == best[r["environment"]["device"]]:
            chosen[key(r)] = r
    return chosen


def _has_fwd_bwd(result: dict) -> bool:
    return any(r["mode"] == "fwd+bwd" for r in result["rows"])


def loss_head_table(result: dict) -> str:
    rows = [r for r in result["rows"] if r["mode"] == "fwd+bwd"]
    eager_peak = {(r["kind"], r["dtype"], r["rows"], r["dim"]): r.get("peak_mb") for r in rows if r["provider"] == "eager"}
    lines = ["| kind | dtype | R | D | backend | fwd+bwd ms | GB/s | x copy-floor time | x eager | x torch.compile "
             "| x best non-jacfast | peak MB (eager) |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["provider"].startswith("jacfast-"):
            continue
        peak, ref = r.get("peak_mb"), eager_peak.get((r["kind"], r["dtype"], r["rows"], r["dim"]))
        memory = "" if peak is None else f"{peak:.1f}" + ("" if ref is None else f" ({ref:.1f})")
        backend = r["provider"][8:] + (f" ({r['kernel_path']})" if r.get("kernel_path") else "")  # which GPU kernels
        lines.append(f"| {r['kind']} | {r['dtype']} | {r['rows']} | {r['dim']} | {backend} | {r['median_ms']:.3f} | "
                     f"{r['gbps']:.1f} | {r['vs_floor']:.2f} | {r['speedup_vs_eager']:.1f} | {r['speedup_vs_compile']:.2f} | "
                     f"{r['speedup_vs_best_other']:.2f} | {memory} |")
    return "\n".join(lines)


def loss_head_parts_table(result: dict, dtype: str = "float32") -> str:
    """fwd alone and bwd alone of each jacfast backend, per kind and size, in ``dtype``."""
    cells = {}
    for r in result["rows"]:
        if r["mode"] in ("fwd", "bwd") and r["dtype"] == dtype and r["provider"].startswith("jacfast-") \
                and not r["provider"].endswith("-unfused"):
            cells[(r["kind"], r["rows"], r["dim"], r["provider"][8:], r["mode"])] = r
    lines = ["| kind | R | D | backend | fwd ms | fwd x eager | fwd x torch.compile | bwd ms | bwd x eager "
             "| bwd x torch.compile |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for kind, rows, dim, backend, mode in cells:
        if mode != "fwd":
            continue
        row = f"| {kind} | {rows} | {dim} | {backend} |"
        for part in ("fwd", "bwd"):
            r = cells.get((kind, rows, dim, backend, part))
            row += (f" {r['median_ms']:.3f} | {r['speedup_vs_eager']:.1f} | {r['speedup_vs_compile']:.2f} |" if r
                    else " | | |")
        lines.append(row)
    return "\n".join(lines) if len(lines) > 2 else ""


# R * D from which the GPU bandwidth target applies.
GPU_BANDWIDTH_MIN_ELEMENTS = 10**7


def loss_head_targets(result: dict) -> str:
    """Per kind and dtype, the worst fwd+bwd ratio of each jacfast backend over the sweep."""
    gpu = result["environment"].get("device_type") == "cuda"
    worst: dict = {}
    for r in result["rows"]:
        # the unfused comparison rows (GPU: forward then backward) are not a path users get
        if r["mode"] != "fwd+bwd" or not r["provider"].startswith("jacfast-") or r["provider"].endswith("-unfused"):
            continue
        key = (r["kind"], r["dtype"], r["provider"][8:])
        w = worst.setdefault(key, {"eager": float("inf"), "compile": float("inf"), "floor": 0.0, "big": 0.0, "n": 0})
        w["eager"] = min(w["eager"], r["speedup_vs_eager"])
        w["compile"] = min(w["compile"], r["speedup_vs_compile"])
        w["floor"] = max(w["floor"], r["vs_floor"])
        if r["rows"] * r["dim"] >= GPU_BANDWIDTH_MIN_ELEMENTS:
            w["big"] = max(w["big"], r["vs_floor"])
        w["n"] += 1
    if gpu:
        lines = ["Worst case over the sweep below (the GPU targets, fp32 and bf16: >= 6x eager, >= 1.5x "
                 "torch.compile, >= 85% of the copy bandwidth for R * D >= 1e7):", "",
                 "| kind | dtype | backend | sizes | min x eager | min x torch.compile | min % of copy bandwidth, "
                 "R * D >= 1e7 |", "|---|---|---|---:|---:|---:|---:|"]
    else:
        lines = ["Worst case over the sweep below (the CPU targets, fp32: >= 8x eager, >= 1.5x torch.compile, "
                 "<= 2x the floor):", "",
                 "| kind | dtype | backend | sizes | min x eager | min x torch.compile | max x floor |",
                 "|---|---|---|---:|---:|---:|---:|"]
    for (kind, dtype, backend), w in worst.items():
        last = (f"{100 / w['big']:.0f}" if w["big"] else "") if gpu else f"{w['floor']:.2f}"
        lines.append(f"| {kind} | {dtype} | {backend} | {w['n']} | {w['eager']:.1f} | {w['compile']:.2f} | {last} |")
    return "\n".join(lines)


def _env_line(result: dict, link_root: str) -> str:
    env = result["environment"]
    link = _link(os.path.dirname(result["path"]), os.path.basename(result["path"]), link_root)
    allocator = f", allocator: {env['allocator']}" if env.get("allocator") else ""
    line = (f"torch {env['torch']}, triton {env['triton']}, Python {env['python']}, revision {env['git_revision']}, "
            f"{env['timestamp']}{allocator} (suite `{result['suite']}`, file "
            f"[`{os.path.basename(result['path'])}`]({link})).")
    if not is_complete(result):
        line += (f" **Incomplete run** ({result.get('stopped') or 'stopped early'}): the tables show the "
                 f"{len(result['rows'])} rows it measured.")
    return line


def _selection_part(device: str, result: dict, folder: str, link_root: str) -> list[str]:
    from jacfast.bench.selection import strategy_table, topk_table

    return [f"### Input-Jacobian selection on {device}", "", _env_line(result, link_root), "",
            "Top-k seeds: the fused op against `torch.topk` + `zeros().scatter_` (one-hot seeds (K, B, C)).", "",
            topk_table(result["rows"]), "",
            "`input_jacobians` strategies on a small CNN: teacher rows (`create_graph=False`, eval mode) and student "
            "rows (`create_graph=True`, train mode, timed with the double backward to the parameters). `auto` is "
            "timed after its first call (which times the candidates, reported separately).", "",
            strategy_table(result["rows"]), ""]


def _training_step_part(key: tuple, result: dict, folder: str, link_root: str) -> list[str]:
    from jacfast.bench.training_step import table

    r0 = result["rows"][0]
    device, allocator = key
    title = f"### Distillation training step on {device}" + (f", allocator: {allocator}" if allocator else "")
    return [title, "", _env_line(result, link_root), "",
            f"One SGD step of CE + KD + Jacobian matching (teacher {r0['teacher_width']} wide, student "
            f"{r0['student_width']}, input {r0['input']}, B = {r0['batch']}, the teacher's top-K outputs); peak memory "
            f"above the step's start ({r0['memory_method']}).", "", table(result["rows"]), "",
            f"[Peak memory plot]({_link(folder, _training_memory_plot_name(device), link_root)}) (the newest run "
            "of this device).", ""]


def performance_section(folder: str, link_root: str | None = None) -> str:
    """docs/performance.md's generated part: every table of the newest runs; plot links are relative to ``link_root`` (default: the
    folder two levels up, the repository root for ``benchmarks/results``)."""
    link_root = link_root or os.path.dirname(os.path.dirname(os.path.abspath(folder)))
    results = load_results(folder)
    parts = [BEGIN, "", "_Generated by `python benchmarks/report.py` from the result files under `benchmarks/results/`; "
             "medians of many timed calls, all providers of a row measured in the same run._", ""]
    chosen = latest_per_device(results, "loss_head", having=_has_fwd_bwd)
    others = {"selection": latest_per_device(results, "selection"),
              # The step allocates and frees 100-260 MB: reported with the allocator tuned and untuned.
              "training_step": latest_per_device(results, "training_step", by_allocator=True)}
    if not chosen and not any(others.values()):
        parts.append("No benchmark results are committed yet.")
    for device, result in sorted(chosen.items(), key=lambda kv: kv[1]["environment"]["device_type"]):
        parts += [f"### Loss head on {device}", "", _env_line(result, link_root), "",
                  "fwd+bwd of `jacobian_matching_loss` (mean reduction) through autograd; the floor is reading "
                  "student and teacher once and writing the gradient, at the copy bandwidth of the same run; GB/s "
                  "counts that traffic; peak memory above the inputs.", "",
                  loss_head_targets(result), "", *_plot_links(result, folder, link_root),
                  loss_head_table(result), ""]
        parts_table = loss_head_parts_table(result)
        if parts_table:
            parts += ["fwd alone (the loss under `torch.no_grad`, as in evaluation) and bwd alone (`autograd.grad` "
                      "of a forward made just before, untimed), float32. Where the forward fuses (the student "
                      "needs a gradient: training), it has formed the gradient already and the backward only "
                      "hands it over, so bwd alone is not a cost a training step pays: fwd+bwd above is.", "",
                      parts_table, ""]
    for name, part in (("selection", _selection_part), ("training_step", _training_step_part)):
        for device, result in sorted(others[name].items(), key=lambda kv: kv[1]["environment"]["device_type"]):
            parts += part(device, result, folder, link_root)
    parts.append(END)
    return "\n".join(parts)


def update_block(path: str, begin: str, end: str, section: str) -> None:
    """Replace the ``begin`` ... ``end`` block of the file at ``path`` by ``section`` (which
    carries the markers)."""
    with open(path) as handle:
        text = handle.read()
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} block to fill")
    new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    with open(path + ".tmp", "w") as handle:
        handle.write(new)
    os.replace(path + ".tmp", path)


def update_docs(readme: str, performance_doc: str, folder: str) -> None:
    """Regenerate the README's summary and the performance document's tables (links relative
    to each file)."""
    update_block(readme, SUMMARY_BEGIN, SUMMARY_END,
                 summary_section(folder, os.path.dirname(os.path.abspath(readme))))
    update_block(performance_doc, BEGIN, END,
                 performance_section(folder, os.path.dirname(os.path.abspath(performance_doc))))


# The backend "auto" picks on each device, first available first: the summary shows it.
_AUTO_ORDER = ("jacfast-cuda", "jacfast-triton", "jacfast-cpu")


def _headline_rows(result: dict, kind: str = "normalized", dtype: str = "float32") -> list[dict]:
    """fwd+bwd rows of ``kind``/``dtype`` of the backend auto picks (the first of _AUTO_ORDER
    the run measured)."""
    rows = [r for r in result["rows"] if r["mode"] == "fwd+bwd" and r["kind"] == kind and r["dtype"] == dtype]
    for provider in _AUTO_ORDER:
        mine = [r for r in rows if r["provider"] == provider]
        if mine:
            return mine
    return []


def _span(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}–{hi:{fmt}}"


def _step_run(results: list[dict]) -> dict:
    """device -> its training-step run with freed memory kept (the bench's default allocator),
    else its untuned one."""
    runs = latest_per_device(results, "training_step", by_allocator=True)
    chosen: dict = {}
    for (device, allocator), result in sorted(runs.items(), key=lambda kv: str(kv[0][1]).startswith("glibc")):
        chosen[device] = result  # the glibc-tuned run sorts last and wins
    return chosen


def summary_section(folder: str, link_root: str | None = None) -> str:
    """The README's performance summary: per device, the headline ratios of the newest runs."""
    link_root = link_root or os.path.dirname(os.path.dirname(os.path.abspath(folder)))
    results = load_results(folder)
    heads = latest_per_device(results, "loss_head", having=_has_fwd_bwd)
    steps = _step_run(results)
    lines = [SUMMARY_BEGIN, "",
             "| device | loss head x eager | loss head x torch.compile | step x loop: exact | step x loop: central fd "
             "| step x loop: forward fd | step x loop: teacher cache | step time / plain KD: exact "
             "| step time / plain KD: teacher cache | result files |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def by_k(rows: list[dict], provider: str, field: str) -> str:
        got = [f"{r[field]:.2f}" for r in sorted(rows, key=lambda r: r["k"]) if r["provider"] == provider]
        return " / ".join(got) if got else "–"

    devices = sorted(set(heads) | set(steps), key=lambda d: ((heads.get(d) or steps[d])["environment"]["device_type"] != "cuda", d))
    for device in devices:
        head, step = heads.get(device), steps.get(device)
        rows = _headline_rows(head) if head else []
        srows = step["rows"] if step else []
        files = [f"[{name}]({_link(os.path.dirname(r['path']), os.path.basename(r['path']), link_root)})"
                 for name, r in (("loss head", head), ("step", step)) if r]
        lines.append(f"| {device} | {_span([r['speedup_vs_eager'] for r in rows], '.1f')} | "
                     f"{_span([r['speedup_vs_compile'] for r in rows], '.2f')} | "
                     + " | ".join(by_k(srows, p, "speedup_vs_naive_paired")
                                  for p in ("jacfast-exact", "jacfast-fd", "jacfast-fd-forward", "jacfast-cache"))
                     + " | " + " | ".join(by_k(srows, p, "vs_floor") for p in ("jacfast-exact", "jacfast-cache"))
                     + f" | {' · '.join(files)} |")
    if not devices:
        lines.append("| no results committed yet | | | | | | | | | |")
    ks = sorted({r["k"] for s in steps.values() for r in s["rows"]})
    lines += ["", "Loss head: `jacobian_matching_loss(kind=\"normalized\")`, float32, forward+backward, the "
              "backend `auto` picks, range over the sweep's sizes. Step: one SGD step of CE + KD + Jacobian "
              f"matching on a small CNN, K = {' / '.join(map(str, ks)) or '–'} selected outputs, paired by round; "
              "\"x loop\" > 1: faster than the hand-written loop (per output one `autograd.grad` of teacher and student, the eager loss); \"step "
              "time / plain KD\": the step's time over that of a step without Jacobian matching. _Generated by `python benchmarks/report.py` from "
              "`benchmarks/results/`._", "",
              f"![normalized float32 loss head: speedup over torch.compile per size, every device]"
              f"({_link(folder, SUMMARY_PLOT, link_root)})", "", SUMMARY_END]
    return "\n".join(lines)


def plot(folder: str, out_dir: str | None = None) -> list[str]:
    """Speedup-vs-size PNGs (one per device, kind and dtype) from the newest loss-head results,
    and peak-memory bar charts per device from the newest loss-head and training-step results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    out_dir = out_dir or folder
    loss_head = latest_per_device(load_results(folder), "loss_head", having=_has_fwd_bwd)
    for device, result in loss_head.items():
        groups = defaultdict(list)
        for r in result["rows"]:
            if r["mode"] == "fwd+bwd":
                groups[(r["kind"], r["dtype"])].append(r)
        for (kind, dtype), rows in groups.items():
            fig, ax = plt.subplots(figsize=(7, 4))
            sizes = sorted({(r["rows"], r["dim"]) for r in rows}, key=lambda s: s[0] * s[1])
            labels = [f"{r}x{d}" for r, d in sizes]
            for provider in sorted({r["provider"] for r in rows}):
                by_size = {(r["rows"], r["dim"]): r["speedup_vs_eager"] for r in rows if r["provider"] == provider}
                ax.plot(labels, [by_size.get(s, float("nan")) for s in sizes], marker="o", label=provider)
            floor = {(r["rows"], r["dim"]): r["speedup_vs_eager"] * r["vs_floor"] for r in rows if r["provider"] == "eager"}
            ax.plot(labels, [floor.get(s, float("nan")) for s in sizes], "k--", label="copy floor")
            ax.set_yscale("log")
            ax.set_xlabel("rows x row length")
            ax.set_ylabel("speedup over eager autograd (fwd+bwd)")
            ax.set_title(f"{kind} loss, {dtype}, {device}", fontsize=9)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = os.path.join(out_dir, _speedup_plot_name(device, kind, dtype))
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    if loss_head:
        written.append(_summary_plot(plt, loss_head, os.path.join(out_dir, SUMMARY_PLOT)))
    for device, result in loss_head.items():
        rows = [r for r in result["rows"] if r["mode"] == "fwd+bwd" and r["kind"] == "normalized"
                and r["dtype"] == "float32" and r.get("peak_mb") is not None]
        written += _memory_bars(plt, rows, lambda r: f"{r['rows']}x{r['dim']}", "peak MB above the inputs (fwd+bwd)",
                                f"normalized loss head, float32, {device}", os.path.join(out_dir, _memory_plot_name(device)))
    for device, result in latest_per_device(load_results(folder), "training_step").items():
        rows = [r for r in result["rows"] if r.get("peak_mb") is not None]
        title = f"distillation step, B = {rows[0]['batch']}, {rows[0]['input']}, {device}" if rows else ""
        written += _memory_bars(plt, rows, lambda r: f"K = {r['k']}", "peak MB above the step's start", title,
                                os.path.join(out_dir, _training_memory_plot_name(device)))
    return written


def slug(text: str) -> str:
    """A file-name form of ``text``: lower case, runs of other characters as one "-"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _speedup_plot_name(device: str, kind: str, dtype: str) -> str:
    return f"loss_head-{slug(f'{device}-{kind}-{dtype}')}.png"


def _memory_plot_name(device: str) -> str:
    return f"loss_head-memory-{slug(device)}.png"


def _training_memory_plot_name(device: str) -> str:  # of the device's newest run, either allocator
    return f"training_step-memory-{slug(device)}.png"


def _link(folder: str, name: str, link_root: str) -> str:
    return os.path.relpath(os.path.join(folder, name), link_root).replace(os.sep, "/")


def _plot_links(result: dict, folder: str, link_root: str) -> list[str]:
    """The README lines that show a loss-head result's plots (written by :func:`plot`)."""
    device = result["environment"]["device"]
    pairs = list(dict.fromkeys((r["kind"], r["dtype"]) for r in result["rows"] if r["mode"] == "fwd+bwd"))

    def link(name: str) -> str:
        return _link(folder, name, link_root)

    lines = []
    if ("normalized", "float32") in pairs:
        lines += [f"![normalized float32 speedup over eager, {device}]"
                  f"({link(_speedup_plot_name(device, 'normalized', 'float32'))})", ""]
    others = " · ".join(f"[{kind} {dtype}]({link(_speedup_plot_name(device, kind, dtype))})" for kind, dtype in pairs)
    lines += [f"Speedup plots: {others} · [peak memory]({link(_memory_plot_name(device))})", ""]
    return lines


def _summary_plot(plt, loss_head: dict, path: str) -> str:
    """The README's plot: normalized float32 fwd+bwd over torch.compile per size, a line per device."""
    per_device = {device: _headline_rows(result) for device, result in sorted(loss_head.items())}
    sizes = sorted({(r["rows"], r["dim"]) for rows in per_device.values() for r in rows}, key=lambda s: (s[0] * s[1], s))
    labels = [f"{r}x{d}" for r, d in sizes]
    fig, ax = plt.subplots(figsize=(7, 4))
    for device, rows in per_device.items():
        if rows:
            by_size = {(r["rows"], r["dim"]): r["speedup_vs_compile"] for r in rows}
            ax.plot(labels, [by_size.get(s, float("nan")) for s in sizes], marker="o",
                    label=f"{device}, {rows[0]['provider'][8:]}")
    ax.axhline(1.0, color="k", linewidth=0.8, linestyle=":")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("rows x row length")
    ax.set_ylabel("speedup over torch.compile (fwd+bwd)")
    ax.set_title("jacfast normalized loss head, float32, per device", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _memory_bars(plt, rows: list[dict], group, ylabel: str, title: str, path: str) -> list[str]:
    """Peak memory per provider (x axis), one bar per group (``group(row)`` names it)."""
    if not rows:
        return []
    groups = list(dict.fromkeys(group(r) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))  # the run's order
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(groups)
    for j, name in enumerate(groups):
        by = {r["provider"]: r["peak_mb"] for r in rows if group(r) == name}
        xs = [i + (j - (len(groups) - 1) / 2) * width for i in range(len(providers))]
        bars = ax.bar(xs, [by.get(p, float("nan")) for p in providers], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(providers)), providers, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
