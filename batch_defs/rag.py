"""Retrieval context for `llm` phases: a corpus split into passages, embedded once with the
embed task's local model (cached on disk by content hash), and the top-k passages per item."""

from __future__ import annotations

import hashlib
import os
import re
import textwrap
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from batch_defs.tasks.base import TaskParams

if TYPE_CHECKING:  # numpy loads with the first vectors: a batch file that names a context is
    import numpy as np  # checked (its retriever made) by every process that loads the batches

DOCUMENT_SUFFIXES = (".md", ".txt", ".rst")
CACHE_FOLDER = ".context_cache"  # under the batch's output folder: shared by its runs


class ContextParams(TaskParams):
    """`context:` of an llm phase: where the documents are and how many passages to add."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # A folder (each .md/.txt/.rst file a document), a data file (.jsonl, .csv, .json,
    # .parquet) or a source spec such as {type: jsonl, path: ..., key: id}.
    from_: str | dict[str, Any] = Field(alias="from")
    top_k: int = Field(default=4, ge=1, le=50)
    query: str | None = None  # template over the item; default: the rendered prompt
    text_field: str = "text"  # data files and sources: the field holding the text
    id_field: str | None = None  # default: the source's key, else the row number
    passage_chars: int = Field(default=1000, ge=100)
    output_field: str | None = None  # default: <phase>_context (the passages' ids)
    model_path: str | None = None  # as the embed task's: default the bundled model


@dataclass(frozen=True)
class Passage:
    id: str  # <document id>#<n>, n counting from 1 in the document
    text: str


def split_passages(doc_id: str, text: str, max_chars: int) -> list[Passage]:
    """Paragraphs, short ones grouped up to `max_chars`; a longer paragraph is split between
    sentences (a sentence longer still, between words)."""
    pieces = [piece for paragraph in re.split(r"\n\s*\n", text)
              for piece in _pieces(paragraph.strip(), max_chars)]
    passages: list[str] = []
    for piece in pieces:
        if passages and len(passages[-1]) + 2 + len(piece) <= max_chars:
            passages[-1] = f"{passages[-1]}\n\n{piece}"
        else:
            passages.append(piece)
    return [Passage(f"{doc_id}#{n}", body) for n, body in enumerate(passages, start=1)]


def _pieces(paragraph: str, max_chars: int) -> list[str]:
    if len(paragraph) <= max_chars:
        return [paragraph] if paragraph else []
    units = [u for sentence in re.split(r"(?<=[.!?])\s+", paragraph)
             for u in (textwrap.wrap(sentence, max_chars) if len(sentence) > max_chars
                       else [sentence])]
    pieces: list[str] = []
    for unit in units:
        if pieces and len(pieces[-1]) + 1 + len(unit) <= max_chars:
            pieces[-1] = f"{pieces[-1]} {unit}"
        else:
            pieces.append(unit)
    return pieces


def _source_spec(params: ContextParams) -> Any:
    from batch_defs.loader import FILE_TYPES
    from batch_defs.spec import SourceSpec

    raw = params.from_
    if isinstance(raw, str):
        file_type = FILE_TYPES.get(Path(raw).suffix.lower())
        if file_type is None:
            raise ValueError(f"context.from {raw}: not a folder nor a data file "
                             f"({', '.join(sorted(FILE_TYPES))})")
        raw = {"type": file_type, "path": raw}
    try:
        return TypeAdapter(SourceSpec).validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"context.from.{where}: {first['msg']}") from exc


def read_documents(params: ContextParams, base_dir: Path) -> list[tuple[str, str]]:
    """(document id, text) of the corpus, in a stable order."""
    from batch_defs.env import resolve_path
    from batch_defs.sources import SourceError, read_source

    if is_folder(params.from_):
        assert isinstance(params.from_, str)
        try:
            folder = resolve_path(params.from_, base_dir)
        except SourceError as exc:
            raise ValueError(f"context.from: {exc}") from exc
        if not folder.is_dir():
            raise ValueError(f"context.from {params.from_}: no such folder")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in DOCUMENT_SUFFIXES)
        return [(p.relative_to(folder).as_posix(), p.read_text(encoding="utf-8"))
                for p in files]
    spec = _source_spec(params)
    id_field = params.id_field or spec.key
    documents = []
    try:
        for record in read_source(spec, base_dir):
            if record.data is None:
                raise ValueError(f"context.from row {record.row}: {record.error}")
            text = record.data.get(params.text_field)
            if not isinstance(text, str):
                raise ValueError(f"context.from row {record.row}: no text in field "
                                 f"{params.text_field!r}")
            doc_id = record.data.get(id_field) if id_field else record.row
            documents.append((str(doc_id if doc_id is not None else record.row), text))
    except SourceError as exc:
        raise ValueError(f"context.from: {exc}") from exc
    return documents


class EmbeddingCache:
    """Vectors by content hash in one .npz file; processes take turns through a file lock."""

    def __init__(self, folder: Path, model: str):
        tag = hashlib.sha256(model.encode()).hexdigest()[:12]
        self.path = folder / f"embeddings-{tag}.npz"
        self.lock = FileLock(str(folder / f"embeddings-{tag}.lock"))
        self.model = model

    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model}\0{text}".encode()).hexdigest()

    def vectors(self, texts: list[str], encode: Any) -> np.ndarray:
        """One vector per text: cached ones loaded, the others encoded (once) and stored."""
        import numpy as np

        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = [self.key(t) for t in texts]
        with self.lock:
            known = self._load()
            missing = sorted({k: t for k, t in zip(keys, texts, strict=True)
                              if k not in known}.items())
            if missing:
                fresh = encode([t for _, t in missing])
                known.update({k: np.asarray(v, dtype=np.float32)
                              for (k, _), v in zip(missing, fresh, strict=True)})
                self._save(known)
        return np.stack([known[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)

    def _load(self) -> dict[str, np.ndarray]:
        import numpy as np

        if not self.path.exists():
            return {}
        with np.load(self.path) as data:
            return dict(zip(data["keys"].tolist(), data["vectors"], strict=True))

    def _save(self, known: dict[str, np.ndarray]) -> None:
        import numpy as np

        partial = self.path.with_suffix(".partial.npz")
        np.savez(partial, keys=np.array(list(known)), vectors=np.stack(list(known.values())))
        os.replace(partial, self.path)


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # cosine similarity (vectors are unit length)


class PassageIndex:
    """The corpus's passages and their unit vectors; top-k by cosine similarity."""

    def __init__(self, passages: list[Passage], vectors: np.ndarray):
        self.passages, self.vectors = passages, vectors

    def top(self, query: np.ndarray, k: int) -> list[Hit]:
        import numpy as np

        if not self.passages:
            return []
        scores = self.vectors @ np.asarray(query, dtype=np.float32)
        # Stable order for equal scores: the corpus's own order.
        best = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k]
        return [Hit(self.passages[i], round(float(scores[i]), 6)) for i in best]


