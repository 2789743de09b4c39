"""VLA policies: training behaviour, what trains, the seeds/03 setup, normalisation, reloading, any action dim."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vltune.models.families import part_of
from vltune.recipes.vla import main as vla_main
from vltune.vla.data.synthetic import make_dataset, make_episodes
from vltune.vla.normalize import FeatureStats, NormalizationError, Normalizer, compute_stats


@pytest.fixture(scope="module")
def calvin_set(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("vla") / "syn"), fmt="calvin", n_train=16, n_val=4, state_dim=2)


def train(tmp, dataset, *extra, steps=4):
    argv = ["--dataset", dataset, "--tiny_size", "xs", "--output_dir", str(tmp), "--max_steps", str(steps),
            "--report_to", "none", "--per_device_train_batch_size", "8", "--logging_steps", "1",
            "--save_strategy", "no", "--image_size", "64", *extra]
    return vla_main(argv)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_loss_falls_and_lightning_features(tmp_path, calvin_set):
    train(tmp_path, calvin_set, "--learning_rate", "3e-3", "--action_head", "mlp", "--save_strategy", "steps",
          "--save_steps", "10", "--save_top_k", "2", "--warmup_steps", "2", "--per_device_train_batch_size", "16",
          steps=30)
    losses = [h["loss"] for h in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:4]), losses
    best = json.loads((tmp_path / "best_checkpoints.json").read_text())
    assert len(best) == 2 and best[0]["eval_loss"] <= best[1]["eval_loss"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == sorted(Path(b["path"]).name for b in best)
    csv = (tmp_path / "metrics.csv").read_text()
    assert "learning_rate" in csv and "eval_loss" in csv
    lrs = [h["learning_rate"] for h in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
           if "learning_rate" in h]
    after_warmup = lrs[2:]
    assert min(after_warmup) >= 3e-3 * 0.01 * 0.99 and lrs[-1] < 0.1 * max(lrs)  # cosine down to min_lr_scale


def test_full_trains_unfrozen_parts_only(tmp_path, calvin_set, tiny_path):
    from transformers import AutoModelForImageTextToText

    base = snapshot(AutoModelForImageTextToText.from_pretrained(tiny_path("qwen3_vl")))
    res = train(tmp_path, calvin_set, "--train_type", "full", "--freeze_vit", "true", "--freeze_aligner", "true",
                "--learning_rate", "1e-2")
    after = snapshot(res.model)
    for name, value in after.items():
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            if part_of(name) in ("vision", "aligner"):
                assert torch.equal(value, base[key]), f"frozen {name} changed"
    assert any(not torch.equal(v, base[n[9:]]) for n, v in after.items() if part_of(n) == "llm")
    head = [n for n in after if n.startswith("head.")]
    assert head


def test_frozen_backbone_trains_only_the_head(tmp_path, calvin_set, tiny_path):
    from transformers import AutoModelForImageTextToText

    base = snapshot(AutoModelForImageTextToText.from_pretrained(tiny_path("qwen3_vl")))
    res = train(tmp_path, calvin_set, "--train_type", "frozen", "--action_head", "gpt", "--learning_rate", "1e-2")
    for name, p in res.model.named_parameters():
        if name.startswith("backbone."):
            assert not p.requires_grad and torch.equal(p.detach(), base[name[9:]])
    saved = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(tmp_path / "policy.safetensors")))
    assert saved and not any(k.startswith("backbone.") for k in saved), "a frozen backbone is not saved again"


def test_seeds03_lora_frozen_backbone_lstm_trains_and_reloads(tmp_path, calvin_set):
    """seeds/03: LoRA + frozen backbone + LSTM head died at the first backward; here it trains and reloads."""
    from vltune.vla.policy import Policy

    res = train(tmp_path, calvin_set, "--train_type", "lora", "--freeze_vit", "true", "--action_head", "lstm",
                "--learning_rate", "1e-2", "--gradient_checkpointing", "true")
    named = dict(res.model.named_parameters())
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in named.items()), "LoRA B starts at zero and must move"
    assert all(not p.requires_grad for n, p in named.items() if n.startswith("backbone.") and "lora_" not in n)
    # Policy.from_pretrained rebuilds the same policy: identical actions on the same frames.
    ep = make_episodes(1, length=5, state_dim=2, seed=3)[0]
    policy = Policy.from_pretrained(tmp_path)
    again = Policy.from_pretrained(tmp_path)
    for p in (policy, again):
        p.reset()
    a = np.stack([policy.step({"static": ep.images["static"][t]}, ep.instruction, ep.state[t]) for t in range(5)])
    b = np.stack([again.step({"static": ep.images["static"][t]}, ep.instruction, ep.state[t]) for t in range(5)])
    np.testing.assert_array_equal(a, b)
    # ... and the reloaded policy equals the trained in-memory model.
    from vltune.vla.frames import FrameInputs

    live = Policy(res.model.eval(), FrameInputs(policy.frames.processor, res.config), policy.normalizers)
    live.reset()
    c = np.stack([live.step({"static": ep.images["static"][t]}, ep.instruction, ep.state[t]) for t in range(5)])
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert set(np.unique(a[:, 6])) <= {-1.0, 1.0}, "gripper dim comes out as the data's open/close values"


def test_batch_norm_head_input_saves_its_statistics(tmp_path, calvin_set):
    """--head_input_norm batch: running statistics are learnt, saved and used at inference (live == reloaded)."""
    from vltune.vla.heads import FeatureBatchNorm
    from vltune.vla.frames import FrameInputs
    from vltune.vla.policy import Policy

    res = train(tmp_path, calvin_set, "--action_head", "gpt", "--window_size", "2")  # batch is the default
    norm = res.model.head.inp[0]
    assert isinstance(norm, FeatureBatchNorm) and norm.running_mean.abs().sum() > 0
    one = torch.randn(1, 1, norm.num_features)  # a last batch of one frame must not stop training
    assert torch.isfinite(norm.train()(one)).all()
    policy = Policy.from_pretrained(tmp_path)
    torch.testing.assert_close(policy.model.head.inp[0].running_var, norm.running_var.cpu())
    live = Policy(res.model.eval(), FrameInputs(policy.frames.processor, res.config), policy.normalizers)
    ep = make_episodes(1, length=4, state_dim=2, seed=5)[0]
    out = []
    for p in (policy, live):
        p.reset()
        out.append(np.stack([p.step({"static": ep.images["static"][t]}, ep.instruction, ep.state[t]) for t in range(4)]))
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)


def test_broken_setup_gets_the_preflight_error(tiny_path, processor_for, calvin_set):
    """Reentrant checkpointing over frozen embeddings without the input-grad hook: LoRA gets no gradient."""
    from transformers import AutoModelForImageTextToText

    from vltune.args import TunerArguments
    from vltune.models.preflight import GradientFlowError, check_gradient_flow
    from vltune.models.tuners import apply_tuner
    from vltune.vla.config import PolicyConfig
    from vltune.vla.data import read_episodes
    from vltune.vla.dataset import WindowCollator, WindowDataset
    from vltune.vla.frames import FrameInputs
    from vltune.vla.modeling import PolicyModel

    vlm = apply_tuner(AutoModelForImageTextToText.from_pretrained(tiny_path("qwen3_vl")),
                      TunerArguments(train_type="lora", freeze_vit=True))
    vlm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    vlm.get_base_model().disable_input_require_grads()
    cfg = PolicyConfig(backbone="tiny:qwen3_vl:xs", train_type="lora", lora={}, action_head="lstm", head_hidden=32,
                       head_layers=1, window_size=2, fwd_pred_next_n=2, exec_steps=1, action_dim=7, gripper_dims=[6],
                       gripper_values=[[-1.0, 1.0]], state_dim=0, state_indices=[], cameras=["static"], image_size=64,
                       use_images=True, arm_loss="huber", arm_gripper_loss_ratio=0.01)
    model = PolicyModel(cfg, vlm)
    ds = WindowDataset(read_episodes(calvin_set), cfg, {})
    batch = WindowCollator(FrameInputs(processor_for("qwen3_vl"), cfg), cfg)([ds[i] for i in range(4)])
    with pytest.raises(GradientFlowError, match=r"(?s)llm \(LoRA\).*reentrant"):
        check_gradient_flow(model, batch, loss_fn=lambda m, b: m(**b)["loss"])


@pytest.mark.parametrize("action_dim,gripper", [(2, "none"), (4, "3"), (14, "6,13")])
def test_any_action_dim_with_configurable_gripper_dims(tmp_path, action_dim, gripper):
    from vltune.vla.policy import Policy

    grip = [] if gripper == "none" else [int(g) for g in gripper.split(",")]
    data = make_dataset(str(tmp_path / "d"), fmt="calvin", n_train=6, n_val=0, action_dim=action_dim,
                        gripper_dims=grip, state_dim=0, wrist_camera=action_dim == 14)
    readout = "action+image" if action_dim == 14 else "action"
    res = train(tmp_path / "out", data, "--gripper_dims", gripper, "--action_head", "mlp", "--readout", readout, steps=2)
    assert res.config.gripper_dims == grip and res.config.action_dim == action_dim
    assert res.config.image_tokens == (8 if action_dim == 14 else 0)  # 2 cameras x 4 tokens of 32 px at 64 px
    assert res.config.cameras == (["static", "gripper"] if action_dim == 14 else ["static"])
    policy = Policy.from_pretrained(res.output_dir)
    ep = make_episodes(1, length=2, action_dim=action_dim, gripper_dims=grip, state_dim=0,
                       wrist_camera=action_dim == 14)[0]
    a = policy.step({c: ep.images[c][0] for c in ep.images}, ep.instruction)
    assert a.shape == (action_dim,) and np.isfinite(a).all()
    for d in grip:
        assert a[d] in (-1.0, 1.0)


def test_no_image_ablation_sees_no_pixels(tmp_path, calvin_set):
    res = train(tmp_path, calvin_set, "--use_images", "false", steps=2)
    assert not res.config.use_images
    from vltune.vla.policy import Policy

    policy = Policy.from_pretrained(res.output_dir)
    ep = make_episodes(1, length=2, state_dim=2)[0]
    noise = np.random.default_rng(0).integers(0, 256, ep.images["static"][0].shape, dtype=np.uint8)
    policy.reset()
    a = policy.step({"static": ep.images["static"][0]}, ep.instruction, ep.state[0])
    policy.reset()
    b = policy.step({"static": noise}, ep.instruction, ep.state[0])
    np.testing.assert_array_equal(a, b)


def test_cameras_flag_picks_named_cameras_and_the_policy_reads_each(tmp_path, capsys):
    """Three named cameras in the data (Meta-World's topview/corner/gripperPOV); --cameras picks two, in the
    given order; each one changes the action; a camera the data lacks is one line naming what there is."""
    from vltune.cli import main as cli_main
    from vltune.vla.data import write_episodes
    from vltune.vla.policy import Policy

    eps = make_episodes(6, length=5, action_dim=4, wrist_camera=True, state_dim=2)
    for ep in eps:
        ep.images = {"topview": ep.images["static"], "corner": ep.images["gripper"],
                     "gripperPOV": 255 - ep.images["static"]}
    data = write_episodes(eps, str(tmp_path / "named"), fmt="calvin").rsplit("/", 1)[0]
    auto = train(tmp_path / "auto", data, "--train_type", "frozen", steps=1)
    assert auto.config.cameras == ["corner", "gripperPOV", "topview"]  # auto: every camera (no static one)
    res = train(tmp_path / "two", data, "--cameras", "corner,topview", "--readout", "action+image", steps=2)
    assert res.config.cameras == ["corner", "topview"] and res.config.image_tokens == 8  # 2 x 4 tokens at 64 px
    policy = Policy.from_pretrained(res.output_dir)
    frame = {c: eps[0].images[c][0] for c in eps[0].images}

    def act(**swap):
        policy.reset()
        return policy.step({**frame, **swap}, eps[0].instruction, eps[0].state[0])

    ref = act()
    black = np.zeros_like(frame["corner"])
    assert not np.array_equal(act(corner=black), ref) and not np.array_equal(act(topview=black), ref)
    np.testing.assert_array_equal(act(gripperPOV=black), ref)  # not one of its cameras
    with pytest.raises(ValueError, match=r"camera\(s\) \['topview'\] missing"):
        policy.reset()
        policy.step({"corner": frame["corner"]}, eps[0].instruction, eps[0].state[0])

    rc = cli_main(["vla", "--dataset", data, "--tiny_size", "xs", "--output_dir", str(tmp_path / "bad"),
                   "--max_steps", "1", "--report_to", "none", "--cameras", "topview,wrist"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert "--cameras topview,wrist" in err[-1] and "wrist not among them" in err[-1] and "corner" in err[-1]


# ---------------------------------------------------------------------------- normalisation
def _stats(x):
    return compute_stats([x], "action")


@pytest.mark.parametrize("mode", ["minmax", "meanstd", "bounds", "none"])
def test_normalisation_round_trips(mode):
    x = np.random.default_rng(0).uniform(-0.6, 0.6, (50, 7)).astype(np.float32)
    n = Normalizer("action", mode, _stats(x), dims=list(range(6)))
    y = n.normalize(x)
    np.testing.assert_allclose(n.unnormalize(y), x, atol=1e-5)
    np.testing.assert_array_equal(y[:, 6], x[:, 6])  # the gripper dim is left alone
    if mode in ("minmax", "bounds"):
        assert np.abs(y[:, :6]).max() <= 1.0 + 1e-6
    again = Normalizer.from_dict(json.loads(json.dumps(n.to_dict())))
    np.testing.assert_allclose(again.normalize(x), y)


def test_bad_statistics_raise_clearly():
    x = np.zeros((10, 3), np.float32)
    x[:, 0] = np.linspace(0, 1, 10)
    x[:, 1] = np.linspace(0, 1, 10)
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(NormalizationError, match=r"action: non-finite value nan in ep7\.npz, frame 4, dimension 1"):
        compute_stats([x, bad], "action", sources=["ep0.npz", "ep7.npz"])
    constant = Normalizer("action", "meanstd", _stats(x), dims=[0, 1, 2])  # dim 2 is exactly constant: centred
    assert constant.constant_dims == [2]
    np.testing.assert_allclose(constant.unnormalize(constant.normalize(x)), x, atol=1e-6)
    tiny = x.copy()
    tiny[:, 2] = np.linspace(0, 1e-9, 10)  # varies, but by next to nothing: dividing would magnify noise
    with pytest.raises(NormalizationError, match=r"action dimension 2 varies, but only by.*--norm_action bounds"):
        Normalizer("action", "meanstd", _stats(tiny), dims=[0, 1, 2])
    Normalizer("action", "bounds", _stats(x), dims=[0, 1, 2])  # a fixed range does not divide by the data's std
    inf = FeatureStats(mean=[0.0], std=[float("inf")], min=[0.0], max=[1.0], q01=[0.0], q99=[1.0], count=1)
    with pytest.raises(NormalizationError, match=r"state statistics: std\[0\] = inf"):
        Normalizer("state", "meanstd", inf, dims=[0])


def test_constant_action_dim_is_kept_constant_not_a_stop(tmp_path, caplog):
    """A dimension that never varies (a task mix whose gripper never moves) trains with a warning: it is left
    out of the loss and output as its value; a near-zero spread that is not constant still stops the run."""
    from vltune.vla.data import write_episodes
    from vltune.vla.policy import Policy

    eps = make_episodes(4, length=5, action_dim=3, gripper_dims=[], state_dim=2)
    for e in eps:
        e.actions[:, 2] = 0.5
        e.state[:, 1] = -1.0  # a constant proprio dimension too
    write_episodes(eps, str(tmp_path / "d"), fmt="calvin")
    res = train(tmp_path / "o", str(tmp_path / "d"), "--gripper_dims", "none", "--val_episodes_ratio", "0")
    assert res.config.constant_dims == [2] and res.config.constant_values == [0.5] and res.config.arm_dims == [0, 1]
    assert "kept constant" in (tmp_path / "o" / "train.log").read_text()
    assert json.loads((tmp_path / "o" / "train_results.json").read_text())["constant_action_dims"] == {"2": 0.5}
    assert "constant dims" in (tmp_path / "o" / "README.md").read_text()
    policy = Policy.from_pretrained(res.output_dir)
    a = policy.step({"static": eps[0].images["static"][0]}, eps[0].instruction, eps[0].state[0])
    assert a[2] == 0.5 and np.isfinite(a).all()
    for e in eps:
        e.actions[:, 2] = 0.5 + np.linspace(0, 4e-7, len(e.actions))  # float32 steps of ~6e-8
    write_episodes(eps, str(tmp_path / "d2"), fmt="calvin")
    with pytest.raises(NormalizationError, match="action dimension 2 varies, but only by"):
        train(tmp_path / "o2", str(tmp_path / "d2"), "--gripper_dims", "none", "--val_episodes_ratio", "0")


def test_fast_patchify_matches_the_processor(processor_for):
    from vltune.vla.config import PolicyConfig
    from vltune.vla.frames import FrameInputs

    cfg = PolicyConfig(backbone="", train_type="full", lora={}, action_head="mlp", head_hidden=8, head_layers=1,
                       window_size=1, fwd_pred_next_n=1, exec_steps=1, action_dim=2, gripper_dims=[], gripper_values=[],
                       state_dim=0, state_indices=[], cameras=["static"], image_size=96, use_images=True,
                       arm_loss="mse", arm_gripper_loss_ratio=0.0)
    assert FrameInputs(processor_for("qwen3_vl"), cfg).fast


# ---------------------------------------------------------------------------- RoboVLMs configs
def test_robovlms_config_maps_keys_and_lists_ignored(tmp_path, calvin_set, caplog):
    from vltune.vla.robovlms_config import load_with_parents, map_robovlms

    (tmp_path / "base.json").write_text(json.dumps({
        "model": "kosmos", "window_size": 8, "fwd_pred_next_n": 10, "arm_gripper_loss_ratio": 0.01,
        "learning_rate": 2e-5, "min_lr_scale": 1e-2, "norm_action": True, "norm_min": -0.65, "norm_max": 0.65,
        "fwd_loss_ratio": 0, "optimizer": "adamw",
        "act_head": {"type": "LSTMDecoder", "hidden_size": 1024, "action_dim": 7, "with_history": True},
        "train_setup": {"precision": "bf16", "freeze_backbone": True, "lora_enable": True, "lora_r": 64,
                        "train_vision": False, "gradient_checkpointing": False, "train_text_embedding": True},
        "trainer": {"strategy": "deepspeed_stage_2", "gradient_clip_val": 1.0, "max_epochs": 5,
                    "accumulate_grad_batches": 2, "precision": "bf16"},
        "train_dataset": {"type": "DiskCalvinDataset", "data_dir": "calvin/task_ABCD_D"}}))
    (tmp_path / "child.json").write_text(json.dumps({
        "parent": "base.json", "window_size": 2, "fwd_pred_next_n": 3, "batch_size": 4,
        "act_head": {"hidden_size": 32}, "train_dataset": {"data_dir": calvin_set}}))
    cfg = load_with_parents(tmp_path / "child.json")
    assert cfg["act_head"] == {"type": "LSTMDecoder", "hidden_size": 32, "action_dim": 7, "with_history": True}
    ours, mapped, ignored = map_robovlms(cfg, cuda=False)
    assert ours["window_size"] == 2 and ours["fwd_pred_next_n"] == 3 and ours["action_head"] == "LSTMDecoder"
    assert ours["train_type"] == "lora" and ours["lora_rank"] == 64 and ours["freeze_vit"] is True
    assert ours["norm_action"] == "bounds" and ours["max_grad_norm"] == 1.0 and ours["num_train_epochs"] == 5
    assert ours["gradient_accumulation_steps"] == 2 and ours["min_lr_scale"] == 1e-2
    assert ours["dataset"] == calvin_set and ours["data_format"] == "calvin"
    ignored_keys = {line.split(":")[0] for line in ignored}
    assert {"model", "fwd_loss_ratio", "act_head.action_dim", "trainer.strategy", "train_setup.precision",
            "train_setup.train_text_embedding"} <= ignored_keys
    # And the recipe takes it: RoboVLMs' JSON + our command-line overrides.
    res = vla_main(["--config", str(tmp_path / "child.json"), "--tiny_size", "xs", "--output_dir",
                    str(tmp_path / "out"), "--max_steps", "2", "--report_to", "none", "--save_strategy", "no",
                    "--learning_rate", "1e-3", "--image_size", "64"])
    assert res.config.window_size == 2 and res.config.fwd_pred_next_n == 3 and res.config.head_hidden == 32
    assert res.config.train_type == "lora" and res.config.action_head == "LSTMDecoder"


def robovlms_all_keys(data_dir: str, model_path: str, out: str) -> dict:
    """Every key that RoboVLMs' configs/calvin_finetune/*.json use (union over its 8 files), our own values."""
    return {
        "robovlm_name": "RoboQwen", "parent": None, "task_name": "calvin_finetune", "model": "qwen",
        "model_url": "https://example.invalid/tiny", "seq_len": 1, "fwd_pred_next_n": 3, "arm_gripper_loss_ratio": 0.01,
        "cap_loss_ratio": 0.05, "fwd_loss_ratio": 0, "window_size": 2, "image_size": 64,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "seed": 7, "batch_size": 4, "num_workers": 0,
        "data_scale": 1, "optimizer": "adam", "learning_rate": 1e-3, "min_lr_scale": 0.01, "weight_decay": 0,
        "warmup_epochs": 0.25, "warmup_steps": 0, "warmup_ratio": None, "use_hand_rgb": False,
        "use_time_causal_attn": False, "use_mim_obs_loss": False, "use_pixel_loss": True, "use_obs_queries": True,
        "vision_masked_ratio": 0.9, "use_tube_mask": False, "output_root": out, "log_root": out + "/logs",
        "cache_root": out + "/cache", "model_path": model_path, "model_config": model_path + "/config.json",
        "model_load_path": None, "model_load_source": "torch", "gradient_clip_val": 1.0, "resume": None,
        "vision_encoder": {"clip_vision_encoder_path": "ViT-x", "clip_vision_encoder_pretrained": "none"},
        "vlm": {"type": "AutoModelForImageTextToText", "pretrained_model_name_or_path": model_path, "name": "qwen",
                "residual": False},
        "tokenizer": {"type": "AutoProcessor", "pretrained_model_name_or_path": model_path, "tokenizer_type": "qwen",
                      "max_text_len": 64, "additional_special_tokens": None, "use_img_start_end": False,
                      "image_start_token": "<s>", "image_end_token": "</s>", "use_act_start_end": False,
                      "action_start_token": "<a>", "action_end_token": "</a>", "use_bbox_start_end": False,
                      "bbox_start_token": "<b>", "bbox_end_token": "</b>"},
        "train_setup": {"predict_action": True, "predict_forward": False, "predict_forward_hand": False,
                        "predict_caption": False, "train_vision": True, "train_resampler": False,
                        "train_text_embedding": True, "train_full_decoder": False, "train_decoder_layers": -1,
                        "precision": "bf16", "bits": -1, "freeze_mm_mlp_adapter": False, "freeze_backbone": False,
                        "freeze_resampler": False, "tune_mm_mlp_adapter": False, "mm_use_im_start_end": False,
                        "mm_use_im_patch_token": False, "gradient_checkpointing": False, "lora_enable": False,
                        "mm_projector_lr": 1e-4, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                        "lora_bias": "none"},
        "act_encoder": None,
        "act_head": {"type": "LSTMDecoder", "hidden_size": 32, "action_dim": 7, "down_sample": "none", "latent": 1,
                     "fwd_pred_next_n": 1, "window_size": 1, "action_space": "continuous", "with_history": True,
                     "history_type": "post", "token_source": "all"},
        "fwd_head": None,
        "trainer": {"accelerator": "gpu", "strategy": "deepspeed_stage_2", "precision": "16",
                    "logger": ["tensorboard"], "gradient_clip_val": 1.0, "use_distributed_sampler": False,
                    "log_every_n_steps": 1, "max_epochs": 5, "val_check_interval": None,
                    "check_val_every_n_epoch": 1, "max_steps": 2, "limit_val_batches": 10,
                    "accumulate_grad_batches": 1},
        "train_dataset": {"type": "DiskCalvinDataset", "data_dir": data_dir, "shift_first": False,
                          "tokenizer_type": "qwen", "rgb_pad": 10, "gripper_pad": 4, "traj_cons": False,
                          "model_name": "qwen"},
        "val_dataset": {"type": "DiskCalvinDataset", "data_dir": data_dir, "tokenizer_type": "qwen",
                        "model_name": "qwen"},
        "norm_action": True, "norm_min": -0.65, "norm_max": 0.65, "use_vision_resampler": False,
        "vision_resampler": {"vis_dim": 64, "depth": 1, "dim_head": 8, "heads": 2, "num_latents": 4},
        "vl_cotrain_ratio": 1, "llava": "none", "llava_config": "none.json", "qwen": "tiny",
    }


@pytest.mark.parametrize("cuda", [False, True])
def test_every_mapped_robovlms_key_is_a_real_option(tmp_path, calvin_set, tiny_path, cuda):
    import dataclasses

    from vltune.train.vla_config import ARG_GROUPS
    from vltune.vla.robovlms_config import map_robovlms

    ours, mapped, ignored = map_robovlms(robovlms_all_keys(calvin_set, tiny_path(), str(tmp_path)), cuda=cuda)
    options = {f.name for group in ARG_GROUPS for f in dataclasses.fields(group)}
    assert set(ours) <= options, sorted(set(ours) - options)
    assert ours["warmup_steps"] == 0.25 / 5 and ours["logging_dir"] == str(tmp_path) + "/logs"
    if cuda:
        assert ours["deepspeed"] == "zero2" and ours["fp16"] is True
    else:
        assert "deepspeed" not in ours
        (line,) = [x for x in ignored if x.startswith("trainer.strategy")]
        assert "dropped, because" in line and "--deepspeed zero2" in line


def test_robovlms_config_with_every_key_trains(tmp_path, calvin_set, tiny_path, monkeypatch):
    import tempfile

    from vltune.vla.robovlms_config import map_robovlms  # noqa: F401  (the path under test)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cfg = tmp_path / "finetune_all_keys.json"
    cfg.write_text(json.dumps(robovlms_all_keys(calvin_set, tiny_path(), str(tmp_path / "out"))))
    res = vla_main(["--config", str(cfg), "--save_strategy", "no"])
    assert res.config.window_size == 2 and res.config.fwd_pred_next_n == 3 and res.config.head_hidden == 32
    assert (tmp_path / "out" / "policy.safetensors").exists()
    assert list((tmp_path / "tmp").iterdir()) == [], "the mapped temporary config is deleted"
    assert list((tmp_path / "out" / "logs").glob("events.out.tfevents.*")), "TensorBoard events go to log_root"
    assert not (tmp_path / "out" / "runs").exists()


def test_latency_benchmark_reports_percentiles(tmp_path, calvin_set):
    from vltune.recipes.eval_vla import main as eval_main

    train(tmp_path, calvin_set, steps=1)
    report = eval_main(["--policy", str(tmp_path), "--env", "none", "--latency_steps", "10"])
    lat = report["latency"]
    assert lat["steps"] == 10 and 0 < lat["p50_ms"] <= lat["p95_ms"] and lat["actions_per_s"] > 0
    assert "p95" in (tmp_path / "eval" / "eval_report.md").read_text()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "idefics3"])
