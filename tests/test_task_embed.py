"""The `embed` task with the real all-MiniLM-L6-v2 model shipped in a wheel, loaded with no
network: 384-dimension unit vectors whose similarities make sense, also from a batch job."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from batch_defs.tasks import TaskContext, build_handler, embed
from batch_defs.tasks.embed import EmbedParams
from resources.storage import BatchStorageResource
from tests.conftest import run_batch, write_batch

# One xdist group for the tests that load the embedding model: torch loads once.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("embed")]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only localhost, never resolved through DNS here
        return host == "localhost"


@pytest.fixture(scope="module", autouse=True)
def no_network() -> Iterator[None]:
    """Loading and running the model may reach nothing but loopback: no hub, ever."""
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and not is_loopback(str(address[0])):
            raise OSError(f"network access to {address[0]} during an embed test")
        return real_connect(self, address)

    embed._models.clear()  # load the model under the guard
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", connect)
        yield


def context(tmp_path: Path, key: str = "1") -> TaskContext:
    return TaskContext(params={}, batch="docs", partition="p1", run_id="r", phase="embed",
                       key=key, base_dir=tmp_path, output_dir=tmp_path)


def test_embeddings_are_384_dim_unit_vectors_with_meaningful_similarity(tmp_path: Path) -> None:
    handler = build_handler("embed", {"text_field": "body"}, tmp_path)
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.",
             "Quarterly revenue grew by eight percent."]
    vectors = [np.array(handler({"body": t}, context(tmp_path))["embedding"]) for t in texts]
    assert all(v.shape == (384,) for v in vectors)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    cat_kitten, cat_revenue = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert cat_kitten > 0.5 > cat_revenue
    again = handler({"body": texts[0]}, context(tmp_path))["embedding"]
    assert np.allclose(again, vectors[0], atol=1e-6)  # deterministic


def test_text_template_output_field_and_errors(tmp_path: Path) -> None:
    handler = build_handler("embed", {"text": "{{ title }}: {{ body }}",
                                      "output_field": "vec", "normalize": False}, tmp_path)
    output = handler({"title": "Cats", "body": "they purr"}, context(tmp_path))
    assert list(output) == ["vec"] and len(output["vec"]) == 384
    assert all(isinstance(x, float) for x in output["vec"])
    by_field = build_handler("embed", {"text_field": "body"}, tmp_path)
    with pytest.raises(ValueError, match="text_field 'body' is missing or null"):
        by_field({"title": "no body"}, context(tmp_path))
    with pytest.raises(ValidationError, match="exactly one of 'text_field'"):
        EmbedParams.model_validate({"text_field": "a", "text": "{{ b }}"})
    with pytest.raises(ValueError, match="model_path models/none: no such folder"):
        build_handler("embed", {"text_field": "a", "model_path": "models/none"}, tmp_path)


@pytest.mark.job
def test_batch_embeds_items_concurrently_and_exports_parquet(
        batch_dir: Path, instance: dg.DagsterInstance) -> None:
    docs = [f"Document number {i} is about {topic}." for i, topic in
            enumerate(["cats", "dogs", "stocks", "bonds", "rain", "snow"] * 3)]
    write_batch(batch_dir, {
        "name": "docs",
        "source": {"type": "inline", "key": "id",
                   "items": [{"id": i, "text": t} for i, t in enumerate(docs)]},
        "phases": [{"name": "embed", "task": "embed", "params": {"text_field": "text"}}],
        "after": [{"task": "export", "params": {"formats": ["parquet"]}}],
        "options": {"concurrency": 4},
    })
    result = run_batch(batch_dir, instance, "docs")
    assert result.success
    rows = BatchStorageResource().ledger(instance).rows(result.run_id)
    assert len(rows) == 18 and set(rows["status"]) == {"succeeded"}
    # Threads shared one model: each vector equals a fresh, single-threaded encoding.
    single = build_handler("embed", {"text_field": "text"}, batch_dir)
    for row in rows.itertuples():
        stored = json.loads(row.output)
        expected = single(stored, context(batch_dir, row.item_key))["embedding"]
        assert np.allclose(stored["embedding"], expected, atol=1e-5)
    export = BatchStorageResource().output_root(instance, "docs") / "p1" / "export.parquet"
    table = pd.read_parquet(export)
    assert list(table.columns) == ["item_key", "id", "text", "embedding"]
    assert len(table) == 18 and {len(v) for v in table["embedding"]} == {384}
