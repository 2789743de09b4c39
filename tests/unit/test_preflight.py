"""seeds/03: a broken LoRA setup is caught before step 1 with an explanation, never the bare autograd error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vltune.args import ModelArguments, TunerArguments
from vltune.data.dataset import SFTCollator, SFTDataset
from vltune.data.formats import read_dataset
from vltune.models.load import load_model
from vltune.models.preflight import GradientFlowError, check_gradient_flow
from vltune.models.tuners import apply_tuner, enable_gradient_checkpointing


@pytest.fixture
def lora_setup(tiny_path, processor_for, grounding_jsonl):
    path = tiny_path("qwen3_vl")
    model = apply_tuner(load_model(path, ModelArguments(model=path)), TunerArguments(train_type="lora"))
    samples, _ = read_dataset(grounding_jsonl)
    batch = SFTCollator(processor_for("qwen3_vl"))([SFTDataset(samples)[i] for i in range(2)])
    return model, batch


def test_healthy_lora_with_checkpointing_passes(lora_setup):
    model, batch = lora_setup
    enable_gradient_checkpointing(model)
    norms = check_gradient_flow(model, batch)
    assert set(norms) == {"llm (LoRA)"} and norms["llm (LoRA)"] > 0
    assert all(p.grad is None for p in model.parameters()), "the preflight must leave no gradients behind"


def test_reentrant_checkpointing_with_frozen_embeddings_is_explained(lora_setup):
    """The exact seeds/03 failure: reentrant checkpointing, frozen embeddings, no input-grad hook."""
    model, batch = lora_setup
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.disable_input_require_grads()
    with pytest.raises(RuntimeError, match="does not require grad") as bare:  # what the user saw
        model.train()
        model(**batch).loss.backward()
    assert "element 0 of tensors" in str(bare.value)
    with pytest.raises(GradientFlowError) as err:
        check_gradient_flow(model, batch)
    msg = str(err.value)
    assert "use_reentrant=True" in msg and "input-grad hook: absent" in msg
    assert "use_reentrant\": false" in msg and "enable_input_require_grads" in msg


def test_trainable_part_outside_the_loss_is_named(lora_setup):
    """A head that is trainable but never reached by the loss (seeds/03's LSTM suspicion) is named."""
    model, batch = lora_setup
    model.base_model.model.unused_head = nn.Linear(4, 4)
    with pytest.raises(GradientFlowError, match=r"groups without gradient: other \(full\)"):
        check_gradient_flow(model, batch)


def test_nothing_trainable_is_explained(lora_setup):
    model, batch = lora_setup
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(GradientFlowError, match="no parameter requires grad"):
        check_gradient_flow(model, batch)


def test_preflight_does_not_change_the_rng_stream(lora_setup):
    model, batch = lora_setup
    torch.manual_seed(3)
    check_gradient_flow(model, batch)
    a = torch.rand(3)
    torch.manual_seed(3)
    b = torch.rand(3)
    assert torch.equal(a, b)
