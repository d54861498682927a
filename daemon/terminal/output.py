"""Printing an answer as it streams: the text on stdout, usage and timings (--verbose) and logprobs on stderr."""

from __future__ import annotations

import json
import sys


def print_stream(events, verbose: bool, as_json: bool = False, whole: bool = False):
    """Print deltas as they come (or, with `whole`, the text once it is complete: schema-constrained output is
    valid JSON or nothing, never a prefix cut off by an error); return the final Result."""
    from edgellm.daemon.engine.generate import Delta

    result = None
    for event in events:
        if isinstance(event, Delta):
            if not (as_json or whole):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            continue
        if as_json:
            logprobs = {"logprobs": [vars(t) for t in event.logprobs]} if event.logprobs is not None else {}
            print(json.dumps({"text": event.text, "json": event.json, "finish_reason": event.finish_reason,
                              "usage": vars(event.usage), "timings": vars(event.timings), **logprobs},
                             ensure_ascii=False))
        else:
            sys.stdout.write((event.text if whole else "") + "\n")
            for t in event.logprobs or []:  # --logprobs N: one line a token, on stderr beside the answer
                alternatives = "  ".join(f"{text!r} {lp:.3f}" for text, lp in t.top)
                print(f"{t.text!r}\t{t.logprob:.3f}\t{alternatives}", file=sys.stderr)
        if verbose:
            print_usage(event)
        result = event
    return result


def print_usage(result) -> None:
    t, u = result.timings, result.usage
    drafts = f", drafts {u.accepted_tokens}/{u.drafted_tokens} kept" if u.drafted_tokens else ""
    speed = (f"; first token {t.ttft_ms:.0f} ms, prefill {t.prefill_tps:.0f} tok/s, decode {t.decode_tps:.1f} tok/s"
             if t.total_ms else "")  # a daemon's OpenAI API reports no timings
    print(f"[{u.prompt_tokens} prompt + {u.completion_tokens} new tokens, finish {result.finish_reason}"
          f"{speed}{drafts}]", file=sys.stderr)
