"""`vltune serve`: a real server process on a free loopback port, driven by the real `openai` client (and raw
HTTP where the point is the status line or headers). One server holds the module's model and adapters; a
second one, with a tiny queue and timeout, shows 429 and 504."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import write_image, write_jsonl

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

CLICK = "click(250, 750)"
KEYS = {"k-admin": "*", "k-user1": ["user_1"], "k-clicker": ["clicker", 2]}
PROMPTS = ["Click the red square", "Open my music app", "Tap settings"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "vltune", "serve", "--port", str(port), "--log_level", "warning",
                             *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not come up:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _random_user_adapters(root: Path, users=(1, 2, 3)) -> Path:
    """LoRA adapters with random non-zero B (so each user's answers differ), as `vltune personalize` lays them out."""
    import torch
    from peft import LoraConfig, get_peft_model

    from vltune.models.config import ModelArguments, TunerArguments
    from vltune.models.load import load_model
    from vltune.models.tiny import tiny_model_path
    from vltune.models.tuners import lora_target_modules

    path = tiny_model_path("qwen3_vl", "xs")
    for user in users:
        model = load_model(path, ModelArguments(model=path), for_training=False)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=lora_target_modules(model, TunerArguments())))
        gen = torch.Generator().manual_seed(user)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.data = torch.randn(p.shape, generator=gen) * 0.5
        peft.save_pretrained(str(root / "adapters" / f"user_{user}"))
    return root


