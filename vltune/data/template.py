"""Chat-template rendering and assistant-only labels, for any processor.

The family's own chat template renders the conversation. Each assistant turn is
rendered as a sentinel first, so the character span of its text is known
exactly; the span is then extended over the end-of-turn token that the
template writes after it (`<|im_end|>`, `<end_of_utterance>`, ...), and with `train_separator` over the
newline that follows it too (what ms-swift, LLaMA-Factory and TRL train). After the
processor has expanded the image placeholders, the spans are shifted by the
replacement offsets it reports and mapped onto tokens through the tokenizer's
offset mapping. Labels are the input ids on those tokens and -100 elsewhere, so
the loss covers exactly the assistant text + its end token, whatever the family.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from .errors import DataError
from .formats import Sample, message_text

IGNORE_INDEX = -100
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<end_of_utterance>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")
_SENTINEL = "\ue000{}\ue001"


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans to train on (assistant text + end token [+ newline])


def _template_messages(sample: Sample) -> list[dict]:
    out = []
    for i, m in enumerate(sample.messages):
        if m["role"] == "assistant":
            content = [{"type": "text", "text": _SENTINEL.format(i)}]
        else:
            content = [dict(p) for p in m["content"]]
        out.append({"role": m["role"], "content": content})
    return out


def trained_turns(sample: Sample, loss_scale: str = "default") -> list[int]:
    """Indices of the assistant messages whose text is trained.

    loss_scale: "default" = every assistant turn; "last_round" = only the final assistant turn.
    A message with "loss": false is never trained; "loss": true forces it in "last_round" mode.
    """
    assistant = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"]
    if loss_scale == "last_round":
        chosen = {i for i in assistant if sample.messages[i].get("loss") is True}
        if assistant:
            chosen.add(assistant[-1])
    elif loss_scale == "default":
        chosen = set(assistant)
    else:
        raise ValueError(f"loss_scale must be 'default' or 'last_round', got {loss_scale!r}")
    return sorted(i for i in chosen if sample.messages[i].get("loss") is not False)


def render(sample: Sample, processor, loss_scale: str = "default", add_generation_prompt: bool = False,
           train_separator: bool = False) -> Rendered:
    """Render `sample` with the processor's chat template; return the text and the spans to train
    (train_separator: also the newline the template writes right after the end token)."""
    trained = set(trained_turns(sample, loss_scale))
    templated = processor.apply_chat_template(
        _template_messages(sample), tokenize=False, add_generation_prompt=add_generation_prompt)
    tokenizer = getattr(processor, "tokenizer", processor)
    ends = [t for t in (getattr(tokenizer, "eos_token", None), *END_OF_TURN_CANDIDATES) if t]
    text, spans, pos = [], [], 0
    out_len = 0
    for i, m in enumerate(sample.messages):
        if m["role"] != "assistant":
            continue
        sentinel = _SENTINEL.format(i)
        at = templated.find(sentinel, pos)
        if at < 0:
            raise DataError(f"the chat template dropped assistant message {i}", sample.where)
        chunk = templated[pos:at]
        text.append(chunk)
        out_len += len(chunk)
        content = message_text(m)
        start = out_len
        text.append(content)
        out_len += len(content)
        pos = at + len(sentinel)
        end = out_len
        following = templated[pos:pos + 33]
        for tok in ends:
            if following.startswith(tok):
                end += len(tok)
                if train_separator and following[len(tok):len(tok) + 1] == "\n":
                    end += 1
                break
        if i in trained:
            spans.append((start, end))
    text.append(templated[pos:])
    return Rendered("".join(text), spans)


def prompt_text(sample: Sample, processor) -> str:
    """The generation prompt: the conversation up to (without) its final assistant turn."""
    msgs = [{"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in sample.prompt_only().messages]
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def labels_from_spans(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                      replacements: list[dict] | None) -> list[int]:
    """Labels for one sequence: token ids overlapping `spans` (shifted past expanded images), else -100."""
    replacements = replacements or []
    ends = [r["span"][1] for r in replacements]
    gained, total = [0], 0
    for r in replacements:
        total += (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
        gained.append(total)
    shifted = sorted((s + gained[bisect.bisect_right(ends, s)], e + gained[bisect.bisect_right(ends, e - 1)])
                     for s, e in spans)
    labels = [IGNORE_INDEX] * len(input_ids)
    if not shifted:
        return labels
    starts = [s for s, _ in shifted]
    for pos, (tok_start, tok_end) in enumerate(offsets):
        if tok_end <= tok_start:  # padding / zero-width tokens
            continue
        k = bisect.bisect_right(starts, tok_end - 1) - 1
        if k >= 0 and tok_start < shifted[k][1] and tok_end > shifted[k][0]:
            labels[pos] = input_ids[pos]
    return labels
