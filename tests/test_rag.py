"""Retrieval context for `llm` phases with the real local embedding model: the right passages
of a small fixed corpus (tests/data/rag_corpus) for questions whose answer is in a known
document, embedded once and cached by content hash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from batch_defs import rag
from batch_defs.tasks import TaskContext, build_handler, embed
from resources.llm import LlmResource
from resources.storage import BatchStorageResource
from tests.conftest import PROJECT, run_batch, write_batch

# One xdist group for the tests that load the embedding model: torch loads once.
pytestmark = pytest.mark.xdist_group("embed")

CORPUS = PROJECT / "tests" / "data" / "rag_corpus"
QUESTIONS = [json.loads(line) for line in
             (PROJECT / "tests" / "data" / "rag_questions.jsonl").read_text().splitlines()]
# Where each question's answer is: the document, and the paragraph (passage) within it.
EXPECTED = {"q1": "lighthouse.md#2", "q2": "sourdough.md#2", "q3": "bicycle.md#1",
            "q4": "payroll.md#1", "q5": "volcano.md#2", "q6": "bicycle.md#2"}


class EchoChat:
    """An OpenAI-compatible answer that echoes nothing: it only keeps the prompts."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, request: Request) -> Response:
        body = request.get_json()
        self.prompts.append(body["messages"][-1]["content"])
        return Response(json.dumps({
            "choices": [{"message": {"role": "assistant", "content": "an answer"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        }), content_type="application/json")


@pytest.fixture
def echo_llm(httpserver_ipv4: HTTPServer) -> tuple[EchoChat, str]:
    chat = EchoChat()
    httpserver_ipv4.expect_request("/v1/chat/completions").respond_with_handler(chat)
    return chat, httpserver_ipv4.url_for("/v1")


def context(tmp_path: Path, base_url: str, key: str) -> TaskContext:
    return TaskContext(params={}, batch="qa", partition="p1", run_id="r", phase="answer",
                       key=key, base_dir=tmp_path, output_dir=tmp_path / "out",
                       resources={"llm": LlmResource(base_url=base_url, model="m", api_key="")})


PARAMS = {"prompt": "Answer the question from the context.\n\n{{ question }}",
          "context": {"from": str(CORPUS), "top_k": 2, "query": "{{ question }}",
                      "passage_chars": 200}}


@pytest.mark.unit
def test_documents_split_into_numbered_passages() -> None:
    text = (CORPUS / "lighthouse.md").read_text()
    passages = rag.split_passages("lighthouse.md", text, 200)
    assert [p.id for p in passages] == ["lighthouse.md#1", "lighthouse.md#2"]
    assert passages[0].text.startswith("# Harbour lighthouse\n\nThe harbour lighthouse")
    assert passages[1].text.startswith("The keeper's logbook records")
    # Shorter passages: paragraphs split between sentences, never inside a word.
    short = rag.split_passages("lighthouse.md", text, 100)
    assert all(len(p.text) <= 100 for p in short) and len(short) == 6
    assert short[3].text == "The keeper's logbook records that the light was automated in 1986."
    assert " ".join(p.text for p in short[1:3]) == text.split("\n\n")[1].strip()
    whole = rag.split_passages("d", text, 1000)
    assert [p.id for p in whole] == ["d#1"] and whole[0].text.count("\n\n") == 2


@pytest.mark.integration
def test_the_right_passages_reach_the_prompt_and_the_output(
        tmp_path: Path, echo_llm: tuple[EchoChat, str]) -> None:
    chat, base_url = echo_llm
    handler = build_handler("llm", PARAMS, tmp_path)
    found = {}
    for question in QUESTIONS:
        result = handler(question, context(tmp_path, base_url, question["id"]))
        ids = result.output["answer_context"]
        assert len(ids) == 2
        found[question["id"]] = ids[0]
        assert ids[0].split("#")[0] == question["answer_in"]
    assert found == EXPECTED
    prompt = chat.prompts[0]
    # The passages come first, each under its id; the question stays the prompt's last words.
    assert prompt.startswith("Context passages:\n\n[lighthouse.md#2] The keeper's logbook")
    assert prompt.endswith("\n\nAnswer the question from the context.\n\n"
                           + QUESTIONS[0]["question"])


@pytest.mark.integration
def test_corpus_is_embedded_once_and_cached_by_content_hash(
        tmp_path: Path, echo_llm: tuple[EchoChat, str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, base_url = echo_llm
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("bicycle.md", "payroll.md"):
        (corpus / name).write_text((CORPUS / name).read_text())
    encoded: list[str] = []
    real = embed.encode

    def counting(texts: list[str], *args: Any, **kwargs: Any) -> Any:
        encoded.extend(texts)
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(embed, "encode", counting)
    params = {**PARAMS, "context": {**PARAMS["context"], "from": str(corpus)}}
    question = {"question": "What tyre pressure does a road bike need?"}
    first = build_handler("llm", params, tmp_path)
    first(question, context(tmp_path, base_url, "a"))
    first(question, context(tmp_path, base_url, "b"))
    passages = 4  # 2 passages in each of the 2 documents
    assert len(encoded) == passages + 2  # the corpus once, then one query per item
    # Another process (a new handler) finds every passage in the cache: queries only.
    encoded.clear()
    build_handler("llm", params, tmp_path)(question, context(tmp_path, base_url, "c"))
    assert encoded == [question["question"]]
    # A changed document: only its new passage is embedded.
    (corpus / "payroll.md").write_text((CORPUS / "payroll.md").read_text()
                                       + "\nBonuses are paid in December.\n")
    encoded.clear()
    build_handler("llm", params, tmp_path)(question, context(tmp_path, base_url, "d"))
    assert encoded == ["Expense claims submitted by the 10th are reimbursed with the same "
                       "month's salary; later claims wait for the next payroll run.\n\n"
                       "Bonuses are paid in December.", question["question"]]
    assert len(list((tmp_path / "out" / rag.CACHE_FOLDER).glob("*.npz"))) == 1


@pytest.mark.unit
def test_bad_context_settings_fail_when_the_batch_loads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="context.from notes.docx: not a folder nor a data "
                                         "file"):
        build_handler("llm", {"prompt": "x", "context": {"from": "notes.docx"}}, tmp_path)
    with pytest.raises(ValueError, match="top_k"):
        build_handler("llm", {"prompt": "x", "context": {"from": "d.jsonl", "top_k": 0}},
                      tmp_path)


@pytest.mark.job
@pytest.mark.integration
def test_batch_records_the_passage_ids_from_a_jsonl_corpus(
        batch_dir: Path, instance: dg.DagsterInstance, echo_llm: tuple[EchoChat, str]) -> None:
    _, base_url = echo_llm
    notes = batch_dir / "notes.jsonl"
    notes.write_text("".join(json.dumps({"slug": p.stem, "body": p.read_text()}) + "\n"
                             for p in sorted(CORPUS.glob("*.md"))))
    write_batch(batch_dir, {
        "name": "qa",
        "source": {"type": "inline", "key": "id", "items": QUESTIONS},
        "phases": [{"name": "answer", "task": "llm", "params": {
            "prompt": "{% for p in context %}({{ p.id }}) {{ p.text }}\n{% endfor %}"
                      "Q: {{ question }}",
            "context": {"from": {"type": "jsonl", "path": "notes.jsonl", "key": "slug"},
                        "text_field": "body", "top_k": 1, "query": "{{ question }}",
                        "output_field": "sources"}}}],
    })
    config = {"resources": {"llm": {"config": {"base_url": base_url, "api_key": ""}}}}
    result = run_batch(batch_dir, instance, "qa", run_config=config)
    assert result.success
    rows = BatchStorageResource().ledger(instance).rows(result.run_id)
    sources = {r.item_key: json.loads(r.output)["sources"] for r in rows.itertuples()}
    expected_docs = {q["id"]: q["answer_in"].removesuffix(".md") for q in QUESTIONS}
    assert {k: v[0].split("#")[0] for k, v in sources.items()} == expected_docs


@pytest.mark.job
@pytest.mark.integration
def test_shipped_document_pipeline_uses_the_desks_notes(instance: dg.DagsterInstance,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from batch_defs.loader import PACKAGE_BATCHES
    from tests.test_shipped_batches import load_script

    server = load_script("fake_llm_server").start("127.0.0.1", 0)
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        result = run_batch(PACKAGE_BATCHES, instance, "document_pipeline")
    finally:
        server.shutdown()
        server.server_close()
    assert result.success
    rows = BatchStorageResource().ledger(instance).rows(result.run_id, phase="summarize")
    desks = {"Batteries": "energy-desk", "Rivers": "rivers-desk", "Compilers": "software-desk",
             "Bread": "food-desk", "Satellites": "space-desk", "Chess": "games-desk"}
    for row in rows.itertuples():
        output = json.loads(row.output)
        assert output["summarize_context"][0] == f"{desks[output['title'].split()[0]]}#1"
        assert output["summarize_quality"]["score"] == 0.9
