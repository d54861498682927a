"""JSON text from and to the wire, safe against what a hostile client can send: payloads are checked for depth
and lone surrogates before any model sees them, and whatever we echo is made encodable. Both transports use it."""

from __future__ import annotations

import json
import re
from typing import Any

from edgellm.daemon.errors import EdgeError

_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_DEPTH = 64  # JSON nesting: a legitimate request or schema is far shallower; deeper would exhaust recursion


def load_json(payload: bytes, what: str = "payload") -> Any:
    """Bytes to a JSON value, or EdgeError('bad_request') naming the problem: not UTF-8, not JSON, nested
    deeper than MAX_DEPTH, or holding a lone UTF-16 surrogate (legal in JSON, unencodable in UTF-8)."""
    value = decode_json(payload, what)
    check_json_value(value, what)
    return value


def decode_json(payload: bytes, what: str) -> Any:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeError("bad_request", f"{what} is not UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise EdgeError("bad_request", f"{what} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise EdgeError("bad_request", f"{what} is nested too deeply; at most {MAX_DEPTH} levels") from None
    return value


def check_json_value(value: Any, what: str = "payload") -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings with lone surrogates, without recursion."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise EdgeError("bad_request", f"{where or what}: nested too deeply; at most {MAX_DEPTH} levels",
                                param=where.split(".")[0] or None)
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str) and has_surrogate(key):
                    raise EdgeError("bad_request", f"{where or what}: a key holds a lone UTF-16 surrogate",
                                    param=where.split(".")[0] or None)
                stack.append((child, f"{where}.{key}" if where else str(key), depth + 1))
        elif isinstance(item, str) and has_surrogate(item):
            raise EdgeError("bad_request", f"{where or what}: holds a lone UTF-16 surrogate (such as \\ud800), "
                            "which is not text; send valid Unicode", param=where.split(".")[0] or None)


def has_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def scrub(value: Any) -> Any:
    """A copy of a JSON value whose strings can be encoded: lone surrogates become U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def encode_json(message: Any) -> bytes:
    """UTF-8 JSON for the wire. Never raises on text: whatever we echo is made encodable first."""
    try:
        return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(scrub(message), ensure_ascii=False, separators=(",", ":")).encode()
