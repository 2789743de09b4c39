"""Serving throughput: `vltune serve` vs one-request-at-a-time inference vs ms-swift `swift deploy`.

Not part of CI. Each server runs in its own process on a free loopback port, one after the other, on the
same model (the benchmark's tiny Qwen2.5-VL, benchmarks/bench_model.py: Qwen's real special-token ids, so
ms-swift inserts the right number of image tokens), the same 8 user adapters (random LoRA with non-zero B on
every LLM linear layer) and the same requests (a synthetic screenshot + an instruction, a random user each,
greedy, max_tokens fixed):

  vltune   `python -m vltune serve --per_user_adapters ...` (gathers concurrent requests into one
           generate call with a different adapter per row)
  naive    the same HTTP front, but each request answered alone through `vltune infer --per_user_adapters`'
           code path (switch the user's adapter, generate, one request at a time)
  swift    `swift deploy --infer_backend transformers --adapters user_0=... ` (ms-swift 4.6.0, own venv built
           by benchmarks/peer_envs.py), the adapter picked by the request's "model"

Load: for each client count (1, 4, 16), that many concurrent clients send requests back to back until
the round's count is reached. Reported per server and client count: requests/s, generated tokens/s,
p50 / p95 / p99 latency, errors, and (vltune) the histogram of rows per generate call.

    python benchmarks/serve_throughput.py                                # 1:100, 4:400, 16:2000 requests
    python benchmarks/serve_throughput.py --requests 1:40,4:100,16:400 --servers vltune,naive,swift
    python benchmarks/serve_throughput.py --device cuda                  # on a GPU machine
"""

import argparse
import asyncio
import base64
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SITE = HERE / "peer_site"
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

ALL_SERVERS = ("vltune", "naive", "swift")
INSTRUCTIONS = ["Click the red circle", "Tap the blue square", "Open the green triangle", "Press the yellow star"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(ALL_SERVERS), help="comma-separated: vltune,naive,swift")
    p.add_argument("--requests", default="1:100,4:400,16:2000",
                   help="clients:requests rounds, e.g. 1:100,4:400,16:2000")
    p.add_argument("--users", type=int, default=8, help="user adapters")
    p.add_argument("--max_tokens", type=int, default=16, help="max_tokens of every request")
    p.add_argument("--max_batch_size", type=int, default=16, help="vltune serve --max_batch_size")
    p.add_argument("--max_batch_wait_ms", type=float, default=5.0, help="vltune serve --max_batch_wait_ms")
    p.add_argument("--regather_wait_ms", type=float, default=50.0, help="vltune serve --regather_wait_ms")
    p.add_argument("--size", default="xs", help="bench model size (xs | s)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every server")
    p.add_argument("--workdir", default="/tmp/vltune-bench", help="model, adapters, logs")
    p.add_argument("--venvs", default=None, help="peer venvs (default: WORKDIR/venvs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_naive_server", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# =============================================================================== set-up
def make_adapters(model_dir: str, out: Path, users: int) -> Path:
    """`users` LoRA adapters (random non-zero B, every LLM linear layer) laid out as `vltune personalize` does."""
    if (out / "DONE").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model

    from vltune.models.config import ModelArguments, TunerArguments
    from vltune.models.load import load_model
    from vltune.models.tuners import lora_target_modules

    for user in range(users):
        model = load_model(model_dir, ModelArguments(model=model_dir), for_training=False)
        peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                                target_modules=lora_target_modules(model, TunerArguments())))
        gen = torch.Generator().manual_seed(1000 + user)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.05
        peft.save_pretrained(str(out / "adapters" / f"user_{user}"))
    (out / "DONE").write_text("ok\n")
    return out


