"""The catalog is the one seam for model families: data only, every row loadable, the docs' table in step with it,
and the graph plan derived from it once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.graph_plan import DETECTOR_DEPLOYMENT, SEGMENTER_DEPLOYMENT, plan_graph
from serve_app.models import catalog
from serve_app.models.loading import loader_class
from serve_app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_the_catalog_and_the_graph_plan_import_neither_torch_nor_transformers():
    code = ("import sys, serve_app.models.catalog, serve_app.models.loading, serve_app.graph_plan; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("family", catalog.FAMILIES, ids=lambda f: f.model_type)
def test_every_row_names_a_class_that_loads_it_for_the_roles_it_claims(family):
    assert family.roles and set(family.roles) <= set(catalog.ROLES)
    cls = loader_class(family)
    assert callable(getattr(cls, "from_spec", None)), f"{family.loader} has no from_spec(spec, family)"
    if catalog.SEGMENTER in family.roles or catalog.CONCEPT in family.roles:
        assert callable(getattr(cls, "segment", None))
    if catalog.DETECTOR in family.roles or catalog.CONCEPT in family.roles:
        assert callable(getattr(cls, "detect", None))
    assert family.licence and family.example


def _model_table_rows() -> list[str]:
    text = (ROOT / "docs" / "models.md").read_text()
    return [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| ---") and not line.startswith("| family")]


@pytest.mark.parametrize("family", catalog.FAMILIES, ids=lambda f: f.model_type)
def test_docs_models_lists_every_family_with_its_licence(family):
    marker = "segment-anything `.pth`" if family.model_type == catalog.SEGMENT_ANYTHING else f"`{family.model_type}`"
    rows = [row for row in _model_table_rows() if marker in row.split("|")[1]]
    assert rows, f"docs/models.md has no table row for {family.name} ({marker})"
    assert any(family.licence in row for row in rows), f"docs/models.md gives {family.name} another licence"


def test_every_family_in_docs_models_is_in_the_catalog():
    named = {name for row in _model_table_rows() for name in re.findall(r"\(`([a-z0-9_-]+)`", row.split("|")[1])}
    named |= {name for row in _model_table_rows() for name in re.findall(r"or `([a-z0-9_-]+)`", row.split("|")[1])}
    assert named and named <= {f.model_type for f in catalog.FAMILIES}, named - {f.model_type for f in catalog.FAMILIES}


def test_only_the_loader_reads_a_checkpoints_config_json():
    readers = [path.relative_to(ROOT).as_posix() for path in (ROOT / "serve_app").rglob("*.py")
               if re.search(r"(json\.load|AutoConfig\.from_pretrained|hf_hub_download)", path.read_text())
               and "config.json" in path.read_text()]
    assert readers == ["serve_app/models/loading.py"]


def _plan(env, model_type):
    return plan_graph(Settings.load({}, env=env), model_type_of=lambda checkpoint: model_type)


def test_the_plan_says_which_deployment_answers_each_role():
    concept = _plan({"DETECTOR_MODEL": "facebook/sam3"}, "sam3_video")
    assert (concept.pipeline, concept.detector.role, concept.segmenter) == ("concept", catalog.CONCEPT, None)
    assert concept.clicks_deployment == DETECTOR_DEPLOYMENT and concept.detector.cache_bytes > 0
    both = _plan({"SEGMENTER_MODEL": "facebook/sam2.1-hiera-large"}, "grounding-dino")
    assert (both.pipeline, both.clicks_deployment) == ("detect+segment", SEGMENTER_DEPLOYMENT)
    assert (both.segmenter.role, both.segmenter.setting, both.detector.cache_bytes) == \
        (catalog.SEGMENTER, "SEGMENTER_MODEL", 0)
    assert both.model_version == "grounded-serve:grounding-dino-tiny+sam2.1-hiera-large"
    boxes = _plan({}, "grounding-dino")
    assert (boxes.pipeline, boxes.clicks_deployment, boxes.process.cpu_share) == ("detect", None, 1)
    mobile = _plan({"USE_MOBILE_SAM": "true", "MODEL_CPU_NICENESS": "7"}, "owlv2")
    assert (mobile.segmenter.sam_model_type, mobile.segmenter.setting) == ("vit_t", "MOBILESAM_CHECKPOINT")
    assert (mobile.process.cpu_niceness, mobile.process.cpu_share) == (7, 2)


def test_a_gated_sam3_hub_id_is_known_by_its_name_when_its_config_cannot_be_read():
    assert _plan({"DETECTOR_MODEL": "facebook/sam3"}, None).pipeline == "concept"
    assert _plan({"DETECTOR_MODEL": "IDEA-Research/grounding-dino-base"}, None).pipeline == "detect"