def test_other_vlm_backbones(tmp_path, calvin_set, family):
    """Any supported VLM: Qwen2.5-VL takes the torch patchify path, Idefics3 its own processor every batch."""
    from vltune.vla.policy import Policy

    res = train(tmp_path, calvin_set, "--model_family", family, "--readout", "action+image", steps=2)
    assert res.config.backbone == f"tiny:{family}:xs" and res.config.image_tokens > 0
    policy = Policy.from_pretrained(res.output_dir)
    ep = make_episodes(1, length=3, state_dim=2)[0]
    actions = [policy.step({"static": ep.images["static"][t]}, ep.instruction, ep.state[t]) for t in range(3)]
    assert all(a.shape == (7,) and np.isfinite(a).all() for a in actions)


def test_step_takes_every_documented_image_layout_and_rejects_the_rest(tmp_path, calvin_set):
    """uint8 HWC, float HWC in [0, 1] and channels-first give the same action; a float image in [0, 255], a
    wrong shape or a short state vector is a ValueError that says what was given (issue 13: a float frame in
    [0, 1] used to become a black frame without a word)."""
    from vltune.vla.policy import Policy

    res = train(tmp_path, calvin_set, "--train_type", "frozen")
    policy = Policy.from_pretrained(res.output_dir)
    ep = make_episodes(1, length=1, state_dim=2, seed=5)[0]
    rgb, state = ep.images["static"][0], ep.state[0]
    assert rgb.dtype == np.uint8 and rgb.shape[-1] == 3

    def act(image, s=state):
        policy.reset()
        return policy.step({"static": image}, ep.instruction, s)

    reference = act(rgb)
    as_float = rgb.astype(np.float32) / 255.0
    for image in (as_float, np.moveaxis(rgb, -1, 0), np.moveaxis(as_float, -1, 0), torch.from_numpy(rgb)):
        np.testing.assert_array_equal(act(image), reference)
    assert not np.array_equal(act(np.zeros_like(rgb)), reference), "a black frame must act differently here"
    with pytest.raises(ValueError, match=r"float image spans \[\d+, \d+\]; float images must lie in \[0, 1\]"):
        act(rgb.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(64, 64\).*expected uint8 \(H, W, 3\)"):
        act(rgb[..., 0][:64, :64])
    with pytest.raises(ValueError, match="state has 1 value"):
        act(rgb, state[:1])


@pytest.mark.drills  # two VLA processes; the kill -9 drill (test_drills.py) covers the same ground
def test_resume_continues_with_the_same_losses_and_weights(tmp_path, calvin_set):
    """Resumed from the step-3 checkpoint of a 6-step run, steps 4-6 log the losses of the uninterrupted run and
    end at the same weights: the policy weights, optimizer, scheduler and RNG come back, and the image-shift
    augmentation depends on the batch, not on how many batches came before. Each run is its own process."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["vla", "--dataset", calvin_set, "--tiny_size", "xs", "--max_steps", "6", "--report_to", "none",
              "--per_device_train_batch_size", "8", "--logging_steps", "1", "--image_size", "64", "--save_strategy",
              "steps", "--save_steps", "3", "--save_top_k", "5", "--image_aug_shift", "4", "--seed", "5"]

    def vla(*argv):
        proc = subprocess.run([sys.executable, "-m", "vltune", *common, *argv], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(out):
        return {h["step"]: h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
                if "loss" in h}

    vla("--output_dir", str(tmp_path / "full"))
    vla("--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3"))
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "checkpoint-3").exists(), "steps 1-3 must not be trained again"
    for k in (4, 5, 6):
        assert resumed[k] == pytest.approx(full[k], rel=1e-5), (k, resumed, full)
    a, b = (load_file(tmp_path / d / "policy.safetensors") for d in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