def _clicker_adapter(root: Path) -> Path:
    """An adapter trained by `vltune sft` to answer CLICK to every board: an answer with a click to convert."""
    import torch

    from vltune.data.synthetic import make_grounding_set
    from vltune.recipes.sft import main as sft_main

    made = make_grounding_set(root / "data", n_train=8, n_test=2, seed=3)
    rows = [json.loads(line) for line in Path(made["train"]).read_text().splitlines()]
    for r in rows:
        r["messages"][-1]["content"] = CLICK
    train = write_jsonl(root / "data" / "click.jsonl", rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sft_main(["--dataset", train, "--output_dir", str(root / "lora"), "--max_steps", "80",
                  "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--lora_dropout", "0",
                  "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
                  "--logging_steps", "40", "--gradient_checkpointing", "false"])
    finally:
        torch.set_num_threads(threads)
    return root / "lora"


def _data_uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _png_bytes(size, mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def _messages(image_uri: str | None, text: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": image_uri}}] if image_uri else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, _tiny_cache):
    root = tmp_path_factory.mktemp("serve")
    personal = _random_user_adapters(root / "personal")
    clicker = _clicker_adapter(root / "clicker")
    keys = root / "keys.json"
    keys.write_text(json.dumps(KEYS))
    images = [write_image(root / f"img{i}.png", color, size) for i, (color, size) in
              enumerate([((200, 30, 30), (64, 64)), ((30, 160, 40), (96, 64)), ((20, 40, 220), (80, 120))])]
    proc, url = _start(["--per_user_adapters", str(personal), "--adapters", f"clicker={clicker}",
                        "--api_keys", str(keys), "--max_loaded_adapters", "3", "--max_batch_wait_ms", "150",
                        "--max_tokens_cap", "32", "--max_images_per_request", "2", "--max_image_pixels", "100000",
                        "--max_request_bytes", "300000"], root / "server.log")
    try:
        yield types.SimpleNamespace(url=url, root=root, personal=personal, images=images, log=root / "server.log",
                                    client=openai.OpenAI(base_url=url + "/v1", api_key="k-admin", max_retries=0))
    finally:
        _stop(proc)


def _ask(served, model, image, text, key="k-admin", **kw):
    client = served.client if key == "k-admin" else openai.OpenAI(base_url=served.url + "/v1", api_key=key,
                                                                   max_retries=0)
    return client.chat.completions.create(model=model, messages=_messages(_data_uri(image), text),
                                          max_tokens=kw.pop("max_tokens", 12), **kw)


def test_models_lists_the_global_model_and_the_adapters_each_key_reaches(served):
    everything = [m.id for m in served.client.models.list().data]
    assert everything == ["tiny-qwen3_vl", "user_1", "user_2", "user_3", "clicker"]
    one = openai.OpenAI(base_url=served.url + "/v1", api_key="k-user1", max_retries=0)
    assert [m.id for m in one.models.list().data] == ["tiny-qwen3_vl", "user_1"]


def test_answers_equal_vltune_infer_per_user_adapters(served, tmp_path):
    from vltune.recipes.infer import main as infer_main

    rows = [{"messages": [{"role": "user", "content": "<image>" + PROMPTS[i % 3]}], "images": [img], "user": user}
            for i, (img, user) in enumerate(zip(served.images * 2, [1, 2, 3, 9, 1, 2]))]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    records = infer_main(["--per_user_adapters", str(served.personal), "--dataset", data, "--max_new_tokens", "12",
                          "--output", str(tmp_path / "preds.jsonl")])
    got = [_ask(served, f"user_{r['user']}", r["images"][0], r["messages"][0]["content"][7:]) for r in rows]
    assert [g.choices[0].message.content for g in got] == [r["answer"] for r in records]
    # user 9 has no adapter: the global model answered, and the response says so
    assert [g.model_extra["adapter"] for g in got] == ["user_1", "user_2", "user_3", None, "user_1", "user_2"]
    assert len({r["answer"] for r in records[:4]}) == 4, "users' adapters should answer differently"


def test_streamed_text_equals_the_non_streamed_text(served):
    for model, stop in [("user_2", None), ("user_3", None), ("user_1", ["e"])]:
        whole = _ask(served, model, served.images[1], PROMPTS[1], stop=stop).choices[0].message.content
        chunks = list(served.client.chat.completions.create(
            model=model, messages=_messages(_data_uri(served.images[1]), PROMPTS[1]), max_tokens=12, stream=True,
            stop=stop))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        if stop:
            assert "e" not in whole
    raw = httpx.post(served.url + "/v1/chat/completions", headers={"Authorization": "Bearer k-admin"}, json={
        "model": "user_1", "messages": _messages(_data_uri(served.images[0]), "hi"), "max_tokens": 3, "stream": True})
    lines = [line for line in raw.text.splitlines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


def test_a_mixed_adapter_batch_equals_one_by_one_answers(served):
    work = [(m, served.images[i % 3], PROMPTS[i % 3], 8 + 2 * (i % 3))
            for i, m in enumerate(["user_1", "user_2", "user_3", "clicker", "tiny-qwen3_vl", "user_1", "user_2",
                                   "clicker"])]
    alone = [_ask(served, m, img, text, max_tokens=n).choices[0].message.content for m, img, text, n in work]
    before = httpx.get(served.url + "/stats").json()["batch_sizes"]
    with ThreadPoolExecutor(len(work)) as pool:
        together = list(pool.map(lambda w: _ask(served, w[0], w[1], w[2], max_tokens=w[3]).choices[0].message.content,
                                 work))
    assert together == alone
    after = httpx.get(served.url + "/stats").json()["batch_sizes"]
    grew = {int(k) for k, v in after.items() if v > before.get(k, 0)}
    assert max(grew) >= 3, f"concurrent requests were not batched together: {after}"
    # 5 adapters were asked for, at most 3 stay loaded (least recently used ones are unloaded)
    assert len(httpx.get(served.url + "/health").json()["loaded_adapters"]) <= 3


def test_a_key_reaches_only_its_users(served):
    assert _ask(served, "user_1", served.images[0], "hi", key="k-user1").model_extra["adapter"] == "user_1"
    assert _ask(served, "tiny-qwen3_vl", served.images[0], "hi", key="k-user1").model_extra["adapter"] is None
    for model, user in [("user_2", None), ("tiny-qwen3_vl", "2"), ("clicker", None), ("user_9", None)]:
        with pytest.raises(openai.PermissionDeniedError) as e:
            _ask(served, model, served.images[0], "hi", key="k-user1", **({"user": user} if user else {}))
        assert e.value.body["param"] == "model"
    assert _ask(served, "tiny-qwen3_vl", served.images[0], "hi", key="k-clicker", user="2").model_extra["adapter"] \
        == "user_2"
    with pytest.raises(openai.AuthenticationError):
        _ask(served, "user_1", served.images[0], "hi", key="not-a-key")


def test_the_click_comes_back_in_the_original_screenshots_pixels(served):
    for image in served.images:
        got = _ask(served, "clicker", image, "Click the red square", extra_body={"return_click": True})
        from PIL import Image

        w, h = Image.open(image).size
        assert got.choices[0].message.content == CLICK
        assert got.model_extra["click"] == {"x": 0.25 * w, "y": 0.75 * h, "model_x": 250, "model_y": 750,
                                            "convention": "rel1000", "image_size": [w, h]}
    assert "click" not in _ask(served, "clicker", served.images[0], "Click").model_extra


def _post(served, body, raw: bytes | None = None):
    return httpx.post(served.url + "/v1/chat/completions", headers={"Authorization": "Bearer k-admin",
                                                                    "Content-Type": "application/json"},
                      content=raw if raw is not None else json.dumps(body).encode(), timeout=30)


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_serving(served):
    good_image = _data_uri(served.images[0])
    good = _ask(served, "user_2", served.images[0], "Tap settings").choices[0].message.content
    png = base64.b64encode(_png_bytes((64, 64))).decode()
    corrupt = "data:image/png;base64," + png[:len(png) // 2]
    too_big = "data:image/png;base64," + base64.b64encode(_png_bytes((400, 300))).decode()
    bomb = "data:image/png;base64," + base64.b64encode(_png_bytes((20000, 20000), "1")).decode()
    not_image = "data:image/png;base64," + base64.b64encode(b"this is not an image").decode()

    def body(**kw):
        return {"model": "user_1", "messages": _messages(good_image, "hi"), "max_tokens": 4, **kw}

    cases = [
        ("malformed JSON", None, b'{"model": "user_1", "messages": [', 400, "body"),
        ("not an object", None, b"[1, 2]", 400, "body"),
        ("missing messages", {"model": "user_1"}, None, 400, "messages"),
        ("bad role", body(messages=[{"role": "robot", "content": "hi"}]), None, 400, "messages[0].role"),
        ("corrupt image", body(messages=_messages(corrupt, "hi")), None, 400, "messages[0].content[0].image_url"),
        ("not an image", body(messages=_messages(not_image, "hi")), None, 400, "messages[0].content[0].image_url"),
        ("image over --max_image_pixels", body(messages=_messages(too_big, "hi")), None, 400,
         "messages[0].content[0].image_url"),
        ("decompression bomb", body(messages=_messages(bomb, "hi")), None, 400, "messages[0].content[0].image_url"),
        ("remote URL", body(messages=_messages("https://example.com/a.png", "hi")), None, 400,
         "messages[0].content[0].image_url"),
        ("server-side path", body(messages=_messages(served.images[0], "hi")), None, 400,
         "messages[0].content[0].image_url"),
        ("body over --max_request_bytes", body(padding="x" * 400_000), None, 413, "body"),
        ("unknown adapter", body(model="nobody"), None, 404, "model"),
        ("max_tokens over the cap", body(max_tokens=33), None, 400, "max_tokens"),
        ("too many images", body(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": good_image}}] * 3}]), None, 400, "messages"),
        ("temperature out of range", body(temperature=7), None, 400, "temperature"),
        ("n > 1", body(n=2), None, 400, "n"),
    ]
    for what, payload, raw, status, param in cases:
        r = _post(served, payload, raw)
        assert r.status_code == status, (what, r.status_code, r.text)
        error = r.json()["error"]
        assert error["param"] == param and param.split("[")[0].split(".")[0] in error["message"], (what, error)
    hints = {what: _post(served, p, raw).json()["error"]["message"] for what, p, raw, *_ in cases
             if "--" in what or what in ("remote URL", "server-side path")}
    assert "--max_image_pixels" in hints["image over --max_image_pixels"]
    assert "--max_request_bytes" in hints["body over --max_request_bytes"]
    assert "--allow_remote_images" in hints["remote URL"] and "--allow_local_images" in hints["server-side path"]
    assert _ask(served, "user_2", served.images[0], "Tap settings").choices[0].message.content == good
    metrics = httpx.get(served.url + "/metrics").text
    assert 'vltune_requests_total{status="400"}' in metrics and 'vltune_requests_total{status="413"}' in metrics
    assert "Traceback" not in served.log.read_text()


def test_metrics_are_prometheus_text(served):
    _ask(served, "user_3", served.images[2], "hi")
    text = httpx.get(served.url + "/metrics").text
    for name in ("vltune_requests_total{status=\"200\"}", "vltune_request_latency_seconds_bucket",
                 "vltune_queue_depth", "vltune_batch_size_bucket", "vltune_generated_tokens_total",
                 "vltune_tokens_per_second"):
        assert name in text, name
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


@contextlib.contextmanager
def _server_in_this_process(**options):
    """A second real server (uvicorn on a loopback port, its own thread) on the tiny model: no second Python
    start-up, so the limits below cost seconds."""
    import threading

    import uvicorn

    from vltune.models.config import ModelArguments
    from vltune.serve.app import create_app, load_service
    from vltune.serve.options import ServeArguments

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(load_service(ModelArguments(), ServeArguments(**options))),
                                           host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the in-process server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_full_queue_gets_429_and_a_late_request_504_and_the_server_lives(tmp_path):
    image = _data_uri(write_image(tmp_path / "a.png"))
    with _server_in_this_process(max_queue_size=2, max_batch_wait_ms=3000, request_timeout=0.5) as url:
        def post(_):
            return httpx.post(url + "/v1/chat/completions", json={"messages": _messages(image, "hi"),
                                                                  "max_tokens": 4}, timeout=30)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(post, range(6)))
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [429, 429, 429, 429, 504, 504], statuses
        refused = next(r for r in answers if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "rate_limited"
        late = next(r for r in answers if r.status_code == 504)
        assert "--request_timeout" in late.json()["error"]["message"]
        assert httpx.get(url + "/health").json()["queue_depth"] == 0  # timed-out requests left the queue
        metrics = httpx.get(url + "/metrics").text
        assert 'vltune_requests_total{status="429"} 4.0' in metrics
        assert 'vltune_requests_total{status="504"} 2.0' in metrics
        assert "vltune_batch_size_count 0.0" in metrics  # nothing timed out reached the model


def test_cli_mistakes_get_one_line_and_status_2(capsys, monkeypatch, tmp_path):
    from vltune.cli import main as cli_main
    from vltune.recipes import serve

    for argv, needle in [(["--adapters", "nameless"], "--adapters nameless: give name=path"),
                         (["--adapters", f"x={tmp_path}"], "no adapter_config.json"),
                         (["--api_keys", str(tmp_path / "missing.json")], "--api_keys"),
                         (["--per_user_adapters", str(tmp_path)], "--per_user_adapters")]:
        assert cli_main(["serve", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)
    with pytest.raises(SystemExit) as e:
        serve.main(["--help"])
    assert e.value.code == 0 and "--max_loaded_adapters" in capsys.readouterr().out
    called = []
    monkeypatch.setitem(sys.modules, "vltune.recipes.serve_policy", types.SimpleNamespace(main=called.append))
    serve.main(["policy", "--port", "9"])
    assert called == [["--port", "9"]]


def test_playground_draws_the_click_in_a_real_browser(served, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("no Debian chromium + chromium-driver here (.ci/run installs them with apt-get)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,800"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    browser = webdriver.Chrome(service=Service(driver_bin), options=options)
    try:
        browser.get(served.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_element(By.ID, "adapters").text)  # the first listing, without a key: 401
        browser.find_element(By.ID, "key").send_keys("k-admin" + Keys.TAB)  # leaving the field lists again
        wait.until(lambda b: "clicker" in [o.get_attribute("value") for o in
                                           b.find_elements(By.CSS_SELECTOR, "#user option")])
        assert "user_1" in browser.find_element(By.ID, "adapters").text
        Select(browser.find_element(By.ID, "user")).select_by_value("clicker")
        browser.find_element(By.ID, "file").send_keys(served.images[1])
        wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_element(By.ID, "canvas").get_attribute("data-click"))
        assert browser.find_element(By.ID, "canvas").get_attribute("data-click") == "24,48"  # 96x64 image
        assert browser.find_element(By.ID, "answer").text == CLICK
        marker = browser.execute_script(
            "const c = document.getElementById('canvas');"
            "return Array.from(c.getContext('2d').getImageData(24, 48, 1, 1).data);")
        assert marker[:3] == [255, 0, 255], marker
        wait.until(lambda b: "requests:" in b.find_element(By.ID, "stats").text
                   and "200:" in b.find_element(By.ID, "stats").text)
        shot = Path(os.environ.get("VLTUNE_TEST_ARTIFACTS", tmp_path)) / "playground.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
    except Exception:
        state = {k: browser.find_element(By.ID, k).text for k in ("adapters", "answer", "meta", "stats")}
        raise AssertionError(f"page state: {state}; browser log: {browser.get_log('browser')}") from None
    finally:
        browser.quit()
