"""Exemplar boxes as prompts: "find every object like this one" (positive) or "not like this" (negative).

Each exemplar serves the phrase of its label: a phrase typed in the prompt box with that label gets the exemplars
as well (text and boxes in one prompt, so an object found by both is one detection), and a label with exemplars but
no phrase gets a phrase of its own whose text is empty (the exemplars alone are the prompt). The regions found carry
the exemplar's label. Which detector families take exemplars is the catalog's `exemplars` column.
"""

from __future__ import annotations

import numpy as np

from serve_app.ingress.context import Exemplar
from serve_app.ingress.errors import BadRequest
from serve_app.ingress.label_config import NEGATIVE_EXEMPLAR_LABEL, ProjectConfig
from serve_app.ingress.prompts import Phrase, Prompt

NOT_SUPPORTED = ("exemplar boxes need a detector that takes visual prompts: SAM 3 (DETECTOR_MODEL=facebook/sam3, "
                 "PIPELINE=concept or auto) or OWLv2 (DETECTOR_MODEL=google/owlv2-base-patch16-ensemble, masks from "
                 "SEGMENTER_MODEL); {detector} does not (docs/models.md lists which families do)")


def exemplar_prompt(exemplars: tuple[Exemplar, ...], typed: Prompt | None, config: ProjectConfig,
                    max_phrases: int) -> tuple[Prompt, tuple[int, ...]]:
    """The phrases to search (the typed ones, then one per exemplar label without a phrase) and, per exemplar,
    the index of the phrase it serves."""
    classes = {config.aliases.get(e.label.lower(), "") for e in exemplars if e.label is not None}
    labels = []
    for exemplar in exemplars:
        if exemplar.label is None:  # only the negative marker selected: the class of the request's other boxes
            only = classes if len(classes) == 1 else set(config.labels) if len(config.labels) == 1 else set()
            if len(only) != 1:
                raise BadRequest(f"a negative exemplar needs its class label selected beside "
                                 f"{NEGATIVE_EXEMPLAR_LABEL!r} (labels: {', '.join(config.labels[:50])})")
            labels.append(next(iter(only)))
            continue
        label = config.aliases.get(exemplar.label.lower())
        if label is None:
            raise BadRequest(f"the exemplar label {exemplar.label[:100]!r} is not a label of the labeling config "
                             f"(labels: {', '.join(config.labels[:50])})")
        labels.append(label)
    phrases = list(typed.phrases) if typed is not None else []
    index_of: dict[str, int] = {}
    for i, phrase in enumerate(phrases):
        index_of.setdefault(phrase.label, i)
    for label in dict.fromkeys(labels):
        if label not in index_of:
            index_of[label] = len(phrases)
            phrases.append(Phrase("", label))
    for label in dict.fromkeys(labels):
        positive = any(e.positive for e, l in zip(exemplars, labels) if l == label)
        if not positive and not phrases[index_of[label]].text:
            raise BadRequest(f"the exemplars of {label[:100]!r} are all negative: draw a positive exemplar or type a "
                             f"phrase for {label[:100]!r} too (negatives only say what to leave out)")
    if len(phrases) > max_phrases:
        raise BadRequest(f"the prompt and exemplars make {len(phrases)} phrases; the limit is {max_phrases} "
                         "(MAX_PHRASES)")
    warnings = typed.warnings if typed is not None else ()
    return Prompt(tuple(phrases), "prompt", warnings), tuple(index_of[label] for label in labels)


def exemplar_arrays(exemplars: tuple[Exemplar, ...], phrase_ids: tuple[int, ...], width: int,
                    height: int) -> dict[str, np.ndarray]:
    """DetectionRequest's exemplar fields, in pixels of one task's image."""
    return {"exemplar_boxes": np.array([e.in_pixels(width, height) for e in exemplars], np.float32).reshape(-1, 4),
            "exemplar_labels": np.array([int(e.positive) for e in exemplars], np.int64),
            "exemplar_phrases": np.array(phrase_ids, np.int64)}
