"""One engine, one fresh process, one JSON line: the measuring end of bench_engine.py.

Each engine runs in its own process (and, for the anchors, its own venv) so that peak RSS is its own.
Usage: python bench_workers.py {edgellm,llamacpp,genai} --model PATH --prompt-file F [--new-tokens 128]
       python bench_workers.py genai-build --hf DIR --out DIR    (make the onnxruntime-genai int4 anchor)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM). getrusage's ru_maxrss would be wrong here: Linux carries it
    across exec, so a worker spawned by a parent holding 800 MB reports at least 800 MB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def summarize(rounds: list[dict], prompt_tokens: int, load_s: float) -> dict:
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {"prompt_tokens": prompt_tokens, "load_s": round(load_s, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            **{k: round(v, 2) for k, v in med.items()}}


def one_round(prefill, step, prompt_tokens: int, new_tokens: int) -> dict:
    """`prefill()` returns the first new token; `step(token)` returns the next one."""
    start = time.perf_counter()
    token = prefill()
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = step(token)
    end = time.perf_counter()
    return {"ttft_ms": (first - start) * 1000, "prefill_tps": prompt_tokens / (first - start),
            "decode_tps": (new_tokens - 1) / (end - first)}


def run_edgellm(args) -> dict:
    import numpy as np

    from edgellm.daemon.engine.model import LoadedModel

    t = time.perf_counter()
    model = LoadedModel.load(args.model, threads=args.threads)
    load_s = time.perf_counter() - t
    ids = model.encode(open(args.prompt_file).read())
    rounds = []
    for _ in range(args.rounds):
        cache = model.decoder.new_cache()
        rounds.append(one_round(lambda c=cache: int(np.argmax(model.decoder.forward(ids, c)[-1])),
                                lambda tok, c=cache: int(np.argmax(model.decoder.forward([tok], c)[-1])),
                                len(ids), args.new_tokens))
    return summarize(rounds, len(ids), load_s)


def run_edgellm_prefix(args) -> dict:
    """Time to first token for a request whose first ~500 tokens were seen before, against a cold one."""
    from edgellm.daemon.engine.chat import ChatMessage
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.params import GenerationParams
    from edgellm.daemon.engine.prefix_cache import PrefixCache

    model = LoadedModel.load(args.model, threads=args.threads)
    context = open(args.prompt_file).read()
    cold_gen, warm_gen = Generator(model), Generator(model, PrefixCache(256 << 20))
    params = GenerationParams(temperature=0, max_tokens=1)
    cold, warm = [], []
    for i in range(args.rounds + 1):
        system = ChatMessage(role="system", content=f"Answer from this text.\n\n{context}")
        first = [system, ChatMessage(role="user", content=f"Question {i}: what is an invoice?")]
        second = [system, ChatMessage(role="user", content=f"Question {i}: who keeps records?")]
        cold_gen.generate(cold_gen.prompt_ids(messages=first), params)  # warm-up of the session, not the cache
        cold.append(cold_gen.generate(cold_gen.prompt_ids(messages=second), params).timings.ttft_ms)
        warm_gen.generate(warm_gen.prompt_ids(messages=first), params)
        r = warm_gen.generate(warm_gen.prompt_ids(messages=second), params)
        warm.append(r.timings.ttft_ms)
    cold_ms, warm_ms = statistics.median(cold[1:]), statistics.median(warm[1:])
    return {"prompt_tokens": len(cold_gen.prompt_ids(messages=second)), "cached_tokens": r.usage.cached_tokens,
            "cold_ttft_ms": round(cold_ms, 1), "warm_ttft_ms": round(warm_ms, 1),
            "prefix_ttft_ratio": round(warm_ms / cold_ms, 3)}


def run_scheduler(args) -> dict:
    """The scheduler's latency goals, on the daemon's Generator (4 rows, prefix cache on):
    - prefill_stall_steps: while 3 streams decode, a 4th request brings a ~500-token prompt. The streams'
      longest wait for a token during that prompt's prefill, in decode steps beyond the usual one:
      (max gap - median gap before it) / median gap before it.
    - ttft_ratio_4_arriving: median time to first token of 4 requests arriving together, over that of one
      alone, for requests sharing a system prompt (a deployment's fixed instructions) with their own
      questions; ..._distinct: the same for 4 unrelated prompts."""
    import threading

    from edgellm.daemon.engine.chat import ChatMessage
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.params import GenerationParams
    from edgellm.daemon.engine.prefix_cache import PrefixCache

    model = LoadedModel.load(args.model, threads=args.threads)
    text = open(args.prompt_file).read().split()

    def generator() -> Generator:
        return Generator(model, PrefixCache(256 << 20), batch_rows=4, batch_context=1024)

    def together(gen: Generator, prompts: list[list[int]], params: GenerationParams) -> list:
        results: list = [None] * len(prompts)
        start = threading.Barrier(len(prompts))

        def one(i: int) -> None:
            start.wait()
            results[i] = gen.generate(prompts[i], params)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    # -- stall: step times around a long prompt's chunked prefill --------------------------------------
    stalls, gaps_before, gaps_during = [], [], []
    for r in range(args.rounds):
        gen = generator()
        ends: list[float] = []
        rows = gen.model.decoder.decode_rows

        def timed(*a, rows=rows, ends=ends):
            out = rows(*a)
            ends.append(time.perf_counter())
            return out

        gen.model.decoder.decode_rows = timed
        long_ids = gen.prompt_ids(" ".join(text[r * 7: r * 7 + 380]), raw=True)
        streams = [threading.Thread(target=gen.generate, args=(gen.prompt_ids(f"Story {r}-{i}: a lighthouse"),
                                                               GenerationParams(max_tokens=300, temperature=0,
                                                                                ignore_eos=True)))
                   for i in range(3)]
        for t in streams:
            t.start()
        while len(ends) < 40:
            time.sleep(0.005)
        arrived = time.perf_counter()
        first = gen.generate(long_ids, GenerationParams(max_tokens=1, temperature=0))
        prefilled = arrived + first.timings.ttft_ms / 1000
        for t in streams:
            t.join()
        gen.model.decoder.decode_rows = rows
        gaps = [(b - a, b) for a, b in zip(ends, ends[1:], strict=False)]
        before = statistics.median(g for g, end in gaps if end < arrived)
        during = [g for g, end in gaps if arrived < end <= prefilled + 0.001]
        stalls.append((max(during) - before) / before)
        gaps_before.append(before)
        gaps_during.append(statistics.median(during))

    # -- time to first token, one alone against four arriving together ---------------------------------
    def ttft_ratio(shared: bool) -> tuple[float, float, float]:
        ratios, alone_ms, four_ms = [], [], []
        for r in range(args.rounds):
            def prompts(n: int, tag: str, r: int = r) -> list[list[int]]:
                gen_ = generator()
                if shared:
                    system = ChatMessage(role="system", content=" ".join(text[r * 11: r * 11 + 120]))
                    return [gen_.prompt_ids(messages=[system, ChatMessage(role="user", content=f"{tag} {i}: "
                                                                          "what does this say?")])
                            for i in range(n)]
                return [gen_.prompt_ids(" ".join(text[40 * i + r: 40 * i + r + 100]) + f" {tag}", raw=True)
                        for i in range(n)]

            params = GenerationParams(max_tokens=1, temperature=0)
            alone = statistics.median(generator().generate(p, params).timings.ttft_ms
                                      for p in prompts(3, f"alone{r}"))
            four = statistics.median(x.timings.ttft_ms for x in together(generator(), prompts(4, f"four{r}"),
                                                                           params))
            ratios.append(four / alone)
            alone_ms.append(alone)
            four_ms.append(four)
        return statistics.median(ratios), statistics.median(alone_ms), statistics.median(four_ms)

    generator().generate(model.encode("warm up the session"), GenerationParams(max_tokens=2, temperature=0))
    shared, shared_alone, shared_four = ttft_ratio(True)
    distinct, distinct_alone, distinct_four = ttft_ratio(False)
    return {"prefill_stall_steps": round(statistics.median(stalls), 2),
            "prefill_stall_steps_range": [round(min(stalls), 2), round(max(stalls), 2)],
            "step_ms_before": round(statistics.median(gaps_before) * 1000, 1),
            "step_ms_during_prefill": round(statistics.median(gaps_during) * 1000, 1),
            "long_prompt_tokens": len(long_ids),
            "ttft_ratio_4_arriving": round(shared, 3), "ttft_ms_alone": round(shared_alone, 1),
            "ttft_ms_4_arriving": round(shared_four, 1),
            "ttft_ratio_4_arriving_distinct": round(distinct, 3), "ttft_ms_alone_distinct": round(distinct_alone, 1),
            "ttft_ms_4_arriving_distinct": round(distinct_four, 1)}


def run_llamacpp(args) -> dict:
    import numpy as np
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024,
                n_batch=512, verbose=False)
    load_s = time.perf_counter() - t
    ids = llm.tokenize(open(args.prompt_file).read().encode(), add_bos=True)  # as the file says (Gemma: BOS)

    def last_logits():  # Llama.scores is only filled with logits_all=True: read the context directly
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    def prefill():
        llm.reset()
        llm.eval(ids)
        return int(np.argmax(last_logits()))

    def step(token):
        llm.eval([token])
        return int(np.argmax(last_logits()))

    rounds = [one_round(prefill, step, len(ids), args.new_tokens) for _ in range(args.rounds)]
    out = summarize(rounds, len(ids), load_s)
    if args.ppl_file:
        out["ppl"], out["ppl_tokens"] = llamacpp_perplexity(args)
    return out


def speculative_tasks() -> dict[str, list[dict]]:
    """bench_speculative.py's prompts: 60 leave-family-out invoices (fields copied, models/tuning/invoices.py), the
    grounded answers' questions over their own documents (tests/data/rag_eval.py), 20 open chat prompts."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from edgellm.models.tuning.invoices import COPY_SCHEMA, INSTRUCTION, SCHEMA, generate
    from tests.data.corpus import DOCUMENTS
    from tests.data.rag_eval import ANSWERABLE, MORE_DOCUMENTS

    invoices = generate(60, seed=998, families=("letterhead", "form", "receipt", "email"))
    documents = {**DOCUMENTS, **MORE_DOCUMENTS}
    chat = ["Write a short story about a lighthouse keeper.", "Explain how a heat pump works.",
            "Give three tips for a job interview.", "Describe the city of Lisbon.", "What is a contract?",
            "Write a poem about autumn.", "How do I make bread at home?", "Explain photosynthesis simply.",
            "What should a small business know about VAT?", "Describe a walk in the mountains.",
            "Write a letter thanking a colleague.", "What is machine learning?", "Explain compound interest.",
            "Plan a day trip to the sea.", "Why is sleep important?", "Describe how a bill becomes a law.",
            "Write a product description for a kettle.", "What are the planets of the solar system?",
            "Give advice for learning a language.", "Explain what a database index is."]
    return {"extract": [{"prompt": f"{INSTRUCTION}\n\n{inv.text}", "schema": COPY_SCHEMA, "anchor_schema": SCHEMA}
                        for inv in invoices],
            "rag": [{"question": q, "document": documents[source], "source": source}
                    for q, _lang, _gold, source in ANSWERABLE if source in documents][:24],
            "chat": [{"prompt": p} for p in chat]}


def run_speculative(args) -> dict:
    """bench_speculative.py's edgellm side: every prompt greedy, drafts off and auto in turn; per prompt the
    latency, tokens, drafted and kept tokens and text, and the prompt ids so llama.cpp is fed the same."""
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.params import GenerationParams
    from edgellm.daemon.retrieval.rag import answer
    from edgellm.daemon.retrieval.store import Hit

    model = LoadedModel.load(args.model, threads=args.threads)
    g = Generator(model)
    seen: list = []
    generate = g.generate

    def recording(ids, params, *a, **kw):  # the ids and schema of the request a task makes
        result = generate(ids, params, *a, **kw)
        seen.append({"ids": ids, "tokens": result.usage.completion_tokens, "result": result})
        return result

    g.generate = recording
    out: dict[str, list] = {}
    for task, items in speculative_tasks().items():
        rows = []
        for item in items:
            row = {}
            for mode in ("off", "auto"):
                params = GenerationParams(max_tokens=96, temperature=0, speculative=mode,
                                          json_schema=item.get("schema"))
                seen.clear()
                started = time.perf_counter()
                if task == "rag":
                    hit = Hit(0, item["source"], "default", 1, 0, len(item["document"]), item["document"], 1.0, 1.0,
                              1)
                    text = answer(g, item["question"], [hit], params).answer
                else:
                    text = g.generate(g.prompt_ids(item["prompt"]), params).text
                seconds = time.perf_counter() - started
                r = seen[-1]["result"] if seen else None
                row[mode] = {"seconds": seconds, "text": text,
                             "tokens": r.usage.completion_tokens if r else 0,
                             "decode_tps": r.timings.decode_tps if r else 0.0,
                             "drafted": r.usage.drafted_tokens if r else 0,
                             "accepted": r.usage.accepted_tokens if r else 0}
                if mode == "off" and seen:
                    row["ids"], row["schema"] = seen[-1]["ids"], item.get("anchor_schema")
            rows.append(row)
        out[task] = rows
    return out


def _without_patterns(schema):
    if isinstance(schema, dict):
        return {k: _without_patterns(v) for k, v in schema.items() if k != "pattern"}
    return [_without_patterns(v) for v in schema] if isinstance(schema, list) else schema


def run_llamacpp_tasks(args) -> dict:
    """bench_speculative.py's anchor: llama.cpp with llama-cpp-python's prompt-lookup drafting, greedy, over the
    very prompt ids edgellm used and as many new tokens; with the task's JSON schema as a grammar where it has
    one (without edgellm's copied fields, which llama.cpp cannot express). Plain eval of the prompt measures the
    prefill, so decode tok/s leaves it out."""
    from llama_cpp import Llama, LlamaGrammar
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    spec = json.load(open(args.tasks_file))
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048,
                n_batch=512, verbose=False, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))
    plain = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048,
                  n_batch=512, verbose=False)
    grammars: dict[str, LlamaGrammar] = {}
    out: dict[str, list] = {}
    for task, rows in spec.items():
        results = []
        for row in rows:
            plain.reset()
            started = time.perf_counter()
            plain.eval(row["ids"])
            prefill = time.perf_counter() - started
            # without its "pattern"s: llama-cpp-python's converter turns the date's \\d-pattern into a grammar its
            # own parser rejects ("parse: error parsing grammar"), so llama.cpp's grammar is a little looser
            schema = json.dumps(_without_patterns(row["schema"])) if row.get("schema") else None
            if schema and schema not in grammars:
                grammars[schema] = LlamaGrammar.from_json_schema(schema, verbose=False)
            llm.reset()
            started = time.perf_counter()
            made = llm.create_completion(row["ids"], max_tokens=max(row["tokens"], 1), temperature=0.0, top_k=1,
                                         grammar=grammars.get(schema))["usage"]["completion_tokens"]
            seconds = time.perf_counter() - started
            results.append({"seconds": seconds, "tokens": made,
                            "decode_tps": (made - 1) / max(seconds - prefill, 1e-9) if made > 1 else 0.0})
        out[task] = results
    return out


