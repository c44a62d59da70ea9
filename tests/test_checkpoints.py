"""Checkpoint sources through the real download code, against a loopback HTTP server."""

from __future__ import annotations

import hashlib
import http.server

import pytest
import torch

from serve_app.models.checkpoints import cached_path, resolve_checkpoint
from serve_app.models.errors import CheckpointError, ModelLoadError
from serve_app.models.grounding_dino import GroundingDinoDetector
from serve_app.models.segmenter import SamSegmenter
from tests.loopback import loopback_http
from tests.serve_process import free_port


class CheckpointServer(http.server.BaseHTTPRequestHandler):
    payload = b""
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).hits.append(self.path)
        if self.path == "/missing.pth":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        if self.path.startswith("/cut/"):  # the connection drops halfway through
            self.wfile.write(self.payload[: len(self.payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def checkpoint_bytes(tiny_models):
    return tiny_models["sam"].read_bytes()


@pytest.fixture(scope="module")
def server(checkpoint_bytes):
    CheckpointServer.payload = checkpoint_bytes
    with loopback_http(CheckpointServer) as url:
        yield url


def test_url_is_downloaded_once_and_loaded(server, tmp_path, checkpoint_bytes):
    url = f"{server}/weights/sam-tiny.pth"
    CheckpointServer.hits.clear()
    sha = hashlib.sha256(checkpoint_bytes).hexdigest()
    first = resolve_checkpoint(url, "SAM_CHECKPOINT", tmp_path, sha256=sha)
    second = resolve_checkpoint(url, "SAM_CHECKPOINT", tmp_path, sha256=sha)
    assert first == second == cached_path(url, tmp_path)
    assert first.read_bytes() == checkpoint_bytes
    assert CheckpointServer.hits == ["/weights/sam-tiny.pth"]  # the second call used the cache
    segmenter = SamSegmenter.load(url, device="cpu", cache_dir=str(tmp_path))
    assert segmenter.sam.image_encoder.img_size == 256


def test_interrupted_download_leaves_nothing_usable(server, tmp_path, checkpoint_bytes):
    url = f"{server}/cut/sam.pth"
    with pytest.raises(CheckpointError, match=r"MOBILESAM_CHECKPOINT: (cannot download|the download of)"):
        resolve_checkpoint(url, "MOBILESAM_CHECKPOINT", tmp_path)
    directory = cached_path(url, tmp_path).parent
    assert not cached_path(url, tmp_path).exists()
    assert not list(directory.glob("*.part"))


@pytest.mark.parametrize("path, message", [
    ("/missing.pth", "SAM_CHECKPOINT: downloading .* answered HTTP 404"),
])
def test_http_errors_name_the_setting(server, tmp_path, path, message):
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(f"{server}{path}", "SAM_CHECKPOINT", tmp_path)


def test_unreachable_host_names_the_setting(tmp_path):
    with pytest.raises(CheckpointError, match="SAM_CHECKPOINT: cannot download .*ConnectError"):
        resolve_checkpoint(f"http://127.0.0.1:{free_port()}/sam.pth", "SAM_CHECKPOINT", tmp_path, timeout_s=5)


def test_sha256_mismatch_is_refused(server, tmp_path):
    with pytest.raises(CheckpointError, match="SAM_CHECKPOINT: .* does not have the expected sha256"):
        resolve_checkpoint(f"{server}/ok.pth", "SAM_CHECKPOINT", tmp_path, sha256="0" * 64)


def test_missing_local_file_and_wrong_layout(tmp_path):
    with pytest.raises(CheckpointError, match="SAM_CHECKPOINT='/nope/sam.pth': no such file"):
        resolve_checkpoint("/nope/sam.pth", "SAM_CHECKPOINT")
    wrong = tmp_path / "wrong.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}, wrong)
    with pytest.raises(CheckpointError, match="SAM_CHECKPOINT: .* does not fit SAM vit_b: missing keys"):
        SamSegmenter.load(str(wrong), device="cpu")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="SAM_CHECKPOINT: .*garbage.pth is not a readable PyTorch state dict"):
        SamSegmenter.load(str(tmp_path / "garbage.pth"), device="cpu")


def test_offline_start_without_the_model_names_model_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as info:
        GroundingDinoDetector.load("IDEA-Research/grounding-dino-tiny", device="cpu")
    message = str(info.value)
    assert "DETECTOR_MODEL='IDEA-Research/grounding-dino-tiny'" in message
    assert "HF_HUB_OFFLINE" in message and str(tmp_path / "hf") in message


def test_a_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a transformers detector model"):
        GroundingDinoDetector.load(str(tmp_path), device="cpu")


def test_download_command_prefetches_the_configured_checkpoint(server, tiny_models, tmp_path, monkeypatch, capsys):
    from serve_app.cli import main

    url = f"{server}/prefetch/mobile_sam.pt"
    monkeypatch.setenv("GROUNDING_DINO_MODEL", str(tiny_models["grounding_dino"]))
    monkeypatch.setenv("USE_MOBILE_SAM", "true")
    monkeypatch.setenv("MOBILESAM_CHECKPOINT", url)
    monkeypatch.setenv("CHECKPOINT_CACHE_DIR", str(tmp_path))
    assert main(["download"]) == 0
    assert cached_path(url, tmp_path).is_file()
    assert f"MOBILESAM_CHECKPOINT: {cached_path(url, tmp_path)}" in capsys.readouterr().out


def test_a_full_disk_names_the_setting_and_leaves_nothing(server, tmp_path):
    url = f"{server}/full/sam.pth"
    target = cached_path(url, tmp_path)
    target.parent.mkdir(parents=True)
    # writes into the .part file land on /dev/full, which fails every write with ENOSPC
    (target.parent / (target.name + ".part")).symlink_to("/dev/full")
    with pytest.raises(CheckpointError, match="SAM_CHECKPOINT: the disk is full .* set CHECKPOINT_CACHE_DIR"):
        resolve_checkpoint(url, "SAM_CHECKPOINT", tmp_path)
    assert not target.exists()


def test_presigned_checkpoint_urls_never_show_their_signature(server, tmp_path):
    """Start-up errors reach the open /health (models.<name>.message): no query string, no password."""
    for url in (f"{server}/cut/sam.pth?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA",
                f"http://user:s3cr3t@127.0.0.1:{free_port()}/sam.pth?sig=s3cr3t"):
        with pytest.raises(CheckpointError) as info:
            resolve_checkpoint(url, "SAM_CHECKPOINT", tmp_path, timeout_s=5)
        assert "s3cr3t" not in str(info.value) and "AKIA" not in str(info.value)
        assert "/sam.pth" in str(info.value)
