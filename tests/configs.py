"""Labeling configs used across tests."""

SEED_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <RectangleLabels name="label" toName="image"><Label value="cats" background="yellow"/><Label value="house" background="blue"/></RectangleLabels>
  <BrushLabels name="label2" toName="image"><Label value="cats" background="yellow"/><Label value="house" background="blue"/></BrushLabels>
</View>"""

PREDICTED_VALUES_CONFIG = """<View>
  <Image name="img" value="$picture"/>
  <Number name="box_threshold" toName="img" defaultValue="0.05"/>
  <RectangleLabels name="boxes" toName="img" model_score_threshold="0.2">
    <Label value="Cat" predicted_values="kitten,tabby cat"/>
    <Label value="Car"/>
  </RectangleLabels>
</View>"""

BOXES_ONLY_ONE_LABEL = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="object"/></RectangleLabels>
</View>"""

CLICK_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="tag2" toName="image" smart="true"><Label value="cats" smart="true" background="#000000" showInline="true"/></KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true"><Label value="cats" background="#000000" showInline="true"/></RectangleLabels>
  <BrushLabels name="tag" toName="image"><Label value="cats" background="#FF0000"/><Label value="house" background="#0d14d3"/></BrushLabels>
</View>"""

POLYGON_CLICK_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <KeyPointLabels name="clicks" toName="image" smart="true"><Label value="cats" smart="true"/></KeyPointLabels>
  <PolygonLabels name="outline" toName="image"><Label value="cats"/><Label value="house"/></PolygonLabels>
</View>"""

# Exemplar prompts (docs/interactive.md): boxes drawn with the `exemplar` control are "more like this"; with NOT
# selected beside the class label, "not this". Boxes drawn with `label` still mean "segment this".
EXEMPLAR_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  <RectangleLabels name="exemplar" toName="image" smart="true" smartOnly="true" choice="multiple">
    <Label value="cats"/><Label value="house"/><Label value="NOT" background="#000000"/>
  </RectangleLabels>
  <RectangleLabels name="label" toName="image"><Label value="cats"/><Label value="house"/></RectangleLabels>
  <BrushLabels name="mask" toName="image"><Label value="cats"/><Label value="house"/></BrushLabels>
</View>"""


def drawn_box(region_id: str, x: float, y: float, width: float, height: float, labels: list[str], *,
              control: str = "exemplar", image_size: tuple[int, int] = (64, 48)) -> dict:
    """A box drawn with a RectangleLabels control, as Label Studio 1.23's editor puts it in params.context.result
    (percent of the image; `image_size` is the original width and height)."""
    return {"original_width": image_size[0], "original_height": image_size[1], "image_rotation": 0,
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0, "rectanglelabels": labels},
            "id": region_id, "from_name": control, "to_name": "image", "type": "rectanglelabels", "origin": "manual"}
