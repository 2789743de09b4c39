"""Padding-free batches and bin packing for SFT (`vltune sft --padding_free true` / `--packing true`).

A padded batch of real GUI data (screenshots of several sizes, one to many turns, short and long answers)
spends much of its compute on pad tokens. Here every batch becomes ONE row of the samples' tokens laid end to
end, with no padding, and the samples still never see each other:

- positions restart at 0 for every sample. For the Qwen-VL families (mRoPE) the 3-D positions of each sample
  come from the model's own `get_rope_index` (run on the padded batch, pads then dropped), and a 4th row of
  plain text positions is put in front, `(4, 1, N)`: transformers' Qwen-VL text models split that row off and
  hand it to the mask builder and the attention layers. Idefics3 (a Llama text model) gets `(1, N)`.
- no attention mask is passed. Then transformers finds the sample boundaries from where the text positions
  restart: `masking_utils.find_packed_sequence_indices` gives sdpa / eager a block-diagonal causal mask, and
  the flash-attention integration takes the same positions to its variable-length kernel (cu_seqlens). So the
  same batch is exact on CPU, on Apple MPS and on GPUs with or without flash-attn.
- labels: the first token of every sample is never a target (otherwise the previous sample's last token would
  be trained to predict it), and `shift_labels` (the target of each kept position) is given explicitly.
  With a model that takes `logits_to_keep`, logits are computed only at the positions whose next token is
  trained (an index tensor), which saves most of the lm_head + cross-entropy work on large vocabularies.

`--packing` also regroups the samples: first-fit-decreasing bin packing into packs of at most
`--packing_length` tokens, never splitting a sample (so never an image span); a training batch is then
`--per_device_train_batch_size` packs, flattened as above. `--padding_free` keeps the usual batches of
samples and only drops their padding.
"""

from __future__ import annotations

import logging
import random

import torch

from .dataset import SFTCollator, SFTDataset
from .template import IGNORE_INDEX

logger = logging.getLogger("vltune")

# Token-level keys of the processor's output: (B, T) tensors that are flattened with the tokens.
TOKEN_KEYS = ("input_ids", "mm_token_type_ids", "token_type_ids")


# ---------------------------------------------------------------------------- bin packing
def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: indices of `lengths` grouped into packs of at most `capacity` tokens.

    A sample is never split; one longer than `capacity` is an error (the caller drops those first).
    Packs come out in the order they were opened (longest first sample first).
    """
    if capacity <= 0:
        raise ValueError(f"packing length must be positive, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"{len(too_long)} sample(s) longer than the packing length {capacity} "
                         f"(e.g. sample {too_long[0]}: {lengths[too_long[0]]} tokens)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free: list[int] = []  # room left in each pack
    for i in order:
        n = lengths[i]
        for k, room in enumerate(free):  # first fit: O(samples x packs), fine for data sets of ~1e5
            if n <= room:
                packs[k].append(i)
                free[k] -= n
                break
        else:
            packs.append([i])
            free.append(capacity - n)
    return packs


class PackedDataset(torch.utils.data.Dataset):
    """Packs of validated samples: item k = the samples of pack k (decoded as `SFTDataset` decodes them).

    The Trainer's sampler shuffles the packs; the samples inside a pack are shuffled once, with `seed`.
    """

    def __init__(self, dataset: SFTDataset, capacity: int, seed: int = 0):
        if dataset.lengths is None:
            raise ValueError("packing needs the token length of every sample")
        self.dataset = dataset
        self.capacity = capacity
        rng = random.Random(seed)
        self.packs = pack_lengths(dataset.lengths, capacity)
        for p in self.packs:
            rng.shuffle(p)
        self.lengths = [sum(dataset.lengths[i] for i in p) for p in self.packs]

    @property
    def runtime_skips(self) -> list[str]:
        return self.dataset.runtime_skips

    def load_skips(self):
        return self.dataset.load_skips()

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, idx: int) -> dict:
        return {"pack": [self.dataset[i] for i in self.packs[idx]]}

    def fill(self) -> float:
        """Share of the packs' token capacity that holds real tokens."""
        return sum(self.lengths) / max(1, len(self.packs) * self.capacity)