def run_serving_memory(args) -> dict:
    """bench_kv.py's worker: the daemon's generator (4 rows of 512 tokens, a 256 MB prefix cache) answers
    --requests requests, four at a time, each a distinct ~250-token prompt; then one stream alone."""
    import threading

    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.params import GenerationParams
    from edgellm.daemon.engine.prefix_cache import PrefixCache
    from edgellm.daemon.serve.stats import current_rss_mb

    model = LoadedModel.load(args.model, threads=args.threads)
    cache = PrefixCache(256 << 20)
    g = Generator(model, cache, batch_rows=4, batch_context=512)
    loaded_rss = current_rss_mb()
    text = open(args.prompt_file).read().split()
    params = GenerationParams(max_tokens=32, temperature=0, ignore_eos=True, speculative="off")
    prompts = [g.prompt_ids(f"Request {i}. " + " ".join(text[i % 50: i % 50 + 160])) for i in range(args.requests)]

    def worker(k: int) -> None:
        for ids in prompts[k::4]:
            g.generate(ids, params)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = Generator(model)
    r = alone.generate(prompts[0], GenerationParams(max_tokens=64, temperature=0, ignore_eos=True, speculative="off"))
    pool = g.scheduler.pool_bytes
    return {"loaded_rss_mb": round(loaded_rss, 1), "rss_mb": round(current_rss_mb(), 1),
            "peak_rss_mb": round(peak_rss_mb(), 1), "kv_pool_mb": round(pool / 2**20, 1),
            "prefix_cache_mb": round(cache.bytes / 2**20, 1), "decode_tps": round(r.timings.decode_tps, 2)}


