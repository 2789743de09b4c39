"""Imported at start-up by every Python process of a benchmark run (this folder is put on
PYTHONPATH by benchmarks/sft_throughput.py; `swift sft` re-launches Python, so an import hook in
the launching script alone would not reach the training process). Nothing is imported eagerly:
two post-import hooks act when (and if) transformers gets imported.

1. VLTUNE_BENCH_TRACE=file.json: every `transformers.Trainer` gets a callback that records, per
   optimizer step, the wall time at its end, the samples / non-pad tokens / trained tokens of its
   batches (read where the Trainer fetches them, `get_batch_samples`), each logged loss, and at the
   end the peak CUDA memory. The same code measures all four tools.
3. VLTUNE_BENCH_STUB_MODULES="importer:missing,...": while module `importer` is being executed, a
   stub stands in for `missing` if that is not installed (ms-swift's qwen-vl-utils imports
   torchvision at the top, LLaMA-Factory's mm_plugin torchaudio; neither loads beside the CPU torch
   2.13.0 and both are only used for video/audio). The stub is removed from sys.modules right
   after, so transformers' own availability checks never see it.
2. VLTUNE_BENCH_REGISTER_PROCESSOR=1: registers an image-only Qwen2.5-VL processor with
   AutoProcessor under the class name saved in the benchmark model (transformers' Qwen-VL video
   processors need torchvision, which does not load beside the CPU torch 2.13.0). vltune has its
   own fallback and runs without this.
"""

import importlib.abc
import json
import os
import sys
import time


