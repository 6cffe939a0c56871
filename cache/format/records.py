"""Training records: read JSONL, format prompts, tokenise, truncate.

Shared by the cache builder and `deltakd eval`, so that a prompt is formatted exactly
the same way when the cache is built and when a student is evaluated. Other sources
(Parquet, Arrow, save_to_disk folders, Hub datasets) give rows that are parsed here
too: `deltakd.cache.format.sources`.

Accepted record shapes (one JSON object per line, or one row):
    {"prompt": str, "response": str}            ("completion" is read when there is no "response")
    {"messages": [{"role": ..., "content": ...}, ..., {"role": "assistant", ...}]}
    {"prompt": [messages], "completion": [{"role": "assistant", ...}]}   (TRL's conversational form)
The response is the last assistant message; everything before it is the prompt.
Other field names: `Fields` (--prompt-field, --response-field, --messages-field).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data file cannot be used; the message names the file and line (or row)."""


@dataclass(frozen=True)
class Record:
    example_id: int  # 0-based index among the records (the non-blank lines of a JSONL file, the rows of a dataset)
    messages: tuple  # prompt turns, as (role, content) pairs
    response: str


@dataclass(frozen=True)
class Fields:
    """Where a record keeps its prompt, response and chat messages."""

    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"

    @property
    def is_default(self) -> bool:
        return self == Fields()


def data_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_records(path: str | Path, require_response: bool = True, **source) -> list[Record]:
    """Every record of a data source, in memory (small sets; the builder streams: sources.open_records)."""
    from deltakd.cache.format.sources import DataSource, open_records

    return list(open_records(DataSource(str(path), **source), require_response))


def iter_jsonl(path: str | Path, fields: Fields, require_response: bool, hasher=None) -> Iterator[Record]:
    """Records of a JSONL file, streamed line by line; `hasher` (hashlib) sees every byte of the file."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read data file ({e.strerror or e})") from e
    n, offset = 0, 0
    with f:
        for lineno, raw in enumerate(f, 1):
            if hasher is not None:
                hasher.update(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {offset + e.start}); "
                    "re-encode the file as UTF-8"
                ) from e
            offset += len(raw)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with prompt/response or messages")
            yield parse_record(obj, n, where, require_response, fields)
            n += 1
    if n == 0:
        raise DataError(f"{path}: no records (the file is empty)")


def _turns(value, where: str, key: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise DataError(f"{where}: '{key}' must be a list of {{role, content}} objects")
    for i, m in enumerate(value):
        for k in ("role", "content"):
            if not isinstance(m[k], str):
                raise DataError(f"{where}: {key}[{i}].{k} must be a string, got {type(m[k]).__name__}")
    return [(m["role"], m["content"]) for m in value]


def parse_record(obj: dict, example_id: int, where: str, require_response: bool, fields: Fields = Fields()) -> Record:
    """One record from a JSON object or dataset row; errors name `where` (file:line, or source row N)."""
    resp_key = fields.response
    if resp_key not in obj and resp_key == "response" and "completion" in obj:
        resp_key = "completion"  # TRL's prompt-completion datasets
    if fields.messages in obj:
        turns = _turns(obj[fields.messages], where, fields.messages)
        if turns and turns[-1][0] == "assistant":
            prompt, response = turns[:-1], turns[-1][1]
        else:
            prompt, response = turns, None
    elif fields.prompt in obj:
        prompt, response = obj[fields.prompt], obj.get(resp_key)
        if isinstance(prompt, list):  # conversational prompt-completion
            prompt = _turns(prompt, where, fields.prompt)
        elif isinstance(prompt, str):
            prompt = [("user", prompt)]
        else:
            raise DataError(f"{where}: '{fields.prompt}' must be a string, got {type(prompt).__name__}")
        if isinstance(response, list) and response and all(isinstance(m, dict) for m in response):
            said = [c for r, c in _turns(response, where, resp_key) if r == "assistant"]
            response = said[-1] if said else None
        elif response is not None and not isinstance(response, str):
            raise DataError(f"{where}: '{resp_key}' must be a string, got {type(response).__name__}")
    else:
        raise DataError(
            f"{where}: record has neither '{fields.prompt}' nor '{fields.messages}' (keys: {sorted(obj)}); "
            "name other fields with --prompt-field, --response-field or --messages-field"
        )
    if require_response and (not isinstance(response, str) or not response.strip()):
        raise DataError(f"{where}: record has no response (a '{fields.response}' field or a final assistant message)")
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
