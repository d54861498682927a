"""Choose the grounded mode's fusion weight and refusal threshold (daemon/retrieval/grounding.py Weights) on the
development questions only: rag_eval.py's ANSWERABLE and UNANSWERABLE, rag_paraphrase.py's *_DEV sets. The
held-out sets are not read here. No generation: for each question, the sentences of the passages `ask` would
be given are scored, and a (lexical, threshold) pair is good when one of the sentences the model is given
holds a gold answer of an answerable question and nothing passes the threshold for an unanswerable one; the
pair with the best mean over the five sets is chosen.

    .venv/bin/python scripts/tune_grounding.py        # ends with one JSON line: the chosen weights, dev scores
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_models import cached_build  # noqa: E402


def main() -> None:
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.params import GenerationParams
    from edgellm.daemon.retrieval import grounding
    from edgellm.daemon.retrieval.embedder import Embedder
    from edgellm.daemon.retrieval.rag import passages
    from edgellm.daemon.retrieval.store import DocumentInput, RetrievalStore
    from tests.data import rag_paraphrase as sets
    from tests.data.corpus import DOCUMENTS
    from tests.data.rag_eval import ANSWERABLE, HELD_OUT_DOCUMENTS, MORE_DOCUMENTS, UNANSWERABLE, is_right

    embedder_folder = ROOT / ".cache/bench/minilm-int8"
    cached_build(embedder_folder, "minilm", "--task", "embedding")
    model = cached_build(ROOT / ".cache/bench/smollm2-int4", "smollm2", "--quant", "int4")
    generator = Generator(LoadedModel.load(model, threads=1))
    params = GenerationParams(max_tokens=48, temperature=0.0)
    # each set counts alike, whatever its size: the 61 questions worded as the documents are do not outvote
    # the 20 paraphrases
    groups = {"worded_as_the_documents": ANSWERABLE, "paraphrase": sets.PARAPHRASE_DEV,
              "cross_language": sets.CROSS_LANGUAGE_DEV, "unanswerable": UNANSWERABLE,
              "shared_words_unanswerable": sets.SHARED_WORDS_UNANSWERABLE_DEV}
    questions = [(name, q[0], q[2] if len(q) == 4 else None) for name, qs in groups.items() for q in qs]
    rows = []  # (group, answerable?, [(cosine, coverage, holds a gold)])
    with tempfile.TemporaryDirectory() as tmp:
        embedder = Embedder(embedder_folder, threads=1)
        store = RetrievalStore(Path(tmp) / "tune.db", embedder)
        store.ingest([DocumentInput(n, [t]) for n, t in {**DOCUMENTS, **MORE_DOCUMENTS, **HELD_OUT_DOCUMENTS}.items()])
        for group, question, golds in questions:
            given = passages(generator, store, question, params)
            candidates = [(i, *s) for i, hit in enumerate(given) for s in grounding.split_sentences(hit)]
            if not candidates:
                rows.append((group, golds is not None, []))
                continue
            coverage = grounding._coverage(set(grounding.content_terms(question)), candidates, given)
            cosines = grounding.meaning(question, candidates, given, embedder.embed)  # as best_sentences does
            rows.append((group, golds is not None, [(float(c), v, golds is not None and is_right(t, golds))
                                            for (_i, t, _s, _e), c, v in zip(candidates, cosines, coverage,
                                                                             strict=True)]))
        store.close()
    best = None
    for lexical in np.arange(0.0, 1.01, 0.1):
        for threshold in np.arange(0.2, 0.9, 0.025):
            good: dict[str, list[bool]] = {}
            refused_answerable = []
            for group, is_answerable, cands in rows:
                scored = sorted(((c + lexical * v, gold) for c, v, gold in cands), reverse=True)
                passing = [g for s, g in scored if s >= threshold][:grounding_top()]
                good.setdefault(group, []).append(any(passing) if is_answerable else not passing)
                if is_answerable:
                    refused_answerable.append(not passing)
            rates = {g: sum(v) / len(v) for g, v in good.items()}
            score = sum(rates.values()) / len(rates)
            if best is None or score > best[0]:
                best = (score, round(float(lexical), 2), round(float(threshold), 3), rates,
                        sum(refused_answerable) / len(refused_answerable))
    _, lexical, threshold, rates, refused = best
    print(json.dumps({"lexical": lexical, "threshold": threshold,
                      **{f"dev_{g}": round(r, 3) for g, r in rates.items()},
                      "dev_answerable_refused": round(refused, 3), "dev_questions": len(rows)}))


def grounding_top() -> int:
    from edgellm.daemon.retrieval.rag import GROUNDED_SENTENCES

    return GROUNDED_SENTENCES


if __name__ == "__main__":
    main()
