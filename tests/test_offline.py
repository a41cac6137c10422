"""Without a network and without HF_HUB_OFFLINE, a hub id or an ir_datasets download fails at once: one line, exit 2.

No network is made certain by a proxy that refuses every connection (HTTPS_PROXY=http://127.0.0.1:9, the discard
port: nothing listens), which both the hub client and ir_datasets' requests honour, and by empty caches. Each bound is
the script's own start-up (its --help) plus 5 s; huggingface_hub alone would retry for ~25 s.
"""

import os
import subprocess
import sys
import time

from conftest import REPO


def timed(tmp_path, *argv):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "NO_PROXY", "no_proxy")}
    env.update(HF_HOME=str(tmp_path / "hf"), IR_DATASETS_HOME=str(tmp_path / "irds"), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9")  # fmt: skip
    start = time.monotonic()
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    return result, time.monotonic() - start


def assert_one_line_fast(result, seconds, help_seconds, message):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert seconds < help_seconds + 5, (seconds, help_seconds)


def test_a_hub_model_without_network_fails_at_once(tmp_path):
    _, help_seconds = timed(tmp_path, str(REPO / "train.py"), "--help")
    result, seconds = timed(tmp_path, str(REPO / "train.py"), "--model", "minilm", "--output_dir", str(tmp_path / "o"))
    assert_one_line_fast(result, seconds, help_seconds, "microsoft/MiniLM-L12-H384-uncased: cannot load model")


def test_ir_datasets_data_without_network_fails_at_once(tiny_bert, tmp_path):
    _, help_seconds = timed(tmp_path, str(REPO / "evaluate.py"), "--help")
    result, seconds = timed(tmp_path, str(REPO / "evaluate.py"), "--models", tiny_bert, "--data", "dl19",
                            "--output_dir", str(tmp_path / "out"))  # fmt: skip
    assert_one_line_fast(result, seconds, help_seconds, "dl19: cannot load msmarco-passage/trec-dl-2019/judged")