def llamacpp_perplexity(args) -> tuple[float, int]:
    """Perplexity of the GGUF in llama.cpp on the same text the manifests use (all logits needed)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_threads=args.threads, n_ctx=2048, n_batch=2048, logits_all=True,
                verbose=False)
    ids = llm.tokenize(open(args.ppl_file).read().encode(), add_bos=True)  # BOS where the file asks
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)[:-1]
    peak = logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
    nll = log_norm - logits[np.arange(len(ids) - 1), ids[1:]]
    return round(float(np.exp(nll.mean())), 4), len(ids)


def run_bandwidth(args) -> dict:
    """Memory copy bandwidth: the ceiling on how fast weights can be read, whatever the engine."""
    import numpy as np

    src = np.ones(64 << 20, dtype=np.float64)  # 512 MB
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t))  # read + write
    return {"copy_gb_per_s": round(best / 1e9, 2)}


STORY = "Story {i}: a lighthouse keeper"  # every engine's concurrency prompt (same length for i < 10)
CONCURRENCY = (1, 2, 4, 8)
# Every stream generates exactly --new-tokens, end-of-sequence ignored (llama.cpp's batched-bench and vLLM's
# throughput benchmark do the same): a story that ended early would leave fewer than n streams running.


def aggregate_rates(measure, per_stream: int, rounds: int = 5) -> dict:
    """`measure(n)` -> (tokens, seconds) for n concurrent streams of `per_stream` tokens each. Every round
    measures each n once, so a slow minute on the shared machine hits all of them; tok/s per n and the
    4-stream speedup are medians."""
    measure(1)  # warm-up
    rates: dict[int, list[float]] = {n: [] for n in CONCURRENCY}
    speedups = []
    for _ in range(rounds):
        for n in CONCURRENCY:
            tokens, seconds = measure(n)
            if tokens != n * per_stream:
                raise RuntimeError(f"{n} streams made {tokens} tokens, not {n * per_stream}: one ended early")
            rates[n].append(tokens / seconds)
        speedups.append(rates[4][-1] / rates[1][-1])
    return {"aggregate_tps": {n: round(statistics.median(r), 2) for n, r in rates.items()},
            "concurrency4_speedup": round(statistics.median(speedups), 3),
            "concurrency4_speedup_range": [round(min(speedups), 3), round(max(speedups), 3)]}


def run_concurrency(args) -> dict:
    """Aggregate tok/s of N concurrent streams through the daemon's worker queue, against one stream."""
    import threading

    from edgellm.daemon.serve.replies import TextDelta
    from edgellm.daemon.serve.requests import GenerateRequest
    from edgellm.daemon.serve.served import ServedModels, load_served
    from edgellm.daemon.serve.settings import Settings
    from edgellm.daemon.serve.stats import Stats
    from edgellm.daemon.serve.worker import Job, Worker

    settings = Settings(model={"path": args.model, "threads": args.threads, "prefix_cache_mb": 0,
                               "batch_size": args.batch_size})
    worker = Worker(ServedModels(load_served(settings)), Stats(), 64, 4096, concurrency=args.batch_size)
    worker.start()

    class Sink:
        def __init__(self):
            self.done, self.event = threading.Event(), None

        def send(self, _request_id, event):
            if not isinstance(event, TextDelta):
                self.event = event
                self.done.set()

    def measure(n: int) -> tuple[int, float]:
        sinks = [Sink() for _ in range(n)]
        start = time.perf_counter()
        for i, sink in enumerate(sinks):
            worker.submit(Job("generate", GenerateRequest(prompt=STORY.format(i=i), raw=True, ignore_eos=True,
                                                          max_tokens=args.new_tokens, temperature=0),
                              f"c{n}-{i}-{time.time()}", sink))
        for sink in sinks:
            sink.done.wait()
        return sum(s.event.reply.result.usage.completion_tokens for s in sinks), time.perf_counter() - start

    return aggregate_rates(measure, args.new_tokens)


