"""`robustlab eval` at scale: AutoAttack throughput with 1 and 2 processes (torchrun, gloo) on this machine, and
the overhead of `--state` (the per-batch, per-attack records written atomically).

    python benchmarks/eval_scale.py --n 100 --batch-size 25 --repeats 2 --json scale.json

The model is the PGD-AT small CNN of `benchmarks/attacks.py --autoattack` (cached), handed to `robustlab eval` as a
user's model (a Python file and safetensors weights), on the first N mnist5k test images. Each configuration is
a full `robustlab eval` process (start-up included, the same for every row); the configurations are run in turn,
`--repeats` times, and each row reports its best run:

- 1 process, T threads (T = the machine's cores) - the baseline;
- torchrun with 2 processes of T/2 threads each (gloo): ranks take batches round-robin, rank 0 merges;
- 1 process, T threads, with `--state`: the cost of writing every batch's records.
Every run's JSON must equal the baseline's (wall-clock seconds aside); the script stops if one does not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attacks import adversarially_trained  # noqa: E402  (the same cached PGD-AT model as the AutoAttack table)

from robustlab.data import load_dataset  # noqa: E402
from robustlab.engine.evaluator import without_seconds  # noqa: E402
from robustlab.utils import machine_description  # noqa: E402

USER_CODE = '''
from robustlab.models import create_model


def net():
    return create_model("small-cnn", width=16, hidden=128)
'''


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="test images (default: 100)")
    ap.add_argument("--batch-size", type=int, default=25, help="(default: 25)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="the machine's cores (default: all)")
    ap.add_argument("--attack", default="autoattack:norm=linf,eps=0.3", help="(default: %(default)s)")
    ap.add_argument("--cache", default="/tmp/robustlab-bench-models", help="trained models kept here")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each configuration (default: 2)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    data = load_dataset("mnist5k")
    model = adversarially_trained("small-cnn", data.x_train, data.y_train, epochs=12, cache=args.cache, width=16,
                                  hidden=128)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "user_net.py").write_text(USER_CODE)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "w.safetensors"))
        np.savez(folder / "data.npz", x=data.x_test[: args.n].numpy(), y=data.y_test[: args.n].numpy())
        base = ["eval", "--model", f"{folder / 'user_net.py'}:net", "--weights", str(folder / "w.safetensors"),
                "--data", str(folder / "data.npz"), "--attack", args.attack, "--batch-size", str(args.batch_size),
                "--quiet", "--no-store"]
        cli = [sys.executable, "-m", "robustlab.cli.main"]
        half = max(1, args.threads // 2)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        configs = [
            ("1 process", cli + base + ["--threads", str(args.threads)], args.threads),
            (f"torchrun, 2 processes x {half} thread(s)",
             [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
              "-m", "robustlab.cli.main"] + base + ["--threads", str(half)], half),
            ("1 process, --state", cli + base + ["--threads", str(args.threads), "--state", str(folder / "state")],
             args.threads),
        ]
        reference = None
        times: dict[str, list[float]] = {label: [] for label, _, _ in configs}
        for repeat in range(args.repeats):  # interleaved: a slow spell of the machine hits every configuration
            for label, cmd, threads in configs:
                out = folder / f"{repeat}-{len(times[label])}-{label[:9].replace(' ', '')}.json"
                if "--state" in cmd:
                    shutil.rmtree(folder / "state", ignore_errors=True)
                seconds = run(cmd + ["--json", str(out)], threads)
                result = without_seconds(json.loads(out.read_text()))
                if reference is None:
                    reference = result
                elif result != reference:
                    raise SystemExit(f"{label}: the result differs from the single-process run's")
                times[label].append(seconds)
                print(f"{label}: {seconds:.1f} s", flush=True)
        for label, ts in times.items():
            rows.append({"run": label, "seconds": min(ts), "all_seconds": ts, "images_per_s": args.n / min(ts)})
        # the state's own cost, measured directly: writing every record file again the way the run wrote them
        from robustlab.engine.eval_state import EvalState

        state = EvalState(folder / "state", json.loads((folder / "state" / "manifest.json").read_text()))
        records = sorted((folder / "state").glob("batch-*.pt"))
        t = time.perf_counter()
        for path in records:
            state.save(path.name, torch.load(path, weights_only=True))
        write_s = time.perf_counter() - t
        # and the hashes it takes: the weights and the data once, every batch's images and labels
        from robustlab.engine.checkpoint import tensors_sha256

        t = time.perf_counter()
        tensors_sha256(dict(model.state_dict()))
        x, y = data.x_test[: args.n], data.y_test[: args.n]
        tensors_sha256({"x": x, "y": y})
        for i in range(0, args.n, args.batch_size):
            tensors_sha256({"x": x[i:i + args.batch_size], "y": y[i:i + args.batch_size]})
        hash_s = time.perf_counter() - t
    base_s = rows[0]["seconds"]
    print(f"\nAutoAttack ({args.attack}), {args.n} images, batch {args.batch_size}, best of {args.repeats} "
          f"interleaved runs; {machine_description()}; torch {torch.__version__}\n")
    print("| run | seconds (best) | every run | images/s | vs 1 process |\n|---|---|---|---|---|")
    for r in rows:
        every = ", ".join(f"{t:.1f}" for t in r["all_seconds"])
        print(f"| {r['run']} | {r['seconds']:.1f} | {every} | {r['images_per_s']:.2f} | {base_s / r['seconds']:.2f}x |")
    overhead = rows[2]["seconds"] / base_s - 1
    own = write_s + hash_s
    print(f"\n--state, end to end: {100 * overhead:+.1f}% of the 1-process run (target < 3%; compare the spread of "
          "the runs above)")
    print(f"--state, its own work measured directly: {len(records)} record files written in {write_s:.3f} s and "
          f"the hashes in {hash_s:.3f} s = {100 * own / base_s:.2f}% of the 1-process run")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_description(), "args": vars(args), "rows": rows,
                                               "state_overhead": overhead, "state_write_seconds": write_s,
                                               "state_hash_seconds": hash_s, "record_files": len(records)}, indent=2))


if __name__ == "__main__":
    main()
