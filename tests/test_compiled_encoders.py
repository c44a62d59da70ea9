"""COMPILE_ENCODERS (serve_app.models.compiled): a segmenter whose image encoder is compiled by torch.compile before
it serves gives the eager encoder's masks for every batch size without compiling on a request, and a compiler that
fails leaves an eager segmenter that still answers."""

import logging

import numpy as np
import pytest
import torch

from serve_app.graph_plan import plan_graph
from serve_app.models import compiled
from serve_app.models.compiled import CompiledEncoder, compile_mode, halvings
from serve_app.models.messages import SegmentationRequest
from serve_app.models.sam_builders import build_tiny_sam
from serve_app.models.segmenter import SamSegmenter
from serve_app.settings import Settings, SettingsError
from tests.imaging import pattern

LOGIT_TOLERANCE = 1e-4  # a compiled graph may round differently: masks may differ only where a logit is this near 0


def requests_for(images):
    boxes = np.array([[10, 20, 150, 110], [0, 0, 60, 40], [30, 5, 200, 90]], np.float32)
    return [SegmentationRequest(image=image, boxes=boxes, image_key=f"k{n}") for n, image in enumerate(images)]


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters  # an observer only: the service never reads torch's private counters

    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(3)
    return build_tiny_sam()


def test_a_compiled_encoder_gives_the_eager_masks_for_any_batch_and_thread_count_without_compiling_on_a_request(
        tiny_sam, monkeypatch):
    monkeypatch.setattr("serve_app.models.device.usable_cores", lambda: 3)  # compiled for 1 and 3 threads
    compiled_segmenter = SamSegmenter(tiny_sam, torch.device("cpu"), encoder_batch_size=4, compile="on")
    assert compiled_segmenter.encoder.active and compiled_segmenter.encoder.compile_seconds > 0
    assert compiled_segmenter.encoder.thread_counts == (1, 3) and compiled_segmenter.encoder_batch_size == 1
    eager = SamSegmenter(tiny_sam, torch.device("cpu"), encoder_batch_size=4)
    images = [pattern(120, 160, seed=1), pattern(200, 90, seed=2), pattern(64, 256, seed=3), pattern(77, 77, seed=4)]
    before, threads = graphs_compiled(), torch.get_num_threads()
    try:
        # a batch's share of the cores (serve_app.deployments.replica_cores) may be any count: 2 runs on 1
        for share, batch in ((3, images[:3]), (2, images[3:]), (1, images[1:3])):
            torch.set_num_threads(share)
            found, expected = compiled_segmenter.segment(requests_for(batch)), eager.segment(requests_for(batch))
            assert torch.get_num_threads() == share  # the share is back for the rest of the batch
            for got, want in zip(found, expected):
                assert got.masks.shape == want.masks.shape and got.masks.any() and not got.masks.all()
                assert (got.masks != want.masks).mean() < 1e-3
                np.testing.assert_allclose(got.scores, want.scores, atol=LOGIT_TOLERANCE)
    finally:
        torch.set_num_threads(threads)
    assert graphs_compiled() == before
    assert compiled_segmenter.encoder.active  # nothing fell back to eager on the way


def test_a_gpu_encoder_is_compiled_for_any_batch_size(monkeypatch):
    """Off a CPU (thread counts do not matter), batches of 1 and 2 at warm-up make any later batch size reuse a
    graph. A small module stands in for the encoder, on the CPU."""
    encoder = CompiledEncoder(torch.nn.Conv2d(3, 4, 3).forward, "default", "test encoder")
    with torch.inference_mode():
        encoder.warm_up(lambda n: encoder(torch.zeros(n, 3, 16, 16)))
        before = graphs_compiled()
        for size in (3, 7, 1, 2):
            assert encoder(torch.ones(size, 3, 16, 16)).shape == (size, 4, 14, 14)
    assert graphs_compiled() == before and encoder.active


