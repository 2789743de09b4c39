"""`vltune infer` and `vltune export --merge_lora`: answers of a trained adapter, and a merged model that
plain transformers (no vltune import) loads and that answers exactly like base + adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vltune.errors import UsageError

from tests.helpers import write_image

ANSWER = "click(500, 500)"


@pytest.fixture(scope="module")
def constant_adapter(tmp_path_factory, _tiny_cache):
    """A LoRA adapter trained by `vltune sft` to answer ANSWER to every board (150 tiny steps, ~10 s):
    an answer the random base model never gives, so every check below can tell adapter from no adapter."""
    from vltune.data.synthetic import make_grounding_set
    from vltune.recipes.sft import main as sft_main

    root = tmp_path_factory.mktemp("constant")
    made = make_grounding_set(root / "data", n_train=16, n_test=4, seed=1)
    rows = [json.loads(line) for line in Path(made["train"]).read_text().splitlines()]
    for r in rows:
        r["messages"][-1]["content"] = ANSWER
    train = root / "data" / "constant.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 150 tiny steps: 2 threads fighting another busy process were ~15x slower (stack.md)
    try:
        sft_main(["--dataset", str(train), "--output_dir", str(root / "lora"), "--max_steps", "150",
                  "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--lora_dropout", "0",
                  "--per_device_train_batch_size", "2", "--report_to", "none", "--save_strategy", "no",
                  "--logging_steps", "50", "--gradient_checkpointing", "false"])
    finally:
        torch.set_num_threads(threads)
    image = str(root / "data" / "images" / "test_00000.png")
    return {"adapter": str(root / "lora"), "test": made["test"], "image": image}


# ---------------------------------------------------------------------------- infer
def test_single_prompt_cli_prints_the_adapters_answer(constant_adapter):
    proc = subprocess.run([sys.executable, "-m", "vltune", "infer", "--adapters", constant_adapter["adapter"],
                           "--image", constant_adapter["image"], "--prompt", "Click the red circle",
                           "--max_new_tokens", "12"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == ANSWER  # stdout holds the answer only; logs go to stderr


def test_batch_mode_writes_one_line_per_sample_and_reports_bad_ones(constant_adapter, tmp_path):
    from vltune.recipes.infer import main as infer_main

    rows = [json.loads(line) for line in Path(constant_adapter["test"]).read_text().splitlines()]
    for r in rows:  # images are relative to the original data file
        r["images"] = [str(Path(constant_adapter["test"]).parent / p) for p in r["images"]]
    rows[1]["images"] = ["does_not_exist.png"]
    rows[2]["messages"] = rows[2]["messages"][:-1]  # a prompt without a reference answer
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = tmp_path / "preds.jsonl"
    infer_main(["--adapters", constant_adapter["adapter"], "--dataset", str(data), "--output", str(preds),
                "--max_new_tokens", "12", "--batch_size", "3"])
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["where"] for r in lines] == [f"{data}:{i}" for i in range(1, 5)]
    assert "not found" in lines[1]["error"] and "answer" not in lines[1]
    for i in (0, 2, 3):
        assert lines[i]["answer"] == ANSWER, lines[i]
    assert lines[0]["reference"] == rows[0]["messages"][-1]["content"] and lines[2]["reference"] is None
    assert lines[0]["prompt"] == rows[0]["messages"][0]["content"] and lines[0]["prompt"].startswith("<image>")


def test_batch_rows_are_written_as_they_are_answered_with_progress(constant_adapter, tmp_path, monkeypatch,
                                                                    capsys):
    """Issue 13: infer --dataset said nothing until the end and wrote its file at once. Now each batch's rows
    are on disk (flushed) before the next batch is generated, each names what answered, and a progress bar runs."""
    import vltune.generation as generation
    from vltune.recipes.infer import main as infer_main

    preds = tmp_path / "preds.jsonl"
    seen_on_disk = []
    real = generation.generate_answers

    def spy(model, processor, samples, **kw):
        seen_on_disk.append(len(preds.read_text().splitlines()) if preds.exists() else 0)
        return real(model, processor, samples, **kw)

    monkeypatch.setattr(generation, "generate_answers", spy)
    infer_main(["--adapters", constant_adapter["adapter"], "--dataset", constant_adapter["test"], "--output",
                str(preds), "--max_new_tokens", "4", "--batch_size", "1"])
    n = len(Path(constant_adapter["test"]).read_text().splitlines())
    assert n >= 3 and seen_on_disk == list(range(n))
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines) == n and {r["adapter"] for r in lines} == {constant_adapter["adapter"]}
    assert "[infer] answering" in capsys.readouterr().err


def test_without_adapter_the_base_answers_differently(constant_adapter, capsys):
    from vltune.recipes.infer import main as infer_main

    infer_main(["--image", constant_adapter["image"], "--prompt", "Click the red circle", "--max_new_tokens", "12"])
    assert capsys.readouterr().out.strip() != ANSWER


def test_generation_arguments_reach_generate(constant_adapter, monkeypatch, capsys):
    from transformers import GenerationMixin

    from vltune.recipes.infer import main as infer_main

    seen = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    common = ["--adapters", constant_adapter["adapter"], "--image", constant_adapter["image"], "--prompt", "Click"]
    infer_main(common + ["--max_new_tokens", "5"])
    assert seen[-1]["do_sample"] is False and seen[-1]["max_new_tokens"] == 5 and seen[-1]["num_beams"] == 1
    infer_main(common + ["--do_sample", "true", "--temperature", "0.7", "--top_p", "0.9", "--top_k", "5",
                         "--num_beams", "2", "--max_new_tokens", "3"])
    assert {k: seen[-1][k] for k in ("do_sample", "temperature", "top_p", "top_k", "num_beams", "max_new_tokens")} == \
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "num_beams": 2, "max_new_tokens": 3}
    with pytest.raises(UsageError, match="--do_sample"):
        infer_main(common + ["--temperature", "0.7"])


# ---------------------------------------------------------------------------- export --merge_lora
# Runs in a fresh interpreter that never imports vltune: what a user of the exported folder has.
PLAIN_TRANSFORMERS = textwrap.dedent("""
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    import transformers

    out, image_path, prompt = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    saved_class = json.load(open(f"{out}/processor_config.json"))["processor_class"]
    assert hasattr(transformers, saved_class), saved_class
    image = Image.open(image_path).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    # The README's line. Without torchvision (as here) transformers cannot build any Qwen-VL processor (its video
    # processor needs torchvision); the export ships an image-only one that trust_remote_code loads.
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert not [m for m in sys.modules if m.split(".")[0] == "vltune"]
    print(json.dumps(ids.tolist()))