def _install_trace(trainer_module):
    path = os.environ.get("VLTUNE_BENCH_TRACE")
    if not path:
        return
    from transformers.trainer_callback import TrainerCallback

    Trainer = trainer_module.Trainer
    original_init = Trainer.__init__

    class _Trace(TrainerCallback):
        def __init__(self):
            self.pending = []  # per-batch 0-dim tensors (kept lazy: no extra device sync per step)
            self.steps = []  # (global_step, wall time at step end, [tensors])
            self.losses = {}
            self.t_begin = None

        def on_train_begin(self, args, state, control, **kw):
            self.t_begin = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append((state.global_step, time.time(), self.pending))
            self.pending = []

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses[int(state.global_step)] = float(logs["loss"])

        def on_train_end(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            rows = []
            for step, t, batches in self.steps:
                vals = [[float(x) for x in b] for b in batches]
                rows.append({"step": step, "t": t, "samples": sum(v[0] for v in vals),
                             "tokens": sum(v[1] for v in vals), "trained": sum(v[2] for v in vals),
                             "padded": sum(v[3] for v in vals), "fp": sum(v[4] for v in vals)})
            out = {"t_begin": self.t_begin, "t_end": time.time(), "steps": rows, "losses": self.losses,
                   "trainer": type(kw.get("model", None)).__name__, "pid": os.getpid()}
            try:
                import torch

                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
                    out["cuda_peak_reserved"] = torch.cuda.max_memory_reserved()
            except Exception:
                pass
            with open(path, "w") as f:
                json.dump(out, f)

    import functools

    @functools.wraps(original_init)  # keep the signature: ms-swift inspects Trainer.__init__'s parameters
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        trace = _Trace()
        self.add_callback(trace)
        fetch = self.get_batch_samples

        def get_batch_samples(*a, **k):
            batches, n_items = fetch(*a, **k)
            for b in batches:
                try:
                    ids = b["input_ids"]
                    mask = b.get("attention_mask")
                    labels = b.get("labels")
                    tokens = mask.sum() if mask is not None and mask.dim() == 2 else ids.numel()
                    n = ids.shape[0]
                    pos = b.get("position_ids")
                    if mask is None and pos is not None:  # a padding-free row: samples = position restarts
                        n = ((pos[0] if pos.dim() == 3 else pos) == 0).sum()
                    trained = (labels != -100).sum() if labels is not None else 0
                    # data-order fingerprint: sum of the non-pad ids (independent of padding side)
                    fp = (ids * mask).sum() if mask is not None and mask.dim() == 2 else ids.sum()
                    trace.pending.append((n, tokens, trained, ids.numel(), fp))
                except Exception:
                    trace.pending.append((0, 0, 0, 0, 0))
            return batches, n_items

        self.get_batch_samples = get_batch_samples

    Trainer.__init__ = __init__


def _install_processor(auto_module):
    if os.environ.get("VLTUNE_BENCH_REGISTER_PROCESSOR") != "1":
        return
    AutoProcessor = auto_module.AutoProcessor
    original = AutoProcessor.from_pretrained.__func__
    done = []

    def from_pretrained(cls, *args, **kwargs):
        if not done:
            done.append(_register(AutoProcessor))
        return original(cls, *args, **kwargs)

    AutoProcessor.from_pretrained = classmethod(from_pretrained)


def _register(AutoProcessor):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2_5_VLImageProcessorOnly(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor without the (torchvision-only) video processor."""

        attributes = ["image_processor", "tokenizer"]  # older transformers read this list
        valid_kwargs = ["chat_template"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            for name, default in (("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
                                  ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>")):
                token = getattr(tokenizer, f"{name}_token", None) or default
                setattr(self, f"{name}_token", token)
                setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageProcessorOnly, exist_ok=True)
    return True


class _Stub(type(sys)):
    """A stand-in module: any attribute is another stub; calling one raises."""

    def __init__(self, name):
        super().__init__(name)
        self.__version__ = "0.0.0+vltune-bench-stub"
        self.__path__ = []

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self.__name__}.{attr}")

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self.__name__} is a stub in this benchmark venv (not installable beside torch 2.13.0 CPU)")


_STUB_SUBMODULES = {"torchvision": ["io", "transforms", "transforms.functional"], "torchaudio": ["functional"]}


def _stub_hooks():
    by_importer = {}
    for item in filter(None, os.environ.get("VLTUNE_BENCH_STUB_MODULES", "").split(",")):
        importer, missing = item.split(":")
        by_importer.setdefault(importer, []).append(missing)
    return {importer: (lambda ms=tuple(ms): _add_stubs(ms), _remove_stubs) for importer, ms in by_importer.items()}


def _add_stubs(missing_modules):
    import importlib.machinery
    import importlib.util

    added = []
    for missing in missing_modules:
        if missing in sys.modules or importlib.util.find_spec(missing) is not None:
            continue
        names = [missing] + [f"{missing}.{s}" for s in _STUB_SUBMODULES.get(missing, [])]
        for n in names:
            m = _Stub(n)
            m.__spec__ = importlib.machinery.ModuleSpec(n, None)
            sys.modules[n] = m
            added.append(n)
        for n in names[1:]:  # parent.attr -> submodule
            parent, _, child = n.rpartition(".")
            setattr(sys.modules[parent], child, sys.modules[n])
    return added


def _remove_stubs(added):
    for n in added or []:
        sys.modules.pop(n, None)


class _PostImport(importlib.abc.MetaPathFinder):
    """Run hooks around the execution of a module (first import only): hooks[name] is either
    post(module) or (pre() -> state, post_state(state))."""

    def __init__(self, hooks):
        self.hooks = dict(hooks)

    def find_spec(self, name, path, target=None):
        if name not in self.hooks:
            return None
        hook = self.hooks.pop(name)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def run(module):
            if isinstance(hook, tuple):
                state = hook[0]()
                try:
                    exec_module(module)
                finally:
                    hook[1](state)
                return
            exec_module(module)
            try:
                hook(module)
            except Exception as e:  # never break the tool being measured
                print(f"[vltune-bench sitecustomize] hook for {name} failed: {e!r}", file=sys.stderr)

        spec.loader.exec_module = run
        return spec


if (os.environ.get("VLTUNE_BENCH_TRACE") or os.environ.get("VLTUNE_BENCH_REGISTER_PROCESSOR")
        or os.environ.get("VLTUNE_BENCH_STUB_MODULES")):
    sys.meta_path.insert(0, _PostImport({
        "transformers.trainer": _install_trace,
        "transformers.models.auto.processing_auto": _install_processor,
        **_stub_hooks(),
    }))
