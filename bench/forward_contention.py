"""How much a busy event loop slows a forward running in another thread of the same process.

    python bench/forward_contention.py [--texts 40] [--repeat 10]

The server runs each forward on a thread beside the event loop. This times one
all-MiniLM-L6-v2 forward of ``--texts`` short texts (torch threads 1 and 2) alone, and
while a second Python thread holds the GIL half of the time (as a loaded event loop does),
for the library's own forward and for a TorchScript trace of its transformer (which runs
without taking the GIL between operations). Prints milliseconds per forward.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import offline_workdir, place_minilm  # noqa: E402

offline_workdir("ingrain-contention-")


def busy_python(stop: threading.Event, duty_s: float = 0.002) -> None:
    """Hold the GIL for ``duty_s``, sleep for ``duty_s``, until stopped."""
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < duty_s:
            pass
        time.sleep(duty_s)


def ms_per_call(fn, repeat: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(place_minilm(), device="cpu")
    features = model.preprocess([f"the cat jumps over item number {i}" for i in range(args.texts)])
    ids, mask, types = features["input_ids"], features["attention_mask"], features["token_type_ids"]

    class Transformer(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

    with torch.inference_mode():
        traced = torch.jit.trace(Transformer(model[0].auto_model).eval(), (ids, mask, types),
                                 strict=False, check_trace=False)

    def library() -> None:
        with torch.inference_mode():
            model(dict(features))

    def torchscript() -> None:
        with torch.inference_mode():
            traced(ids, mask, types)

    print(f"{'forward':12s} {'threads':>7s} {'alone ms':>9s} {'busy loop ms':>13s} {'slowdown':>9s}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, fn in (("library", library), ("torchscript", torchscript)):
            alone = ms_per_call(fn, args.repeat)
            stop = threading.Event()
            other = threading.Thread(target=busy_python, args=(stop,))
            other.start()
            try:
                loaded = ms_per_call(fn, args.repeat)
            finally:
                stop.set()
                other.join()
            print(f"{name:12s} {threads:7d} {alone:9.1f} {loaded:13.1f} {loaded / alone:8.2f}x")


if __name__ == "__main__":
    main()