# ---------------------------------------------------------------------------- padding-free collation
def find_rope_index(model):
    """The model's own mRoPE position function (`get_rope_index` of the Qwen-VL families), or None.

    Looked up on the (PEFT-unwrapped) model and its submodules, so it works for
    `Qwen*VLForConditionalGeneration` (the method lives on its `.model`) and for a PEFT wrapper.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in base.modules():
        fn = getattr(module, "get_rope_index", None)
        if callable(fn):
            return fn
    return None


class PaddingFreeCollator:
    """Flatten a batch of samples (or of packs of samples) into one padding-free row; see the module docstring.

    Args:
        processor: the model's processor.
        rope_index: the model's `get_rope_index` (mRoPE families; `find_rope_index(model)`), None for 1-D RoPE.
        keep_trained_logits: pass `logits_to_keep` = the positions whose next token is trained (the model's
            forward must accept `logits_to_keep`).
    """

    def __init__(self, processor, loss_scale: str = "default", rope_index=None, keep_trained_logits: bool = False,
                 train_separator: bool = False):
        # The samples are encoded by the padded collator (chat template, processor, assistant-only labels),
        # right-padded and with every logit kept; the pads are then dropped here.
        self.encoder = SFTCollator(processor, loss_scale, logits_to_keep=False, train_separator=train_separator)
        self.rope_index = rope_index
        self.keep_trained_logits = keep_trained_logits

    def __call__(self, features: list[dict]) -> dict:
        samples = [s for f in features for s in (f["pack"] if "pack" in f else [f])]
        out = self.encoder(samples)
        mask = out.pop("attention_mask").bool()  # (B, T); no mask in the packed batch: see the module docstring
        lengths = mask.sum(1)
        batch: dict = {}
        if self.rope_index is not None:
            with torch.no_grad():
                rope, _ = self.rope_index(
                    input_ids=out["input_ids"], mm_token_type_ids=out.get("mm_token_type_ids"),
                    image_grid_thw=out.get("image_grid_thw"), attention_mask=mask.long())
        text_positions = torch.cat([torch.arange(int(n)) for n in lengths])[None]  # (1, N), restarts per sample
        labels = out.pop("labels")
        labels[:, 0] = IGNORE_INDEX  # a sample's first token is never predicted from the previous sample
        for key, value in out.items():
            if key in TOKEN_KEYS:
                batch[key] = value[mask][None]  # row-major: the samples' tokens in order, pads dropped
            elif key.startswith("pixel_") and torch.is_tensor(value) and value.dim() >= 4 \
                    and value.shape[0] == mask.shape[0]:
                # Idefics3-style per-sample image stacks (B, images, ...): one stack for the single row, in the
                # same order as the image tokens (the model drops the all-zero padding images).
                batch[key] = value.reshape(1, -1, *value.shape[2:])
            else:  # Qwen-VL pixel_values (patches, dim) and image_grid_thw (images, 3) are already flat
                batch[key] = value
        flat_labels = labels[mask][None]  # (1, N)
        shift = torch.full_like(flat_labels, IGNORE_INDEX)
        shift[:, :-1] = flat_labels[:, 1:]  # target of position p = label of p + 1
        if self.rope_index is not None:
            batch["position_ids"] = torch.cat([text_positions[None], rope[:, mask][:, None]], 0)  # (4, 1, N)
        else:
            batch["position_ids"] = text_positions
        batch["labels"] = flat_labels
        # With a KV cache the mask builder skips packed-sequence detection (and a model whose config says
        # use_cache=True makes one even in training): the samples would then attend to each other.
        batch["use_cache"] = False
        if self.keep_trained_logits:
            keep = (shift[0] != IGNORE_INDEX).nonzero()[:, 0]
            batch["logits_to_keep"] = keep
            batch["shift_labels"] = shift[:, keep]
        else:
            batch["shift_labels"] = shift
        return batch


# ---------------------------------------------------------------------------- length picture
def pad_share(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Share of a padded batch's tokens that are padding, for random batches of `batch_size` samples
    (each batch padded to its longest sample, as the Trainer's shuffled batches are)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    real = padded = 0
    for k in range(0, len(order), batch_size):
        chunk = [lengths[i] for i in order[k:k + batch_size]]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - real / max(1, padded)


def length_histogram(lengths: list[int], bins: int = 10, width: int = 40) -> list[str]:
    """Text histogram of token counts: one line per bin, `lo-hi  count  ####`."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * (-(-(hi - lo + 1) // step))
    for n in lengths:
        counts[(n - lo) // step] += 1
    top = max(counts)
    lines = []
    for k, c in enumerate(counts):
        a, b = lo + k * step, min(hi, lo + (k + 1) * step - 1)
        lines.append(f"{a:>6}-{b:<6} {c:>7}  {'#' * max(1 if c else 0, round(width * c / top))}")
    return lines
