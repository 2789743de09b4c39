"""`vltune export --merge_lora` on a Qwen-VL model, loaded the way a user's own script does: plain transformers
in a fresh interpreter that never imports vltune."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import torch

USER_SCRIPT = r"""
import json, sys
from transformers import AutoModelForImageTextToText, AutoProcessor
out = sys.argv[1]
model = AutoModelForImageTextToText.from_pretrained(out)
try:
    processor = AutoProcessor.from_pretrained(out)
    result = {"processor": type(processor).__name__, "has_images": hasattr(processor, "image_processor")}
except Exception as e:  # transformers' own verdict, exactly as the user would meet it
    result = {"error": type(e).__name__, "message": str(e)}
assert not [m for m in sys.modules if m.split(".")[0] == "vltune"]
print(json.dumps({"model": type(model).__name__, **result}))
"""


def test_merged_qwen3_vl_export_loads_with_plain_auto_classes(tmp_path, tiny_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vltune.models.load import load_processor
    from vltune.recipes.export import main as export_main

    base = tiny_path("qwen3_vl")
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForImageTextToText.from_pretrained(base),
                                LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    load_processor(base).save_pretrained(adapter)
    out = export_main(["--adapters", str(adapter), "--merge_lora", "--output_dir", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert err.count("no --model given") <= 1, err  # logged once, not once per look-up

    video = json.loads((out / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen3VLVideoProcessor" and video["processor_class"] == "Qwen3VLProcessor"
    r = subprocess.run([sys.executable, "-c", USER_SCRIPT, str(out)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["model"] == "Qwen3VLForConditionalGeneration"
    if importlib.util.find_spec("torchvision") is not None:
        assert got == {**got, "processor": "Qwen3VLProcessor", "has_images": True}, got
    else:
        # Without torchvision transformers builds no Qwen-VL processor at all (the hub originals neither): the
        # user must meet that reason, not a missing file of ours.
        assert got.get("error") == "ImportError" and "Torchvision" in got["message"], got
        assert "video_preprocessor_config.json" not in got["message"]
