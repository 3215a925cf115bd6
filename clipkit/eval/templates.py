"""Prompt templates for zero-shot classification.

Template sets are lists of strings with a `{c}` placeholder (CLIP_benchmark's convention, rendered with
`template.format(c=classname)`), or per-class prompt lists (CuPL, Pratt et al. 2022: a JSON object
`{classname: [prompt, ...]}`). The named sets come from open_clip's metadata module, not copies of it.
"""

import json
from pathlib import Path
from typing import Dict, List, Sequence, Union

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

PLACEHOLDER = "{c}"
Templates = Union[List[str], Dict[str, List[str]]]


def _from_callables(fns) -> List[str]:
    # open_clip stores its templates as lambdas `lambda c: f"a photo of a {c}."`; calling one with the placeholder
    # itself gives back the template string.
    return [fn(PLACEHOLDER) for fn in fns]


NAMED_TEMPLATES = {
    "openai": lambda: _from_callables(OPENAI_IMAGENET_TEMPLATES),
    "simple": lambda: _from_callables(SIMPLE_IMAGENET_TEMPLATES),
}


def check_templates(templates: Sequence[str], source: str) -> List[str]:
    templates = [t for t in templates if t.strip()]
    if not templates:
        raise ValueError(f"templates {source}: no templates")
    for t in templates:
        if PLACEHOLDER not in t:
            raise ValueError(f"templates {source}: template {t!r} has no {PLACEHOLDER} placeholder for the class name")
        try:
            t.format(c="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"templates {source}: template {t!r} is not a valid format string ({e}); "
                             "write literal braces as {{ and }}") from e
    return list(templates)


def load_templates(spec: str, dataset_templates: List[str] | None = None) -> Templates:
    """`openai` (80 templates), `simple`, `dataset` (the data set's own, e.g. a wds
    zeroshot_classification_templates.txt), `auto` (the data set's own if it has them, else `openai`), a text file with
    one `{c}` template per line, or a JSON file holding a list of templates or a CuPL-style `{classname: [prompts]}`
    object."""
    if spec == "auto":
        spec = "dataset" if dataset_templates else "openai"
    if spec == "dataset":
        if not dataset_templates:
            raise ValueError("--templates dataset: this data set has no templates of its own")
        return check_templates(dataset_templates, "of the data set")
    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec]()
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--templates {spec!r}: not one of {sorted(NAMED_TEMPLATES)}, 'dataset', 'auto', nor a file")
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, list):
            return check_templates([str(t) for t in data], spec)
        if isinstance(data, dict):
            prompts = {str(k): [str(p) for p in v] for k, v in data.items() if isinstance(v, list)}
            if len(prompts) != len(data) or any(not v for v in prompts.values()):
                raise ValueError(f"templates {spec}: a per-class JSON must map each class name to a non-empty list")
            return prompts
        raise ValueError(f"templates {spec}: JSON must be a list of templates or a {{classname: [prompts]}} object")
    with open(path, encoding="utf-8") as f:
        return check_templates([line.strip() for line in f], spec)


def class_prompts(templates: Templates, classnames: Sequence[str]) -> List[List[str]]:
    """The prompts of each class, in class order: templates rendered with the class name, or the per-class lists."""
    if isinstance(templates, dict):
        missing = [c for c in classnames if c not in templates]
        if missing:
            raise ValueError(f"per-class prompts lack {len(missing)} class(es), e.g. {missing[:3]}")
        return [list(templates[c]) for c in classnames]
    return [[t.format(c=c) for t in templates] for c in classnames]