def run_concurrency_llamacpp(args) -> dict:
    """llama-cpp-python's Llama holds one sequence: concurrent requests are served one after another
    (llama.cpp's own server can batch with parallel slots; the Python binding we anchor on cannot)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024,
                n_batch=512, verbose=False)
    eos = llm.token_eos()

    def one(prompt: str) -> int:
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=False))
        for _ in range(args.new_tokens - 1):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
            logits[eos] = -np.inf
            llm.eval([int(np.argmax(logits))])
        return args.new_tokens

    def measure(n: int) -> tuple[int, float]:
        start = time.perf_counter()
        tokens = sum(one(STORY.format(i=i)) for i in range(n))
        return tokens, time.perf_counter() - start

    return aggregate_rates(measure, args.new_tokens)


def run_concurrency_genai(args) -> dict:
    """onnxruntime-genai's static batching: n prompts in one generator, run until all are done."""
    import numpy as np
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    config = og.Config(args.model)
    config.clear_providers()
    model = og.Model(config)
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")

    def measure(n: int) -> tuple[int, float]:
        ids = np.array([tok.encode(STORY.format(i=i)).ids for i in range(n)], dtype=np.int32)
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        length = ids.shape[1] + args.new_tokens
        params.set_search_options(batch_size=n, max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        seconds = time.perf_counter() - start
        return sum(len(gen.get_sequence(i)) - ids.shape[1] for i in range(n)), seconds

    return aggregate_rates(measure, args.new_tokens)


def run_genai(args) -> dict:
    import onnxruntime_genai as og

    t = time.perf_counter()
    config = og.Config(args.model)
    config.clear_providers()
    model = og.Model(config)
    load_s = time.perf_counter() - t
    # The same ids as the other engines: genai's own tokenizer splits this tokenizer.json differently.
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(f"{args.model}/tokenizer.json").encode(open(args.prompt_file).read()).ids
    rounds = []
    for _ in range(args.rounds):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + args.new_tokens + 8, do_sample=False)
        gen = og.Generator(model, params)

        def prefill(gen=gen):
            gen.append_tokens(ids)
            gen.generate_next_token()
            return int(gen.get_next_tokens()[0])

        def step(_token, gen=gen):
            gen.generate_next_token()
            return int(gen.get_next_tokens()[0])

        rounds.append(one_round(prefill, step, len(ids), args.new_tokens))
        del gen
    return summarize(rounds, len(ids), load_s)


