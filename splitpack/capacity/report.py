"""A capacity plan for people: the table and the plot."""
from __future__ import annotations

from splitpack.capacity.footprint import FOOTPRINT_PARTS
from splitpack.measure.units import GiB, format_bytes


def format_plan(plan: dict) -> str:
    lines = [f"{plan['model']} @{plan['size']} batch {plan['batch_size']}: GPU {format_bytes(plan['gpu_memory_bytes'])} "
             f"({plan['gpu_memory_source']}), headroom {format_bytes(plan['headroom_bytes'])}, "
             f"usable {format_bytes(plan['usable_bytes'])}" + _backend_text(plan),
             f"{'configuration':<36} {'per replica':>12} {'activations':>12} {'replicas':>9} {'latency':>8}"]
    for r in [plan["unsplit"]] + plan["candidates"]:
        name = "unsplit" if r["merge_layer"] is None else f"{r['merge_layer']} {r['grid']} {r['mode']}"
        ratio = f"{r['latency_ratio']:.2f}x" if r["latency_ratio"] is not None else "-"
        lines.append(f"{name:<36} {format_bytes(r['replica_bytes']):>12} {format_bytes(r['peak_activation_bytes']):>12} "
                     f"{r['replicas']:>9} {ratio:>8}")
    rec = plan["recommended"]
    what = "unsplit" if rec["merge_layer"] is None else f"merge at {rec['merge_layer']}, {rec['grid']}, {rec['mode']}"
    lines.append(f"recommended: {what}: {rec['replicas']} replicas per GPU ({rec['reason']})")
    lines += _timeout_lines(plan, plan["batch_size"])
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def _timeout_lines(plan: dict, batch: int) -> list[str]:
    """The batch's time and the response timeout derived from it, when the plan has them."""
    if "response_timeout_s" not in plan:
        return []
    how = "measured" if plan["batch_seconds_source"].startswith("median") else "predicted"
    return [f"one batch of {batch}: {plan['predicted_batch_seconds']:.1f} s {how} ({plan['batch_seconds_source']}) "
            f"-> response timeout {plan['response_timeout_s']} s"]


def _backend_text(plan: dict) -> str:
    if plan.get("backend", "python") == "python":
        return ""
    sharing = " with weight sharing" if plan["weight_sharing"] else ""
    return (f"; backend {plan['backend']}{sharing}: {format_bytes(plan['shared_bytes'])} paid once for all "
            f"instances (one process)")


def plot_plan(plan: dict, path: str) -> None:
    """Left: footprint per configuration, stacked; right: replicas per GPU vs latency ratio."""
    from splitpack.measure.plot import pyplot

    plt = pyplot()

    rows = [plan["unsplit"]] + plan["candidates"]
    names = ["unsplit"] + [f"{c['merge_layer']}\n{c['grid']} {c['mode']}" for c in plan["candidates"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(10.0, 2.2 * len(rows) + 5), 5.0),
                                  gridspec_kw={"width_ratios": [max(2, len(rows)), 2]})
    bottom = [0.0] * len(rows)
    for key, label in FOOTPRINT_PARTS:
        vals = [r["footprint"][key] / GiB for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{r['replicas']} / GPU", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel("per-replica footprint (GiB)")
    ax.set_title(f"{plan['model']} @{plan['size']} batch {plan['batch_size']}, "
                 f"{plan['usable_bytes'] / GiB:.1f} GiB usable")
    ax.legend(fontsize=7)
    for i, r in enumerate(rows):
        ratio = r["latency_ratio"] if r["latency_ratio"] is not None else float("nan")
        ax2.scatter([ratio], [r["replicas"]], color="black" if i == 0 else f"C{i % 10}")
        ax2.annotate(names[i].replace("\n", " "), (ratio, r["replicas"]), fontsize=6, xytext=(3, 3),
                     textcoords="offset points")
    ax2.set_xlabel("latency vs unsplit (measured on " + plan["device"] + ")")
    ax2.set_ylabel("replicas per GPU")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_shape(plan: dict) -> str:
    """A --memory-limit or --search-batch plan (and its validation) for people."""
    rec, t = plan["recommended"], plan["terms"]
    what = "unsplit" if rec["merge_layer"] is None else f"split-pack {plan['split']['plan']}"
    gpu = plan.get("memory") == "gpu"
    where = "one GPU pod, GPU memory" if gpu else f"{plan['device']}) under"
    lines = [f"{plan['model']} @{plan['size']} on {plan['server']} ({where} {format_bytes(plan['memory_limit_bytes'])} "
             f"({plan['memory_limit_source']}), planned within {format_bytes(plan['planned_within_bytes'])} "
             f"(headroom {format_bytes(plan['headroom_bytes'])})" + (")" if gpu else ""),
             (f"per worker on the GPU: CUDA context {format_bytes(t['process_bytes'])}, weights "
              f"{format_bytes(t['weights_bytes'])} ({t['source']})") if gpu else
             (f"fixed costs: server {format_bytes(t['server_bytes'])}, per process {format_bytes(t['process_bytes'])}, "
              f"weights {format_bytes(t['weights_bytes'])} per copy ({t['source']})"),
             f"activations per image: split {format_bytes(plan['split']['activation_bytes_per_image'])}, unsplit "
             f"{format_bytes(plan['unsplit']['activation_bytes_per_image'])} (cost model replay)",
             f"images in flight: split {plan['inflight_images_split']}, unsplit {plan['inflight_images_unsplit']}",
             f"recommended: {what}: {rec['replicas']} {'worker' if gpu else 'replica'}(s) x batch "
             f"{rec['batch_size']}, predicted usage {format_bytes(plan['predicted_usage_bytes'])} ({rec['reason']})"]
    if gpu:
        pod = plan["pod"]
        lines.append(f"pod: {pod['workers']} worker(s) x {pod['cpus_per_worker']} CPU(s) = {pod['cpus']} CPU(s), host "
                     f"memory {format_bytes(pod['host_memory_bytes'])} (at most {pod['max_workers']} workers in "
                     f"{pod['pod_cpus']} CPUs and {format_bytes(pod['pod_host_memory_bytes'])})")
    lines += _timeout_lines(plan, rec["batch_size"])
    for key, label in (("planned", "validated"), ("unsplit_same_shape", "unsplit, same shape")):
        run = plan.get("validation", {}).get(key)
        if run:
            lines.append(f"{label}: served {run.get('served', 0)}, failed {run.get('failed', 0)}, OOM kills "
                         f"{run['oom_kills']}, peak {format_bytes(run['peak_usage_bytes'])}"
                         + ("" if run.get("started", True) else f"; did not start: {run.get('start_error')}"))
    lines += [f"note: {n}" for n in plan.get("notes", [])]
    return "\n".join(lines)
