"""Whether a reply address (a request's Response Topic, or its payload `reply_to`) can be published to.

A PUBLISH whose topic the broker finds malformed makes it close the connection (MQTT 5.0, 4.7 and 1.5.4).
paho then re-sends the reply, and the broker redelivers the unacknowledged request, at every reconnect: one
bad address would keep the device off MQTT for good. So every address is checked before anything is
published to it, against what the spec forbids and what Mosquitto refuses on top (its UTF-8 check rejects
control characters and Unicode non-characters in topics), and an unusable one is never published to.
"""

from __future__ import annotations

MAX_TOPIC_BYTES = 65_535  # a UTF-8 string in MQTT carries a two-byte length


def reply_topic_problem(topic: str | None) -> str | None:
    """What makes `topic` unusable as a reply address, or None when it can be published to."""
    if not topic:
        return "no Response Topic or reply_to"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "it holds a lone UTF-16 surrogate, which UTF-8 cannot encode"
    if size > MAX_TOPIC_BYTES:
        return f"it is {size} bytes of UTF-8; a topic holds at most {MAX_TOPIC_BYTES}"
    if "+" in topic or "#" in topic:
        return "it holds a wildcard (+ or #); replies go to one topic"
    if topic.startswith("$"):
        return "topics starting with $ are the broker's own"
    for i, c in enumerate(topic):
        code = ord(c)
        if code <= 0x1F or 0x7F <= code <= 0x9F:
            return f"it holds the control character U+{code:04X} at position {i}"
        if 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:
            return f"it holds the Unicode non-character U+{code:04X} at position {i}"
    return None
