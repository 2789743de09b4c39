"""The reward registry: built-ins, user plug-ins (TRL functions and ms-swift classes), checked calls,
and the seeds/05 SD3 + CLIP reward on tiny models built offline."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest

from vltune.rewards import RewardContext, RewardError, build_reward_funcs

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed (pip install 'vltune[grpo]')")


def msgs(text):
    return [{"role": "assistant", "content": text}]


def prompt(text="Click the red circle"):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def ctx(**args):
    return RewardContext(args=SimpleNamespace(**args), coords="rel1000")


TARGET = {"box": [10, 20, 30, 40], "size": [100, 100]}  # px; in 0-1000 coordinates: x 100-300, y 200-400


# ---------------------------------------------------------------------------- built-ins
def test_click_reward_scores_inside_outside_unparseable_and_missing_target():
    (click,) = build_reward_funcs(["click"], ctx())
    completions = [msgs("click(200, 300)"), msgs("click(500, 300)"), "click(100, 400)", msgs("no idea"),
                   msgs("click(200, 300)")]
    targets = [TARGET, TARGET, TARGET, TARGET, None]
    out = click(prompts=[prompt()] * 5, completions=completions, target=targets)
    assert out == [1.0, 0.0, 1.0, 0.0, None]


def test_click_reward_reads_ms_swift_objects_and_image_size():
    from PIL import Image

    (click,) = build_reward_funcs(["click"], ctx())
    objects = {"ref": ["red circle"], "bbox": [[10, 20, 30, 40]]}
    out = click(prompts=[prompt()] * 2, completions=[msgs("click(100, 100)"), msgs("click(200, 300)")],
                objects=[objects] * 2, images=[[Image.new("RGB", (50, 100))]] * 2)
    # 50 px wide: x 200/1000 -> 10 px (inside), y 300/1000 -> 30 px (inside); the first is (5, 10): outside
    assert out == [0.0, 1.0]


def test_iou_reward():
    (iou,) = build_reward_funcs(["iou"], ctx())
    out = iou(prompts=[prompt()] * 3, completions=[msgs("[100, 200, 300, 400]"), msgs("box (100,200,200,400)"),
                                                     msgs("[600, 600, 700, 700]")], target=[TARGET] * 3)
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(0.5) and out[2] == 0.0


def test_accuracy_format_and_length_rewards():
    acc, fmt, length = build_reward_funcs(["accuracy", "format", "length"], ctx(length_target=4))
    completions = [msgs("<think>2+2</think><answer>4</answer>"), msgs("The answer is 5"), msgs("Paris."),
                   msgs("<answer>london</answer>")]
    solutions = ["4", "4", "paris", "Paris"]
    assert acc(prompts=[prompt()] * 4, completions=completions, solution=solutions) == [1.0, 0.0, 1.0, 0.0]
    assert fmt(prompts=[prompt()] * 4, completions=completions) == [1.0, 0.0, 0.0, 0.0]
    ids = [[1] * 4, [1] * 2, [1] * 8, [1] * 12]
    assert length(prompts=[prompt()] * 4, completions=completions, completion_ids=ids) == [1.0, 0.5, 0.0, 0.0]


def test_format_pattern_is_configurable_and_validated():
    (fmt,) = build_reward_funcs(["format"], ctx(format_pattern=r"click\(\d+, \d+\)"))
    assert fmt(prompts=[prompt()] * 2, completions=[msgs("click(1, 2)"), msgs("click(1, 2) done")]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="format_pattern"):
        build_reward_funcs(["format"], ctx(format_pattern="(unclosed"))
    with pytest.raises(ValueError, match="length_target"):
        build_reward_funcs(["length"], ctx())


def test_unknown_reward_lists_the_known_ones():
    from vltune.errors import UsageError

    with pytest.raises(UsageError, match=r"--reward_funcs nope: unknown reward.*click.*external_plugins"):
        build_reward_funcs(["nope"], ctx())


# ---------------------------------------------------------------------------- plug-ins
PLUGIN = '''
from vltune.rewards import register_reward

def shorter_is_better(prompts, completions, completion_ids=None, **kwargs):
    """TRL signature: conversational completions arrive as message lists."""
    assert isinstance(completions[0], list)
    return [1.0 / (1 + len(c[0]["content"])) for c in completions]

class MentionsColor:
    """ms-swift style: completions arrive as strings; columns in kwargs."""
    def __init__(self, args=None):
        self.args = args
    def __call__(self, completions, **kwargs):
        assert isinstance(completions[0], str)
        return [float(color in c) for c, color in zip(completions, kwargs["color"])]

orms = {"mentions_color": MentionsColor}

@register_reward("always_one")
def _one(prompts, completions, **kwargs):
    return [1.0] * len(completions)

def broken(prompts, completions, **kwargs):
    return [1 / 0 for _ in completions]

def short(prompts, completions, **kwargs):
    return [1.0]

def text_valued(prompts, completions, **kwargs):
    return ["good"] * len(completions)
'''


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    return str(path)


def test_plugin_functions_and_ms_swift_classes(plugin_file):
    args = SimpleNamespace(marker=1)
    fn, cls, reg = build_reward_funcs(["shorter_is_better", "mentions_color", "always_one"],
                                      RewardContext(args=args), [plugin_file])
    completions = [msgs("red"), msgs("a blue one")]
    assert fn(prompts=[prompt()] * 2, completions=completions) == [pytest.approx(1 / 4), pytest.approx(1 / 11)]
    assert cls(prompts=[prompt()] * 2, completions=completions, color=["red", "red"]) == [1.0, 0.0]
    assert cls.reward_impl.args is args  # ms-swift classes get the reward arguments when __init__ takes `args`
    assert reg(prompts=[prompt()] * 2, completions=completions) == [1.0, 1.0]
    assert [f.__name__ for f in (fn, cls, reg)] == ["shorter_is_better", "mentions_color", "always_one"]


def test_a_raising_reward_names_reward_batch_and_fix(plugin_file):
    (broken,) = build_reward_funcs(["broken"], ctx(), [plugin_file])
    state = SimpleNamespace(global_step=7)
    with pytest.raises(RewardError) as e:
        broken(prompts=[prompt("Tap the blue square")] * 2, completions=[msgs("a"), msgs("b")], trainer_state=state,
               color=["red", "blue"])
    text = str(e.value)
    assert "reward 'broken' raised ZeroDivisionError" in text
    assert "step 7" in text and "batch of 2 completions" in text and "Tap the blue square" in text
    assert "color" in text and "--reward_funcs" in text


def test_wrong_length_and_non_numbers_are_rejected(plugin_file):
    short, text_valued = build_reward_funcs(["short", "text_valued"], ctx(), [plugin_file])
    with pytest.raises(RewardError, match=r"reward 'short' returned 1 values for the step 3, batch of 2 completions"):
        short(prompts=[prompt()] * 2, completions=[msgs("a"), msgs("b")], trainer_state=SimpleNamespace(global_step=3))
    with pytest.raises(RewardError, match=r"reward 'text_valued' returned 'good'"):
        text_valued(prompts=[prompt()] * 2, completions=[msgs("a"), msgs("b")])


# ---------------------------------------------------------------------------- seeds/05: SD3 + CLIP
@needs_diffusers
def test_clip_sd3_reward_batches_saves_images_and_stays_frozen(tmp_path, monkeypatch):

    args = SimpleNamespace(sd_steps=2, sd_image_size=32, sd_guidance_scale=1.0, sd_batch_size=3,
                           save_reward_images_steps=2)
    rc = RewardContext(args=args, output_dir=str(tmp_path), extra={"device": "cpu", "seed": 0})
    (reward,) = build_reward_funcs(["clip_sd3"], rc)
    impl = reward.reward_impl
    calls = []
    original_pipe_call = type(impl.pipe).__call__

    def counting(self, *a, **kw):
        calls.append(len(kw["prompt"]))
        return original_pipe_call(self, *a, **kw)

    monkeypatch.setattr(type(impl.pipe), "__call__", counting)
    prompts = [prompt("a red cat")] * 4 + [prompt("a blue dog")] * 1
    completions = [msgs(t) for t in ("a red cat on a mat", "cat", "red", "a red cat", "a blue dog")]
    out = reward(prompts=prompts, completions=completions, trainer_state=SimpleNamespace(global_step=2),
                 original_prompt=[None, None, None, None, "a blue dog in the park"])
    assert len(out) == 5 and all(-1.0 <= v <= 1.0 for v in out)
    assert calls == [3, 2]  # batched by --sd_batch_size
    index = [json.loads(line) for line in (tmp_path / "reward_images" / "step_000002" / "index.jsonl").open()]
    assert [r["original_prompt"] for r in index] == ["a red cat"] * 4 + ["a blue dog in the park"]
    assert [r["rewrite"] for r in index][0] == "a red cat on a mat"
    assert len(list((tmp_path / "reward_images" / "step_000002").glob("*.png"))) == 5
    # step 3 is not a multiple of 2: nothing saved; the same original + same rewrite -> the same reward (same noise)
    again = reward(prompts=prompts[:1] * 2, completions=[completions[0]] * 2,
                   trainer_state=SimpleNamespace(global_step=3))
    assert again[0] == pytest.approx(again[1], abs=1e-6)  # (batched CPU kernels differ by ~1e-8)
    assert not (tmp_path / "reward_images" / "step_000003").exists()
    frozen = [p.requires_grad for m in (impl.pipe.transformer, impl.pipe.vae, impl.pipe.text_encoder, impl.clip)
              for p in m.parameters()]
    assert frozen and not any(frozen)


@needs_diffusers
def test_reward_models_load_outside_zero3(monkeypatch):
    """Under a ZeRO-3 config transformers would build models inside deepspeed.zero.Init; rewards must not be."""
    from transformers.integrations import deepspeed as hf_ds

    from vltune.rewards.clip_sd3 import outside_zero3

    class FakeZero3:
        def is_zero3(self):
            return True

    keep = FakeZero3()
    hf_ds.set_hf_deepspeed_config(keep)
    try:
        assert hf_ds.is_deepspeed_zero3_enabled()
        with outside_zero3():
            assert not hf_ds.is_deepspeed_zero3_enabled()
        assert hf_ds.is_deepspeed_zero3_enabled()
    finally:
        hf_ds.unset_hf_deepspeed_config()
