"""Field limits of the log-inputs and log-model bodies (see the README's manifest format)."""

from __future__ import annotations

import re

RUN_ID_PATTERN = re.compile(r"[a-zA-Z0-9][\w\-]{0,255}")

DATASET_LIMITS: dict[str, int] = {
    "name": 500,
    "digest": 36,
    "source": 65_535,
    "source_type": 36,
    "schema": 1_048_575,
    "profile": 16_777_215,
}
DATASET_REQUIRED = ("name", "digest", "source", "source_type")
TAG_KEY_MAX = 255
TAG_VALUE_MAX = 500
MODEL_JSON_REQUIRED = ("artifact_path", "flavors", "utc_time_created", "run_id")
RETRY_TOKEN_MAX = 64
