"""vltune serve policy: OFT-compatible /act, robot sessions, batching, bad input, the client's chunking.

One tiny policy (window 2, chunk 3, exec_steps 2, state 2) and one loopback server for the module.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import requests

from vltune.vla.data.synthetic import make_dataset, make_episodes

MAX_BODY = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from vltune.recipes.vla import main as vla_main

    tmp = tmp_path_factory.mktemp("serve")
    data = make_dataset(str(tmp / "syn"), fmt="calvin", n_train=6, n_val=0, state_dim=2)
    vla_main(["--dataset", data, "--tiny_size", "xs", "--output_dir", str(tmp / "p"), "--max_steps", "2",
              "--report_to", "none", "--save_strategy", "no", "--image_size", "64", "--action_head", "lstm",
              "--window_size", "2", "--fwd_pred_next_n", "3", "--exec_steps", "2", "--per_device_train_batch_size", "4"])
    return str(tmp / "p")


@pytest.fixture(scope="module")
def served(policy_dir):
    from vltune.vla.policy import Policy
    from vltune.vla.server import ServerSettings, create_app, running_server

    app = create_app(Policy.from_pretrained(policy_dir), ServerSettings(max_body_bytes=MAX_BODY))
    with running_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def local(policy_dir):
    """A fresh in-process Policy over the same weights, per call."""
    from vltune.vla.policy import Policy

    base = Policy.from_pretrained(policy_dir)
    return lambda: Policy(base.model, base.frames, base.normalizers)


def episode(seed, length=6):
    return make_episodes(1, length=length, state_dim=2, seed=seed)[0]


def obs_at(ep, t, image_key="static"):
    return {image_key: ep.images["static"][t], "state": ep.state[t].astype(np.float32), "instruction": ep.instruction}


def in_process_actions(local, ep, steps):
    p = local()
    p.reset()
    return np.stack([p.step({"static": ep.images["static"][t]}, ep.instruction, ep.state[t]) for t in range(steps)])


# ---------------------------------------------------------------------------- OpenVLA-OFT clients
def test_oft_style_client_works_unchanged(served, local, monkeypatch):
    """OFT's get_action_from_server: json_numpy-patched json, requests.post(json=obs), response.json()."""
    import json_numpy

    url, _ = served
    monkeypatch.setattr(json, "dumps", json_numpy.dumps)
    monkeypatch.setattr(json, "loads", json_numpy.loads)
    ep = episode(1)
    obs = obs_at(ep, 0, image_key="full_image")  # OFT's LIBERO camera name
    actions = requests.post(url + "/act", json=obs, timeout=30).json()
    assert isinstance(actions, np.ndarray) and actions.shape == (3, 7) and actions.dtype == np.float32
    p = local()
    p.reset()
    p.observe({"static": ep.images["static"][0]}, ep.instruction, ep.state[0])
    np.testing.assert_allclose(actions, p.predict_chunk(), atol=1e-5)
    # OFT's fallback for clients without json_numpy: {"encoded": ...} in, a double-encoded string out.
    encoded = requests.post(url + "/act", json={"encoded": json_numpy.dumps(obs)}, timeout=30).json()
    assert isinstance(encoded, str)
    np.testing.assert_allclose(json_numpy.loads(encoded), actions, atol=1e-6)


# ---------------------------------------------------------------------------- sessions
def test_sessions_are_isolated_and_equal_in_process(served, local):
    """Two robots interleaved through one server: each gets exactly its own in-process actions."""
    from vltune.vla.client import PolicyClient

    url, _ = served
    eps = [episode(2), episode(3)]
    clients = [PolicyClient(url, chunk_threshold=0.0, encoding="msgpack"),
               PolicyClient(url, chunk_threshold=0.0, encoding="json")]
    got = [[], []]
    for c in clients:
        c.reset()
    for t in range(6):
        for i, c in enumerate(clients):
            got[i].append(c.step(obs_at(eps[i], t)))
    for i in range(2):
        np.testing.assert_allclose(np.stack(got[i]), in_process_actions(local, eps[i], 6), atol=1e-5)
    assert not np.allclose(got[0], got[1])
    # reset = a new episode: the same frames give the same actions again
    clients[0].reset()
    again = np.stack([clients[0].step(obs_at(eps[0], t)) for t in range(3)])
    np.testing.assert_allclose(again, np.stack(got[0][:3]), atol=1e-5)
    for c in clients:
        c.close()