def build_genai(args) -> dict:
    """int4 by onnxruntime-genai's own builder, from the same (dequantized GGUF) weights saved as a HF folder."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", args.hf, "-o", args.out,
                        "-p", "int4", "-e", "cpu", "-c", cache], check=True, capture_output=True)
    return {"built": args.out}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["edgellm", "edgellm-prefix", "scheduler", "llamacpp", "genai", "genai-build",
                                      "bandwidth", "concurrency", "concurrency-llamacpp", "concurrency-genai",
                                      "speculative", "llamacpp-tasks", "serving-memory"])
    p.add_argument("--ppl-file", help="llamacpp: also measure perplexity on this text")
    p.add_argument("--model")
    p.add_argument("--prompt-file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="concurrency: the daemon's model.batch_size")
    p.add_argument("--hf", help="a Hugging Face model folder")
    p.add_argument("--out")
    p.add_argument("--tasks-file", help="llamacpp-tasks: the prompts edgellm ran (bench_speculative.py writes it)")
    p.add_argument("--requests", type=int, default=40, help="serving-memory: requests answered")
    args = p.parse_args()
    run = {"edgellm": run_edgellm, "edgellm-prefix": run_edgellm_prefix, "scheduler": run_scheduler,
           "llamacpp": run_llamacpp,
           "genai": run_genai, "genai-build": build_genai, "bandwidth": run_bandwidth,
           "concurrency": run_concurrency, "concurrency-llamacpp": run_concurrency_llamacpp,
           "concurrency-genai": run_concurrency_genai, "speculative": run_speculative,
           "llamacpp-tasks": run_llamacpp_tasks, "serving-memory": run_serving_memory}
    print(json.dumps(run[args.engine](args)))


if __name__ == "__main__":
    main()
