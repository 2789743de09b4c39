"""Policy serving cost per control step: in-process vs HTTP json-numpy vs binary (msgpack, websocket) vs async chunks.

    python benchmarks/policy_serving.py --policy runs/vla_metaworld/policy_vlm --steps 500 --robots 1,4
    python benchmarks/policy_serving.py --policy P --modes async --robots 4 --steps 2500      # 10,000 steps

The server runs as `vltune serve policy --threads 1` in its own process (one torch thread for the policy);
the robots are client threads here, each with its own session, sending 96 px frames (random pixels: the
cost does not depend on them) plus a 4-dim state. Modes:
- inproc: `Policy.step` in this process (robots stepped round-robin on one thread);
- json: `POST /act` with json-numpy, `mode: step` (the server re-plans exactly as `Policy.step` does);
- msgpack / msgpack-png: the same with msgpack bodies, images as raw arrays / PNG bytes;
- ws: the websocket, msgpack, `mode: step`;
- async: `PolicyClient(chunk_threshold=0.5)`: chunks fetched in the background, one action per `step`.
Per mode and robot count: p50/p95/p99 latency of one step as the robot sees it, actions/s per robot and in
total, errors, and for the request modes the network path's own cost: per request, the round trip minus the
`model_ms` the server reports for the policy call that answered it (the overhead over in-process, measured on
the same request, so it does not drift with the machine between modes). Prints one markdown table.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def observation(rng, cfg_info: dict, size: int) -> dict:
    obs = {c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in cfg_info["cameras"]}
    obs["instruction"] = "open the drawer"
    if cfg_info["state_length"]:
        obs["state"] = rng.normal(size=cfg_info["state_length"]).astype(np.float32)
    return obs


def summary(ms: list[float], wall: float, robots: int, errors: int, overhead: list[float] | None = None) -> dict:
    a = np.asarray(ms)
    return {"p50": np.percentile(a, 50), "p95": np.percentile(a, 95), "p99": np.percentile(a, 99),
            "per_robot": len(a) / robots / wall, "total": len(a) / wall, "steps": len(a), "errors": errors,
            "overhead_p50": float(np.percentile(overhead, 50)) if overhead else None,
            "overhead_p95": float(np.percentile(overhead, 95)) if overhead else None}


def run_inproc(policy_dir: str, robots: int, steps: int, size: int) -> dict:
    import torch

    from vltune.vla.policy import Policy
    from vltune.vla.wire import ObservationSpec

    torch.set_num_threads(1)
    base = Policy.from_pretrained(policy_dir)
    info = ObservationSpec.of(base.config).info()
    pols = [Policy(base.model, base.frames, base.normalizers) for _ in range(robots)]
    rng = np.random.default_rng(0)
    obs = [observation(rng, info, size) for _ in range(robots)]
    ms = []
    for p in pols:
        p.reset()
    for _ in range(5):  # warm-up
        pols[0].step({c: obs[0][c] for c in info["cameras"]}, obs[0]["instruction"], obs[0].get("state"))
    t0 = time.perf_counter()
    for _ in range(steps):
        for p, o in zip(pols, obs):
            t = time.perf_counter()
            p.step({c: o[c] for c in info["cameras"]}, o["instruction"], o.get("state"))
            ms.append((time.perf_counter() - t) * 1000)
    return summary(ms, time.perf_counter() - t0, robots, 0)


def robot_loop(mode: str, url: str, info: dict, steps: int, size: int, seed: int, out: list, errs: list,
               barrier: threading.Barrier, over: list) -> None:
    import requests

    from vltune.vla.client import PolicyClient
    from vltune.vla.wire import MSGPACK, image_bytes, json_dumps, json_loads, msgpack_dumps, msgpack_loads

    rng = np.random.default_rng(seed)
    obs = observation(rng, info, size)
    ms, errors, overhead = [], 0, []
    if mode == "async":
        client = PolicyClient(url, chunk_threshold=0.5, encoding="msgpack")
        client.reset()
        for _ in range(5):
            client.step(obs)
        barrier.wait()
        for _ in range(steps):
            t = time.perf_counter()
            try:
                client.step(obs)
            except Exception:
                errors += 1
            ms.append((time.perf_counter() - t) * 1000)
        client.close()
    elif mode == "ws":
        from websockets.sync.client import connect

        with connect(url.replace("http", "ws") + "/ws", max_size=None) as ws:
            ws.send(msgpack_dumps({"reset": True}))
            ws.recv()
            body = msgpack_dumps({**obs, "mode": "step"})
            for i in range(steps + 5):
                if i == 5:
                    barrier.wait()
                t = time.perf_counter()
                ws.send(body)
                reply = msgpack_loads(ws.recv())
                took = (time.perf_counter() - t) * 1000
                if "actions" not in reply:
                    errors += 1
                if i >= 5:
                    ms.append(took)
                    if "model_ms" in reply:
                        overhead.append(took - reply["model_ms"])
    else:
        http = requests.Session()
        sid = http.post(url + "/reset", json={}).json()["session_id"]
        payload = {**obs, "session_id": sid, "mode": "step"}
        for i in range(steps + 5):
            if i == 5:
                barrier.wait()
            t, model_ms = time.perf_counter(), None
            try:  # encode per step: it is part of what each encoding costs
                if mode == "json":
                    r = http.post(url + "/act", data=json_dumps(payload), headers={"Content-Type": "application/json"})
                    ok = r.status_code == 200 and json_loads(r.content).shape[0] == 1
                    model_ms = float(r.headers["X-Model-Ms"]) if "X-Model-Ms" in r.headers else None
                else:
                    p = payload if mode == "msgpack" else {
                        **payload, **{c: image_bytes(obs[c], "png") for c in info["cameras"]}}
                    r = http.post(url + "/act", data=msgpack_dumps(p), headers={"Content-Type": MSGPACK})
                    reply = msgpack_loads(r.content)
                    ok = r.status_code == 200 and reply["actions"].shape[0] == 1
                    model_ms = reply.get("model_ms")
            except Exception:
                ok = False
            took = (time.perf_counter() - t) * 1000
            errors += not ok
            if i >= 5:
                ms.append(took)
                if ok and model_ms is not None:
                    overhead.append(took - model_ms)
    out.extend(ms)
    errs.append(errors)
    over.extend(overhead)


def run_remote(mode: str, url: str, info: dict, robots: int, steps: int, size: int) -> dict:
    out, errs, over = [], [], []
    barrier = threading.Barrier(robots + 1)
    threads = [threading.Thread(target=robot_loop, args=(mode, url, info, steps, size, i, out, errs, barrier, over))
               for i in range(robots)]
    for th in threads:
        th.start()
    barrier.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    return summary(out, time.perf_counter() - t0, robots, sum(errs), over)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="runs/vla_metaworld/policy_vlm")
    ap.add_argument("--steps", type=int, default=500, help="steps per robot per mode")
    ap.add_argument("--robots", default="1,4")
    ap.add_argument("--modes", default="inproc,json,msgpack,msgpack-png,ws,async")
    ap.add_argument("--image_size", type=int, default=96)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import requests

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "vltune", "serve", "policy", "--policy", a.policy, "--port",
                               str(port), "--threads", "1"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the policy server did not start")
            time.sleep(0.2)
        info = requests.get(url + "/info").json()
        rows = []
        for mode in a.modes.split(","):
            for robots in map(int, a.robots.split(",")):
                r = (run_inproc(a.policy, robots, a.steps, a.image_size) if mode == "inproc"
                     else run_remote(mode, url, info, robots, a.steps, a.image_size))
                rows.append((mode, robots, r))
                print(f"{mode:12s} robots {robots}: p50 {r['p50']:.2f} ms, p95 {r['p95']:.2f}, p99 {r['p99']:.2f}, "
                      f"{r['per_robot']:.1f} actions/s per robot ({r['total']:.1f} total), {r['steps']} steps, "
                      f"{r['errors']} errors" + (f", overhead over the model p50 {r['overhead_p50']:.2f} ms"
                                                 if r["overhead_p50"] is not None else ""), flush=True)
        stats = requests.get(url + "/stats").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\nserver batches: {stats['batch_sizes']} (frames per backbone forward: count)")
    print("\n| mode | robots | p50 ms | p95 ms | p99 ms | actions/s per robot | actions/s total | steps | errors "
          "| overhead p50 / p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, robots, r in rows:
        over = "-" if r["overhead_p50"] is None else f"{r['overhead_p50']:.2f} / {r['overhead_p95']:.2f}"
        print(f"| {mode} | {robots} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | {r['per_robot']:.1f} | "
              f"{r['total']:.1f} | {r['steps']} | {r['errors']} | {over} |")


if __name__ == "__main__":
    main()