def test_step_mode_keeps_the_chunk_on_the_server(served, local):
    url, _ = served
    sid = requests.post(url + "/reset", json={"session_id": "robot-7"}, timeout=30).json()["session_id"]
    assert sid == "robot-7"
    from vltune.vla.wire import json_dumps, json_loads

    ep = episode(4)
    got = []
    for t in range(5):
        body = json_dumps({**obs_at(ep, t), "session_id": sid, "mode": "step"})
        r = requests.post(url + "/act", data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 200 and r.headers["X-Session-Id"] == sid
        got.append(json_loads(r.content)[0])
    np.testing.assert_allclose(np.stack(got), in_process_actions(local, ep, 5), atol=1e-5)
    assert requests.delete(url + f"/sessions/{sid}", timeout=30).status_code == 200


def test_concurrent_sessions_share_one_backbone_forward(policy_dir, local):
    """Jobs of three sessions queued together go through the backbone as one batch of three frames."""
    from vltune.vla.policy import Policy
    from vltune.vla.server import Batcher, Job, ServerSettings, SessionStore
    from vltune.vla.wire import ObservationSpec, parse_observation

    policy = Policy.from_pretrained(policy_dir)
    store, spec = SessionStore(policy, ServerSettings()), ObservationSpec.of(policy.config)
    batcher = Batcher(ServerSettings(max_batch=8))
    eps = [episode(10 + i) for i in range(3)]
    sessions = [store.reset(f"r{i}") for i in range(3)]
    calls = []
    encode = policy.model.encode

    def counting(**kw):
        calls.append(kw["input_ids"].shape[0])
        return encode(**kw)

    policy.model.encode = counting
    try:
        futures = []
        for t in range(2):  # two frames per session: each session's second frame must wait for its first
            for s, ep in zip(sessions, eps):
                obs = parse_observation({**obs_at(ep, t), "session_id": s.id}, spec)
                futures.append(batcher.submit(Job(s.policy, obs, s.id)))
        batcher.start()
        results = [f.result(timeout=60)[0] for f in futures]
    finally:
        batcher.close()
        policy.model.encode = encode
    assert calls == [3, 3] and batcher.batch_sizes == {3: 2}
    for i, ep in enumerate(eps):
        p = local()
        p.reset()
        for t in range(2):
            p.observe({"static": ep.images["static"][t]}, ep.instruction, ep.state[t])
            np.testing.assert_allclose(results[3 * t + i], p.predict_chunk(), atol=1e-4)


def test_concurrent_robots_over_http_stay_correct(served, local):
    from vltune.vla.client import PolicyClient

    url, app = served
    eps = [episode(20 + i, length=4) for i in range(4)]
    out, errors = {}, []

    def robot(i):
        try:
            with PolicyClient(url, chunk_threshold=0.0) as c:
                c.reset()
                out[i] = np.stack([c.step(obs_at(eps[i], t)) for t in range(4)])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    for i in range(4):
        np.testing.assert_allclose(out[i], in_process_actions(local, eps[i], 4), atol=1e-4)


# ---------------------------------------------------------------------------- bad input
def test_bad_input_gets_4xx_naming_the_field_and_sessions_survive(served, local):
    from vltune.vla.wire import MSGPACK, json_dumps, json_loads, msgpack_dumps

    url, _ = served
    sid = requests.post(url + "/reset", json={}, timeout=30).json()["session_id"]
    ep = episode(5)
    got = []

    def good(t):
        r = requests.post(url + "/act", data=json_dumps({**obs_at(ep, t), "session_id": sid, "mode": "step"}),
                          headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 200, r.text
        got.append(json_loads(r.content)[0])

    good(0)
    good(1)
    base = {**obs_at(ep, 2), "session_id": sid, "mode": "step"}
    img = ep.images["static"][2]
    cases = [
        ({**base, "static": img[:, :, :2]}, "static", 422),  # wrong shape
        ({**base, "static": img.astype(np.float32)}, "static", 422),  # wrong dtype
        ({k: v for k, v in base.items() if k != "static"}, "static", 422),  # camera missing
        ({**base, "state": np.zeros(5, np.float32)}, "state", 422),  # wrong state dimension
        ({**base, "state": np.array([np.nan, 0], np.float32)}, "state", 422),
        ({**base, "state": np.array([0, np.inf], np.float32)}, "state", 422),
        ({**base, "session_id": "nobody"}, "session_id", 404),
        ({**base, "instruction": ""}, "instruction", 422),
        ({**base, "mode": "fly"}, "mode", 422),
        ({**base, "static": b"not a png"}, "static", 422),
    ]
    for payload, field, status in cases:
        for enc in ("json", "msgpack"):
            if enc == "json" and isinstance(payload.get("static"), bytes):
                continue
            data = json_dumps(payload) if enc == "json" else msgpack_dumps(payload)
            ctype = "application/json" if enc == "json" else MSGPACK
            r = requests.post(url + "/act", data=data, headers={"Content-Type": ctype}, timeout=30)
            assert r.status_code == status and r.json()["field"] == field, (field, enc, r.status_code, r.text)
            assert field in r.json()["detail"]
    raw = [(b"x" * (MAX_BODY + 1), "application/json", "body", 413), (b"{not json", "application/json", "body", 400),
           (b"\xc1\xc1", MSGPACK, "body", 400), (b"[1, 2]", "application/json", "body", 400),
           (json.dumps({"encoded": "{}", "x": 1}).encode(), "application/json", "encoded", 400)]
    for data, ctype, field, status in raw:
        r = requests.post(url + "/act", data=data, headers={"Content-Type": ctype}, timeout=30)
        assert r.status_code == status and r.json()["field"] == field, (data[:20], r.status_code, r.text)
    # a pickled object array in msgpack-numpy's layout is refused, never unpickled
    evil = msgpack_dumps({"static": {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": b"cos\n"}})
    r = requests.post(url + "/act", data=evil, headers={"Content-Type": MSGPACK}, timeout=30)
    assert r.status_code == 400 and r.json()["field"] == "body"
    for t in range(2, 6):
        good(t)
    np.testing.assert_allclose(np.stack(got), in_process_actions(local, ep, 6), atol=1e-5)
    stats = requests.get(url + "/stats", timeout=30).json()
    assert stats["errors_4xx"] >= len(cases) and stats["errors_5xx"] == 0


def test_api_key_and_png_images(policy_dir, local):
    from fastapi.testclient import TestClient

    from vltune.vla.policy import Policy
    from vltune.vla.server import ServerSettings, create_app
    from vltune.vla.wire import MSGPACK, image_bytes, msgpack_dumps, msgpack_loads

    app = create_app(Policy.from_pretrained(policy_dir), ServerSettings(api_key="s3cret"))
    ep = episode(6)
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        r = http.get("/info")
        assert r.status_code == 401 and r.json()["field"] == "api_key"
        assert http.get("/info", headers={"X-API-Key": "wrong"}).status_code == 401
        info = http.get("/info", headers={"Authorization": "Bearer s3cret"}).json()
        assert info["cameras"] == ["static"] and info["state_length"] == 2 and info["chunk_size"] == 3
        obs = {**obs_at(ep, 0), "static": image_bytes(ep.images["static"][0], "png")}  # lossless: same actions
        r = http.post("/act", content=msgpack_dumps(obs), headers={"Content-Type": MSGPACK, "X-API-Key": "s3cret"})
        assert r.status_code == 200
        p = local()
        p.reset()
        p.observe({"static": ep.images["static"][0]}, ep.instruction, ep.state[0])
        reply = msgpack_loads(r.content)
        np.testing.assert_allclose(reply["actions"], p.predict_chunk(), atol=1e-5)
        # what a client needs to tell the network path's cost from the policy's (benchmarks/policy_serving.py)
        assert 0 < reply["model_ms"] <= reply["server_ms"], reply
        assert float(r.headers["X-Model-Ms"]) == reply["model_ms"] and r.headers["X-Batch-Size"] == "1"


def test_websocket_session(served, local):
    from websockets.sync.client import connect

    from vltune.vla.wire import msgpack_dumps, msgpack_loads

    url, _ = served
    ep = episode(7)
    with connect(url.replace("http", "ws") + "/ws") as ws:
        ws.send(msgpack_dumps({"reset": True}))
        sid = msgpack_loads(ws.recv())["session_id"]
        chunks = []
        for t in range(3):
            ws.send(msgpack_dumps({**obs_at(ep, t), "mode": "chunk"}))
            reply = msgpack_loads(ws.recv())
            assert reply["session_id"] == sid and 0 < reply["model_ms"] <= reply["server_ms"]
            chunks.append(reply["actions"])
            ws.send(msgpack_dumps({**obs_at(ep, t), "state": np.zeros(9, np.float32)}))  # bad: the socket stays up
            bad = msgpack_loads(ws.recv())
            assert bad["status"] == 422 and bad["field"] == "state"
    p = local()
    p.reset()
    for t in range(3):
        p.observe({"static": ep.images["static"][t]}, ep.instruction, ep.state[t])
        np.testing.assert_allclose(chunks[t], p.predict_chunk(), atol=1e-5)


# ---------------------------------------------------------------------------- the client's chunk queue
class ScriptedClient:
    """PolicyClient whose 'server' answers chunk[i] = 100 * (observation step) + i, or fails on command."""

    @staticmethod
    def make(**kw):
        from vltune.vla.client import PolicyClient, _NetworkError

        class Fake(PolicyClient):
            fail = False

            def act(self, obs, mode="chunk"):
                if self.fail:
                    raise _NetworkError("connection refused")
                self.requests_seen.append(obs["t"])
                return (100.0 * obs["t"] + np.arange(4, dtype=np.float32))[:, None].repeat(2, 1)

            def reset(self):
                self._started = True
                self._queue.clear()
                self._t = 0

        c = Fake("http://scripted", **kw)
        c.requests_seen = []
        c._info = {"exec_steps": 2, "chunk_size": 4, "window_size": 1, "cameras": ["static"]}
        return c


@pytest.mark.parametrize("aggregate,expected", [("latest_only", 201.0), ("weighted_average", 0.3 * 3 + 0.7 * 201),
                                                ("average", 0.5 * 3 + 0.5 * 201), ("conservative", 0.7 * 3 + 0.3 * 201)])
def test_async_chunks_are_aligned_and_blended(aggregate, expected):
    c = ScriptedClient.make(chunk_threshold=0.5, aggregate=aggregate)
    acts = []
    for t in range(6):
        acts.append(c.step({"t": t})[0])
        if c._inflight is not None:
            c._inflight.result()  # let the background fetch land before the next step (deterministic)
    # steps 0-2 from the first chunk; at step 2 fewer than 0.5 * 4 actions were left -> fetch with obs 2,
    # whose chunk covers steps 2-5: step 3 blends the old 3 with the new 201, steps 4-5 are new (202, 203).
    assert c.requests_seen[:2] == [0, 2]
    np.testing.assert_allclose(acts[:3], [0, 1, 2])
    np.testing.assert_allclose(acts[3], expected, rtol=1e-6)
    assert acts[4] == 202.0
    c.close()


def test_synchronous_chunks_execute_exec_steps_then_refetch():
    c = ScriptedClient.make(chunk_threshold=0.0)
    acts = [c.step({"t": t})[0] for t in range(5)]
    assert acts == [0, 1, 200, 201, 400] and c.requests_seen == [0, 2, 4]
    c.close()


def test_network_errors_are_tolerated_for_a_bounded_time():
    from vltune.vla.client import PolicyServerError

    c = ScriptedClient.make(chunk_threshold=1.0, offline_tolerance_s=0.3, retry_interval_s=0.01)
    c.step({"t": 0})
    c._inflight.result()
    c.fail = True
    got = [c.step({"t": t})[0] for t in range(1, 4)]  # the queued chunk keeps the robot moving
    np.testing.assert_allclose(got, [1, 2, 3], rtol=1e-6)
    with pytest.raises(PolicyServerError, match="no answer"):
        for t in range(4, 40):
            c.step({"t": t})
    c.close()


def test_unreachable_server_says_so():
    from vltune.vla.client import PolicyClient, PolicyServerError

    with pytest.raises(PolicyServerError, match="cannot reach"):
        PolicyClient("http://127.0.0.1:9", timeout_s=0.5).step({"instruction": "x"})


# ---------------------------------------------------------------------------- the command
def test_serve_command_user_errors(tmp_path, monkeypatch, capsys):
    from vltune.cli import main

    monkeypatch.chdir(tmp_path)
    for argv, words in ((["serve", "policy"], "vltune vla --max_steps 20"),
                        (["serve", "policy", "--policy", str(tmp_path / "none")], "--policy"),
                        (["serve", "gui"], "gui")):  # a mistyped target: vltune serve's one-line error
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_serve_command_port_taken(policy_dir, capsys):
    import socket

    from vltune.recipes.serve_policy import main

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        from vltune.errors import UsageError

        with pytest.raises(UsageError, match="--port"):
            main(["--policy", policy_dir, "--port", str(sock.getsockname()[1])])
    finally:
        sock.close()
