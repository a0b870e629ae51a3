import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from hypothesis import settings  # noqa: E402

# Property tests run in CI on 2 cores: enough examples to find shape bugs, no flaky deadlines.
settings.register_profile("course", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("course")
