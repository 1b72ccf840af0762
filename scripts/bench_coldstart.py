#!/usr/bin/env python3
"""Cold start of an EP group: time to ready for R processes (default 8), each with its own
cache directory (as on R nodes or containers), in four situations:

    cold_alone       empty caches, each process fetches its kernels alone (get_kernel per spec)
    cold_collective  empty caches, ep_jit.warm: each key compiled once in the group
    shared           empty caches and a shared read-only tier filled by ep-jit-warm beforehand
    warm             the caches the collective run filled, in new processes

    python scripts/bench_coldstart.py [--ranks 8] [--repeats 3] [--out FILE]   # CPU: ep_jit.warm over the specs
    python scripts/bench_coldstart.py --gpu [--out FILE]   # Buffer(...) on GPU 0, shared by every rank

Processes form a torch gloo group. The time is from a barrier to the last rank being ready
(CPU: the kernels are in its memory tier; --gpu: `Buffer(..., warm=True)` has returned), median over
the repeats. Shape: DeepSeek-V3 (hidden 7168, 256 experts, top-8, bf16), the NVLink
transport's kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("cold_alone", "cold_collective", "shared", "warm")
SHAPE = dict(hidden=7168, num_experts=256, topk=8, dtype="bf16")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu", action="store_true", help="time Buffer(...) on GPU 0 instead of ep_jit.warm")
    p.add_argument("--arch", default="sm_90a", help="arch of the kernels (--gpu: must be GPU 0's)")
    p.add_argument("--transport", default="nvlink", choices=("nvlink", "collective"))
    p.add_argument("--max-tokens", type=int, default=4096, help="--gpu: the Buffer's max_tokens_per_rank")
    p.add_argument("--num-sms", type=int, default=24, help="--gpu: the Buffer's num_sms")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--worker", nargs=3, metavar=("RANK", "PORT", "SCENARIO"), help=argparse.SUPPRESS)
    return p.parse_args()


# ---- one rank -------------------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    rank, port, scenario = int(args.worker[0]), int(args.worker[1]), args.worker[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks,
                            timeout=datetime.timedelta(seconds=300))
    import ep_jit

    specs = ep_jit.buffer_specs(**SHAPE, members=range(args.ranks), arch=args.arch, transport=args.transport)
    if args.gpu:
        import torch
        from ep_jit.runtime import device_arch
        torch.cuda.set_device(0)
        if device_arch(0) != args.arch:
            raise SystemExit(f"--arch: GPU 0 is {device_arch(0)}, got {args.arch}")
    dist.barrier()
    start = time.perf_counter()
    if scenario == "cold_alone":  # how a Buffer fetched its kernels before ep_jit.warm
        for spec in specs:
            ep_jit.get_kernel(spec)
    if args.gpu:
        buf = ep_jit.Buffer(dist.group.WORLD, SHAPE["hidden"], SHAPE["num_experts"], SHAPE["topk"],
                            args.max_tokens, SHAPE["dtype"], args.num_sms, transport=args.transport,
                            warm=True)  # Buffer() alone fetches nothing: time it with every kernel
    elif scenario != "cold_alone":
        ep_jit.warm(specs, dist.group.WORLD)
    seconds = time.perf_counter() - start
    everyone = [None] * args.ranks
    dist.all_gather_object(everyone, {"seconds": seconds, **ep_jit.stats()})
    if args.gpu:
        buf.close()
    if rank == 0:
        print("RESULT " + json.dumps(everyone))
    dist.destroy_process_group()


# ---- the driver -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(args: argparse.Namespace, scenario: str, work: Path, shared: Path | None) -> dict:
    port = free_port()
    base = [sys.executable, __file__, "--ranks", str(args.ranks), "--arch", args.arch, "--transport", args.transport,
            "--max-tokens", str(args.max_tokens), "--num-sms", str(args.num_sms)] + (["--gpu"] if args.gpu else [])
    procs = []
    for rank in range(args.ranks):
        env = {**os.environ, "PYTHONPATH": str(REPO), "EP_JIT_CACHE_DIR": str(work / f"cache{rank}"),
               "EP_JIT_LOCK_DIR": str(work / f"locks{rank}")}
        env.pop("EP_JIT_SHARED_CACHE_DIR", None)
        if shared is not None:
            env["EP_JIT_SHARED_CACHE_DIR"] = str(shared)
        procs.append(subprocess.Popen([*base, "--worker", str(rank), str(port), scenario], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"{scenario}: a rank failed:\n{err[-3000:]}")
    ranks = json.loads(next(l for l in outs[0][0].splitlines() if l.startswith("RESULT "))[7:])
    return {"seconds": max(r["seconds"] for r in ranks), "compiles": sum(r["compiles"] for r in ranks),
            "peer_hits": sum(r["peer_hits"] for r in ranks), "shared_hits": sum(r["shared_hits"] for r in ranks),
            "disk_hits": sum(r["disk_hits"] for r in ranks)}


def fill_shared(args: argparse.Namespace, root: Path) -> None:
    """What a cluster would do once: ep-jit-warm into the shared folder (both transports' kernels)."""
    subprocess.run([sys.executable, "-m", "ep_jit.cli.warm", "--hidden", str(SHAPE["hidden"]), "--experts",
                    str(SHAPE["num_experts"]), "--topk", str(SHAPE["topk"]), "--dtype", SHAPE["dtype"],
                    "--world-size", str(args.ranks), "--arch", args.arch, "--cache-dir", str(root), "--json"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def one_repeat(args: argparse.Namespace, tmp: Path) -> dict:
    shared = tmp / "shared"
    fill_shared(args, shared)
    out = {}
    for scenario in SCENARIOS:
        work = tmp / ("collective" if scenario in ("cold_collective", "warm") else scenario)
        out[scenario] = run_group(args, scenario, work, shared if scenario == "shared" else None)
    return out


def commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(REPO))
    from ep_jit.compiler import nvrtc_version

    runs = []
    for _ in range(args.repeats):
        tmp = Path(tempfile.mkdtemp(prefix="ep_jit-coldstart-"))
        try:
            runs.append(one_repeat(args, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    results = {
        "date": time.strftime("%Y-%m-%d"), "commit": commit(), "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)", "nvrtc": nvrtc_version(),
        "mode": "gpu: Buffer on GPU 0" if args.gpu else "cpu: ep_jit.warm", "ranks": args.ranks,
        "shape": SHAPE, "transport": args.transport, "arch": args.arch, "repeats": args.repeats,
        "scenarios": {s: {"seconds_median": statistics.median(r[s]["seconds"] for r in runs),
                          "seconds": [round(r[s]["seconds"], 4) for r in runs],
                          **{k: runs[0][s][k] for k in ("compiles", "peer_hits", "shared_hits", "disk_hits")}}
                      for s in SCENARIOS},
    }
    print(f"{results['mode']}, {args.ranks} ranks, NVRTC {results['nvrtc']}, {results['machine']}")
    print(f"{'scenario':16} {'time to ready':>14} {'compiles':>9} {'from peers':>11} {'shared hits':>12}")
    for name, r in results["scenarios"].items():
        print(f"{name:16} {r['seconds_median']:12.3f} s {r['compiles']:9} {r['peer_hits']:11} {r['shared_hits']:12}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
