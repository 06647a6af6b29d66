"""llama.cpp as a reference point for the decode benchmarks (benchmark only: never a dependency of seqlab).

llama.cpp is reached through `llama-cpp-python`, installed in an interpreter of its own (it builds llama.cpp from
source, about 20 minutes on a 2-core machine), so that seqlab's environment never holds it:

    python -m venv /tmp/llamavenv && /tmp/llamavenv/bin/pip install llama-cpp-python
    python benchmarks/bench_pretrained.py --llama-cpp-python /tmp/llamavenv/bin/python

`LlamaCpp(python, gguf)` starts this file as a worker under that interpreter and keeps it for the whole benchmark,
so the model is loaded once and each decode can be timed between seqlab's and transformers' runs (alternating in
one benchmark run). The worker decodes greedily by hand (argmax of the last logits, one `eval` per token) from a
prompt of token ids, so it runs the same token sequence protocol as `seqlab.generate(..., stop_at_eos=False)`:
the prompt in one batch, then `new_tokens` single-token steps. It times itself (wall and its own CPU time) around
the prompt and the steps, the model load excluded. llama.cpp runs the file's own quantized weights (Q4_1 and Q8_0
for SmolLM2), not a dequantized copy, so its greedy tokens may part from an fp32 model's: the benchmark records how
many of the first tokens agree rather than requiring them equal.

Protocol: one JSON object per line in each direction.
    request  {"threads": 1, "prompt": [ids], "new_tokens": 128}
    answer   {"tokens": [new ids], "wall_s": ..., "cpu_s": ..., "llama_cpp_python": version} or {"error": "..."}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


class LlamaCpp:
    """A llama.cpp worker process on `gguf` under `python` (an interpreter that has llama-cpp-python)."""

    def __init__(self, python: str, gguf: str):
        self.gguf = gguf
        self.proc = subprocess.Popen([python, __file__, str(gguf)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        hello = self._read()
        if "error" in hello:
            self.close()
            raise RuntimeError(f"llama.cpp worker under {python}: {hello['error']}")
        self.version = hello["llama_cpp_python"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker exited (code {self.proc.poll()})")
        return json.loads(line)

    def decode(self, prompt: list[int], new_tokens: int, threads: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens, "threads": threads}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"llama.cpp worker: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _worker(gguf: str) -> None:  # runs under the llama-cpp-python interpreter: no torch, no seqlab here
    try:
        import llama_cpp
        import numpy as np
    except ImportError as e:
        print(json.dumps({"error": f"cannot import llama_cpp ({e}): pip install llama-cpp-python there"}), flush=True)
        return
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__}), flush=True)
    models: dict[int, llama_cpp.Llama] = {}
    for line in sys.stdin:
        req = json.loads(line)
        try:
            t = int(req["threads"])
            if t not in models:  # one context per thread count, loaded once (the file is ~100 MB)
                models[t] = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_batch=512, n_threads=t,
                                            n_threads_batch=t, logits_all=False, verbose=False)
            llm = models[t]
            llm.reset()
            out = []
            wall, cpu = time.perf_counter(), time.process_time()
            llm.eval(list(req["prompt"]))
            n, vocab = int(req["new_tokens"]), llm.n_vocab()
            for i in range(n):
                # the last position's logits, read from the context (llama-cpp-python keeps `scores` only with
                # logits_all=True, which would copy every position's logits)
                tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
                out.append(tok)
                if i + 1 < n:  # the last token is not fed back: prompt + (n - 1) steps, as seqlab.generate
                    llm.eval([tok])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(json.dumps({"tokens": out, "wall_s": wall, "cpu_s": cpu}), flush=True)
        except Exception as e:  # one bad request is reported, not a dead worker
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