def make_requests(workdir: Path, n: int, users: int, max_tokens: int, seed: int) -> list[dict]:
    """n chat requests: a synthetic screenshot (data: URI) + an instruction, a random user each."""
    from vltune.data.synthetic import make_grounding_set

    data = workdir / "serve-screens"
    made = make_grounding_set(data, n_train=64, n_test=0, grid=4, cell=28, seed=seed) \
        if not (data / "train.jsonl").exists() else {"train": str(data / "train.jsonl")}
    rows = [json.loads(line) for line in open(made["train"], encoding="utf-8")]
    screens = []
    for r in rows:
        img = Path(made["train"]).parent / r["images"][0]
        screens.append("data:image/png;base64," + base64.b64encode(img.read_bytes()).decode())
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append({"model": f"user_{rng.randrange(users)}", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": rng.choice(screens)}},
                        {"type": "text", "text": rng.choice(INSTRUCTIONS)}]}]})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(a, peer: bool) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               USE_MODELSCOPE_HUB="0", PYTHONPATH=os.pathsep.join([str(SITE), str(REPO)]))
    if peer:
        from peer_envs import SPECS

        env["VLTUNE_BENCH_REGISTER_PROCESSOR"] = "1"
        env["VLTUNE_BENCH_STUB_MODULES"] = SPECS["swift"].get("stub_modules", "")
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def server_command(name: str, a, model: str, adapters: Path, port: int, venvs: Path) -> list[str]:
    if name == "vltune":
        return [sys.executable, "-m", "vltune", "serve", "--model", model, "--per_user_adapters", str(adapters),
                "--port", str(port), "--max_batch_size", str(a.max_batch_size), "--max_batch_wait_ms",
                str(a.max_batch_wait_ms), "--regather_wait_ms", str(a.regather_wait_ms), "--max_loaded_adapters",
                str(a.users), "--max_queue_size", "4096",
                "--request_timeout", "600", "--device", a.device, "--log_level", "warning"]
    if name == "naive":
        return [sys.executable, str(Path(__file__).resolve()), "--_naive_server",
                json.dumps({"model": model, "adapters": str(adapters), "port": port, "device": a.device})]
    pairs = [f"user_{u}={adapters / 'adapters' / f'user_{u}'}" for u in range(a.users)]
    return [str(venvs / "swift" / "bin" / "swift"), "deploy", "--model", model, "--model_type", "qwen2_5_vl",
            "--template", "qwen2_5_vl", "--use_hf", "true", "--infer_backend",
            "transformers", "--adapters", *pairs, "--port", str(port), "--host", "127.0.0.1",
            "--max_new_tokens", str(a.max_tokens), "--torch_dtype", "float32", "--verbose", "false"]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log_tail(log)}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout:.0f} s: {log_tail(log)}")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the server and any Python it launched), SIGKILL after 30 s."""
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, n: int = 4) -> list[str]:
    try:
        return [ln.rstrip()[:200] for ln in open(path, encoding="utf-8", errors="replace") if ln.strip()][-n:]
    except OSError:
        return []


