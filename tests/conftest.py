"""Suite-wide settings. Hubs are unreachable here: fail fast instead of retrying for ~47 s."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

