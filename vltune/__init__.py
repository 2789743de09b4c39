"""vltune: fine-tune vision-language models and the robot policies built on them."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional kernel hub package is absent; harmless.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# With `kernels` installed (transformers 5.25 requires it), that import fetches the kernel through it instead, and
# under HF_HUB_OFFLINE=1 it warns on every command that it skips the hub's publisher check: a line on stderr before
# our one-line errors. Only that message is dropped; other warnings of `kernels` still show.
_logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: not record.getMessage().startswith("Skipping publisher trust check"))
# transformers 5.2x renamed gradient_checkpointing -> activation_checkpointing; ms-swift users pass the old name.
_warnings.filterwarnings("ignore", message=r".*(gradient_checkpointing|is_gradient_checkpointing).*deprecated.*",
                         category=FutureWarning)
