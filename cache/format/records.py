"""Training records: read JSONL, format prompts, tokenise, truncate.

Shared by the cache builder and `deltakd eval`, so that a prompt is formatted exactly
the same way when the cache is built and when a student is evaluated.

Accepted record shapes (one JSON object per line):
    {"prompt": str, "response": str}
    {"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}
The response is the last assistant message; everything before it is the prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    example_id: int  # 0-based line index among the non-blank lines of the file
    messages: tuple  # prompt turns, as (role, content) pairs
    response: str


def data_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_records(path: str | Path, require_response: bool = True) -> list[Record]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read data file ({e.strerror or e})") from e
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
            "re-encode the file as UTF-8"
        ) from e
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with prompt/response or messages")
        records.append(_parse(obj, len(records), where, require_response))
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def _parse(obj: dict, example_id: int, where: str, require_response: bool) -> Record:
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            for key in ("role", "content"):
                if not isinstance(m[key], str):
                    raise DataError(f"{where}: messages[{i}].{key} must be a string, got {type(m[key]).__name__}")
        turns = [(m["role"], m["content"]) for m in msgs]
        if turns and turns[-1][0] == "assistant":
            prompt, response = turns[:-1], turns[-1][1]
        else:
            prompt, response = turns, None
    elif "prompt" in obj:
        prompt, response = [("user", obj["prompt"])], obj.get("response")
        for key in ("prompt", "response"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(obj[key]).__name__}")
    else:
        raise DataError(f"{where}: record has neither 'prompt' nor 'messages' (keys: {sorted(obj)})")
    if require_response and (not isinstance(response, str) or not response.strip()):
        raise DataError(f"{where}: record has no response (a 'response' field or a final assistant message)")
    if not prompt or not all(isinstance(c, str) for _, c in prompt):
        raise DataError(f"{where}: the prompt is empty or not text")
    return Record(example_id, tuple(prompt), response or "")


def prompt_text(tokenizer, record: Record) -> str:
    """The prompt as the model sees it: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": r, "content": c} for r, c in record.messages]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "\n".join(c for _, c in record.messages)


def encode_prompt(tokenizer, record: Record) -> list[int]:
    ids = tokenizer(prompt_text(tokenizer, record), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    # Templates that start with BOS already carry it; plain prompts get it here.
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def encode_record(tokenizer, record: Record, max_length: int) -> tuple[list[int], int, bool]:
    """Token ids of prompt + response (+ EOS), the prompt length, and whether it was truncated.

    Over-long records keep the end of the prompt and the start of the response; the
    response keeps at least half of `max_length` when it is that long.
    """
    p = encode_prompt(tokenizer, record)
    r = tokenizer(record.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    truncated = len(p) + len(r) > max_length
    if truncated:
        keep_r = min(len(r), max(max_length - len(p), max_length // 2))
        keep_p = max_length - keep_r
        p, r = p[len(p) - keep_p :] if keep_p else [], r[:keep_r]
    return p + r, len(p), truncated


def loss_mask_for(n_tokens: int, prompt_len: int) -> list[int]:
    """mask[t] = 1 iff position t predicts a response token (t+1 >= prompt_len)."""
    return [1 if t + 1 >= max(prompt_len, 1) and t + 1 < n_tokens else 0 for t in range(n_tokens)]


def tokenizer_identity(tok) -> dict:
    """What makes two tokenizers interchangeable for the cache: vocabulary, specials, template."""
    desc = {
        "vocab": sorted(tok.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
        "chat_template": getattr(tok, "chat_template", None),
    }
    blob = json.dumps(desc, sort_keys=True, default=str).encode()
    return {"sha256": hashlib.sha256(blob).hexdigest(), "vocab_size": len(tok)}
