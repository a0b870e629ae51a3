import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Triton reads TRITON_INTERPRET once, when it is first imported, and any test module (or a
# library it imports) may be the first. Without a GPU, the kernels run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# Property tests run in CI on 2 cores: enough examples to find shape bugs, no flaky deadlines.
settings.register_profile("course", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("course")
