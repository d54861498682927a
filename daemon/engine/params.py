"""Generation parameters: the one definition of what a request may tune. MQTT takes these fields as they are;
the CLI makes its flags from them (edgellm/daemon/cli.py) and the HTTP API its OpenAI-named fields
(edgellm/daemon/serve/http/openai.py), so a new parameter is added here once."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgellm.daemon.engine.drafting import MAX_DRAFT

MAX_STOPS = 16


def speculation_mode(mode: str | int) -> str | int:
    """A speculative-decoding mode as requests and settings give it, checked (edgellm/daemon/engine/drafting.py)."""
    if mode in ("auto", "off") or (isinstance(mode, int) and not isinstance(mode, bool) and 1 <= mode <= MAX_DRAFT):
        return mode
    raise ValueError(f"must be 'auto', 'off' or a draft length from 1 to {MAX_DRAFT}, not {mode!r}")


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    max_tokens: int = Field(256, ge=1, le=65536, description="new tokens at most")
    temperature: float = Field(0.7, ge=0.0, le=5.0, description="0 for greedy decoding")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus sampling: keep the likeliest tokens up to "
                         "this probability mass")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="keep only tokens at least this fraction as likely as "
                         "the likeliest (llama.cpp's min_p); 0 turns it off")
    top_k: int = Field(40, ge=0, le=100_000, description="sample among the k likeliest tokens; 0 turns it off")
    repetition_penalty: float = Field(1.0, ge=0.1, le=10.0, description="above 1 discourages repeating tokens")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted from a token's logit once for "
                                     "each time it appeared in the last 64 tokens (OpenAI's, llama.cpp's)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted from the logit of any token "
                                    "that appeared in the last 64 tokens")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="sampling seed, for repeatable output")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS, description="a string that ends the "
                            "output where it appears")
    json_schema: dict[str, Any] | None = Field(None, description="a JSON Schema the output will validate against")
    adapter: str | None = Field(None, max_length=128, description="a LoRA adapter loaded on the model (model."
                                "adapters, or its adapters/ folder), run beside the base for this request only")
    ignore_eos: bool = Field(False, description="never sample the end-of-sequence token, so the output runs to "
                             "max_tokens or a stop string (llama.cpp's ignore_eos); for fixed-length benchmarks")
    logprobs: int | None = Field(None, ge=0, le=20, description="report each generated token's log-probability "
                                 "and this many likeliest alternatives at its position (0: the token's own only)")
    speculative: str | int | None = Field(
        None, description="draft tokens from the prompt and check them in one pass: auto (where it pays), off, "
        f"or a fixed draft length 1-{MAX_DRAFT}; unset: the server's setting (model.speculative)")

    @property
    def penalizes(self) -> bool:
        """Whether sampling looks at the tokens so far."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @field_validator("speculative")
    @classmethod
    def _speculation_mode(cls, mode: str | int | None) -> str | int | None:
        return mode if mode is None else speculation_mode(mode)

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stops: list[str]) -> list[str]:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops
