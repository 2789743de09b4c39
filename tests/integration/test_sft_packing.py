"""Padding-free batches and packing through the model and `vltune sft`: the same losses, gradients and
isolation as padded batches, per family; the run logs tokens per step; a missing GPU package is one line."""

from __future__ import annotations

import pytest
import torch

from vltune.data.dataset import SFTCollator
from vltune.data.packing import PaddingFreeCollator, find_rope_index
from vltune.data.template import IGNORE_INDEX

from tests.helpers import FAMILIES, packing_features, packing_rows


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForImageTextToText

    from vltune.models.tiny import tiny_model_path

    cache = {}

    def get(family):
        if family not in cache:
            torch.manual_seed(0)
            m = AutoModelForImageTextToText.from_pretrained(tiny_model_path(family, "xs"), attn_implementation="sdpa")
            cache[family] = m.float().train()  # use_cache stays as saved: the collator must turn it off
        return cache[family]

    return get


def _per_sample_losses_padded(model, batch):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    out = []
    for b in range(labels.shape[0]):
        ce = torch.nn.functional.cross_entropy(logits[b, :-1], labels[b, 1:], reduction="sum", ignore_index=-100)
        out.append(ce / (labels[b, 1:] != IGNORE_INDEX).sum())
    return torch.stack(out)


def _per_sample_losses_flat(model, batch, lengths):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "logits_to_keep")}
    logits = model(**inputs).logits[0]
    shift = batch["shift_labels"][0]
    out, start = [], 0
    for n in lengths:
        ce = torch.nn.functional.cross_entropy(logits[start:start + n], shift[start:start + n], reduction="sum")
        out.append(ce / (shift[start:start + n] != IGNORE_INDEX).sum())
        start += n
    return torch.stack(out), logits


@pytest.mark.parametrize("family", FAMILIES)
def test_flat_batch_same_losses_gradients_and_isolation(family, processor_for, models):
    proc, model = processor_for(family), models(family)
    feats = packing_features(packing_rows())
    padded = SFTCollator(proc)(feats)
    lengths = padded["attention_mask"].sum(1).tolist()
    flat = PaddingFreeCollator(proc, rope_index=find_rope_index(model))(feats)
    assert "attention_mask" not in flat and flat["input_ids"].shape == (1, sum(lengths))
    text_row = flat["position_ids"][0] if flat["position_ids"].dim() == 3 else flat["position_ids"]
    starts = [0] + torch.tensor(lengths).cumsum(0)[:-1].tolist()
    assert (text_row[0, starts] == 0).all() and int((text_row[0] == 0).sum()) == len(lengths)
    if family.startswith("qwen"):
        assert flat["position_ids"].shape[:2] == (4, 1)  # text row + 3-D mRoPE
    with torch.no_grad():
        ref = _per_sample_losses_padded(model, padded)
        got, logits = _per_sample_losses_flat(model, flat, lengths)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

    # The loss the Trainer optimises (model's own, logits kept only where trained) and its gradients.
    keep = PaddingFreeCollator(proc, rope_index=find_rope_index(model), keep_trained_logits=True)(feats)
    assert keep["shift_labels"].shape[1] == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    grads = []
    for batch in (padded, keep):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    model.zero_grad()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys() and len(grads[0][1]) > 10
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-6, msg=name)

    # Changing one sample's answer changes no logit of the other samples in the flat row.
    rows = packing_rows()
    rows[0]["messages"][1]["content"] = "click(999, 1)"
    rows[0]["messages"][0]["content"] = "<image>Click the big blue square now"
    changed = PaddingFreeCollator(proc, rope_index=find_rope_index(model))(packing_features(rows))
    n0 = int(SFTCollator(proc)(packing_features(rows[:1]))["attention_mask"].sum())
    with torch.no_grad():
        inputs = {k: v for k, v in changed.items() if k not in ("labels", "shift_labels")}
        other = model(**inputs).logits[0]
    torch.testing.assert_close(other[n0:], logits[lengths[0]:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other[:n0].mean(), logits[:lengths[0]].mean())


def test_sft_packing_end_to_end_logs_tokens_per_step(tmp_path, tiny_path, monkeypatch):
    from vltune.recipes.sft import main

    # an import inside training (bitsandbytes' torch.compile at import) sets the inductor cache dir: undo it after
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    out = tmp_path / "out"
    res = main(["--model", tiny_path("qwen2_vl"), "--packing", "true", "--max_steps", "2", "--num_samples", "24",
                "--per_device_train_batch_size", "1", "--max_length", "256", "--output_dir", str(out),
                "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
                "--gradient_checkpointing", "false"])
    log = (out / "train.log").read_text()
    assert "tokens per optimizer step" in log and "packing: 24 samples in" in log
    assert res.metrics["train_loss"] > 0


def test_liger_without_package_is_one_line_exit_2(tmp_path, tiny_path, capsys, monkeypatch):
    import importlib.util

    from vltune.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "liger_kernel" else real(n, *a))
    assert main(["sft", "--model", tiny_path("qwen2_vl"), "--use_liger_kernel", "true",
                 "--output_dir", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vltune sft:")]
    assert len(err) == 1 and "--use_liger_kernel" in err[0] and "pip install liger-kernel" in err[0]