class Retriever:
    """The context of one phase: its index is built on first use, once per process."""

    def __init__(self, params: ContextParams, base_dir: Path):
        from batch_defs.tasks.embed import check_model, model_identity

        self.params, self.base_dir = params, base_dir
        self.model_path = check_model(params.model_path, base_dir, "context")
        self.model = model_identity(self.model_path)
        if not is_folder(params.from_):
            _source_spec(params)  # a wrong source fails when the batch loads
        self._index: PassageIndex | None = None
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        from batch_defs.tasks.embed import encode

        return encode(texts, self.model_path)

    def index(self, cache_dir: Path) -> PassageIndex:
        with self._lock:
            if self._index is None:
                passages = [passage for doc_id, text in read_documents(self.params,
                                                                       self.base_dir)
                            for passage in split_passages(doc_id, text,
                                                          self.params.passage_chars)]
                cache = EmbeddingCache(cache_dir / CACHE_FOLDER, self.model)
                self._index = PassageIndex(passages, cache.vectors(
                    [p.text for p in passages], self.encode))
            return self._index

    def search(self, query: str, cache_dir: Path) -> list[Hit]:
        index = self.index(cache_dir)
        return index.top(self.encode([query])[0], self.params.top_k)


def is_folder(source: str | dict[str, Any]) -> bool:
    """A path without a file suffix names a folder of documents (read when the run starts)."""
    return isinstance(source, str) and not Path(source.rstrip("/")).suffix


def context_block(hits: Iterable[Hit]) -> str:
    """The passages as the prompt's first paragraphs, each under its id."""
    return "\n\n".join(f"[{hit.passage.id}] {hit.passage.text}" for hit in hits)