# =============================================================================== the naive baseline
def naive_server(spec: dict) -> None:
    """One request at a time through `vltune infer --per_user_adapters`' code path, behind the same kind of
    HTTP front (FastAPI + uvicorn, the same request parsing) as vltune serve."""
    import threading

    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from vltune.models.config import ModelArguments
    from vltune.models.adapters import UserAdapters, load_global
    from vltune.recipes.infer import InferArguments, answer_samples, generation_kwargs
    from vltune.serve.options import ServeArguments
    from vltune.serve.protocol import image_urls, load_checked_image, parse_request, to_sample

    model_args = ModelArguments(model=spec["model"], device=spec["device"])
    model, processor, _ = load_global(model_args, spec["model"])
    bank = UserAdapters(model, spec["adapters"])
    opts, lock, app = ServeArguments(), threading.Lock(), FastAPI()

    def answer(req):
        images = [load_checked_image(u, p, opts) for u, p in image_urls(req)]
        sample = to_sample(req, images)
        args = InferArguments(max_new_tokens=req.max_tokens, batch_size=1)
        with lock, bank.use(int(req.model.split("_")[1])) as model:  # infer's per-user path: switch, generate
            (_, text, error), = answer_samples(model, processor, [sample], args, generation_kwargs(args))
        return text, error

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": f"user_{u}", "object": "model"} for u in bank.users]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_request(await request.json())
        text, error = await run_in_threadpool(answer, req)
        if error:
            return JSONResponse({"error": {"message": error}}, status_code=400)
        # no usage: infer's path returns text only (re-tokenising it would not give the generated count)
        return {"object": "chat.completion", "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    uvicorn.run(app, host="127.0.0.1", port=spec["port"], log_level="warning")


# =============================================================================== load
async def drive(url: str, requests: list[dict], clients: int) -> dict:
    import httpx

    latencies, tokens, errors, answers = [], 0, [], {}
    queue = list(enumerate(requests))
    queue.reverse()

    async def client(http):
        nonlocal tokens
        while queue:
            i, body = queue.pop()
            start = time.perf_counter()
            try:
                r = await http.post(url + "/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:120]}")
                    continue
                got = r.json()
                tokens += int(got.get("usage", {}).get("completion_tokens") or 0)
                answers[i] = got["choices"][0]["message"]["content"]
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()

    def pct(q):
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {"clients": clients, "requests": len(requests), "ok": len(latencies), "errors": len(errors),
            "error_samples": errors[:3], "wall_s": wall, "req_s": len(latencies) / wall, "tok_s": tokens / wall,
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "answers": answers}


def batch_histogram(url: str) -> dict:
    import httpx

    try:
        return httpx.get(url + "/stats", timeout=5).json().get("batch_sizes", {})
    except (httpx.HTTPError, ValueError):
        return {}


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def report(results: dict, rounds: list[tuple[int, int]]) -> str:
    lines = ["| server | clients | requests | req/s | tokens/s | p50 ms | p95 ms | p99 ms | errors | rows per generate call |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, per in results.items():
        for clients, _ in rounds:
            r = per.get(clients)
            if not r:
                continue
            hist = ", ".join(f"{k}: {v}" for k, v in sorted(r.get("batches", {}).items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {name} | {clients} | {r['requests']} | {fmt(r['req_s'], '.2f')} | {fmt(r['tok_s'] or None)} | "
                         f"{fmt(r['p50_ms'], '.0f')} | {fmt(r['p95_ms'], '.0f')} | {fmt(r['p99_ms'], '.0f')} | "
                         f"{r['errors']} | {hist or '-'} |")
    out = ["\n".join(lines)]
    if "vltune" in results:
        for peer in (p for p in results if p != "vltune"):
            parts = []
            for clients, _ in rounds:
                v, o = results["vltune"].get(clients), results[peer].get(clients)
                if v and o and o["req_s"] and o["p95_ms"]:
                    parts.append(f"{clients} clients: {v['req_s'] / o['req_s']:.2f}x req/s, "
                                 f"p95 {v['p95_ms'] / o['p95_ms']:.2f}x")
            if parts:
                out.append(f"vltune / {peer} (>1x req/s = vltune faster; p95 <1x = vltune lower): " + "; ".join(parts))
        same = []
        for peer in (p for p in results if p != "vltune"):
            for clients, _ in rounds:
                v, o = results["vltune"].get(clients), results[peer].get(clients)
                if v and o:
                    common = set(v["answers"]) & set(o["answers"])
                    same.append(f"{peer}@{clients}: {sum(v['answers'][i] == o['answers'][i] for i in common)}/"
                                f"{len(common)}")
        if same:
            out.append("identical greedy answers, vltune vs: " + ", ".join(same))
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a._naive_server:
        naive_server(json.loads(a._naive_server))
        return 0
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the server under test
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    bad = [s for s in servers if s not in ALL_SERVERS]
    if bad:
        raise SystemExit(f"--servers: unknown {bad}; choose from {ALL_SERVERS}")
    rounds = [(int(c), int(n)) for c, n in (x.split(":") for x in a.requests.split(","))]
    workdir = Path(a.workdir)
    venvs = Path(a.venvs) if a.venvs else workdir / "venvs"
    runs = workdir / "runs" / ("serve-" + time.strftime("%Y%m%d-%H%M%S"))
    runs.mkdir(parents=True, exist_ok=True)
    from bench_model import build_bench_model

    model = build_bench_model(workdir / f"model-{a.size}", a.size)
    adapters = make_adapters(model, workdir / f"serve-adapters-{a.size}-{a.users}", a.users)
    requests = {c: make_requests(workdir, n, a.users, a.max_tokens, a.seed + c) for c, n in rounds}
    print(f"[bench] model {model}; {a.users} adapters under {adapters}; rounds {rounds}; logs {runs}", flush=True)
    results: dict = {}
    for name in servers:
        if name == "swift":
            from peer_envs import ensure_venv

            py, msg = ensure_venv("swift", venvs)
            if py is None:
                print(f"[bench] swift: skipped: {msg}", flush=True)
                continue
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = runs / f"{name}.log"
        proc = subprocess.Popen(server_command(name, a, model, adapters, port, venvs), cwd=runs,
                                env=server_env(a, name == "swift"), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: `swift deploy` re-launches Python
        try:
            t0 = time.time()
            wait_ready(url, proc, log)
            print(f"[bench] {name}: up in {time.time() - t0:.0f} s", flush=True)
            asyncio.run(drive(url, requests[rounds[0][0]][:4], 1))  # warm-up, not measured
            results[name] = {}
            for clients, n in rounds:
                before = batch_histogram(url) if name == "vltune" else {}
                r = asyncio.run(drive(url, requests[clients], clients))
                after = batch_histogram(url) if name == "vltune" else {}
                r["batches"] = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
                results[name][clients] = r
                print(f"[bench] {name} {clients} clients: {r['ok']}/{n} ok in {r['wall_s']:.1f} s, "
                      f"{r['req_s']:.2f} req/s, p95 {fmt(r['p95_ms'], '.0f')} ms, errors {r['errors']} "
                      f"{r['error_samples'] or ''}", flush=True)
        except RuntimeError as e:
            print(f"[bench] {name}: failed: {e}", flush=True)
        finally:
            stop_group(proc)
    text = report(results, rounds)
    print("\n" + text, flush=True)
    (runs / "results.json").write_text(json.dumps({n: {c: {k: v for k, v in r.items() if k != "answers"}
                                                       for c, r in per.items()} for n, per in results.items()},
                                                  indent=2))
    (runs / "report.md").write_text(text + "\n")
    print(f"[bench] results: {runs / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
