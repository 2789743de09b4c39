"""GUI agents (seeds/04): synthetic per-user data, per-user adapters on one loaded global model,
adapter routing in `vltune infer`, and the zero-shot / global / personalised grounding report."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vltune.data.errors import DataError
from vltune.data.formats import read_dataset
from vltune.data.synthetic_gui import APP_CATEGORY, APP_LOOKS, CATEGORIES, make_gui_set
from vltune.coords import from_model_coords, parse_click
from vltune.errors import UsageError

# ---------------------------------------------------------------------------- synthetic data


@pytest.fixture(scope="module")
def gui_set(tmp_path_factory):
    return make_gui_set(tmp_path_factory.mktemp("gui") / "data", train_users="3-6", test_users="1-2",
                        samples_per_user=12, test_per_user=6, seed=3)


def test_gui_set_layout_and_split(gui_set):
    root = Path(gui_set["dir"])
    train, errors = read_dataset(gui_set["train"])
    test, _ = read_dataset(gui_set["test"])
    assert not errors
    assert sorted({s.extra["user"] for s in train}) == [1, 2, 3, 4, 5, 6]
    assert sorted({s.extra["user"] for s in test}) == [1, 2]  # held-out rows only for the test users
    assert len(train) == 6 * 12 and len(test) == 2 * 6
    assert not {s.images[0] for s in train} & {s.images[0] for s in test}  # held-out screens are new screens
    # the seeds/04 layout: one pickle per user, readable only with the opt-in, same rows as the JSONL
    assert sorted(p.name for p in (root / "train").iterdir()) == [f"user_{u}.pkl" for u in (1, 2, 3, 4, 5, 6)]
    from_pickles, perr = read_dataset(str(root / "train"), users="3-6", allow_pickle=True)
    assert not perr and len(from_pickles) == 4 * 12
    jsonl_users_3_6 = [s for s in train if s.extra["user"] >= 3]
    assert [s.messages for s in from_pickles] == [s.messages for s in jsonl_users_3_6]
    assert [Path(s.images[0]).resolve() for s in from_pickles] == [Path(s.images[0]).resolve() for s in jsonl_users_3_6]
    with open(root / "train" / "user_3.pkl", "rb") as f:
        conv = pickle.load(f)[0]
    assert conv["messages"][0]["content"][0]["type"] == "image"  # seeds/04 content lists with image paths


def test_gui_answers_point_at_the_target(gui_set):
    from PIL import Image

    train, _ = read_dataset(gui_set["train"])
    for s in train:
        t = s.extra["target"]
        w, h = Image.open(s.images[0]).size
        assert [w, h] == t["size"]
        x, y = from_model_coords(*parse_click(s.messages[-1]["content"][0]["text"]), w, h, "rel1000")
        x1, y1, x2, y2 = t["box"]
        assert x1 <= x <= x2 and y1 <= y <= y2
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_habits_need_the_user(gui_set):
    """A habit instruction always has a rival app of the same category on screen, and its answer is the
    user's own preferred app: the screen alone cannot tell, the user's data can."""
    users = json.loads((Path(gui_set["dir"]) / "users.json").read_text())
    train, _ = read_dataset(gui_set["train"])
    habits = [s for s in train if s.extra["kind"] == "habit"]
    assert habits and any(s.extra["kind"] == "explicit" for s in train)
    by_screen = {}
    for s in train:
        by_screen.setdefault(s.images[0], set()).add(s.extra["app"])
    for s in habits:
        cat = s.extra["category"]
        assert s.extra["app"] == users[str(s.extra["user"])]["preferred"][cat]
        assert APP_CATEGORY[s.extra["app"]] == cat
    assert len(set(APP_LOOKS.values())) == len(APP_LOOKS) == sum(map(len, CATEGORIES.values()))


def test_gui_set_absolute_coordinates_follow_the_processor(tmp_path, processor_for):
    """Qwen2.5-VL answers in pixels of the resized image: targets are built through the processor."""
    proc = processor_for("qwen2_5_vl")
    made = make_gui_set(tmp_path / "d", train_users="2", test_users="1", samples_per_user=3, test_per_user=1,
                        screen=(640, 480), convention="abs_resized", processor=proc, pickles=False)
    s = read_dataset(made["train"])[0][0]
    x, y = from_model_coords(*parse_click(s.messages[-1]["content"][0]["text"]), 640, 480, "abs_resized", proc)
    x1, y1, x2, y2 = s.extra["target"]["box"]
    assert x1 <= x <= x2 and y1 <= y <= y2


def test_synth_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vltune", "data", "synth", "gui", "--preset", "smoke",
                           "--samples_per_user", "5", "--out", str(tmp_path / "g")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "g" / "meta.json").read_text())
    assert meta["train_rows"] == 6 * 5 and meta["test_rows"] == 2 * 8  # preset + an explicit flag that wins
    bad = subprocess.run([sys.executable, "-m", "vltune", "data", "synth", "gui", "--users", "3",
                          "--test_users", "1-5", "--out", str(tmp_path / "h")], capture_output=True, text=True)
    assert bad.returncode != 0 and "--test_users" in bad.stderr


# ---------------------------------------------------------------------------- personalisation
USER_ANSWERS = {1: "click(125, 127)", 2: "click(875, 877)"}


@pytest.fixture(scope="module")
def personalised(tmp_path_factory, tiny_path):
    """Two users whose every answer is their own constant click; `vltune personalize` on the tiny model as
    the global model. Only an adapter trained on exactly its user's rows answers that user's click."""
    from vltune.data.synthetic import make_grounding_set
    from vltune.recipes.personalize import main as personalize_main

    root = tmp_path_factory.mktemp("personal")
    made = make_grounding_set(root / "data", n_train=16, n_test=4, seed=2)
    rows = [json.loads(line) for line in Path(made["train"]).read_text().splitlines()]
    out_rows = []
    for i, r in enumerate(rows):
        user = 1 + i % 2
        r["user"] = user
        r["messages"][-1]["content"] = USER_ANSWERS[user]
        x, y = (16, 16) if user == 1 else (112, 112)  # the answer's point on the 128 px board
        r["target"] = {"box": [x - 8, y - 8, x + 8, y + 8], "point": [x, y], "size": [128, 128]}
        out_rows.append(r)
    data = root / "data" / "users.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    calls = []
    import vltune.models.inference as inference

    original = inference.load_model
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:  # module-scoped fixture: the function-scoped monkeypatch is not here
        mp.setattr(inference, "load_model", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
        torch.set_num_threads(1)
        warnings = logging.Handler(logging.WARNING)
        warnings.emit = lambda record: logged.append(record.getMessage())
        logged: list[str] = []
        logging.getLogger("vltune").addHandler(warnings)
        try:
            summary = personalize_main([  # users 3-4 have no rows: skipped, and the log says so
                "--base", tiny_path(), "--dataset", str(data), "--users", "1-4", "--output_dir", str(root / "out"),
                "--max_steps", "120", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
                "--lora_dropout", "0", "--per_device_train_batch_size", "2", "--report_to", "none",
                "--save_strategy", "no", "--logging_steps", "40", "--gradient_checkpointing", "false"])
        finally:
            logging.getLogger("vltune").removeHandler(warnings)
            torch.set_num_threads(threads)
    return {"root": root, "data": str(data), "out": root / "out", "summary": summary, "loads": calls,
            "warnings": logged}


def test_personalize_loads_the_global_model_once_and_writes_one_adapter_per_user(personalised, tiny_path):
    out = personalised["out"]
    assert personalised["summary"]["skipped_users"] == [3, 4]
    assert any("no adapter for user(s) [3, 4]" in m and "its users: [1, 2]" in m for m in personalised["warnings"])
    assert personalised["loads"] == [tiny_path()]  # one load for both users
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["user_1", "user_2"]
    for user in (1, 2):
        adapter = out / "adapters" / f"user_{user}"
        assert (adapter / "adapter_config.json").is_file() and (adapter / "processor_config.json").is_file()
        report = json.loads((adapter / "data_report.json").read_text())
        # only this user's rows, less the screens held out for the guard (the default --guard_ratio 0.1)
        assert report["total"] == 7
    summary = json.loads((out / "personalize.json").read_text())
    assert set(summary["users"]) == {"1", "2"} and summary["users"]["1"]["steps"] == 120
    for user in ("1", "2"):
        rec = summary["users"][user]
        assert (rec["trained_on"], rec["validation"], rec["replayed"]) == (7, 1, 0)
        # the random tiny global model misses; the trained adapter answers the user's own click
        assert rec["val_accuracy_global"] == 0.0 and rec["val_accuracy_adapter"] == 1.0
    assert summary["kept_global"] == []


def test_personalize_workers_train_the_same_adapters_side_by_side(personalised, tmp_path, monkeypatch):
    """--workers 2: two processes, one user each, merged into one output dir that eval/infer/serve read as usual;
    each adapter equals the one the single process trained (training is seeded per user)."""
    from safetensors.torch import load_file

    from vltune.recipes.personalize import main as personalize_main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the fixture trained on one thread
    out = tmp_path / "out"
    summary = personalize_main([
        "--base", str(personalised["summary"]["base"]), "--dataset", personalised["data"], "--users", "1-4",
        "--output_dir", str(out), "--workers", "2",
        "--max_steps", "120", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
        "--lora_dropout", "0", "--per_device_train_batch_size", "2", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "40", "--gradient_checkpointing", "false"])
    assert summary["workers"] == 2 and summary["skipped_users"] == [3, 4]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["user_1", "user_2"]
    assert sorted(p.name for p in (out / "workers").iterdir()) == ["worker_0.log", "worker_1.log"]
    on_disk = json.loads((out / "personalize.json").read_text())
    single = json.loads((personalised["out"] / "personalize.json").read_text())
    for user in ("1", "2"):
        rec = on_disk["users"][user]
        assert rec["adapter"] == str(out / "adapters" / f"user_{user}")
        for key in ("trained_on", "validation", "replayed", "steps", "val_accuracy_global", "val_accuracy_adapter"):
            assert rec[key] == single["users"][user][key], key
        mine = load_file(out / "adapters" / f"user_{user}" / "adapter_model.safetensors")
        theirs = load_file(personalised["out"] / "adapters" / f"user_{user}" / "adapter_model.safetensors")
        assert mine.keys() == theirs.keys()
        assert all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine)
    with pytest.raises(UsageError, match="--workers 0"):
        personalize_main(["--base", str(personalised["summary"]["base"]), "--dataset", personalised["data"],
                          "--users", "1-2", "--workers", "0", "--output_dir", str(tmp_path / "o")])


def _three_user_rows(root: Path) -> str:
    from vltune.data.synthetic import make_grounding_set

    made = make_grounding_set(root / "data", n_train=18, n_test=2, seed=4)
    rows = [json.loads(line) for line in Path(made["train"]).read_text().splitlines()]
    data = root / "data" / "users3.jsonl"  # beside the images its rows name
    data.write_text("".join(json.dumps({**r, "user": 1 + i % 3}) + "\n" for i, r in enumerate(rows)))
    return str(data)


def test_personalize_replays_other_users_and_the_guard_keeps_global_for_a_worse_adapter(tmp_path, tiny_path,
                                                                                     monkeypatch):
    """Replay (by default: every other user of --dataset, rows of theirs without a `kind` column included)
    mixes --replay_ratio of their rows into the adapter's training; a user whose adapter
    scores below the global model on their held-out screens keeps the global model: the adapter goes to
    rejected/, personalize.json says so, and eval grounding's personalised row answers with the global model."""
    import vltune.recipes.personalize as personalize
    from vltune.recipes.eval_grounding import main as eval_main

    data = _three_user_rows(tmp_path)
    scores = iter([0.75, 0.5, 0.25, 0.5])  # user 1: global 75% > adapter 50%; user 2: 25% < 50%
    monkeypatch.setattr(personalize, "_click_accuracy", lambda *a: next(scores))
    import vltune.data.formats as formats
    reads = []
    read_dataset = formats.read_dataset
    monkeypatch.setattr(formats, "read_dataset", lambda *a, **k: reads.append(a) or read_dataset(*a, **k))
    out = tmp_path / "personal"
    summary = personalize.main([
        "--base", tiny_path(), "--dataset", data, "--users", "1-2", "--replay_ratio", "0.5",  # replays `others`: user 3
        "--guard_ratio", "0.2", "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing", "false"])
    assert summary["kept_global"] == [1]
    assert len(reads) == 1  # the users' rows and the replayed ones come from one read of --dataset
    u1, u2 = summary["users"][1], summary["users"][2]
    assert (u1["trained_on"], u1["validation"], u1["replayed"]) == (5, 1, 2)  # 6 rows, one screen held out
    assert u1["adapter"] is None and (out / "rejected" / "user_1" / "adapter_config.json").is_file()
    assert u2["adapter"] == str(out / "adapters" / "user_2") and u2["val_accuracy_adapter"] == 0.5
    assert not (out / "adapters" / "user_1").exists() and (out / "adapters" / "user_2" / "adapter_config.json").is_file()
    assert json.loads((out / "adapters" / "user_2" / "data_report.json").read_text())["total"] == 5 + 2
    on_disk = json.loads((out / "personalize.json").read_text())
    assert on_disk["kept_global"] == [1] and on_disk["users"]["1"]["val_accuracy_global"] == 0.75

    report = eval_main(["--model", tiny_path(), "--per_user_adapters", str(out), "--dataset", data, "--users", "1-2",
                        "--frequent_app_baseline", data, "--output_dir", str(tmp_path / "eval"),
                        "--max_new_tokens", "8"])
    assert report["kept_global"] == [1]
    # no category/app columns here: the baseline has no history to use and asks every row as it was
    assert report["frequent_app_memory"] == {} and report["setups"]["most-frequent app"]["overall"] == \
        report["setups"]["global"]["overall"]
    assert list(report["gains"]) == ["most-frequent app", "personalised"]
    glob, pers = report["setups"]["global"]["per_user"], report["setups"]["personalised"]["per_user"]
    assert pers["1"] == glob["1"]  # the guard's user is answered by the global model
    assert "guard" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(UsageError, match="--replay_users 1 overlaps"):
        personalize.main(["--base", tiny_path(), "--dataset", data, "--users", "1-2", "--replay_users", "1",
                          "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="--replay_where user=9: no row of --replay_users 3"):
        personalize.main(["--base", tiny_path(), "--dataset", data, "--users", "1-2", "--replay_users", "3",
                          "--replay_where", "user=9", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(DataError, match="--users 9 matches no user here; its users are 1-3"):
        personalize.main(["--base", tiny_path(), "--dataset", data, "--users", "9", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="--guard_ratio 1.5"):
        personalize.main(["--base", tiny_path(), "--dataset", data, "--users", "1", "--guard_ratio", "1.5",
                          "--output_dir", str(tmp_path / "o")])


def test_a_stopped_personalize_run_resumes_user_by_user(tmp_path, tiny_path, monkeypatch, caplog):
    """A run stopped in its third user keeps the two it finished; --resume_from_checkpoint true trains only the
    third and ends with the adapters and personalize.json of an uninterrupted run. A --workers run whose parent
    stopped after a worker finished a user keeps that user too, and the workers share out the others."""
    from safetensors.torch import load_file

    import vltune.recipes.personalize as personalize
    import vltune.train.sft as sft

    data = _three_user_rows(tmp_path)
    # a constant learning rate: the stopped user's first run is cut to max_steps 1, whose schedule would differ
    common = ["--base", tiny_path(), "--dataset", data, "--users", "1-3", "--replay_users", "none", "--max_steps", "2",
              "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "2", "--report_to", "none",
              "--save_strategy", "no", "--gradient_checkpointing", "false"]
    ref = personalize.main([*common, "--output_dir", str(tmp_path / "ref")])

    trained, run_sft = [], sft.run_sft

    def stopping_at(user):
        def run(model_args, tuner, data_args, args, **kw):
            trained.append(data_args.users)
            if data_args.users == user:  # Ctrl-C, or the machine going away, after this user's checkpoint-1
                run_sft(model_args, tuner, data_args, replace(args, max_steps=1, save_strategy="steps", save_steps=1),
                        **kw)
                raise KeyboardInterrupt
            return run_sft(model_args, tuner, data_args, args, **kw)
        return run

    out = tmp_path / "out"
    monkeypatch.setattr(sft, "run_sft", stopping_at("3"))
    with pytest.raises(KeyboardInterrupt):
        personalize.main([*common, "--output_dir", str(out)])
    assert not (out / "personalize.json").exists()
    assert [u for u in (1, 2, 3) if (out / "adapters" / f"user_{u}" / personalize.USER_RECORD).is_file()] == [1, 2]
    assert (out / "adapters" / "user_3" / "checkpoint-1" / "checkpoint_complete.json").is_file()
    with pytest.raises(UsageError, match="holds a previous run"):  # not resumed by accident
        personalize.main([*common, "--output_dir", str(out)])
    with pytest.raises(UsageError, match="resumes user by user; give true"):
        personalize.main([*common, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "adapters")])

    trained.clear()
    monkeypatch.setattr(sft, "run_sft", stopping_at(None))
    caplog.set_level(logging.INFO, logger="vltune")
    summary = personalize.main([*common, "--output_dir", str(out), "--resume_from_checkpoint", "true"])
    assert trained == ["3"]  # users 1-2 kept; user 3 continued from its checkpoint-1 to step 2
    assert f"resuming from {out / 'adapters' / 'user_3' / 'checkpoint-1'} (global step 1)" in caplog.text
    on_disk = json.loads((out / "personalize.json").read_text())
    want = json.loads((tmp_path / "ref" / "personalize.json").read_text())
    assert summary["kept_global"] == ref["kept_global"] and on_disk["kept_global"] == want["kept_global"]
    for user in ("1", "2", "3"):
        got, exp = on_disk["users"][user], want["users"][user]
        for key in ("trained_on", "validation", "replayed", "steps", "val_accuracy_global", "val_accuracy_adapter"):
            assert got[key] == exp[key], (user, key)
        sub = "adapters" if got["adapter"] else "rejected"
        assert (got["adapter"] or got["rejected_adapter"]) == str(out / sub / f"user_{user}")
        mine = load_file(out / sub / f"user_{user}" / "adapter_model.safetensors")
        theirs = load_file(tmp_path / "ref" / sub / f"user_{user}" / "adapter_model.safetensors")
        assert all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in theirs)

    # --workers: the parent stopped after worker 1 had finished user 2 (left in workers/worker_1/)
    wout = tmp_path / "wout"
    sub2 = "adapters" if want["users"]["2"]["adapter"] else "rejected"
    shutil.copytree(tmp_path / "ref" / sub2 / "user_2", wout / "workers" / "worker_1" / sub2 / "user_2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    summary = personalize.main([*common, "--output_dir", str(wout), "--workers", "2", "--resume_from_checkpoint",
                                "true"])
    assert summary["workers"] == 2 and sorted(summary["users"]) == [1, 2, 3]
    logs = {p.name: p.read_text() for p in (wout / "workers").glob("worker_*.log")}
    assert sorted(logs) == ["worker_0.log", "worker_1.log"]
    assert not any("[personalize] user 2 (" in t for t in logs.values())  # not trained again: the record it left
    assert summary["users"][2]["seconds"] == want["users"]["2"]["seconds"]
    record = json.loads((wout / sub2 / "user_2" / personalize.USER_RECORD).read_text())
    assert (record["adapter"] or record["rejected_adapter"]) == str(wout / sub2 / "user_2")
    for user in (1, 3):  # the workers' users: merged, and their records say where they are now
        rec = summary["users"][user]
        where = Path(rec["adapter"] or rec["rejected_adapter"])
        assert where.parent.parent == wout
        assert json.loads((where / personalize.USER_RECORD).read_text())["steps"] == rec["steps"]


def test_frequent_app_baseline_asks_habit_rows_by_the_users_most_used_app():
    from vltune.data.formats import Sample
    from vltune.eval.grounding import frequent_app_instructions, user_gains

    def row(user, kind, cat, app, text):
        return Sample([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "click(1, 1)"}]}], ["x.png"],
                      "t", {"user": user, "kind": kind, "category": cat, "app": app})

    history = [row(1, "habit", "music", "Beats", "Open my music app"), row(1, "explicit", "music", "Melody", "Open Melody"),
               row(1, "explicit", "music", "Beats", "Open Beats"), row(2, "habit", "music", "Melody", "Tap my music app")]
    test = [row(1, "habit", "music", "Beats", "Launch my usual music player"), row(1, "explicit", "maps", "Atlas", "Open Atlas"),
            row(2, "habit", "music", "Melody", "Open my music app"), row(3, "habit", "music", "Beats", "Open my music app")]
    asked, memory = frequent_app_instructions(history, test)
    assert memory == {1: {"music": "Beats"}, 2: {"music": "Melody"}}
    assert [s.instruction() for s in asked] == ["Open Beats", "Open Atlas", "Open Melody", "Open my music app"]
    assert asked[0].messages[0]["content"][0] == {"type": "image"} and asked[0].extra == test[0].extra
    assert test[0].instruction() == "Launch my usual music player"  # the originals are untouched
    g = user_gains({"per_user": {"1": {"click_accuracy": 0.5}, "2": {"click_accuracy": 0.5}, "3": {"click_accuracy": 0.2}}},
                   {"per_user": {"1": {"click_accuracy": 0.75}, "2": {"click_accuracy": 0.25}, "3": {"click_accuracy": 0.3}}})
    assert g["per_user"] == pytest.approx({"1": 25.0, "2": -25.0, "3": 10.0})
    assert (g["min"], g["median"], g["max"], g["worse"], g["n_users"]) == pytest.approx((-25.0, 10.0, 25.0, 1, 3))


