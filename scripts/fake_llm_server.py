"""A tiny OpenAI-compatible chat completions server for running the llm batches locally.

It answers deterministically, without any model: a JSON request gets the document's topic and
keywords (its most frequent long words), a text request the first sentence of the prompt's
last paragraph (of the first user message: a regenerated attempt, which appends the judge's
feedback, gets the same answer). A judge's request (its system message asks for a "score")
gets 0.9 for an answer of 5 to 60 words, else 0.3 with feedback. Token counts are estimated
(4 characters a token), so costs add up as with a real API. Standard library only.

    python scripts/fake_llm_server.py --port 8089
    export OPENAI_BASE_URL=http://127.0.0.1:8089/v1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STOPWORDS = {"about", "after", "again", "along", "their", "there", "these", "those", "which",
             "while", "with", "within", "three", "between", "document", "return", "keywords",
             "language", "topic", "words", "sentence", "summarise", "extract", "facts"}


def tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def last_paragraph(text: str) -> str:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return paragraphs[-1] if paragraphs else ""


def keywords(text: str, count: int = 5) -> list[str]:
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z-]{4,}", text)]
    ranked = Counter(w for w in words if w not in STOPWORDS).most_common()
    # Ties in first-seen order, so the answer does not depend on hashing.
    return [w for w, _ in sorted(ranked, key=lambda wc: (-wc[1], words.index(wc[0])))][:count]


def judge(prompt: str) -> str:
    """A judge's verdict on the answer (the judge prompt's last paragraph), by its length."""
    words = len(last_paragraph(prompt).split())
    if 5 <= words <= 60:
        return json.dumps({"score": 0.9, "feedback": ""})
    return json.dumps({"score": 0.3, "feedback": "Answer in one sentence of 5 to 60 words."})


def answer(request: dict[str, Any]) -> str:
    messages = request.get("messages") or []
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    if any('"score"' in str(m.get("content", "")) for m in messages
           if m.get("role") == "system"):
        return judge(users[-1] if users else "")
    text = last_paragraph(users[0] if users else "")
    if (request.get("response_format") or {}).get("type") == "json_object":
        words = keywords(text)
        return json.dumps({"topic": " ".join(words[:2]), "keywords": words, "language": "en"})
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return sentence[:300]


def completion(request: dict[str, Any]) -> dict[str, Any]:
    content = answer(request)
    prompt_tokens = sum(tokens(str(m.get("content", ""))) for m in request.get("messages", []))
    completion_tokens = tokens(content)
    return {
        "id": f"chatcmpl-fake-{hashlib.sha256(content.encode()).hexdigest()[:12]}",
        "object": "chat.completion",
        "model": request.get("model", "fake"),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self.reply(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        except ValueError:
            self.reply(400, {"error": {"message": "body is not JSON"}})
            return
        self.reply(200, completion(request))

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a batch makes thousands of requests."""


def start(host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A running server in a background thread (port 0: any free port); shutdown() stops it."""
    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible chat completions")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"fake LLM on http://{args.host}:{server.server_port}/v1 "
          f"(export OPENAI_BASE_URL=http://{args.host}:{server.server_port}/v1)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
