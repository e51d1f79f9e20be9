"""chunk_size: 1 (one Dagster step per item) says what it costs when validated."""

from __future__ import annotations

import pytest

from batch_defs.loader import load_batch
from batch_defs.workers import validate_notes
from tests.conftest import inline_items, write_batch

pytestmark = pytest.mark.unit


def _batch(tmp_path, options: dict):
    return load_batch(write_batch(tmp_path, {
        "name": "steps", "source": inline_items(3),
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms"}}],
        "options": options}))


def test_chunk_size_one_is_noted_with_its_cost_and_line(tmp_path):
    notes = [str(note) for note in validate_notes(_batch(tmp_path, {"chunk_size": 1}))]
    assert len(notes) == 1
    assert notes[0].startswith("steps.yaml:") and "options.chunk_size" in notes[0]
    assert "one step at a time" in notes[0] and "chunk_size: auto" in notes[0]


def test_chunks_have_no_note(tmp_path):
    assert validate_notes(_batch(tmp_path, {"chunk_size": 5})) == []
    assert validate_notes(_batch(tmp_path, {})) == []


@pytest.mark.job
def test_one_step_per_item_keeps_every_slot_busy(batch_dir, instance):
    # Dagster's in-process executor runs one step at a time; the engine's slots work ahead
    # into the next steps' items, so they overlap up to the concurrency.
    from tests import handlers
    from tests.conftest import run_batch

    write_batch(batch_dir, {
        "name": "steps", "source": inline_items(24),
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms", "ms": 100}}],
        "options": {"chunk_size": 1, "concurrency": 4}})
    result = run_batch(batch_dir, instance, "steps")
    assert result.success
    assert len(handlers.started) == 24
    assert handlers.max_in_flight == 4
