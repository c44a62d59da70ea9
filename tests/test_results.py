import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from serve_app.ingress.label_config import parse_label_config
from serve_app.ingress.prompts import Phrase
from serve_app.ingress.results import build_prediction
from serve_app.models.messages import Detections
from tests.configs import PREDICTED_VALUES_CONFIG, SEED_CONFIG

PHRASES = (Phrase("brown cat", "cats"), Phrase("house", "house"))


def test_boxes_and_masks_with_labels_in_percent():
    config = parse_label_config(SEED_CONFIG)
    masks = np.zeros((2, 50, 200), bool)
    masks[0, 10:20, 30:60] = True
    prediction = build_prediction(
        config, PHRASES, Detections(boxes=np.array([[20, 5, 120, 45], [0, 0, 200, 50]], np.float32),
                                    scores=np.array([0.9, 0.5], np.float32), phrase_ids=np.array([0, 1])), masks,
        width=200, height=50, model_version="v1")

    rects = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
    brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    assert [r["value"]["rectanglelabels"] for r in rects] == [["cats"], ["house"]]
    assert [r["value"]["brushlabels"] for r in brushes] == [["cats"], ["house"]]
    first = rects[0]["value"]
    assert (first["x"], first["y"], first["width"], first["height"]) == (10.0, 10.0, 50.0, 80.0)
    assert all(r["original_width"] == 200 and r["original_height"] == 50 for r in prediction["result"])
    decoded = decode_rle(brushes[0]["value"]["rle"]).reshape(50, 200, 4)[:, :, 3] > 0
    assert np.array_equal(decoded, masks[0])
    assert prediction["model_version"] == "v1" and abs(prediction["score"] - 0.7) < 1e-6
    assert len({r["id"] for r in prediction["result"]}) == 4
    # Label Studio's own validator accepts every region
    interface = LabelInterface(SEED_CONFIG)
    assert interface.validate_prediction({"result": prediction["result"]})


def test_control_score_threshold_filters():
    config = parse_label_config(PREDICTED_VALUES_CONFIG)  # model_score_threshold=0.2, boxes only
    phrases = (Phrase("kitten", "Cat"),)
    prediction = build_prediction(
        config, phrases, Detections(boxes=np.array([[0, 0, 10, 10], [0, 0, 5, 5]], np.float32),
                                    scores=np.array([0.5, 0.1], np.float32), phrase_ids=np.array([0, 0])), None,
        width=10, height=10, model_version="v")
    assert [r["score"] for r in prediction["result"]] == [0.5]
    assert prediction["result"][0]["from_name"] == "boxes" and prediction["result"][0]["to_name"] == "img"