def test_user_adapters_switch_on_one_model(personalised, tiny_path):
    """Logits with a user's adapter active equal a fresh base + that adapter; switching back and forth and
    disabling adapters gives the same numbers every time."""
    from peft import PeftModel

    from vltune.args import ModelArguments
    from vltune.models.adapters import UserAdapters, load_global
    from vltune.models.inference import load_for_inference

    model, processor, _ = load_global(ModelArguments(), tiny_path())
    bank = UserAdapters(model, personalised["out"])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits

    with bank.use(None) as m:
        plain = logits(m)
    got = {}
    for user in (1, 2, 1, None, 2):
        with bank.use(user) as m:
            got.setdefault(user, []).append(logits(m))
    for user, outs in got.items():
        assert all(torch.equal(o, outs[0]) for o in outs)
    assert torch.equal(got[None][0], plain)
    assert not torch.allclose(got[1][0], got[2][0])
    for user in (1, 2):
        fresh, _, _ = load_for_inference(ModelArguments(model=tiny_path()))
        fresh = PeftModel.from_pretrained(fresh, str(personalised["out"] / "adapters" / f"user_{user}"))
        assert torch.allclose(logits(fresh.eval()), got[user][0], atol=1e-6)


def test_infer_routes_each_row_to_its_users_adapter(personalised, tiny_path, tmp_path):
    preds = tmp_path / "preds.jsonl"
    proc = subprocess.run([sys.executable, "-m", "vltune", "infer", "--model", tiny_path(), "--per_user_adapters",
                           str(personalised["out"]), "--dataset", personalised["data"], "--output", str(preds),
                           "--max_new_tokens", "12", "--batch_size", "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    rows = [json.loads(line) for line in Path(personalised["data"]).read_text().splitlines()]
    assert [r["where"].rsplit(":", 1)[1] for r in records] == [str(i + 1) for i in range(len(rows))]  # data order
    for rec, row in zip(records, rows):
        assert rec["answer"].strip() == USER_ANSWERS[row["user"]]
        assert rec["adapter"] == f"user_{row['user']}"
    # --prompt without --user: the global model answers, and the log says so (it used to be silent)
    proc = subprocess.run([sys.executable, "-m", "vltune", "infer", "--model", tiny_path(), "--per_user_adapters",
                           str(personalised["out"]), "--prompt", "Click the red circle", "--max_new_tokens", "4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "answered by the global model (no --user given)" in proc.stderr, proc.stderr


def test_eval_grounding_compares_zero_shot_global_and_personalised(personalised, tiny_path, tmp_path, caplog):
    from vltune.recipes.eval_grounding import main as eval_main

    out = tmp_path / "eval"
    report = eval_main(["--model", tiny_path(), "--per_user_adapters", str(personalised["out"]), "--zero_shot",
                        tiny_path(), "--dataset", personalised["data"], "--output_dir", str(out),
                        "--max_new_tokens", "12"])
    setups = report["setups"]
    assert list(setups) == ["zero-shot", "global", "personalised"]
    assert f"[eval] zero-shot model: {tiny_path()}" in caplog.text  # the log names the model it compares with
    assert setups["personalised"]["overall"]["click_accuracy"] == 1.0
    assert setups["personalised"]["overall"]["mean_distance_px"] == pytest.approx(0.0, abs=0.5)
    assert setups["global"]["overall"]["click_accuracy"] == 0.0  # the random tiny model never clicks there
    assert setups["global"]["overall"]["unparseable_rate"] > 0.5
    assert set(setups["personalised"]["per_user"]) == {"1", "2"}
    md = (out / "report.md").read_text()
    assert "| personalised | 100.0% |" in md and "## Per user" in md
    assert (out / "clicks_personalised.png").stat().st_size > 0
    assert 'data-user="1"' in (out / "report.html").read_text()  # the self-contained page, per-user rows
    lines = (out / "predictions_personalised.jsonl").read_text().splitlines()
    assert len(lines) == 16 and all(json.loads(line)["ok"] for line in lines)
    assert json.loads((out / "report.json").read_text())["setups"]["global"]["overall"]["n"] == 16


def test_breakdown_scores():
    from vltune.eval.grounding import breakdown

    recs = [{"user": 1, "kind": "habit", "pred": [1, 1], "ok": True, "distance_px": 2.0},
            {"user": 1, "kind": "explicit", "pred": None, "ok": False, "distance_px": None},
            {"user": 2, "kind": "habit", "pred": [5, 5], "ok": False, "distance_px": 10.0}]
    b = breakdown(recs)
    assert b["overall"] == {"n": 3, "click_accuracy": 1 / 3, "mean_distance_px": 6.0, "unparseable_rate": 1 / 3}
    assert b["per_user"]["1"]["click_accuracy"] == 0.5 and b["per_kind"]["habit"]["n"] == 2
    assert list(breakdown([{**recs[0], "user": u} for u in (10, 2, 1)])["per_user"]) == ["1", "2", "10"]


def test_personalize_refuses_full_and_needs_users_data(tmp_path, tiny_path, grounding_jsonl):
    from vltune.errors import UsageError
    from vltune.recipes.personalize import main as personalize_main

    with pytest.raises(UsageError, match="--train_type lora"):
        personalize_main(["--base", tiny_path(), "--dataset", grounding_jsonl, "--train_type", "full",
                          "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="matches no user"):  # the demo set has no `user` column
        personalize_main(["--base", tiny_path(), "--dataset", grounding_jsonl, "--users", "1-2",
                          "--output_dir", str(tmp_path / "o")])


@pytest.mark.slow
def test_gui_agents_example_personalised_beats_global_beats_zero_shot(tmp_path):
    """examples/gui_agents.sh end to end at seed 0 (~18 min on 2 quiet CPU cores). Measured at seed 0 (README):
    global 62.7% (explicit 77.6%, habit 41.2%), personalised 71.6% (80.3%, 59.0%), most-frequent app 69.9%,
    no user worse than global. The asserted margins sit below those by a few points of run-to-run noise; they
    are NOT issue 18's targets (+10 overall, +30 habit), which no setup measured so far reaches."""
    script = Path(__file__).parents[2] / "examples" / "gui_agents.sh"
    proc = subprocess.run(["bash", str(script), str(tmp_path / "gui"), "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gui" / "eval" / "report.json").read_text())
    setups = report["setups"]
    acc = {name: s["overall"]["click_accuracy"] for name, s in setups.items()}
    kind = {name: {k: v["click_accuracy"] for k, v in s["per_kind"].items()} for name, s in setups.items()}
    assert acc["zero-shot"] < 0.05 < acc["global"]
    assert acc["personalised"] >= acc["global"] + 0.05
    assert kind["personalised"]["habit"] >= kind["global"]["habit"] + 0.12  # the gain is on habit rows...
    assert kind["personalised"]["explicit"] >= kind["global"]["explicit"] - 0.03  # ...without losing the screen
    assert acc["most-frequent app"] >= acc["global"] + 0.04
    gains = report["gains"]["personalised"]
    assert gains["min"] > -6 and gains["worse"] <= 2  # the guard keeps bad adapters out
    personal = json.loads((tmp_path / "gui" / "personal" / "personalize.json").read_text())
    assert all(personal["users"][str(u)]["adapter"] is None for u in personal["kept_global"])
    steps = [line.split(":")[0] for line in (tmp_path / "gui" / "times.txt").read_text().splitlines()]
    assert steps == ["data", "global", "personalize", "eval"]


def test_global_model_keeps_its_training_resize(tmp_path, tiny_path):
    """A global model saved with --max_pixels 16384 is evaluated at that resize (clicks would drift for
    Qwen2.5-VL otherwise); an explicit --max_pixels still wins."""
    from transformers import AutoModelForImageTextToText

    from vltune.args import ModelArguments
    from vltune.coords import resized_size
    from vltune.models.adapters import load_global
    from vltune.models.load import load_processor, set_pixel_bounds

    path = tiny_path("qwen2_5_vl")
    saved = tmp_path / "global"
    AutoModelForImageTextToText.from_pretrained(path).save_pretrained(saved)
    proc = load_processor(path)
    set_pixel_bounds(proc, 16384, None)
    proc.save_pretrained(saved)
    _, got, _ = load_global(ModelArguments(), str(saved))
    assert resized_size(got, 512, 512) == resized_size(proc, 512, 512) == (112, 112)
    _, bigger, _ = load_global(ModelArguments(max_pixels=200_000), str(saved))
    assert resized_size(bigger, 512, 512)[0] > 112


def test_personalize_on_a_lora_global_model(tmp_path, tiny_path):
    """The README's path: `vltune sft` (LoRA by default) makes the global model, `vltune personalize --base` takes
    that adapter directory (merged into its base in memory) and trains a user's adapter on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vltune.data.synthetic import make_grounding_set
    from vltune.models.load import load_processor
    from vltune.recipes.personalize import main as personalize_main

    torch.manual_seed(0)
    global_lora = tmp_path / "global"
    get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_path()),
                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(global_lora)
    load_processor(tiny_path()).save_pretrained(global_lora)
    made = make_grounding_set(tmp_path / "data", n_train=4, n_test=2, seed=1)
    rows = [{**json.loads(line), "user": 7} for line in Path(made["train"]).read_text().splitlines()]
    users = Path(made["train"]).with_name("users.jsonl")  # beside the images its rows name
    users.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = personalize_main(["--base", str(global_lora), "--dataset", str(users),
                                "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--report_to", "none",
                                "--save_strategy", "no", "--gradient_checkpointing", "false"])
    assert list(summary["users"]) == [7]
    assert (tmp_path / "out" / "adapters" / "user_7" / "adapter_model.safetensors").is_file()


def test_eval_report_html_filters_in_a_real_browser(tmp_path):
    """report.html from hand-made answers on synthetic GUI screens (no model): the tables render, the user
    filter leaves only that user's cards (and per-user row), the kind filter narrows them further.
    VLTUNE_WRITE_DOCS=1 also writes the screenshot to docs/eval_report.png."""
    import os
    import shutil

    from tests.helpers import grounding_report, headless_chromium
    from vltune.coords import format_click, to_model_coords
    from vltune.eval.html_report import write_html_report

    made = make_gui_set(tmp_path / "data", train_users="4", test_users="1-3", samples_per_user=1,
                        test_per_user=6, seed=5, pickles=False)
    samples, _ = read_dataset(made["test"])

    def click(s, hit: bool) -> str:
        (x, y), (w, h) = s.extra["target"]["point"], s.extra["target"]["size"]
        return format_click(*to_model_coords(x if hit else w - x, y if hit else h - y, w, h, "rel1000"))

    answers = {"zero-shot": ["I cannot see the screen"] * len(samples),
               "global": [click(s, s.extra["kind"] == "explicit") for s in samples],
               "personalised": [click(s, s.extra["kind"] == "explicit" or i % 3) for i, s in enumerate(samples)]}
    report, predictions = grounding_report(samples, answers, kept_global=["3"])
    report["users"] = "1-3"
    path = write_html_report(tmp_path, report, predictions, samples)

    with headless_chromium((1200, 900)) as browser:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        browser.get(path.resolve().as_uri())

        def shown(css: str) -> list:
            return [e for e in browser.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]

        try:
            assert [r.find_element(By.TAG_NAME, "td").text for r in shown("#overall tbody tr")] == list(answers)
            assert len(shown("#per-user tbody tr")) == 3 and len(shown(".card")) == len(samples) == 18
            assert "global kept" in shown("#per-user tbody tr")[2].text
            Select(browser.find_element(By.ID, "user-filter")).select_by_value("2")
            cards = shown(".card")
            assert len(cards) == 6 and {c.get_attribute("data-user") for c in cards} == {"2"}
            assert [r.get_attribute("data-user") for r in shown("#per-user tbody tr")] == ["2"]
            kinds = [s.extra["kind"] for s in samples if s.extra["user"] == 2]
            kind = next(k for k in ("habit", "explicit") if 0 < kinds.count(k) < 6)  # the filter hides some
            Select(browser.find_element(By.ID, "kind-filter")).select_by_value(kind)
            cards = shown(".card")
            assert len(cards) == kinds.count(kind) < 6
            assert {(c.get_attribute("data-user"), c.get_attribute("data-kind")) for c in cards} == {("2", kind)}
            assert browser.find_element(By.ID, "shown").text == str(len(cards))
            assert all(c.find_element(By.TAG_NAME, "img").get_attribute("naturalWidth") != "0" for c in cards)
        except Exception:
            raise AssertionError(f"browser log: {browser.get_log('browser')}") from None
        shot = tmp_path / "eval_report.png"
        browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000
    if os.environ.get("VLTUNE_WRITE_DOCS") == "1":
        shutil.copy(shot, Path(__file__).parents[2] / "docs" / "eval_report.png")
