"""What a run leaves beside its weights reads right: the model card's metadata, the loss plot's title."""

import logging

from vltune.eval.plots import loss_plot_title, plot_loss_curve
from vltune.train.run import write_model_card


def test_model_card_has_the_metadata_block_peft_reads_back(tmp_path, caplog):
    from huggingface_hub import ModelCard

    write_model_card(tmp_path, "vltune sft output", ["train type: lora"], "Load with `x`.\n", "args.json",
                     command="sft", library="peft", base_model="/models/tiny qwen")
    # PEFT loads an existing README.md like this each time it saves into the directory (a second run, or a
    # resumed one); without a metadata block huggingface_hub warned "Repo card metadata block was not found".
    with caplog.at_level(logging.WARNING):
        card = ModelCard.load(tmp_path / "README.md")
    assert "metadata block" not in caplog.text
    assert card.data.library_name == "peft" and card.data.base_model == "/models/tiny qwen"
    assert card.data.tags == ["vltune", "vltune-sft"] and "# vltune sft output" in card.text


def test_loss_plot_title_names_what_was_logged(tmp_path):
    train = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.5}]
    evals = [{"step": 5, "eval_loss": 1.2}]
    assert loss_plot_title(train + evals) == "train and eval loss"
    assert loss_plot_title(train) == "train loss"
    assert loss_plot_title(evals).startswith("eval loss") and "--logging_steps" in loss_plot_title(evals)
    assert plot_loss_curve(evals, tmp_path / "loss.png") == str(tmp_path / "loss.png")
    assert plot_loss_curve([], tmp_path / "none.png") is None
