"""Visual-token compressors: ``score -> select -> aggregate`` (see ``compress.core``).

Importing this package registers every method in ``registry.COMPRESSORS``; each line below is
one method module.
"""

from efficient_mllm.compress import core  # noqa: F401
from efficient_mllm.compress import baselines  # noqa: F401
from efficient_mllm.compress import cls_attention  # noqa: F401
from efficient_mllm.compress import visionzip  # noqa: F401
from efficient_mllm.compress import diversity  # noqa: F401
from efficient_mllm.compress import frequency  # noqa: F401
from efficient_mllm.compress import merging  # noqa: F401
from efficient_mllm.compress import learned  # noqa: F401
from efficient_mllm.compress import text_guided  # noqa: F401
from efficient_mllm.compress import fastv  # noqa: F401
from efficient_mllm.compress import sparsevlm  # noqa: F401
from efficient_mllm.compress import zipvl  # noqa: F401
from efficient_mllm.compress import pmod  # noqa: F401
