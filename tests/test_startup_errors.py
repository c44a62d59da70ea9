"""A deployment that cannot load its model fails with one message naming the setting, visible in /health,
while the service keeps answering Label Studio's health checks."""

import httpx
import pytest

from tests.serve_process import ServeProcess

pytestmark = pytest.mark.serve


def test_missing_checkpoint_fails_the_segmenter_and_says_which_setting(tiny_models, tmp_path):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
           "SAM_CHECKPOINT": "/nonexistent/sam_vit_b.pth"}

    def segmenter_failed(health):
        return health.get("models", {}).get("segmenter", {}).get("status") == "DEPLOY_FAILED"

    process = ServeProcess(env, tmp_path).start(ready=segmenter_failed)
    try:
        health = httpx.get(f"{process.url}/health", timeout=5).json()
        assert health["status"] == "UP"
        assert health["models_ready"] == {"detector": True, "segmenter": False}
        assert "SAM_CHECKPOINT='/nonexistent/sam_vit_b.pth': no such file" in health["models"]["segmenter"]["message"]
        log = process.log_path.read_text(errors="replace")
        # Serve gives up after its retries instead of restarting the replica forever
        assert log.count("SAM_CHECKPOINT='/nonexistent/sam_vit_b.pth': no such file") <= 6
    finally:
        process.stop()
