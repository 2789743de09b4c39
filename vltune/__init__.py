"""vltune: fine-tune vision-language models and the robot policies built on them."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# bitsandbytes warns at import on CPUs with AVX512-BF16 that an optional kernel hub package is absent; harmless.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
# transformers 5.2x renamed gradient_checkpointing -> activation_checkpointing; ms-swift users pass the old name.
_warnings.filterwarnings("ignore", message=r".*(gradient_checkpointing|is_gradient_checkpointing).*deprecated.*",
                         category=FutureWarning)