def test_a_compiler_that_fails_at_warm_up_leaves_an_eager_segmenter_that_answers(tiny_sam, monkeypatch, caplog):
    def broken_compile(module, mode=None):
        def run(*args):
            raise RuntimeError("inductor: no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger=compiled.logger.name):
        segmenter = SamSegmenter(tiny_sam, torch.device("cpu"), compile="on")
    assert not segmenter.encoder.active
    assert "torch.compile failed (RuntimeError: inductor: no C++ compiler found)" in caplog.text
    images = [pattern(120, 160, seed=1)]
    expected = SamSegmenter(tiny_sam, torch.device("cpu")).segment(requests_for(images))
    np.testing.assert_array_equal(segmenter.segment(requests_for(images))[0].masks, expected[0].masks)


def test_a_compiled_graph_that_fails_on_a_request_answers_that_request_eagerly(monkeypatch, caplog):
    calls = []

    def flaky_compile(module, mode=None):
        def run(batch):
            calls.append(batch.shape[0])
            if len(calls) == 3:  # warm-up passes, a later shape does not
                raise RuntimeError("inductor: recompilation failed")
            return module(batch) + 1
        return run

    monkeypatch.setattr(compiled.torch, "compile", flaky_compile)
    encoder = CompiledEncoder(torch.nn.Identity().forward, "default", "test encoder")
    encoder.warm_up(lambda n: encoder(torch.zeros(n, 2)))
    assert calls == [1, 2] and encoder.active
    with caplog.at_level(logging.WARNING, logger=compiled.logger.name):
        out = encoder(torch.ones(3, 2))
    torch.testing.assert_close(out, torch.ones(3, 2))  # the eager module's answer, not the graph's
    assert not encoder.active and "running the encoder eagerly from now on" in caplog.text
    assert encoder(torch.ones(1, 2)).sum() == 2 and calls == [1, 2, 3]  # the graph is not tried again


def test_running_out_of_memory_is_the_batchs_error_not_the_compilers(monkeypatch):
    def compile_that_runs_out(module, mode=None):
        def run(batch):
            if batch.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return module(batch)
        return run

    monkeypatch.setattr(compiled.torch, "compile", compile_that_runs_out)
    encoder = CompiledEncoder(torch.nn.Identity().forward, "default", "test encoder")
    with pytest.raises(torch.OutOfMemoryError):
        encoder(torch.zeros(8, 2))
    assert encoder.active and encoder(torch.ones(2, 2)).sum() == 4  # a smaller batch still runs compiled


def test_cuda_graph_outputs_are_copied_before_the_next_replay(monkeypatch):
    """`cudagraphs` (reduce-overhead) replays write into the same output buffers: what the encoder returns, a
    tensor or a transformers ModelOutput of tensors, must be the caller's own copy."""
    from transformers.modeling_outputs import BaseModelOutput

    buffer = torch.zeros(1, 3)

    def replaying_compile(module, mode=None):
        assert mode == "reduce-overhead"

        def run(batch):
            buffer.copy_(batch)
            return BaseModelOutput(last_hidden_state=buffer, hidden_states=(buffer, buffer))
        return run

    monkeypatch.setattr(compiled.torch, "compile", replaying_compile)
    monkeypatch.setattr(compiled.torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    encoder = CompiledEncoder(lambda batch: batch, "reduce-overhead", "test encoder")
    first = encoder(torch.ones(1, 3))
    encoder(torch.full((1, 3), 7.0))
    assert isinstance(first, BaseModelOutput) and first.last_hidden_state.sum() == 3
    assert first.hidden_states[1].sum() == 3 and first.last_hidden_state is not buffer


def test_off_compiles_nothing(tiny_sam, monkeypatch):
    monkeypatch.setattr(compiled.torch, "compile", lambda *a, **k: pytest.fail("torch.compile called"))
    segmenter = SamSegmenter(tiny_sam, torch.device("cpu"))
    assert not segmenter.encoder.active and segmenter.encoder.compile_seconds == 0


def test_cpu_thread_counts_are_the_cores_halved():
    assert halvings(1) == (1,) and halvings(2) == (1, 2) and halvings(3) == (1, 3)
    assert halvings(16) == (1, 2, 4, 8, 16) and halvings(0) == (1,)


def test_cuda_graphs_are_asked_only_of_a_gpu(caplog):
    assert compile_mode("off", torch.device("cuda")) is None
    assert compile_mode("on", torch.device("cpu")) == "default"
    assert compile_mode("cudagraphs", torch.device("cuda")) == "reduce-overhead"
    with caplog.at_level(logging.WARNING, logger=compiled.logger.name):
        assert compile_mode("cudagraphs", torch.device("cpu")) == "default"
    assert "needs a CUDA device" in caplog.text


def test_the_setting_reaches_the_segmenter_and_a_bad_value_is_refused():
    plan = plan_graph(Settings.load({}, env={"USE_MOBILE_SAM": "1", "COMPILE_ENCODERS": "on"}),
                      model_type_of=lambda model: "grounding-dino")
    assert plan.segmenter.compile == "on"
    assert plan_graph(Settings.load({}, env={"USE_SAM": "1"}), lambda model: "grounding-dino").segmenter.compile == "off"
    with pytest.raises(SettingsError, match="COMPILE_ENCODERS must be off, on or cudagraphs, got 'yes'"):
        Settings.load({}, env={"COMPILE_ENCODERS": "yes"})


def test_a_transformers_sam_family_compiles_too(tmp_path, monkeypatch):
    from serve_app.models.hf_segmenter import HfSamSegmenter
    from serve_app.tiny_models.grounding_dino_sam import make_tiny_sam_family

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("serve_app.models.device.usable_cores", lambda: 1)  # one graph: compiling is the slow part
    path = make_tiny_sam_family(tmp_path / "sam", "sam", seed=5)
    eager = HfSamSegmenter.load(str(path), device="cpu")
    compiled_segmenter = HfSamSegmenter(eager.model, eager.processor, eager.family, eager.device, compile="on")
    assert compiled_segmenter.encoder.active
    images = [pattern(480, 640, seed=1), pattern(97, 1203, seed=3)]
    for got, want in zip(compiled_segmenter.segment(requests_for(images)), eager.segment(requests_for(images))):
        assert (got.masks != want.masks).mean() < 1e-3
        np.testing.assert_allclose(got.scores, want.scores, atol=LOGIT_TOLERANCE)


def test_sam3_compiles_its_vision_encoder_for_text_and_clicks(tmp_path, monkeypatch):
    """SAM 3 (PIPELINE=concept) is the Detector replica: its vision encoder, shared by text prompts and clicks."""
    from serve_app.models.messages import DetectionRequest
    from serve_app.models.sam3_concept import Sam3Concept
    from serve_app.tiny_models.sam3 import make_tiny_sam3_video

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("serve_app.models.device.usable_cores", lambda: 1)  # one graph: compiling is the slow part
    path = make_tiny_sam3_video(tmp_path / "sam3_video")
    eager = Sam3Concept.load(str(path), device="cpu")
    compiled_model = Sam3Concept(eager.model, eager.processor, eager.device, tracker=eager.tracker, compile="on")
    assert compiled_model.encoder.active
    image = pattern(90, 160, seed=6)
    found = compiled_model.detect([DetectionRequest(image=image, phrases=["cat", "dog"], box_threshold=0.0)])[0]
    expected = eager.detect([DetectionRequest(image=image, phrases=["cat", "dog"], box_threshold=0.0)])[0]
    assert len(found.boxes) == len(expected.boxes) > 0
    np.testing.assert_allclose(found.boxes, expected.boxes, atol=1e-3)
    click = SegmentationRequest(image=image, boxes=np.zeros((0, 4)), points=np.array([[80.0, 45.0]]),
                                point_labels=np.array([1]))
    got, want = compiled_model.segment([click])[0], eager.segment([click])[0]
    assert (got.masks != want.masks).mean() < 1e-3
    plan = plan_graph(Settings.load({}, env={"DETECTOR_MODEL": str(path), "COMPILE_ENCODERS": "on"}),
                      model_type_of=lambda model: "sam3_video")
    assert plan.pipeline == "concept" and plan.detector.compile == "on"
    grounding = plan_graph(Settings.load({}, env={"COMPILE_ENCODERS": "on"}), lambda model: "grounding-dino")
    assert grounding.detector.compile == "off"  # Grounding DINO's input size follows the image: not compiled
