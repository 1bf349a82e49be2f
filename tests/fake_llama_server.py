"""A stand-in for download.llamameta.net: a signed-URL file tree served on 127.0.0.1.

`LlamaMirror` writes the files Meta ships for Llama 2 or Llama 3 (a few KB each, shards that are
real `torch.save`d state dicts, checklists with real md5s) and serves them over HTTP the way
CloudFront does for the parts download.sh relies on: 403 without the right signature, Range
requests answered with 206 or 416. Tests can make it misbehave per path: drop the connection
half-way through a body, or answer with an HTML page and status 200.
"""

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path
from typing import Dict, List, Optional, Set

import torch

SIGNATURE = "SECRETSIG"

LLAMA2_SHARDS = {"7B": 1, "13B": 2, "70B": 8, "7B-chat": 1, "13B-chat": 2, "70B-chat": 8}
LLAMA3_SHARDS = {"8B": 1, "8B-instruct": 1, "70B": 8, "70B-instruct": 8}
LLAMA3_REMOTE = {
    "8B": "8b_pre_trained",
    "8B-instruct": "8b_instruction_tuned",
    "70B": "70b_pre_trained",
    "70B-instruct": "70b_instruction_tuned",
}
LLAMA3_LOCAL = {
    "8B": "Meta-Llama-3-8B",
    "8B-instruct": "Meta-Llama-3-8B-Instruct",
    "70B": "Meta-Llama-3-70B",
    "70B-instruct": "Meta-Llama-3-70B-Instruct",
}

HTML_ERROR_PAGE = b"<!DOCTYPE html>\n<html><head><title>Error</title></head><body>Sorry.</body></html>\n"


def llama2_folder(model: str) -> str:
    """`7B-chat` -> `llama-2-7b-chat`: Llama 2's folder name, remote and local alike."""
    return "llama-2-" + model.lower()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_checklist(folder: Path, names: List[str], checklist: str = "checklist.chk") -> None:
    lines = [f"{_md5(folder / name)}  {name}\n" for name in names]
    (folder / checklist).write_text("".join(lines))


def _write_shard(path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    state_dict = {"tok_embeddings.weight": torch.randn(16, 32, generator=g), "norm.weight": torch.ones(32)}
    torch.save(state_dict, path)


def _write_model_folder(folder: Path, n_shards: int, seed: int, extra: Dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    names = []
    for i in range(n_shards):
        name = f"consolidated.{i:02d}.pth"
        _write_shard(folder / name, seed * 100 + i)
        names.append(name)
    params = {"dim": 32, "n_layers": 1, "n_heads": 4, "norm_eps": 1e-5, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params))
    names.append("params.json")
    for name, data in extra.items():
        (folder / name).write_bytes(data)
        names.append(name)
    _write_checklist(folder, names)


def write_llama2_tree(root: Path) -> None:
    """Meta's Llama 2 bucket: licence, tokenizer and checklist at the top, one folder per model."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "LICENSE").write_text("LLAMA 2 COMMUNITY LICENSE AGREEMENT (test copy)\n")
    (root / "USE_POLICY.md").write_text("# Llama 2 Acceptable Use Policy (test copy)\n")
    (root / "tokenizer.model").write_bytes(bytes(range(256)) * 8)
    _write_checklist(root, ["tokenizer.model"], "tokenizer_checklist.chk")
    for seed, (model, n_shards) in enumerate(LLAMA2_SHARDS.items()):
        _write_model_folder(root / llama2_folder(model), n_shards, seed, {})


def write_llama3_tree(root: Path) -> None:
    """Meta's Llama 3 bucket: licence at the top, tokenizer and checklist inside each model folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "LICENSE").write_text("META LLAMA 3 COMMUNITY LICENSE AGREEMENT (test copy)\n")
    (root / "USE_POLICY").write_text("Meta Llama 3 Acceptable Use Policy (test copy)\n")
    tokenizer = b"IQ== 0\nIg== 1\n" * 200  # tiktoken's format: base64 token, rank
    for seed, (model, n_shards) in enumerate(LLAMA3_SHARDS.items()):
        _write_model_folder(root / LLAMA3_REMOTE[model], n_shards, seed, {"tokenizer.model": tokenizer})


class LlamaMirror:
    """The signed-URL server. Use as a context manager; `url` is what Meta's email would hold.

    Knobs, each a set of remote paths such as `llama-2-7b/consolidated.00.pth`:
      drop_first  -- the first GET of the path sends half the body, then closes the connection.
      drop_always -- every GET of the path that starts at byte 0 does so.
      html        -- the path answers 200 with an HTML page instead of the file.
    `requests` records (path, Range header or None, User-Agent) for every signed GET.
    """

    def __init__(self, root: Path):
        self.root = root
        self.drop_first: Set[str] = set()
        self.drop_always: Set[str] = set()
        self.html: Set[str] = set()
        self.requests: List[tuple] = []
        self._dropped: Set[str] = set()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}/*?Policy=xyz&Signature={SIGNATURE}&Key-Pair-Id=K"

    def requested(self, path: str) -> List[Optional[str]]:
        """The Range headers (None for a plain GET) of every signed request for `path`."""
        with self._lock:
            return [rng for p, rng, _ in self.requests if p == path]

    def user_agents(self) -> Set[str]:
        """The User-Agent product names (`Wget`, `curl`) the signed requests came with."""
        with self._lock:
            return {agent.split("/")[0] for _, _, agent in self.requests}

    def __enter__(self) -> "LlamaMirror":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _should_drop(self, path: str, start: int) -> bool:
        with self._lock:
            if path in self.drop_always and start == 0:
                return True
            if path in self.drop_first and path not in self._dropped:
                self._dropped.add(path)
                return True
        return False

    def _handler(self):
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(parts.query)
                path = urllib.parse.unquote(parts.path).lstrip("/")
                if query.get("Signature") != [SIGNATURE] or "Policy" not in query or "Key-Pair-Id" not in query:
                    return self._send(403, b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>")
                with mirror._lock:
                    mirror.requests.append((path, self.headers.get("Range"), self.headers.get("User-Agent", "")))
                if path in mirror.html:
                    return self._send(200, HTML_ERROR_PAGE, "text/html")
                file = (mirror.root / path).resolve()
                if mirror.root.resolve() not in file.parents or not file.is_file():
                    return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")
                self._send_file(path, file.read_bytes())

            def _send_file(self, path: str, data: bytes) -> None:
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[len("bytes="):-1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if mirror._should_drop(path, start):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def _send(self, status: int, body: bytes, content_type: str = "application/xml") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
