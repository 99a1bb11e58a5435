"""Ray is an optional extra: the embedded default (API, jobs, pipeline, CLI) never imports it."""

import subprocess
import sys


def test_embedded_default_does_not_import_ray():
    code = (
        "import sys\n"
        "import service.cli, service.api.app, service.jobs.worker, service.jobs.fit\n"
        "import service.pipeline.embedding, service.pipeline.fitting, service.cli.score\n"
        "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
