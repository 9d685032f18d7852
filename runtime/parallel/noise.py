"""Import-time messages of optional backends that concern no meshplan user: dropped.

Torch-free, so that the CLI can install the filters before anything imports torchao
(transformers' quantizers import it once it is installed, peft's LoRA too).
"""

from __future__ import annotations

import logging
import re

# What peft's optional backends log at import, none of which concerns LoRA: torchao, each
# compiled extension this torch cannot load (`Failed to load …/_C_mxfp8….so`);
# bitsandbytes, a CPU kernel package that is not installed; torch's pytree, torchao's
# deprecated registration of enums. transformers imports torchao too (its quantizers)
# once it is installed. Only these messages are dropped, by their text.
_NOISE: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("torchao", re.compile(r"^Failed to load .*\.so\b")),
    ("bitsandbytes.backends.cpu.ops", re.compile(r"^Failed to load CPU gemm_4bit_forward from kernels-community")),
    ("torch.utils._pytree", re.compile(r"is an Enum subclass and is now natively supported by torch\.compile")),
)


class _DropNoise(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def quiet_optional_backends() -> None:
    """Drop the import-time messages of peft's optional backends (`_NOISE`) from now on.

    Each filter sits on the very logger that emits its message (a logger's filters see
    only its own records, not its children's); every other message goes through.
    Idempotent."""
    for name, pattern in _NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DropNoise(pattern))

