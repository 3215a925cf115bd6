"""`python -m clipkit.plan`: memory, FLOPs, time, cost and data side of a CLIP training run, per GPU and in total.

    python -m clipkit.plan --model ViT-B-16 --samples 1e9 --global-batch 32768 --gpus 256 --gpu h100 --zero 2
    python -m clipkit.plan --model ViT-L-14 --samples 12.8B --global-batch 90112 --gpus 512 --gpu a100-40gb \\
        --grad-checkpointing --loss-chunk-size 1024 --urls 12.8B --prep-nodes 20
    python -m clipkit.plan --model ViT-B-32 --sweep gpus=64,128,256 global_batch=16k,32k
    python -m clipkit.plan --model clipkit-tiny --gpu cpu --gpus 1 --global-batch 64 --precision fp32 --zero 0 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import fields, replace
from typing import Dict, List

from clipkit.plan.calibration import load_calibration
from clipkit.plan.plan import GIB, PlanRequest, make_plan

DECIMAL = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
SWEEPABLE = {"gpus": "gpus", "global_batch": "global_batch", "zero": "zero", "gpu": "gpu", "loss_chunk_size":
             "loss_chunk_size", "samples": "samples", "model": "model", "precision": "precision"}


def parse_count(text: str) -> float:
    """1e9, 12.8B, 400M, 1.5k (decimal suffixes k, M, B/G, T)."""
    t = str(text).strip().lower().replace("_", "").replace(",", "")
    try:
        if t and t[-1] in DECIMAL:
            return float(t[:-1]) * DECIMAL[t[-1]]
        return float(t)
    except ValueError:
        raise ValueError(f"not a count: {text!r} (write 1e9, 12.8B, 400M or 1.5k)") from None


def parse_batch(text: str) -> int:
    """32768 or 32k (k = 1024, as CLIP papers write batch sizes)."""
    t = str(text).strip().lower()
    try:
        value = float(t[:-1]) * 1024 if t.endswith("k") else float(t)
    except ValueError:
        raise ValueError(f"not a batch size: {text!r} (write 32768 or 32k)") from None
    if value != int(value) or value < 1:
        raise ValueError(f"batch size must be a positive whole number, got {text!r}")
    return int(value)


def _sweep_value(key: str, text: str):
    if key == "global_batch":
        return parse_batch(text)
    if key in ("gpus", "zero"):
        return int(parse_count(text))
    if key == "loss_chunk_size":
        return None if text.lower() in ("none", "0", "off") else int(text)
    if key == "samples":
        return parse_count(text)
    return text


def parse_sweep(items: List[str]) -> Dict[str, list]:
    grid: Dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SWEEPABLE or not values:
            raise ValueError(f"--sweep {item!r}: write KEY=V1,V2 with KEY one of {', '.join(SWEEPABLE)}")
        grid[key] = [_sweep_value(key, v) for v in values.split(",")]
    return grid


def build_parser() -> argparse.ArgumentParser:
    from clipkit.plan.gpus import GPUS

    p = argparse.ArgumentParser(prog="python -m clipkit.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16", help="open_clip / clipkit config name, or a JSON config")
    p.add_argument("--samples", default="1e9", help="samples seen (1e9, 12.8B, 400M)")
    p.add_argument("--global-batch", default="32768", help="global batch (32768 or 32k)")
    p.add_argument("--gpus", type=int, default=256, help="data-parallel ranks (processes with --gpu cpu)")
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)}, or cpu")
    p.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    p.add_argument("--loss-chunk-size", type=int, default=None, help="chunked InfoNCE rows per chunk (default: full "
                                                                      "logits)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--interconnect", type=float, default=None, metavar="GB/s",
                   help="network bandwidth per GPU across nodes (default: the GPU table's)")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation (default: measured, else assumed)")
    p.add_argument("--memory-gib", type=float, default=None, help="usable memory per rank")
    p.add_argument("--cpu-cores", type=int, default=None, help="with --gpu cpu: cores the processes share")
    p.add_argument("--urls", default=None, help="data prep: URLs in the dump (e.g. 400M)")
    p.add_argument("--prep-nodes", type=int, default=1, help="data prep: CPU nodes")
    p.add_argument("--prep-cores-per-node", type=int, default=32, help="data prep: cores per node")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--calibration", default=None, help="calibration JSON (default: clipkit/plan/calibration.json)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2",
                   help=f"a table of alternatives over the product of the values; KEY: {', '.join(SWEEPABLE)}")
    p.add_argument("--json", action="store_true", help="print the plan (or the sweep's plans) as JSON")
    return p


def request_from_args(a: argparse.Namespace) -> PlanRequest:
    return PlanRequest(
        model=a.model, samples=parse_count(a.samples), global_batch=parse_batch(a.global_batch), gpus=a.gpus,
        gpu=a.gpu.lower(), zero=a.zero, loss_chunk_size=a.loss_chunk_size, precision=a.precision,
        grad_checkpointing=a.grad_checkpointing, interconnect_gbs=a.interconnect, gpus_per_node=a.gpus_per_node,
        mfu=a.mfu, memory_gib=a.memory_gib, cpu_cores=a.cpu_cores, urls=parse_count(a.urls) if a.urls else None,
        prep_nodes=a.prep_nodes, prep_cores_per_node=a.prep_cores_per_node, samples_per_shard=a.samples_per_shard)


# ---------------------------------------------------------------- text
def gib(x: float) -> str:
    return f"{x / GIB:,.2f} GiB" if x >= GIB / 10 else f"{x / 2**20:,.1f} MiB"


def si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:,.3g} {prefix}{unit}"
    return f"{x:,.3g} {unit}".rstrip()


def format_plan(plan: Dict) -> str:
    r, m, d, mem, st, run = (plan[k] for k in ("request", "model", "device", "memory_per_rank", "step", "run"))
    rank = "process" if d["name"] == "cpu" else "GPU"
    lines = [f"clipkit plan: {r['model']}, {si(r['samples'])} samples seen, global batch {r['global_batch']:,} on "
             f"{r['gpus']} x {d['name']} (ZeRO-{r['zero']}, {r['precision']}"
             f"{', grad checkpointing' if r['grad_checkpointing'] else ''})", ""]
    lines.append(f"model       {m['params'] / 1e6:,.1f} M parameters ({m['trainable'] / 1e6:,.1f} M trainable), "
                 f"D={m['embed_dim']}, {m['image_size'][0]}x{m['image_size'][1]} px, {m['context_length']} tokens")
    lines.append(f"FLOPs       {si(m['tower_flops'], 'FLOP')} per sample for the towers (forward + backward, torch's "
                 f"FLOP counter) + loss = {si(m['flops_per_sample'], 'FLOP')} per sample; "
                 f"{si(st['flops']['model'], 'FLOP')} per step per {rank}; run total {si(run['total_flops'], 'FLOP')}")
    lines.append(f"memory per {rank} (local batch {st['local_batch']:,}):")
    rows = [("parameters", mem["parameters"]), ("fp32 master weights", mem["master_weights"]),
            ("Adam m and v", mem["optimizer"]), ("gradients + step buffers (measured per parameter)",
                                                 mem["transient"]),
            (f"activations ({m['activation_bytes'] / 2**20:,.1f} MiB per sample"
             f"{' + one recomputed block' if r['grad_checkpointing'] else ''})", mem["activations"]),
            (f"loss ({plan['loss']['used'].replace('_', ' ')})", mem["loss"])]
    lines += [f"  {name:<58} {gib(v):>14}" for name, v in rows]
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    lines.append(f"  {'total':<58} {gib(mem['total']):>14}  of {gib(mem['capacity'])} usable: {verdict}")
    lines.append(f"  largest local batch that fits: {mem['max_local_batch']:,}")
    lines.append("  by ZeRO stage: " + ", ".join(f"{s}: {gib(v['total'])}" for s, v in plan["zero_by_stage"].items()))
    lo = plan["loss"]
    lines.append(f"loss        {lo['local_batch']:,} rows x {lo['columns']:,} columns per {rank}: full logits "
                 f"{gib(lo['full_logits']['peak_bytes'])}, {si(lo['full_logits']['flops'], 'FLOP')}; chunked "
                 f"(K={lo['chunk_size']}) {gib(lo['chunked']['peak_bytes'])}, {si(lo['chunked']['flops'], 'FLOP')}; "
                 f"{100 * lo['share_of_step_flops']:.2f}% of the step's FLOPs")
    if d["name"] == "cpu":
        rate = (f"{si(d['flops_per_s'], 'FLOP/s')} per process, {r['gpus']} sharing {d['cores']} cores "
                f"({d['rate_source']})")
    else:
        rate = (f"MFU {100 * d['mfu']:.0f}% of {d['peak_tflops']:.0f} TFLOP/s ({d['mfu_source']}); "
                f"communication {si(st['comm_bytes'], 'B')} per {rank} (ZeRO {si(st['zero_comm_bytes'], 'B')}, "
                f"feature all-gather {si(st['feature_allgather_bytes'], 'B')}) at {d['bandwidth_gbs']:.0f} GB/s = "
                f"{st['comm_s']:.3f} s")
    lines.append(f"time        step {st['step_s']:.3f} s ({st['bound']}-bound): compute {st['compute_s']:.3f} s "
                 f"at {rate}")
    lines.append(f"            {st['samples_per_s']:,.0f} samples/s ({st['samples_per_s_per_rank']:,.1f} per {rank}); "
                 f"{run['steps']:,} steps; wall {run['wall_hours']:,.2f} h; {rank}-hours {run['gpu_hours']:,.0f}")
    ld, sh = plan["data"]["loader"], plan["data"]["shards"]
    lines.append(f"data        loaders must deliver {ld['samples_per_s_total']:,.0f} samples/s in total, "
                 f"{ld['samples_per_s_per_gpu']:,.0f} per {rank}, {ld['samples_per_s_per_node']:,.0f} per node "
                 f"({ld['nodes']} nodes)")
    shard_line = f"            {sh['shards']:,} shards of {sh['samples_per_shard']:,} samples"
    if "bytes_total" in sh:
        shard_line += f", {si(sh['bytes_total'], 'B')} ({sh['bytes_source']})"
    lines.append(shard_line)
    prep = plan["data"].get("prep")
    if prep:
        if "hours" in prep:
            lines.append(f"data prep   {si(prep['urls'])} URLs on {prep['nodes']} nodes x "
                         f"{prep['cores_per_node']} cores: {prep['hours']:,.1f} h at {prep['images_per_s']:,.0f} "
                         f"images/s ({prep['source']})")
        else:
            lines.append(f"data prep   {prep['note']}")
    return "\n".join(lines)


def format_sweep(plans: List[Dict], keys: List[str]) -> str:
    head = keys + ["local batch", "peak/rank GiB", "fits", "max local", "step s", "bound", "samples/s", "wall h",
                   "GPU-hours"]
    rows = [head]
    for p in plans:
        req, mem, st, run = p["request"], p["memory_per_rank"], p["step"], p["run"]
        rows.append([str(req[k]) for k in keys] + [
            f"{st['local_batch']:,}", f"{mem['total'] / GIB:.1f}", "yes" if mem["fits"] else "NO",
            f"{mem['max_local_batch']:,}", f"{st['step_s']:.3f}", st["bound"], f"{st['samples_per_s']:,.0f}",
            f"{run['wall_hours']:,.1f}", f"{run['gpu_hours']:,.0f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        calibration = load_calibration(args.calibration)
        base = request_from_args(args)
        if args.sweep:
            grid = parse_sweep(args.sweep)
            keys = list(grid)
            plans = [make_plan(replace(base, **dict(zip(keys, combo))), calibration)
                     for combo in itertools.product(*grid.values())]
            print(json.dumps(plans, indent=1) if args.json else format_sweep(plans, keys))
        else:
            plan = make_plan(base, calibration)
            print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


assert {f.name for f in fields(PlanRequest)} >= set(SWEEPABLE.values())
