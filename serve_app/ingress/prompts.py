"""From Label Studio's prompt box (or the config's labels) to phrases with labels.

Syntax, as in the prompt box of Label Studio's Grounding DINO example: phrases separated by
".", each optionally suffixed "_<label>". "brown cat_cats. house" looks for "brown cat" and
labels it `cats`, and looks for "house" and labels it `house`.

Rule for phrases without a suffix: the phrase must equal (case-insensitively) a label value or
one of a label's `predicted_values`. If it matches nothing and the config has exactly one label,
that label is used; otherwise the phrase is dropped and named in the response's `warnings`,
because Label Studio rejects labels its config lacks. A suffix that names no label is dropped
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.ingress.errors import BadRequest
from serve_app.ingress.label_config import ProjectConfig

MAX_PROMPT_WARNINGS = 10
MAX_LABELS_NAMED = 50


@dataclass(frozen=True)
class Phrase:
    text: str  # what the detector looks for
    label: str  # the config's label value results carry


@dataclass(frozen=True)
class Prompt:
    phrases: tuple[Phrase, ...]
    source: str  # "prompt" when typed by a user, "labels" when built from the config
    warnings: tuple[str, ...] = ()


def parse_prompt(text: str, config: ProjectConfig, max_chars: int, max_phrases: int) -> Prompt:
    if len(text) > max_chars:
        raise BadRequest(f"the prompt has {len(text)} characters; the limit is {max_chars} (MAX_PROMPT_CHARS)")
    parts = [p.strip() for p in text.replace("\n", ".").split(".")]
    parts = [p for p in parts if p]
    if not parts:
        raise BadRequest("the prompt is empty: type phrases separated by '.', e.g. 'brown cat_cats. house'")

    phrases: dict[Phrase, None] = {}
    dropped: dict[str, str] = {}  # phrase as typed -> why; each distinct phrase once
    only_label = config.labels[0] if len(config.labels) == 1 else None
    for part in dict.fromkeys(parts):
        words, label = part, None
        if "_" in part:
            words, suffix = (s.strip() for s in part.rsplit("_", 1))
            label = config.aliases.get(suffix.lower())
            if label is None:
                dropped[part] = f"{part[:100]!r}: no label {suffix[:100]!r} in the labeling config"
                continue
        else:
            label = config.aliases.get(part.lower(), only_label)
            if label is None:
                dropped[part] = (f"{part[:100]!r} matches no label; add a suffix such as "
                                 f"{part[:100] + '_' + config.labels[0]!r}")
                continue
        if words:
            phrases[Phrase(words.lower(), label)] = None
    if len(phrases) > max_phrases:
        raise BadRequest(f"the prompt has {len(phrases)} phrases; the limit is {max_phrases} (MAX_PHRASES)")
    return Prompt(tuple(phrases), "prompt", _warnings(list(dropped.values()), config.labels))


def _warnings(reasons: list[str], labels: tuple[str, ...]) -> tuple[str, ...]:
    """At most MAX_PROMPT_WARNINGS reasons, then the config's labels named once (at most MAX_LABELS_NAMED):
    a 2,000-label config and a 2 KB prompt must not make a 100 MB answer."""
    if not reasons:
        return ()
    shown = reasons[:MAX_PROMPT_WARNINGS]
    if len(reasons) > len(shown):
        shown.append(f"... and {len(reasons) - len(shown)} more phrases dropped")
    named = ", ".join(label[:100] for label in labels[:MAX_LABELS_NAMED])
    more = f" and {len(labels) - MAX_LABELS_NAMED} more" if len(labels) > MAX_LABELS_NAMED else ""
    return (*shown, f"labels in the config: {named}{more}")


def prompt_from_labels(config: ProjectConfig, max_phrases: int) -> Prompt:
    """Batch "Retrieve predictions" sends no prompt: look for every label and predicted value."""
    phrases = tuple(Phrase(alias, label) for alias, label in config.aliases.items())
    warnings = ()
    if len(phrases) > max_phrases:
        warnings = (f"the config has {len(phrases)} labels and predicted values; only the first "
                    f"{max_phrases} are searched (MAX_PHRASES)",)
    return Prompt(phrases[:max_phrases], "labels", warnings)