""")


def _greedy_ids(base: str, image: str, prompt: str, adapter: str | None = None) -> list[int]:
    """Greedy token ids of base (+ adapter as an unmerged PeftModel), with vltune's processor and prompt."""
    from transformers import AutoModelForImageTextToText

    from vltune.data.formats import normalize_row
    from vltune.data.images import load_image
    from vltune.data.template import prompt_text
    from vltune.models.load import load_processor

    model = AutoModelForImageTextToText.from_pretrained(base)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    processor = load_processor(base)
    sample = normalize_row({"messages": [{"role": "user", "content": "<image>" + prompt}], "images": [image]})
    inputs = processor(text=[prompt_text(sample, processor)], images=[load_image(image)], return_tensors="pt",
                       add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _run_plain(out: Path, image: str, prompt: str) -> list[int]:
    env = {**os.environ, "HF_MODULES_CACHE": str(out.parent / "hf_modules")}  # trust_remote_code's copy: not ~
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(out), image, prompt],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_merged_model_loads_without_vltune_and_answers_like_base_plus_adapter(constant_adapter, tmp_path, tiny_path):
    from vltune.recipes.export import main as export_main

    out = export_main(["--adapters", constant_adapter["adapter"], "--merge_lora", "--output_dir", str(tmp_path / "m")])
    assert list(out.glob("*.safetensors")) and (out / "chat_template.jinja").exists()
    assert not (out / "adapter_config.json").exists()
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # the image-only processor travels with the export
        assert (out / "processing_image_only.py").is_file()
        assert "import vltune" not in (out / "processing_image_only.py").read_text()
    expected = _greedy_ids(tiny_path("qwen3_vl"), constant_adapter["image"], "Click the red circle",
                           constant_adapter["adapter"])
    got = _run_plain(out, constant_adapter["image"], "Click the red circle")
    assert got == expected
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).decode(got, skip_special_tokens=True) == ANSWER


def test_merge_of_a_random_adapter_on_idefics3_matches_token_for_token(tmp_path, tiny_path):
    """A family whose AutoProcessor loads everywhere: the whole plain-transformers path, processor included.
    The adapter is random (non-zero B), so merged weights differ from the base and must still answer alike."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vltune.models.load import load_processor
    from vltune.recipes.export import main as export_main

    base = tiny_path("idefics3")
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForImageTextToText.from_pretrained(base),
                                LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    load_processor(base).save_pretrained(adapter)  # like `vltune sft`: the processor beside the adapter
    image = write_image(tmp_path / "img.png", color=(30, 60, 220))

    out = export_main(["--model", base, "--adapters", str(adapter), "--merge_lora",
                       "--output_dir", str(tmp_path / "m")])
    expected = _greedy_ids(base, image, "What is this?", str(adapter))
    assert expected != _greedy_ids(base, image, "What is this?"), "the adapter must change the answer"
    assert _run_plain(out, image, "What is this?") == expected


def test_export_refuses_unclear_requests(tmp_path):
    from vltune.recipes.export import main as export_main

    with pytest.raises(UsageError, match="choose one"):
        export_main(["--output_dir", str(tmp_path)])
    with pytest.raises(UsageError, match="adapter_config.json"):
        export_main(["--adapters", str(tmp_path), "--merge_lora", "--output_dir", str(tmp_path / "m")])
